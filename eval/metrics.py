"""Scores with the paper's definitions (supplement S.2).

Annotation (S.2.2): Accuracy, Precision and Recall "calculated globally" (micro averages over
all cells, as scikit-learn computes them with ``average='micro'``), MacroF1 averaged per cell
type; the macro precision/recall are reported beside them because, for single-label data,
the global ones coincide with accuracy. Normalized confusion matrix: rows are true types,
each row sums to 1.

Integration / embedding (S.2.1, Luecken et al.): scib 1.1.7 functions, called directly.
NMI_cell and ARI_cell on the Leiden clustering (resolutions 0.1..2.0 step 0.1) with the best
NMI; ASW_cell = (ASW + 1) / 2 (``scib.metrics.silhouette``, scale=True); ASW_batch =
1 - |ASW| per cell and cell type (``scib.metrics.silhouette_batch``); graph connectivity on the
kNN graph of the embedding. AvgBIO = mean(NMI, ARI, ASW_cell), AvgBATCH = mean(ASW_batch,
GraphConn), Overall = 0.6 AvgBIO + 0.4 AvgBATCH.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# S.2.1: "resolutions ranging from 0.1 to 2, with increments of 0.1"
RESOLUTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))
N_NEIGHBORS = 15  # scanpy / scib default kNN size


def classification_scores(y_true, y_pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    kw = {"zero_division": 0}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, average="micro", **kw)),
        "recall": float(recall_score(y_true, y_pred, average="micro", **kw)),
        # macro over the true types only: a predicted type absent from the query is not a class
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), **kw)),
        "precision_macro": float(precision_score(y_true, y_pred, average="macro",
                                                 labels=np.unique(y_true), **kw)),
        "recall_macro": float(recall_score(y_true, y_pred, average="macro",
                                           labels=np.unique(y_true), **kw)),
    }


def normalized_confusion(y_true, y_pred, labels=None) -> pd.DataFrame:
    """Rows: true type, columns: predicted type; each row sums to 1 (0 for an empty row)."""
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for t, p in zip(y_true, y_pred):
        m[index[t], index[p]] += 1
    rows = m.sum(axis=1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    return pd.DataFrame(m, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted"))


def knn_transfer(ref_emb: np.ndarray, ref_labels, query_emb: np.ndarray, k: int = 10) -> np.ndarray:
    """Label transfer: majority vote of the k nearest reference cells (cosine), ties -> nearest."""
    from sklearn.neighbors import NearestNeighbors

    ref_labels = np.asarray(ref_labels).astype(str)
    k = min(k, ref_emb.shape[0])
    nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(ref_emb)
    _, idx = nn.kneighbors(query_emb)  # (n_query, k), nearest first
    out = np.empty(idx.shape[0], dtype=object)
    for i, row in enumerate(idx):
        labs = ref_labels[row]
        uniq, counts = np.unique(labs, return_counts=True)
        best = uniq[counts == counts.max()]
        # among tied labels, the one whose first occurrence is nearest wins
        out[i] = next(lab for lab in labs if lab in set(best))
    return out.astype(str)


def embedding_adata(emb: np.ndarray, labels, batches=None, *, n_neighbors: int = N_NEIGHBORS,
                    seed: int = 0) -> ad.AnnData:
    """An AnnData holding the embedding in ``obsm['X_emb']`` and its kNN graph (scanpy)."""
    import scanpy as sc

    a = ad.AnnData(X=np.zeros((emb.shape[0], 1), dtype=np.float32))
    a.obsm["X_emb"] = np.asarray(emb, dtype=np.float32)
    a.obs["label"] = pd.Categorical(np.asarray(labels).astype(str))
    if batches is not None:
        a.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=n_neighbors, random_state=seed)
    return a


def _leiden(adata, resolution, key_added, **_):
    import scanpy as sc

    # igraph flavour: the fast, deterministic implementation scanpy recommends
    sc.tl.leiden(adata, resolution=resolution, key_added=key_added, flavor="igraph",
                 n_iterations=2, directed=False, random_state=0)


_leiden.__name__ = "leiden"


def bio_scores(a: ad.AnnData, resolutions: tuple[float, ...] = RESOLUTIONS) -> dict[str, float]:
    """NMI_cell, ARI_cell (best-NMI Leiden clustering), ASW_cell = (ASW+1)/2, AvgBIO."""
    import scib

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scib prints per resolution; pandas/anndata warn
        scib.metrics.cluster_optimal_resolution(a, label_key="label", cluster_key="cluster",
                                                cluster_function=_leiden, resolutions=list(resolutions),
                                                force=True, verbose=False)
        nmi = scib.metrics.nmi(a, "cluster", "label")
        ari = scib.metrics.ari(a, "cluster", "label")
        asw = scib.metrics.silhouette(a, label_key="label", embed="X_emb")
    out = {"NMI_cell": float(nmi), "ARI_cell": float(ari), "ASW_cell": float(asw)}
    out["AvgBIO"] = float(np.mean([out["NMI_cell"], out["ARI_cell"], out["ASW_cell"]]))
    return out


def batch_scores(a: ad.AnnData) -> dict[str, float]:
    """ASW_batch = 1 - |ASW| (per cell type, scib), graph connectivity, AvgBATCH."""
    import scib

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asw_b = scib.metrics.silhouette_batch(a, batch_key="batch", label_key="label", embed="X_emb",
                                              verbose=False)
        gc = scib.metrics.graph_connectivity(a, label_key="label")
    out = {"ASW_batch": float(asw_b), "GraphConn": float(gc)}
    out["AvgBATCH"] = float(np.mean([out["ASW_batch"], out["GraphConn"]]))
    return out


def integration_scores(emb: np.ndarray, labels, batches=None, *, seed: int = 0,
                       resolutions: tuple[float, ...] = RESOLUTIONS,
                       n_neighbors: int = N_NEIGHBORS) -> dict[str, float]:
    """All S.2.1 scores for one embedding; batch scores only when there are >= 2 batches."""
    a = embedding_adata(emb, labels, batches, seed=seed, n_neighbors=min(n_neighbors, emb.shape[0] - 1))
    out = bio_scores(a, resolutions)
    if batches is not None and len(set(np.asarray(batches))) >= 2:
        out.update(batch_scores(a))
        out["Overall"] = 0.6 * out["AvgBIO"] + 0.4 * out["AvgBATCH"]
    return out
