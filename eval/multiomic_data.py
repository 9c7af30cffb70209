"""Multi-omic input for the ``multiomic`` task: MuData / h5ad loading, checks, marker gating, binning.

Inputs (one of):

* a MuData ``.h5mu`` (scverse): modalities ``rna`` / ``prot`` / ``atac`` under their usual aliases
  (``gex``, ``protein``, ``adt``, ``peaks``...). A cell missing from a modality, or a NaN value,
  means "not measured" (mosaic data): that feature is absent from the cell's tokens, never a zero;
* an ``.h5ad`` with RNA counts in ``X`` and proteins in ``obsm`` (``protein_expression``, names in
  ``uns['protein_names']`` or the DataFrame's columns), the layout of scvi-tools' CITE-seq files;
* ``pbmc_cite`` (shipped, the default): the two 10x CITE-seq PBMC files as a 2-batch pair. Their
  panels differ (14 vs 29 proteins), so the pair is mosaic on the protein side; RNA genes that one
  file lacks are likewise unmeasured there. They carry no cell types: reference labels come from
  protein-marker gating (:func:`gate_pbmc_markers`), documented in data/README.md and the run's params.

Per modality, values are raw counts (checked), binned per cell over that modality's measured
nonzero features only (§4.5: "each modality binned separately").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.errors import EvalError
from eval.genes import DATA_DIR, GeneMatch, match_genes
from scgpt_model.multiomic import RNA

log = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, ...]] = {
    "rna": ("rna", "gex", "gene expression", "expression", "mrna"),
    "prot": ("prot", "protein", "proteins", "adt", "cite", "antibody capture"),
    "atac": ("atac", "peaks", "chromatin", "accessibility", "atac-seq"),
}
PROTEIN_OBSM_KEYS = ("protein_expression", "protein", "proteins", "adt", "prot")
BATCH_CANDIDATES = ("batch", "sample", "batch_id", "library", "library_id", "dataset")
SHIPPED_NAME = "pbmc_cite"
SHIPPED_FILES = (("10k", "pbmc_10k_protein_v3.h5ad"), ("5k", "pbmc_5k_protein_v3.h5ad"))
SHIPPED_LABEL, SHIPPED_BATCH = "gated_celltype", "batch"
N_PEAKS = 4000  # Methods: 4,000 highly variable peaks
_ANTIBODY_SUFFIX = re.compile(r"_TotalSeq[A-C]$")  # 10x antibody barcodes, not part of the marker name

# Marker gating of the shipped pair (CLR per batch, muon's Seurat flavour across cells; a marker is
# positive when a 2-component Gaussian mixture, fitted per batch, puts the cell in its high component).
GATING_MARKERS = ("CD3", "CD4", "CD8a", "CD14", "CD19", "CD56", "CD16")
GATING_RULES = (
    "CD4 T: CD3+ CD4+ CD8- CD14- CD19-", "CD8 T: CD3+ CD8+ CD4- CD14- CD19-", "B: CD19+ CD3-",
    "CD14 mono: CD14+ CD3- CD19-", "NK: CD56+ CD3- CD19- CD14-", "CD16 mono: CD16+ CD56- CD3- CD19- CD14-",
    "other cells: unassigned, left out of the task")


@dataclass
class Modality:
    """One modality's counts on the cells of the task; ``measured`` marks what a cell measured."""

    name: str  # canonical: rna, prot, atac (or the file's own name)
    counts: sp.csr_matrix  # (n_cells, F) float32 raw counts, 0 where not measured
    features: list[str]  # (F,) names as in the data (RNA: symbols or ids, matched below)
    measured: np.ndarray  # (n_cells, F) bool
    var: pd.DataFrame | None = None  # RNA: the var table for gene matching

    @property
    def n_features(self) -> int:
        return int(self.counts.shape[1])

    def take(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> Modality:
        r = slice(None) if rows is None else np.asarray(rows)
        c = slice(None) if cols is None else np.asarray(cols)
        X = sp.csr_matrix(self.counts[r][:, c])
        X.sort_indices()
        feats = self.features if cols is None else [self.features[j] for j in np.asarray(cols)]
        var = None if self.var is None else (self.var if cols is None else self.var.iloc[np.asarray(cols)])
        return replace(self, counts=X, features=feats, measured=self.measured[r][:, c], var=var)


@dataclass
class MultiomicInput:
    """What was read, before matching to a model: modalities on one cell axis, and the obs."""

    name: str
    mods: dict[str, Modality]  # rna first
    obs: pd.DataFrame
    label_key: str | None
    batch_key: str | None
    notes: dict = field(default_factory=dict)


@dataclass
class MultiomicData:
    """Cells x the task's features, binned per modality, ready for the model and the baselines."""

    name: str
    mods: dict[str, Modality]  # selected features only; rna first
    bins: dict[str, sp.csr_matrix]  # per modality, same pattern as counts; bins 1..n_bins-1
    obs: pd.DataFrame  # has _row (stable id in the source), label and batch columns
    label_key: str
    batch_key: str | None
    match: GeneMatch
    rna_token_ids: np.ndarray  # (n_rna,) vocabulary ids of the RNA columns
    n_bins: int
    seed: int = 0
    params: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_genes(self) -> int:  # every feature of every modality (the runner logs it)
        return sum(m.n_features for m in self.mods.values())

    @property
    def labels(self) -> np.ndarray:
        return self.obs[self.label_key].astype(str).to_numpy()

    @property
    def batches(self) -> np.ndarray | None:
        return None if self.batch_key is None else self.obs[self.batch_key].astype(str).to_numpy()


# ------------------------------------------------------------------------------------------------
def canonical_modality(name: str) -> str | None:
    n = name.strip().lower()
    return next((c for c, al in ALIASES.items() if n in al), None)


def clean_protein_name(name: str) -> str:
    return _ANTIBODY_SUFFIX.sub("", str(name))


def _check_counts(X, name: str, mod: str, measured: np.ndarray | None = None) -> None:
    vals = X.data if sp.issparse(X) else np.asarray(X)[measured] if measured is not None else np.asarray(X).ravel()
    vals = np.asarray(vals, dtype=np.float64)[:2_000_000]
    if vals.size and not np.isfinite(vals).all():
        raise EvalError(f"dataset {name}: modality {mod!r} has infinite values; pass raw counts")
    if vals.size and vals.min() < 0:
        raise EvalError(f"dataset {name}: modality {mod!r} has negative values (scaled or CLR data?); "
                        "the multiomic task needs raw counts in every modality")
    frac = vals[np.abs(vals - np.round(vals)) > 1e-6]
    if frac.size:
        raise EvalError(f"dataset {name}: modality {mod!r} has non-integer values (e.g. {float(frac[0]):.4g}): it "
                        "looks log-normalised, but the task bins raw counts. Put the raw counts in X (for a "
                        "MuData: mdata.mod[...].X = layers['counts'])")


def _modality_from(X, features, name: str, mod: str, var: pd.DataFrame | None = None) -> Modality:
    features = [str(f) for f in features]
    if len(features) == 0:
        raise EvalError(f"dataset {name}: modality {mod!r} has no features; drop it or add its measurements")
    dup = pd.Index(features)[pd.Index(features).duplicated()].unique().tolist()
    if dup:
        raise EvalError(f"dataset {name}: feature names in modality {mod!r} are not unique (e.g. {dup[:3]}); "
                        "make them unique (AnnData.var_names_make_unique) before the evaluation")
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        measured = np.ones(X.shape, dtype=bool)
        if not np.isfinite(X.data).all():
            nan = ~np.isfinite(X.data) & np.isnan(X.data)
            r = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
            measured[r[nan], X.indices[nan]] = False
            X.data[nan] = 0.0
    else:
        X = np.asarray(X, dtype=np.float64)
        measured = ~np.isnan(X)
        X = np.where(measured, X, 0.0)
    _check_counts(X, name, mod)
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    return Modality(mod, X, features, measured, var)


def _protein_obsm(a: ad.AnnData, name: str):
    key = next((k for k in PROTEIN_OBSM_KEYS if k in a.obsm), None)
    if key is None:
        raise EvalError(f"dataset {name} is an .h5ad without a second modality: put proteins in "
                        f"obsm[{PROTEIN_OBSM_KEYS[0]!r}] (names in uns['protein_names']) or pass a MuData .h5mu")
    P = a.obsm[key]
    if isinstance(P, pd.DataFrame):
        return P.to_numpy(), list(P.columns)
    names = a.uns.get("protein_names")
    if names is None or len(names) != P.shape[1]:
        raise EvalError(f"dataset {name}: obsm[{key!r}] has {P.shape[1]} columns but uns['protein_names'] "
                        f"{'is missing' if names is None else f'has {len(names)} names'}; store the protein names")
    return P, list(names)


def _stack(parts: list[Modality], mod: str) -> Modality:
    """Cells of several parts on the union of their features; a part's missing features unmeasured."""
    union = list(dict.fromkeys(f for p in parts for f in p.features))
    pos = {f: j for j, f in enumerate(union)}
    rows, meas = [], []
    for p in parts:
        cols = np.asarray([pos[f] for f in p.features])
        coo = p.counts.tocoo()
        rows.append(sp.csr_matrix((coo.data, (coo.row, cols[coo.col])), shape=(p.counts.shape[0], len(union))))
        m = np.zeros((p.counts.shape[0], len(union)), dtype=bool)
        m[:, cols] = p.measured
        meas.append(m)
    var = None
    if parts[0].var is not None:
        var = pd.concat([p.var for p in parts]).loc[lambda d: ~d.index.duplicated()].reindex(union)
    X = sp.csr_matrix(sp.vstack(rows), dtype=np.float32)
    X.sort_indices()
    return Modality(mod, X, union, np.vstack(meas), var)


def load_shipped_pair() -> MultiomicInput:
    """The two 10x CITE-seq PBMC files (scvi-tools test data) as one 2-batch mosaic input."""
    rna_parts, prot_parts, obs = [], [], []
    for batch, fname in SHIPPED_FILES:
        path = DATA_DIR / fname
        a = ad.read_h5ad(path)
        P, names = _protein_obsm(a, SHIPPED_NAME)
        rna_parts.append(_modality_from(a.X, a.var_names, SHIPPED_NAME, RNA, a.var[[]].copy()))
        prot_parts.append(_modality_from(P, [clean_protein_name(n) for n in names], SHIPPED_NAME, "prot"))
        o = a.obs[[]].copy()
        o.index = [f"{batch}_{i}" for i in o.index]
        o[SHIPPED_BATCH] = batch
        obs.append(o)
    mods = {RNA: _stack(rna_parts, RNA), "prot": _stack(prot_parts, "prot")}
    obs = pd.concat(obs)
    obs[SHIPPED_LABEL] = gate_pbmc_markers(mods["prot"], obs[SHIPPED_BATCH].to_numpy())
    return MultiomicInput(SHIPPED_NAME, mods, obs, SHIPPED_LABEL, SHIPPED_BATCH,
                          notes={"labels": "protein-marker gating: " + "; ".join(GATING_RULES)})


def load_h5ad(path: Path) -> MultiomicInput:
    try:
        a = ad.read_h5ad(path)
    except Exception as e:
        raise EvalError(f"could not read {path} as AnnData ({type(e).__name__}: {e})") from e
    P, names = _protein_obsm(a, path.stem)
    mods = {RNA: _modality_from(a.X, a.var_names, path.stem, RNA, a.var.copy()),
            "prot": _modality_from(P, [clean_protein_name(n) for n in names], path.stem, "prot")}
    return MultiomicInput(path.stem, mods, a.obs.copy(), None, None)


def load_h5mu(path: Path) -> MultiomicInput:
    import mudata as md

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mudata 0.3 warns about its future obs-pulling default
            mdata = md.read_h5mu(path)
    except Exception as e:
        raise EvalError(f"could not read {path} as MuData ({type(e).__name__}: {e})") from e
    name = path.stem
    found: dict[str, str] = {}
    for key in mdata.mod:
        canon = canonical_modality(key)
        if canon is None:
            raise EvalError(f"dataset {name}: modality {key!r} is not one the task knows; name it rna, prot or atac "
                            f"(aliases: {', '.join(a for al in ALIASES.values() for a in al)})")
        if canon in found:
            raise EvalError(f"dataset {name}: modalities {found[canon]!r} and {key!r} are both {canon}; keep one")
        found[canon] = key
    if RNA not in found:
        raise EvalError(f"dataset {name} has no RNA modality (modalities: {list(mdata.mod)}); the model inherits "
                        "its gene embeddings, so the MuData needs mod['rna'] (or 'gex') with gene counts")
    cells = mdata.obs_names
    mods: dict[str, Modality] = {}
    for canon in [RNA] + [c for c in found if c != RNA]:
        m = mdata.mod[found[canon]]
        idx = cells.get_indexer(m.obs_names)
        feats = m.var_names if canon != "prot" else [clean_protein_name(v) for v in m.var_names]
        part = _modality_from(m.X, feats, name, canon, m.var.copy() if canon == RNA else None)
        # cells absent from this modality: nothing measured
        coo = part.counts.tocoo()
        X = sp.csr_matrix((coo.data, (idx[coo.row], coo.col)), shape=(len(cells), part.n_features), dtype=np.float32)
        X.sort_indices()
        meas = np.zeros((len(cells), part.n_features), dtype=bool)
        meas[idx] = part.measured
        mods[canon] = Modality(canon, X, part.features, meas, part.var)
    if len(mods) < 2:
        raise EvalError(f"dataset {name} has only the RNA modality; the multiomic task needs a second one "
                        "(prot or atac)")
    obs = mdata.obs.copy()
    for c in mdata.mod[found[RNA]].obs.columns:  # plain keys from the RNA modality as well
        if c not in obs.columns:
            obs[c] = mdata.mod[found[RNA]].obs[c].reindex(cells).to_numpy()
    return MultiomicInput(name, mods, obs, None, None)


def load_input(spec: str) -> MultiomicInput:
    if spec == SHIPPED_NAME:
        return load_shipped_pair()
    path = Path(spec)
    if not path.exists():
        raise EvalError(f"dataset {spec!r} is neither the shipped pair ({SHIPPED_NAME}) nor an existing "
                        ".h5mu / .h5ad file")
    if path.suffix == ".h5mu":
        return load_h5mu(path)
    if path.suffix == ".h5ad":
        return load_h5ad(path)
    raise EvalError(f"dataset {spec!r}: the multiomic task reads MuData (.h5mu) or .h5ad with proteins in obsm")


# ------------------------------------------------------------------------------------------------
def clr(counts: sp.csr_matrix, measured: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n_cells, F) CLR of protein counts (muon, Seurat flavour, across cells), per group of cells
    (batch) over the features that group measured; unmeasured entries are NaN."""
    import muon as mu

    out = np.full(counts.shape, np.nan, dtype=np.float32)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        cols = np.flatnonzero(measured[rows].all(axis=0))
        a = ad.AnnData(X=counts[rows][:, cols].toarray().astype(np.float32))
        mu.prot.pp.clr(a, axis=0)
        out[np.ix_(rows, cols)] = np.asarray(a.X)
    return out


def gate_pbmc_markers(prot: Modality, batches: np.ndarray, seed: int = 0) -> np.ndarray:
    """Reference cell types of the shipped pair from CLR protein markers (see GATING_RULES)."""
    from sklearn.mixture import GaussianMixture

    values = clr(prot.counts, prot.measured, batches)
    pos: dict[str, np.ndarray] = {}
    for m in GATING_MARKERS:
        j = prot.features.index(m)
        p = np.zeros(len(batches), dtype=bool)
        for b in np.unique(batches):
            rows = np.flatnonzero(batches == b)
            x = values[rows, j].reshape(-1, 1).astype(np.float64)
            gm = GaussianMixture(2, random_state=seed).fit(x)
            p[rows] = gm.predict_proba(x)[:, int(np.argmax(gm.means_.ravel()))] > 0.5
        pos[m] = p
    lab = np.full(len(batches), None, dtype=object)
    t = pos["CD3"] & ~pos["CD19"] & ~pos["CD14"]
    lab[t & pos["CD4"] & ~pos["CD8a"]] = "CD4 T"
    lab[t & pos["CD8a"] & ~pos["CD4"]] = "CD8 T"
    lin_neg = ~pos["CD3"] & ~pos["CD19"]
    lab[~pos["CD3"] & pos["CD19"]] = "B"
    lab[lin_neg & pos["CD14"]] = "CD14 mono"
    lab[lin_neg & ~pos["CD14"] & pos["CD56"]] = "NK"
    lab[lin_neg & ~pos["CD14"] & ~pos["CD56"] & pos["CD16"]] = "CD16 mono"
    return lab


def resolve_keys(inp: MultiomicInput, label_key: str | None, batch_key: str | None) -> tuple[str, str | None]:
    cols = ", ".join(map(str, inp.obs.columns)) or "(none)"
    label = label_key or inp.label_key
    batch = batch_key or inp.batch_key
    if label is None:
        raise EvalError(f"dataset {inp.name} needs a cell-type label column for the scores: pass --label-key "
                        f"(obs columns: {cols})")
    for key, what in ((label, "label"), (batch, "batch")):
        if key is not None and key not in inp.obs.columns:
            raise EvalError(f"{what} key {key!r} is not a column of {inp.name}'s obs; the columns are: {cols}. "
                            f"Pass --{what}-key with one of them.")
    if batch is None:
        several = [c for c in BATCH_CANDIDATES if c in inp.obs.columns and inp.obs[c].nunique() > 1]
        patterns = {tuple(bool(m.measured[i].any()) for m in inp.mods.values()) for i in range(inp.obs.shape[0])}
        if several or len(patterns) > 1:
            why = (f"obs[{several[0]!r}] has {inp.obs[several[0]].nunique()} values" if several else
                   "its cells measure different modalities (mosaic)")
            raise EvalError(f"dataset {inp.name} has several batches ({why}) and no batch key: pass --batch-key "
                            f"(obs columns: {cols})")
    return label, batch


def select_features(mod: Modality, n_top: int, batches: np.ndarray | None) -> np.ndarray:
    """Columns the task keeps: RNA HVGs among genes every cell measured, every protein,
    the ``n_top`` most often accessible peaks."""
    from eval.data import select_hvg

    expressed = np.asarray((mod.counts > 0).sum(axis=0)).ravel() > 0
    if mod.name == RNA:
        cols = np.flatnonzero(mod.measured.all(axis=0) & expressed)
        sub = cols[select_hvg(sp.csr_matrix(mod.counts[:, cols]), n_top, batches)]
        return np.sort(sub)
    if mod.name == "atac":
        freq = np.asarray((mod.counts > 0).sum(axis=0)).ravel() / np.maximum(mod.measured.sum(axis=0), 1)
        return np.sort(np.argsort(-freq, kind="stable")[:n_top])
    return np.flatnonzero(expressed)


def prepare_multiomic(inp: MultiomicInput, vocab, *, label_key: str, batch_key: str | None, n_hvg: int,
                      n_peaks: int = N_PEAKS, max_cells: int = 0, seed: int = 0, n_bins: int = 51) -> MultiomicData:
    """Match RNA genes to the vocabulary, drop unlabelled cells, subsample, select features, bin."""
    from scgpt_model.binning import bin_csr

    rna = inp.mods[RNA]
    fake = ad.AnnData(X=sp.csr_matrix((1, rna.n_features), dtype=np.float32),
                      var=rna.var if rna.var is not None else pd.DataFrame(index=rna.features))
    fake.var_names = rna.features
    match = match_genes(fake, vocab)
    obs = inp.obs.copy()
    obs["_row"] = np.arange(obs.shape[0], dtype=np.int64)
    keep = obs[label_key].notna().to_numpy()
    if batch_key is not None:
        keep &= obs[batch_key].notna().to_numpy()
    n_dropped = int((~keep).sum())
    rows = np.flatnonzero(keep)
    if max_cells and rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_cells, replace=False))
    if rows.size < 10:
        raise EvalError(f"dataset {inp.name}: only {rows.size} labelled cells; the scores need at least 10")
    from eval.data import check_labels

    check_labels(obs.iloc[rows], label_key, inp.name)  # the annotation tasks' rule: no continuous or single-type key
    obs = obs.iloc[rows]
    batches = None if batch_key is None else obs[batch_key].astype(str).to_numpy()
    mods: dict[str, Modality] = {}
    for name, m in inp.mods.items():
        m = m.take(rows, match.var_index) if name == RNA else m.take(rows)
        cols = select_features(m, n_hvg if name == RNA else n_peaks, batches)
        if cols.size == 0:
            raise EvalError(f"dataset {inp.name}: modality {name!r} has no feature expressed in the selected cells"
                            + (" and measured in all of them" if name == RNA else ""))
        mods[name] = m.take(None, cols)
        if name == RNA:
            token_ids = match.token_ids[cols]
    bins = {}
    for k, (name, m) in enumerate(mods.items()):
        # each modality is binned on its own (its features' quantiles per cell); unmeasured entries are
        # zeros of the matrix, so they never enter a cell's quantiles
        bins[name] = sp.csr_matrix(bin_csr(m.counts, obs["_row"].to_numpy(np.int64), n_bins=n_bins,
                                           seed=seed + 7919 * k), dtype=np.float32)
    counts = obs[label_key].astype(str).value_counts()
    params = {"n_labelled_cells_dropped": n_dropped, **inp.notes,
              "label_counts": "; ".join(f"{k} {v}" for k, v in counts.items()),  # the task's cells, most first
              **{f"n_features_{k}": m.n_features for k, m in mods.items()},
              "mosaic": any(not m.measured.all() for m in mods.values())}
    data = MultiomicData(inp.name, mods, bins, obs, label_key, batch_key, match, token_ids, n_bins, seed, params)
    log.info("%s: %d cells; %s; %s", inp.name, data.n_cells, match.report(),
             ", ".join(f"{k} {m.n_features}" for k, m in mods.items()))
    return data
