"""Input of the ``perturbation`` task: a CRISPR screen as AnnData, checked and prepared (Methods,
"scRNA-seq perturbation", following GEARS' preprocessing).

* ``obs[perturbation_key]`` names each cell's condition: the control label (``--control``, else the
  first of ``ctrl``, ``control``, ``non-targeting``, ``NT`` found), a gene (``STAT1``), or a
  GEARS-style string (``STAT1+ctrl``, ``ctrl+STAT1``, ``A+B`` for two genes). Cells with any other
  label (``unassigned``, ``multiplet``, NaN...) are dropped and counted.
* Counts are normalised per cell (total counts -> 1e4) and log1p'd; the gene set is the highly
  variable genes (default 5,000, capped by the genes present) plus every measured perturbed gene.
* A target gene the assay did not measure (16 of the 25 Papalexi targets) still enters the model
  as its vocabulary token carrying the perturbation flag, with no value and no score; a target the
  vocabulary does not know is reported and its perturbation excluded.
* DE genes: the top 20 per perturbation against the control cells (scanpy ``rank_genes_groups``,
  t-test, ranked by |score|) on the observed cells.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.data import check_counts, load_dataset, select_hvg
from eval.errors import EvalError
from eval.genes import DATA_DIR, match_genes, symbol_table
from scgpt_model.vocab import GeneVocab

log = logging.getLogger(__name__)

SHIPPED = {"papalexi": "papalexi_crispr_counts.h5ad"}  # data/README.md: Papalexi et al. 2021 ECCITE-seq
DEFAULT_KEY = "perturbation"
CONTROL_NAMES = ("ctrl", "control", "non-targeting", "NT")  # the order; first found wins
# labels that are not a condition (no confident guide, several guides): dropped and counted
OTHER_LABELS = {"unassigned", "multiplet", "doublet", "negative", "unknown", "none", "nan", ""}
DEFAULT_HVG = 5000  # Methods: 5,000 HVGs plus the perturbed genes
N_DE = 20  # S.2 / GEARS: top-20 DE genes
MIN_CELLS = 5  # a perturbation needs this many cells to enter a split (its mean and DE genes)
MIN_PERTURBATIONS = 3  # one each for train, validation and test


@dataclass
class PerturbData:
    """A prepared screen: log-normalised expression on the gene set, one condition per cell."""

    name: str
    expr: np.ndarray  # (n_cells, G) float32 log1p(CP10k) of the measured genes in the gene set
    genes: list[str]  # (G,) symbols
    token_ids: np.ndarray  # (G,) vocabulary ids of the measured genes
    conditions: np.ndarray  # (n_cells,) canonical condition: CONTROL or "A" or "A+B" (genes sorted)
    targets: dict[str, tuple[str, ...]]  # perturbation -> its target genes (symbols)
    target_token: dict[str, int]  # target symbol -> vocabulary id (every kept target)
    target_column: dict[str, int]  # target symbol -> column in ``genes`` (-1: not measured)
    de_genes: dict[str, np.ndarray] = field(default_factory=dict)  # perturbation -> columns of its top DE genes
    report: dict = field(default_factory=dict)  # what was dropped and why, for the run's params

    CONTROL = "ctrl"

    @property
    def n_cells(self) -> int:
        return int(self.expr.shape[0])

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def perturbations(self) -> list[str]:
        return sorted(self.targets)

    def cells_of(self, cond: str) -> np.ndarray:
        return np.flatnonzero(self.conditions == cond)

    def control_mean(self) -> np.ndarray:
        return self.expr[self.cells_of(self.CONTROL)].mean(axis=0)

    def unmeasured(self, cond: str) -> list[str]:
        return [g for g in self.targets.get(cond, ()) if self.target_column[g] < 0]


# ------------------------------------------------------------------------------------------------
def resolve(spec: str) -> tuple[str, ad.AnnData]:
    if spec in SHIPPED:
        path = DATA_DIR / SHIPPED[spec]
        try:
            return spec, ad.read_h5ad(path)
        except OSError as e:
            raise EvalError(f"the shipped screen {spec!r} could not be read from {path}: {e}") from e
    if not spec.endswith(".h5ad") and "/" not in spec:
        raise EvalError(f"dataset {spec!r} is neither a shipped perturbation screen ({', '.join(SHIPPED)}) nor an "
                        ".h5ad file; pass one of those names or a path to an .h5ad with raw counts")
    name, adata, _ = load_dataset(spec)
    return name, adata


def parse_condition(label: str, control: str) -> tuple[str, ...] | None:
    """Target genes of one label; () for the control, None for a label that is no condition."""
    s = str(label).strip()
    if s == control:
        return ()
    if s.lower() in OTHER_LABELS:
        return None
    parts = [p.strip() for p in s.split("+")]
    if any(not p for p in parts):
        return None
    genes = tuple(sorted({p for p in parts if p != "ctrl" and p != control}))
    return genes


def find_control(labels: pd.Series, control: str | None, key: str) -> str:
    present = [str(x) for x in labels.dropna().unique()]
    listed = ", ".join(sorted(present)[:40]) + (" ..." if len(present) > 40 else "")
    if control is not None:
        if control not in present:
            raise EvalError(f"control label {control!r} is not in obs[{key!r}]; labels: {listed}")
        return control
    for c in CONTROL_NAMES:
        if c in present:
            return c
    raise EvalError(f"no control cells found in obs[{key!r}]: none of the labels {', '.join(CONTROL_NAMES)} occurs. "
                    f"Pass --control LABEL; labels: {listed}")


def _target_token(sym: str, vocab: GeneVocab, measured: dict[str, int]) -> int:
    if sym in measured:
        return measured[sym]
    if sym in vocab:
        return int(vocab[sym])
    if vocab.key == "feature_id":
        ens = symbol_table().get(sym)
        if ens is not None and ens in vocab:
            return int(vocab[ens])
    return -1


def _lognorm(X: sp.csr_matrix) -> sp.csr_matrix:
    tot = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    tot[tot == 0] = 1.0
    Y = sp.csr_matrix(sp.diags(1e4 / tot) @ X.astype(np.float64))
    Y.data = np.log1p(Y.data)
    return Y.astype(np.float32)


def de_genes(expr: np.ndarray, conditions: np.ndarray, perts: list[str], n_top: int = N_DE) -> dict[str, np.ndarray]:
    """Columns of the top ``n_top`` DE genes of each perturbation against the control (t-test, |score|)."""
    import scanpy as sc
    import warnings

    keep = np.isin(conditions, [PerturbData.CONTROL, *perts])
    a = ad.AnnData(X=expr[keep].astype(np.float32))
    a.var_names = [str(i) for i in range(expr.shape[1])]
    a.obs["condition"] = pd.Categorical(conditions[keep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy warns about constant genes within a group
        sc.tl.rank_genes_groups(a, "condition", groups=perts, reference=PerturbData.CONTROL, method="t-test",
                                rankby_abs=True, n_genes=min(n_top, expr.shape[1]), use_raw=False)
    names = a.uns["rank_genes_groups"]["names"]
    return {p: np.asarray([int(x) for x in names[p]], dtype=np.int64) for p in perts}


def prepare_perturbation(adata: ad.AnnData, vocab: GeneVocab, *, name: str, key: str | None = None,
                         control: str | None = None, n_hvg: int | None = None, max_cells: int = 0,
                         max_perturbations: int = 0, seed: int = 0, min_cells: int = MIN_CELLS) -> PerturbData:
    """Check, parse, subsample, normalise, select genes and find DE genes; raises EvalError on bad input."""
    key = key or DEFAULT_KEY
    if key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise EvalError(f"dataset {name} has no perturbation column {key!r}: pass --perturbation-key "
                        f"(obs columns: {cols})")
    check_counts(adata, name)
    labels = adata.obs[key]
    ctrl = find_control(labels, control, key)
    match = match_genes(adata, vocab)
    measured_tok = {s: int(t) for s, t in zip(match.symbols, match.token_ids) if s}

    parsed = {lab: parse_condition(lab, ctrl) for lab in labels.dropna().astype(str).unique()}
    raw = labels.astype(str).where(labels.notna(), "nan").to_numpy()
    cond = np.array([PerturbData.CONTROL if parsed.get(r) == () else
                     "+".join(parsed[r]) if parsed.get(r) else "" for r in raw], dtype=object)
    n_other = int((cond == "").sum())
    other_labels = sorted({r for r, c in zip(raw, cond) if c == ""})
    # targets the vocabulary does not know: their perturbations are excluded
    all_targets = sorted({g for p in parsed.values() if p for g in p})
    tok = {g: _target_token(g, vocab, measured_tok) for g in all_targets}
    oov = sorted(g for g, t in tok.items() if t < 0)
    perts = sorted({c for c in cond if c and c != PerturbData.CONTROL})
    if perts and all(any(tok[g] < 0 for g in p.split("+")) for p in perts):
        raise EvalError(f"dataset {name}: no perturbation target is in the model's vocabulary (keyed by {vocab.key}; "
                        f"targets: {', '.join(all_targets[:20])}). Use target gene symbols or Ensembl ids of the "
                        "model's organism")
    oov_perts = [p for p in perts if any(tok[g] < 0 for g in p.split("+"))]
    if oov:
        log.warning("%s: %d target(s) not in the vocabulary, their perturbations excluded: %s", name, len(oov),
                    ", ".join(oov[:20]))
    keep = np.isin(cond, [PerturbData.CONTROL, *[p for p in perts if p not in oov_perts]])
    n_oov_cells = int((~keep).sum()) - n_other
    if not (cond[keep] == PerturbData.CONTROL).any():
        raise EvalError(f"dataset {name} has no control cells ({ctrl!r} labels only cells that were dropped)")
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(keep)
    if max_perturbations:
        cand = sorted({c for c in cond[rows] if c != PerturbData.CONTROL})
        counts = pd.Series(cond[rows]).value_counts()
        cand = [c for c in cand if counts[c] >= min_cells]
        if len(cand) > max_perturbations:
            chosen = set(rng.choice(cand, size=max_perturbations, replace=False).tolist())
            rows = rows[np.isin(cond[rows], [PerturbData.CONTROL, *chosen])]
    if max_cells and rows.size > max_cells:
        groups = pd.Series(rows).groupby(cond[rows])
        cap = max(min_cells, max_cells // (groups.ngroups + 1))  # the control gets two shares
        picked = [np.sort(rng.choice(r.to_numpy(), size=min(r.size, 2 * cap if c == PerturbData.CONTROL else cap),
                                     replace=False)) for c, r in groups]
        rows = np.sort(np.concatenate(picked))
    cond = cond[rows]
    counts = pd.Series(cond).value_counts()
    few = sorted(c for c in counts.index if c != PerturbData.CONTROL and counts[c] < min_cells)
    if few:
        log.info("%s: %d perturbation(s) with fewer than %d cells left out: %s", name, len(few), min_cells,
                 ", ".join(few[:10]))
        ok = ~np.isin(cond, few)
        rows, cond = rows[ok], cond[ok]
    perts = sorted(set(cond) - {PerturbData.CONTROL})
    if len(perts) < MIN_PERTURBATIONS:
        raise EvalError(f"dataset {name}: {len(perts)} perturbation(s) with at least {min_cells} cells "
                        f"({', '.join(perts) or 'none'}); an unseen-perturbation split needs at least "
                        f"{MIN_PERTURBATIONS} (train, validation, test)")

    X = sp.csr_matrix(adata.X[rows], dtype=np.float32)
    L = _lognorm(X)[:, match.var_index]  # normalised over all the cell's genes, then matched ones kept
    targets = {p: tuple(p.split("+")) for p in perts}
    used = sorted({g for t in targets.values() for g in t})
    sym_col = {s: j for j, s in enumerate(match.symbols) if s}
    n_hvg = DEFAULT_HVG if n_hvg is None else n_hvg
    cols = select_hvg(sp.csr_matrix(X[:, match.var_index]), min(n_hvg, match.n_matched))
    expressed = np.asarray((L > 0).sum(axis=0)).ravel() > 0
    cols = cols[expressed[cols]]
    cols = np.union1d(cols, [sym_col[g] for g in used if g in sym_col]).astype(np.int64)
    genes = [match.symbols[j] for j in cols]
    col_of = {g: i for i, g in enumerate(genes)}
    expr = L[:, cols].toarray().astype(np.float32)
    data = PerturbData(name=name, expr=expr, genes=genes, token_ids=match.token_ids[cols].astype(np.int64),
                       conditions=cond.astype(str), targets=targets, target_token={g: tok[g] for g in used},
                       target_column={g: col_of.get(g, -1) for g in used})
    data.de_genes = de_genes(expr, data.conditions, perts)
    unmeasured = sorted(g for g in used if data.target_column[g] < 0)
    data.report = {
        "control_label": ctrl, "perturbation_key": key, "n_cells": data.n_cells,
        "n_control_cells": int((data.conditions == PerturbData.CONTROL).sum()), "n_perturbations": len(perts),
        "n_genes": data.n_genes, "n_hvg_target": n_hvg, "gene_match": match.report(),
        "cells_dropped_other_labels": n_other, "other_labels": ",".join(other_labels[:10]),
        "targets_not_in_vocabulary": ",".join(oov), "cells_dropped_target_not_in_vocabulary": n_oov_cells,
        "perturbations_too_few_cells": ",".join(few), "targets_not_measured": ",".join(unmeasured),
        "n_two_gene_perturbations": sum(len(t) == 2 for t in targets.values())}
    log.info("%s: %d cells (%d control) x %d genes, %d perturbations (%d targets not measured); dropped %d cells "
             "with other labels (%s), %d with targets outside the vocabulary", name, data.n_cells,
             data.report["n_control_cells"], data.n_genes, len(perts), len(unmeasured), n_other,
             ", ".join(other_labels[:5]), n_oov_cells)
    return data
