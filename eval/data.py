"""Dataset loading and preparation shared by every evaluation task.

Steps (paper §4.5): raw counts checked -> genes matched to the vocabulary (report) ->
optional cell subsample -> HVGs selected among the matched genes (1,200 for integration,
3,000 for annotation) -> per-cell binning with the model package's token contract.
Everything downstream (fine-tuning, embeddings, baselines) reads one ``PreparedData``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.errors import EvalError
from eval.genes import DATA_DIR, GeneMatch, match_genes
from scgpt_model.schema import DEFAULT_N_BINS
from scgpt_model.vocab import GeneVocab
from shardset.counts import NEGATIVE, NONFINITE, first_bad_count

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShippedDataset:
    file: str
    label_key: str
    batch_key: str | None
    # reference/query split for cross-batch annotation: these batches are the query
    query_batches: tuple[str, ...] = ()


SHIPPED: dict[str, ShippedDataset] = {
    "pbmc3k": ShippedDataset("pbmc3k_counts_celltype.h5ad", label_key="celltype", batch_key=None),
    # 10x 3' v1 / 3' v2 are the reference, 5' the query (a chemistry shift, as in the paper's
    # cross-study annotation benchmarks)
    "symphony": ShippedDataset("symphony_pbmc_3batch_counts.h5ad", label_key="celltype",
                               batch_key="batch", query_batches=("5p",)),
}


def resolve_dataset(spec: str) -> tuple[str, Path, ShippedDataset | None]:
    """A shipped name (``pbmc3k``, ``symphony``) or an ``.h5ad`` path -> (name, path, defaults)."""
    if spec in SHIPPED:
        meta = SHIPPED[spec]
        return spec, DATA_DIR / meta.file, meta
    path = Path(spec)
    if not path.exists():
        raise EvalError(f"dataset {spec!r} is neither a shipped dataset ({', '.join(SHIPPED)}) "
                        "nor an existing .h5ad file; pass one of those names or a path to an .h5ad")
    if path.suffix != ".h5ad":
        raise EvalError(f"dataset {spec!r} is not an .h5ad file; convert it with anndata first")
    return path.stem, path, None


def load_dataset(spec: str) -> tuple[str, ad.AnnData, ShippedDataset | None]:
    name, path, meta = resolve_dataset(spec)
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for a broken file
        raise EvalError(f"could not read {path} as AnnData ({type(e).__name__}: {e})") from e
    return name, adata, meta


def check_counts(adata: ad.AnnData, name: str) -> None:
    """Raw counts (``shardset.counts``, the rule ingest applies): finite, non-negative,
    integer-valued, every value checked. Log-normalized input is refused."""
    X = adata.X
    if X is None:
        raise EvalError(f"dataset {name} has no X matrix; put raw counts in X")
    try:
        bad = first_bad_count(X.data if sp.issparse(X) else np.asarray(X))
    except TypeError as e:
        raise EvalError(f"dataset {name}: X is not numeric ({e}); put raw counts in X") from None
    if bad is None:
        return
    hint = (" It has adata.layers['counts']: set adata.X = adata.layers['counts'] and save it again."
            if "counts" in adata.layers else "")
    if bad.kind == NONFINITE:
        raise EvalError(f"dataset {name} has non-finite values (NaN/inf) in X; pass raw counts.{hint}")
    if bad.kind == NEGATIVE:
        raise EvalError(f"dataset {name} has negative values in X (e.g. {bad.value:.4g}; scaled data?); "
                        f"pass raw counts.{hint}")
    raise EvalError(
        f"dataset {name} has non-integer values in X (e.g. {bad.value:.4g}): it looks "
        f"log-normalized, but the evaluation needs raw counts (binning and HVG selection run on "
        f"counts).{hint}")


def check_obs_key(adata: ad.AnnData, key: str | None, what: str, name: str) -> None:
    if key is not None and key not in adata.obs.columns:
        raise EvalError(f"{what} key {key!r} is not a column of {name}.obs; the columns are: "
                        f"{', '.join(map(str, adata.obs.columns)) or '(none)'}. "
                        f"Pass --{what}-key with one of them.")


# A label column is refused when it looks like a measurement rather than classes: numeric with
# more distinct values than any cell-type annotation has (the CELLxGENE Census' finest
# cell_type level has ~700 across all tissues, one dataset's annotation a few dozen), or, of any
# type, more distinct values than half the cells (most "classes" would hold one cell: nothing to
# fine-tune on, and a stratified split cannot put them on both sides).
MAX_NUMERIC_CLASSES = 100


def _label_candidates(obs: pd.DataFrame, key: str | None, n_cells: int) -> list[str]:
    """obs columns that could be cell-type labels: categorical/text/integer with 2.. n/2 values."""
    out = []
    for c in obs.columns:
        if c == key or str(c).startswith("_"):
            continue
        col = obs[c]
        k = int(col.nunique(dropna=True))
        numeric = pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype)
        if numeric and not pd.api.types.is_bool_dtype(col):
            vals = col.dropna().to_numpy(dtype=np.float64)
            if k > MAX_NUMERIC_CLASSES or (vals.size and np.any(vals != np.round(vals))):
                continue
        if 2 <= k <= max(2, n_cells // 2):
            out.append(str(c))
    return out


def check_labels(obs: pd.DataFrame, key: str, name: str) -> None:
    """Refuse a label column that cannot be cell types: continuous, (nearly) one value per cell,
    a single class, or no labeled cell. ``obs``: the cells that will be scored."""
    col = obs[key]
    n = len(col)
    cands = _label_candidates(obs, key, n)
    hint = (f"categorical candidates in {name}.obs: {', '.join(cands)}" if cands
            else f"{name}.obs has no other column that looks categorical")
    if n == 0:
        raise EvalError(f"dataset {name} has no cell with a {key!r} label (the column is empty or all NaN); "
                        f"pass another --label-key ({hint})")
    k = int(col.nunique(dropna=True))
    numeric = (pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype)
               and not pd.api.types.is_bool_dtype(col))
    if numeric:
        vals = col.to_numpy(dtype=np.float64)
        if np.any(vals != np.round(vals)) or k > MAX_NUMERIC_CLASSES:
            raise EvalError(
                f"label key {key!r} of {name} looks continuous ({col.dtype}, {k} distinct values in {n} cells), "
                f"not cell types; pass --label-key with a categorical column ({hint}). If it really holds "
                f"classes, store it as one: adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)")
    if k > n / 2:
        raise EvalError(
            f"label key {key!r} of {name} has too many distinct values for cell types ({k} in {n} cells: most "
            f"cells would be a class of their own); pass --label-key with a categorical column ({hint})")
    if k < 2:
        only = col.dropna().astype(str).iloc[0]
        raise EvalError(
            f"dataset {name} has a single cell type in .obs[{key!r}] ({only!r}): the evaluation compares cell "
            f"types and needs at least 2; pass a dataset with several cell types or another --label-key ({hint})")


@dataclass(slots=True)
class PreparedData:
    """Cells x matched genes, ready for the model and the baselines.

    ``counts`` and ``bins`` share one CSR pattern (nonzeros only; bins 1..n_bins-1); column j is
    vocabulary token ``token_ids[j]`` with symbol ``symbols[j]``.
    """

    name: str
    counts: sp.csr_matrix  # (n_cells, n_genes) float32 raw counts
    bins: sp.csr_matrix  # (n_cells, n_genes) float32 bin ids, same pattern
    token_ids: np.ndarray  # (n_genes,) int64
    symbols: list[str]
    obs: pd.DataFrame
    label_key: str | None
    batch_key: str | None
    match: GeneMatch
    n_bins: int
    seed: int = 0

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.label_key is None else self.obs[self.label_key].astype(str).to_numpy()

    @property
    def batches(self) -> np.ndarray | None:
        return None if self.batch_key is None else self.obs[self.batch_key].astype(str).to_numpy()

    def lognorm(self) -> np.ndarray:
        """(n_cells, n_genes) dense log1p(CP10k) over the prepared genes, for the baselines."""
        X = self.counts.astype(np.float64)
        tot = np.asarray(X.sum(axis=1)).ravel()
        tot[tot == 0] = 1.0
        X = sp.diags(1e4 / tot) @ X
        return np.log1p(X.toarray()).astype(np.float32)

    def subset(self, idx: np.ndarray) -> PreparedData:
        """The same genes for a subset of cells (bins are per cell, so they carry over)."""
        idx = np.asarray(idx)
        return replace(self, counts=self.counts[idx], bins=self.bins[idx], obs=self.obs.iloc[idx])

    def take_genes(self, cols: np.ndarray) -> PreparedData:
        """A subset of the genes, re-binned: a cell's bins are quantiles over ITS genes."""
        cols = np.asarray(cols, dtype=np.int64)
        X = sp.csr_matrix(self.counts[:, cols])
        X.sort_indices()
        return replace(self, counts=X, bins=_bin(X, self.obs, self.n_bins, self.seed),
                       token_ids=self.token_ids[cols], symbols=[self.symbols[j] for j in cols])


def _bin(X: sp.csr_matrix, obs: pd.DataFrame, n_bins: int, seed: int) -> sp.csr_matrix:
    from scgpt_model.binning import bin_csr

    # a stable per-cell id (row in the source file) seeds the tie-breaking: a cell gets the same
    # bins whatever subset of cells it is evaluated in
    return sp.csr_matrix(bin_csr(X, obs["_row"].to_numpy(np.int64), n_bins=n_bins, seed=seed), dtype=np.float32)


def align_genes(data: PreparedData, token_ids: np.ndarray, symbols: list[str]) -> PreparedData:
    """Put ``data`` on exactly the gene list ``token_ids`` (missing genes are all-zero columns),
    re-binned; used to score query cells on a model's fine-tuning gene set."""
    pos = {int(t): j for j, t in enumerate(data.token_ids)}
    src = np.asarray([pos.get(int(t), -1) for t in token_ids])
    have = np.flatnonzero(src >= 0)
    if have.size == 0:
        raise EvalError(f"dataset {data.name} shares none of the model's {len(token_ids)} fine-tuning genes")
    sel = sp.csr_matrix(data.counts[:, src[have]]).tocoo()
    X = sp.csr_matrix((sel.data, (sel.row, have[sel.col])), shape=(data.n_cells, len(token_ids)), dtype=np.float32)
    X.sort_indices()
    log.info("%s: %d of %d fine-tuning genes present", data.name, have.size, len(token_ids))
    return replace(data, counts=X, bins=_bin(X, data.obs, data.n_bins, data.seed),
                   token_ids=np.asarray(token_ids, dtype=np.int64), symbols=list(symbols))


def select_hvg(counts: sp.csr_matrix, n_top: int, batches: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n_top`` most variable genes, sorted.

    scanpy's default ``seurat`` flavour on log1p(CP10k), per batch when batches are given (the
    paper's scanpy preprocessing). ``seurat_v3``'s loess fit fails on small batches (near
    singularities), so it is not used here.
    """
    import scanpy as sc

    n = counts.shape[1]
    if n_top <= 0 or n_top >= n:
        return np.arange(n)
    a = ad.AnnData(X=counts.astype(np.float32))
    if batches is not None:
        a.obs["batch"] = pd.Categorical(batches)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat",
                                batch_key="batch" if batches is not None else None)
    return np.sort(np.flatnonzero(a.var["highly_variable"].to_numpy()))


def prepare(adata: ad.AnnData, vocab: GeneVocab, *, name: str, label_key: str | None,
            batch_key: str | None, n_hvg: int = 0, max_cells: int = 0, seed: int = 0,
            n_bins: int = DEFAULT_N_BINS, require_labels: bool = True,
            extra_symbols: tuple[str, ...] = ()) -> PreparedData:
    """Check, match, subsample, select HVGs and bin. Cells with a missing label are dropped.

    ``extra_symbols``: genes kept even if not highly variable (gene-network query genes).
    """
    if adata.n_obs == 0:
        raise EvalError(f"dataset {name} has no cells (0 rows in .obs); pass a dataset with cells")
    check_counts(adata, name)
    check_obs_key(adata, label_key, "label", name)
    check_obs_key(adata, batch_key, "batch", name)
    match = match_genes(adata, vocab)
    log.info("%s: %s", name, match.report())

    obs = adata.obs.copy()
    obs["_row"] = np.arange(adata.n_obs, dtype=np.int64)
    keep = np.ones(adata.n_obs, dtype=bool)
    if label_key is not None and require_labels:
        keep &= obs[label_key].notna().to_numpy()
        if (~keep).any():
            log.info("%s: dropping %d cells without a %r label", name, int((~keep).sum()), label_key)
    rows = np.flatnonzero(keep)
    if max_cells and rows.size > max_cells:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
    if label_key is not None and require_labels:
        check_labels(obs.iloc[rows], label_key, name)
    X = sp.csr_matrix(adata.X[rows][:, match.var_index], dtype=np.float32)
    X.sort_indices()
    obs = obs.iloc[rows]
    batches = None if batch_key is None else obs[batch_key].astype(str).to_numpy()
    cols = select_hvg(X, n_hvg, batches)
    if extra_symbols:
        extra = [j for j, s in enumerate(match.symbols) if s in set(extra_symbols)]
        cols = np.union1d(cols, np.asarray(extra, dtype=np.int64))
    X = X[:, cols]
    # genes that are zero in every kept cell carry nothing for any task
    nz = np.asarray((X > 0).sum(axis=0)).ravel() > 0
    cols, X = cols[nz], X[:, nz]
    if X.shape[1] == 0:
        raise EvalError(f"dataset {name}: no matched gene is expressed in the selected cells")
    X = sp.csr_matrix(X)
    X.sort_indices()
    bins = _bin(X, obs, n_bins, seed)
    log.info("%s: %d cells x %d genes prepared (HVG target %s)", name, X.shape[0], X.shape[1],
             n_hvg or "all")
    return PreparedData(name=name, counts=X, bins=bins, token_ids=match.token_ids[cols],
                        symbols=[match.symbols[j] for j in cols], obs=obs, label_key=label_key,
                        batch_key=batch_key, match=match, n_bins=n_bins, seed=seed)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), stratified by label; classes with < 2 cells stay in train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * idx.size)) if idx.size >= 2 else 0
        n_test = min(max(n_test, 1 if idx.size >= 2 else 0), idx.size - 1) if idx.size >= 2 else 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def batch_split(batches: np.ndarray, query_batches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(reference_idx, query_idx): the query is every cell of ``query_batches``."""
    q = np.isin(batches, list(query_batches))
    if not q.any() or q.all():
        raise EvalError(f"query batches {list(query_batches)} leave an empty reference or query; "
                        f"batches present: {sorted(set(batches))}")
    return np.flatnonzero(~q), np.flatnonzero(q)
