"""Figures of the ``perturbation`` task (Agg backend; each function writes one PNG and returns its path)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

COLOURS = {"scGPT": "tab:red", "scGPT random init": "tab:orange", "linear (PCA)": "tab:blue",
           "linear (scGPT emb.)": "tab:purple",
           "train mean": "tab:green", "no change": "tab:gray"}


def plot_delta_de(data, test: list[str], preds: dict[str, np.ndarray], ctrl: np.ndarray, path: Path,
                  n_show: int = 4) -> Path:
    """Predicted vs observed change (vs control) on the DE genes, for the first ``n_show`` test
    perturbations of a split: observed as black bars, each method as coloured markers."""
    show = test[:n_show]
    fig, axes = plt.subplots(len(show), 1, figsize=(9, 2.6 * len(show)), squeeze=False)
    for ax, pert in zip(axes[:, 0], show):
        i = test.index(pert)
        de = data.de_genes[pert]
        obs = data.expr[data.cells_of(pert)].mean(axis=0) - ctrl
        x = np.arange(de.size)
        ax.bar(x, obs[de], color="black", alpha=0.25, label="observed")
        for method, pred in preds.items():
            if method == "no change":
                continue
            ax.scatter(x, pred[i][de] - ctrl[de], s=14, color=COLOURS.get(method), label=method, zorder=3)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x, [data.genes[j] for j in de], rotation=70, fontsize=6)
        ax.set_ylabel("Δ log1p(CP10k)", fontsize=7)
        ax.set_title(f"{pert}: change on its top-{de.size} DE genes", fontsize=8)
    axes[0, 0].legend(fontsize=6, ncol=5, loc="upper right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_perturbation(per_pert: pd.DataFrame, path: Path) -> Path:
    """corr(Δ) on the DE genes per test perturbation (mean over the splits that held it out), scGPT
    beside the baselines; the no-change baseline has no corr(Δ) and is left out."""
    df = per_pert[per_pert["method"] != "no change"]
    tab = df.pivot_table(index="perturbation", columns="method", values="pearson_delta_de", aggfunc="mean")
    tab = tab.sort_values(tab.columns[0] if "scGPT" not in tab else "scGPT")
    methods = list(tab.columns)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tab) + 2), 3.6))
    w = 0.8 / max(len(methods), 1)
    x = np.arange(len(tab))
    for k, m in enumerate(methods):
        ax.bar(x + (k - (len(methods) - 1) / 2) * w, tab[m].to_numpy(), width=w, color=COLOURS.get(m), label=m)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, tab.index, rotation=70, fontsize=7)
    ax.set_ylabel("corr(Δ), top-20 DE genes", fontsize=8)
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=6, ncol=len(methods), loc="lower right", frameon=False)
    ax.set_title("unseen perturbations: corr(Δ) on DE genes (mean over the splits holding each out)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
