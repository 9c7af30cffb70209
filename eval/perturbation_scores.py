"""Unseen-perturbation splits, the perturbation metrics (supplement S.2 as the issue defines them)
and the model-free baselines of the ``perturbation`` task.

Metrics, per held-out perturbation, on the mean predicted profile against the mean observed one
(log1p(CP10k), measured genes only): Pearson on all genes (``pearson``); Pearson of the changes
after subtracting the control mean (``pearson_delta``, corr(Δ)); both on the perturbation's top-20
DE genes (``pearson_de``, ``pearson_delta_de``); the MSE on the DE genes (``mse_de``); the share of DE
genes whose predicted change has the observed sign (``direction_de``; a prediction of no change
gets none right). A correlation with a constant vector (the no-change baseline's corr(Δ)) is
undefined: it is ``None`` per perturbation and never enters a mean as 0 or NaN.

Baselines, on the same splits: *no change* (the control mean); *train mean* (control mean + the
mean change over the training perturbations); *linear* in the manner of Ahlmann-Eltze et al.
(Nat. Methods 2025): gene embeddings G from a PCA of the training pseudobulk (genes x training
conditions), the training changes fitted as Y ≈ G W Pᵀ + b by ridge regression, where a
perturbation's embedding P is the gene embedding of its target (summed over two targets); an
unseen target is placed through its gene embedding, and a target without one (not measured)
gets a zero embedding, i.e. the fitted offset b: (close to) the training mean. *linear (scGPT emb.)*
is the same model where an unmeasured target gets an embedding after all: the pretrained model's
token embedding of the target (every kept target is in the vocabulary), mapped into the PCA
gene-embedding space by a ridge regression fitted on the measured genes (which have both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("pearson", "pearson_delta", "pearson_de", "pearson_delta_de", "mse_de", "direction_de")
LINEAR_DIM = 10  # Ahlmann-Eltze et al.: PCA dimension 10
LINEAR_RIDGE = 0.1  # Ahlmann-Eltze et al.: ridge penalty 0.1
EMB_RIDGE = 1.0  # ridge of the map from pretrained token embeddings to the PCA gene embeddings


# ------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Perturbations of one split seed; no training cell carries a validation or test perturbation."""

    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    subgroup: dict[str, str] = field(default_factory=dict)  # held-out perturbation -> "single", "combo_seen0/1/2"


def _subgroups(held: list[str], train: list[str], targets: dict[str, tuple[str, ...]]) -> dict[str, str]:
    seen = {g for p in train for g in targets[p]}
    return {p: "single" if len(targets[p]) == 1 else f"combo_seen{sum(g in seen for g in targets[p])}"
            for p in held}


def make_split(targets: dict[str, tuple[str, ...]], seed: int, test_fraction: float = 0.2,
               val_fraction: float = 0.1) -> Split:
    """One unseen-perturbation split (at least one perturbation in each part).

    One-gene data: the perturbations are shuffled and cut. Two-gene data (GEARS' simulation split):
    a share of the genes is held out; their single perturbations and every combination containing
    one of them are held out (0 or 1 of the genes seen in training), and a share of the combinations
    of two seen genes as well (2 of 2 seen); validation is drawn from the held-out ones. The subgroup
    of each held-out combination is how many of its genes occur in the training perturbations.
    """
    rng = np.random.default_rng(seed)
    perts = sorted(targets)
    n = len(perts)
    assert n >= 3, "a split needs at least 3 perturbations"
    combos = [p for p in perts if len(targets[p]) > 1]
    if not combos:
        return _plain(targets, rng, test_fraction, val_fraction, seed)
    genes = sorted({g for p in perts for g in targets[p]})
    gorder = [genes[i] for i in rng.permutation(len(genes))]
    held_genes = set(gorder[:max(1, int(round(test_fraction * len(genes))))])
    held = [p for p in perts if any(g in held_genes for g in targets[p])]
    both_seen = [p for p in combos if p not in held]
    k = int(round(test_fraction * len(both_seen)))
    held += [both_seen[i] for i in rng.permutation(len(both_seen))[:k]]
    train = [p for p in perts if p not in set(held)]
    if len(train) < 1 or len(held) < 2:  # degenerate draw on tiny data: fall back to a plain cut
        return _plain(targets, rng, test_fraction, val_fraction, seed)
    held = [held[i] for i in rng.permutation(len(held))]
    n_val = min(max(1, int(round(val_fraction / (test_fraction + val_fraction) * len(held)))), len(held) - 1)
    val, test = held[:n_val], held[n_val:]
    train, val, test = sorted(train), sorted(val), sorted(test)
    return Split(seed, train, val, test, _subgroups(val + test, train, targets))


def _plain(targets, rng, test_fraction, val_fraction, seed) -> Split:
    perts = sorted(targets)
    order = [perts[i] for i in rng.permutation(len(perts))]
    n_test = min(max(1, int(round(test_fraction * len(perts)))), len(perts) - 2)
    n_val = min(max(1, int(round(val_fraction * len(perts)))), len(perts) - 1 - n_test)
    test, val, train = sorted(order[:n_test]), sorted(order[n_test:n_test + n_val]), sorted(order[n_test + n_val:])
    return Split(seed, train, val, test, _subgroups(val + test, train, targets))


# ------------------------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation; None when either side is constant (undefined, not 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((a * a).sum()), np.sqrt((b * b).sum())
    if na < 1e-12 or nb < 1e-12:  # a constant side (float32 means: 1e-12 is far below any real spread)
        return None
    return float(np.clip((a * b).sum() / (na * nb), -1.0, 1.0))


def scores(pred: np.ndarray, obs: np.ndarray, ctrl: np.ndarray, de: np.ndarray) -> dict[str, float | None]:
    """The six metrics of one perturbation. pred/obs/ctrl: (G,) mean profiles; de: (k,) DE columns."""
    pred, obs, ctrl = (np.asarray(x, np.float64) for x in (pred, obs, ctrl))
    dp, do = pred - ctrl, obs - ctrl
    de = np.asarray(de, dtype=np.int64)
    sign_p, sign_o = np.sign(dp[de]), np.sign(do[de])
    return {"pearson": pearson(pred, obs), "pearson_delta": pearson(dp, do),
            "pearson_de": pearson(pred[de], obs[de]), "pearson_delta_de": pearson(dp[de], do[de]),
            "mse_de": float(np.mean((pred[de] - obs[de]) ** 2)),
            "direction_de": float(np.mean((sign_p == sign_o) & (sign_o != 0))) if de.size else None}


def mean_defined(values) -> float:
    """Mean over the defined values; NaN (shown as "undefined") when none is defined."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


# ------------------------------------------------------------------------------------------------
def no_change(ctrl: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(ctrl[None, :], n, axis=0)


def train_mean(ctrl: np.ndarray, train_means: np.ndarray, n: int) -> np.ndarray:
    """Control mean + the mean change over the training perturbations, for each of ``n`` perturbations."""
    delta = (train_means - ctrl[None, :]).mean(axis=0)
    return np.repeat((ctrl + delta)[None, :], n, axis=0)


def embedding_map(gene_emb: np.ndarray, A: np.ndarray, ridge: float = EMB_RIDGE):
    """A ridge map from pretrained token embeddings to the PCA gene embeddings, fitted on the measured
    genes (rows of ``gene_emb`` and ``A`` are the same genes); returns a function (d,) -> (k,)."""
    E = np.asarray(gene_emb, np.float64)
    me, ma = E.mean(axis=0), A.mean(axis=0)
    Ec = E - me
    M = np.linalg.solve(Ec.T @ Ec + ridge * np.eye(E.shape[1]), Ec.T @ (A - ma))
    return lambda e: (np.asarray(e, np.float64) - me) @ M + ma


def linear_baseline(ctrl: np.ndarray, train_means: np.ndarray, train_cols: list[list[int]],
                    test_cols: list[list[int]], dim: int = LINEAR_DIM, ridge: float = LINEAR_RIDGE, *,
                    gene_emb: np.ndarray | None = None, train_ext: list[list[np.ndarray]] | None = None,
                    test_ext: list[list[np.ndarray]] | None = None) -> np.ndarray:
    """Ahlmann-Eltze et al.'s linear model. ``train_means`` (n_train, G) pseudobulk profiles;
    ``*_cols``: per perturbation, the columns of its measured target genes ([] = no embedding).
    With ``gene_emb`` (G, d), the pretrained token embeddings of the G measured genes, a target that
    is not measured is placed too: ``*_ext`` hold, per perturbation, the pretrained embeddings of its
    unmeasured targets, mapped into the PCA gene-embedding space by :func:`embedding_map`.
    Returns (n_test, G) predicted mean profiles."""
    X = np.vstack([ctrl[None, :], train_means]).T.astype(np.float64)  # (G, 1 + n_train): control included
    Xc = X - X.mean(axis=0, keepdims=True)  # PCA of the genes (rows), conditions centred
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    k = min(dim, S.size)
    A = U[:, :k] * S[:k]  # (G, k) gene embeddings
    to_pca = embedding_map(gene_emb, A) if gene_emb is not None else None

    def emb(cols: list[int], ext: list[np.ndarray]) -> np.ndarray:
        e = A[cols].sum(axis=0) if cols else np.zeros(k)
        if to_pca is not None:
            for v in ext:
                e = e + to_pca(v)
        return e

    tr_ext = train_ext or [[] for _ in train_cols]
    te_ext = test_ext or [[] for _ in test_cols]
    B = np.stack([np.zeros(k)] + [emb(c, x) for c, x in zip(train_cols, tr_ext)], axis=1)  # (k, 1 + n_train)
    Y = X - ctrl[:, None]  # (G, 1 + n_train) changes; the control's is 0
    center = Y.mean(axis=1, keepdims=True)
    Yc = Y - center
    I = np.eye(k)
    W = np.linalg.solve(A.T @ A + ridge * I, A.T @ Yc @ B.T) @ np.linalg.inv(B @ B.T + ridge * I)
    P = (np.stack([emb(c, x) for c, x in zip(test_cols, te_ext)], axis=1) if test_cols
         else np.zeros((k, 0)))  # (k, n_test)
    return (A @ W @ P + center + ctrl[:, None]).T.astype(np.float32)
