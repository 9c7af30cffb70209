"""Simple baselines scored on the same split as the model, so every table has a yardstick.

* annotation: logistic regression on PCA of log-normalized HVGs (PCA fit on the reference);
* integration / zero-shot: PCA of log-normalized HVGs, and Harmony (Korsunsky et al. 2019,
  ``harmonypy``) on that PCA;
* gene networks: a co-expression network (Pearson correlation of log-normalized expression
  across cells), scored exactly like the embedding cosine network.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

log = logging.getLogger(__name__)

N_PCS = 50  # scanpy's default number of components


def _scale(X: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """Gene-wise z-score clipped at 10 (scanpy ``pp.scale(max_value=10)``)."""
    mean = X.mean(axis=0) if mean is None else mean
    std = X.std(axis=0) if std is None else std
    std = np.where(std > 0, std, 1.0)
    return np.clip((X - mean) / std, -10, 10), mean, std


def pca_embedding(logX: np.ndarray, n_comps: int = N_PCS, seed: int = 0) -> np.ndarray:
    """(n_cells, n_comps) PCA of the scaled log-normalized matrix."""
    from sklearn.decomposition import PCA

    Z, _, _ = _scale(logX)
    n_comps = max(1, min(n_comps, Z.shape[0] - 1, Z.shape[1] - 1))
    return PCA(n_components=n_comps, svd_solver="full", random_state=seed).fit_transform(Z).astype(np.float32)


def harmony_embedding(pcs: np.ndarray, batches, seed: int = 0) -> np.ndarray:
    """Harmony-corrected PCs (n_cells, n_comps); batches are the covariate to remove."""
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    with contextlib.redirect_stdout(io.StringIO()):
        ho = harmonypy.run_harmony(np.asarray(pcs, dtype=np.float64), meta, ["batch"],
                                   random_state=seed, verbose=False)
    Z = np.asarray(ho.Z_corr)
    # harmonypy returns (n_comps, n_cells) in the releases we know; accept either layout
    if Z.shape[0] != pcs.shape[0]:
        Z = Z.T
    assert Z.shape == pcs.shape, (Z.shape, pcs.shape)
    return Z.astype(np.float32)


def logreg_annotation(train_logX: np.ndarray, train_y, test_logX: np.ndarray, *,
                      n_comps: int = N_PCS, seed: int = 0) -> np.ndarray:
    """Predicted labels of the test cells: PCA (fit on train) -> multinomial logistic regression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    Ztr, mean, std = _scale(train_logX)
    Zte, _, _ = _scale(test_logX, mean, std)
    n_comps = max(1, min(n_comps, Ztr.shape[0] - 1, Ztr.shape[1] - 1))
    pca = PCA(n_components=n_comps, svd_solver="full", random_state=seed).fit(Ztr)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(pca.transform(Ztr), np.asarray(train_y).astype(str))
    return clf.predict(pca.transform(Zte)).astype(str)


def coexpression_similarity(logX: np.ndarray) -> np.ndarray:
    """(n_genes, n_genes) Pearson correlation across cells; constant genes get 0."""
    X = logX - logX.mean(axis=0)
    norm = np.linalg.norm(X, axis=0)
    norm[norm == 0] = np.inf
    X = X / norm
    C = X.T @ X
    np.fill_diagonal(C, 1.0)
    return C.astype(np.float32)
