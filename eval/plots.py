"""Figures logged with every evaluation: UMAPs, confusion matrices, gene networks.

Matplotlib with the Agg backend (no display); each function writes one PNG and returns its path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger(__name__)


def umap_coords(emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n_cells, 2) UMAP of an embedding (scanpy: kNN graph then ``tl.umap``, seeded)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=np.zeros((emb.shape[0], 1), dtype=np.float32))
    a.obsm["X_emb"] = np.asarray(emb, dtype=np.float32)
    sc.pp.neighbors(a, use_rep="X_emb", random_state=seed)
    sc.tl.umap(a, random_state=seed)
    return np.asarray(a.obsm["X_umap"])


def _scatter(ax, xy: np.ndarray, values, title: str) -> None:
    values = np.asarray(values).astype(str)
    cats = sorted(set(values))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, c in enumerate(cats):
        m = values == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(i % cmap.N), label=c, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def plot_umap(emb: np.ndarray, labels, batches, path: Path, title: str, seed: int = 0) -> Path:
    """UMAP coloured by cell type and, when there are batches, by batch."""
    xy = umap_coords(emb, seed)
    n = 2 if batches is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    _scatter(axes[0, 0], xy, labels, f"{title}: cell type")
    if batches is not None:
        _scatter(axes[0, 1], xy, batches, f"{title}: batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: pd.DataFrame, path: Path, title: str) -> Path:
    """Heat map of a row-normalized confusion matrix (rows: true type)."""
    n = max(cm.shape)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.45 * n))
    im = ax.imshow(cm.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(cm.shape[1]), cm.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(cm.shape[0]), cm.index, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            v = cm.iat[i, j]
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gene_network(sim: np.ndarray, genes: list[str], focus: list[str], threshold: float,
                      path: Path, title: str) -> Path:
    """The thresholded similarity network among ``focus`` genes (e.g. HLA genes and CD8A's
    neighbours), on a circle, edge width by similarity."""
    idx = [genes.index(g) for g in focus if g in genes]
    fig, ax = plt.subplots(figsize=(6, 6))
    n = len(idx)
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    xy = np.c_[np.cos(ang), np.sin(ang)]
    for a in range(n):
        for b in range(a + 1, n):
            s = float(sim[idx[a], idx[b]])
            if s > threshold:
                lw = 0.5 + 3 * (s - threshold) / max(1e-6, 1 - threshold)
                ax.plot(*xy[[a, b]].T, color="tab:blue", alpha=0.6, lw=lw)
    def colour(g: str) -> str:
        return "tab:red" if g.startswith("HLA-D") else "tab:green" if g.startswith("HLA-") else "tab:gray"

    colors = [colour(genes[i]) for i in idx]
    ax.scatter(xy[:, 0], xy[:, 1], s=60, c=colors, zorder=3)
    for k, i in enumerate(idx):
        ax.text(1.12 * xy[k, 0], 1.12 * xy[k, 1], genes[i], ha="center", va="center", fontsize=7)
    ax.set_title(f"{title}\n(edges: similarity > {threshold}; red HLA class II, green class I)", fontsize=9)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
