"""`ingest synth-census`: a realistic synthetic store in Census layout, for scale tests.

Cells: genes detected per cell ~ lognormal around ``mean_genes`` (1,500 by default, like
10x 3' v3 data); which genes are detected follows per-gene weights (lognormal, heavy-tailed,
with a cell-type-specific program of marker genes); counts are ``1 + NegBin`` with a mean that
grows with the gene's weight. Several tissues, datasets, assays, donors; ~5% non-primary cells.
Written in chunks of ``chunk_cells`` so memory stays bounded whatever ``n_cells`` is.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ingest.errors import IngestError
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from shardset.genes import symbol_table

log = logging.getLogger(__name__)

TISSUE_CELL_TYPES: dict[str, tuple[str, ...]] = {
    "blood": ("CD4-positive, alpha-beta T cell", "CD14-positive monocyte", "B cell", "natural killer cell"),
    "lung": ("type II pneumocyte", "alveolar macrophage", "ciliated cell", "fibroblast"),
    "brain": ("astrocyte", "oligodendrocyte", "neuron", "microglial cell"),
    "liver": ("hepatocyte", "Kupffer cell", "endothelial cell"),
    "kidney": ("kidney proximal convoluted tubule epithelial cell", "podocyte", "endothelial cell"),
}
ASSAYS = ("10x 3' v2", "10x 3' v3", "10x 5' v1")


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    n_cells: int
    n_genes: int = 20_000
    mean_genes: float = 1500.0   # genes detected per cell (lognormal median)
    sd_log_genes: float = 0.35   # spread of genes per cell on the log scale
    chunk_cells: int = 5000      # cells generated and written per step (bounds memory)
    seed: int = 0
    tissues: tuple[str, ...] = ("blood", "lung", "brain", "liver", "kidney")
    non_primary_fraction: float = 0.05


def synth_var(n_genes: int) -> pd.DataFrame:
    """Real Ensembl ids and symbols from the shipped table first, clearly synthetic ids beyond it."""
    table = symbol_table()
    seen: dict[str, str] = {}
    for name, fid in table.items():
        seen.setdefault(fid, name)
        if len(seen) == n_genes:
            break
    ids, names = list(seen), list(seen.values())
    for i in range(len(ids), n_genes):
        ids.append(f"ENSGSYNTH{i:08d}")
        names.append(f"SYNTH{i}")
    return pd.DataFrame({"feature_id": ids, "feature_name": names})


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique via sort (numpy 2.4's hash-based unique is slower on large int64 arrays: BENCHMARKS.md)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if x.size else x


class CellSampler:
    """Draws count cells for named programs (cell types) over one gene space."""

    def __init__(self, n_genes: int, programs: list[str], rng: np.random.Generator,
                 mean_genes: float = 1500.0, sd_log_genes: float = 0.35) -> None:
        self.n_genes, self.rng = n_genes, rng
        self.mean_genes, self.sd_log_genes = mean_genes, sd_log_genes
        base = rng.normal(0.0, 1.5, n_genes)  # log gene weights: a few genes dominate, as in real data
        self.cdf: dict[str, np.ndarray] = {}
        self.rel: dict[str, np.ndarray] = {}
        for p in programs:
            logw = base.copy()
            markers = rng.choice(n_genes, size=max(n_genes // 50, 1), replace=False)
            logw[markers] += rng.normal(2.5, 0.5, markers.size)  # the program's marker genes
            w = np.exp(logw)
            self.cdf[p] = np.cumsum(w) / w.sum()
            self.rel[p] = np.minimum(w / np.median(w), 200.0)

    def sample(self, program: str, n_cells: int) -> sp.csr_matrix:
        """(n_cells, n_genes) float32 CSR of integer counts, ~mean_genes nonzeros per cell."""
        rng = self.rng
        n_genes = np.clip(rng.lognormal(np.log(self.mean_genes), self.sd_log_genes, n_cells),
                          20, self.n_genes // 2).astype(np.int64)
        # draws with replacement, de-duplicated per cell; top up the cells short of their target
        # (popular genes collide) for a few rounds, so detected genes track the lognormal target
        kt = np.uint32 if n_cells * self.n_genes < 2**32 else np.int64  # 32-bit keys sort faster (BENCHMARKS.md)
        key = np.zeros(0, dtype=kt)
        need = n_genes.copy()
        for _ in range(6):
            if need.sum() <= 0.02 * n_genes.sum():  # within 2% of the target: good enough, stop sorting
                break
            rows = np.repeat(np.arange(n_cells, dtype=kt), need + need // 10)
            genes = np.minimum(np.searchsorted(self.cdf[program], rng.random(rows.size), side="right"),
                               self.n_genes - 1).astype(kt)
            key = _sorted_unique(np.concatenate([key, rows * kt(self.n_genes) + genes]))  # row-major
            need = np.maximum(n_genes - np.bincount(key // self.n_genes, minlength=n_cells), 0)
        key = key.astype(np.int64)
        rows, genes = key // self.n_genes, key % self.n_genes
        mean = 0.3 * self.rel[program][genes] * rng.lognormal(0.0, 0.3, n_cells)[rows]  # size factor per cell
        counts = 1 + rng.negative_binomial(2, 2.0 / (2.0 + mean))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_cells))])
        return sp.csr_matrix((counts.astype(np.float32), genes, indptr), shape=(n_cells, self.n_genes))


def synth_census(out: str | Path, cfg: SynthConfig) -> Path:
    if cfg.n_cells <= 0 or cfg.n_genes < 100:
        raise IngestError("synth-census needs --cells > 0 and --genes >= 100")
    unknown = [t for t in cfg.tissues if t not in TISSUE_CELL_TYPES]
    if unknown:
        raise IngestError(f"unknown synthetic tissue(s) {unknown}; choose from {sorted(TISSUE_CELL_TYPES)}")
    rng = np.random.default_rng(cfg.seed)
    var = synth_var(cfg.n_genes)
    programs = [f"{t}|{c}" for t in cfg.tissues for c in TISSUE_CELL_TYPES[t]]
    sampler = CellSampler(cfg.n_genes, programs, rng, cfg.mean_genes, cfg.sd_log_genes)
    writer = CensusStoreWriter(out, var, cfg.n_cells,
                               build_note=f"SYNTHETIC store from `ingest synth-census` (seed {cfg.seed}); "
                               "not real data")
    t0, done = time.perf_counter(), 0
    try:
        for c0 in range(0, cfg.n_cells, cfg.chunk_cells):
            n = min(cfg.chunk_cells, cfg.n_cells - c0)
            chunk_no = c0 // cfg.chunk_cells
            tissue = cfg.tissues[chunk_no % len(cfg.tissues)]  # one dataset per chunk, one tissue each
            types = TISSUE_CELL_TYPES[tissue]
            labels = rng.integers(0, len(types), n)
            parts = [sampler.sample(f"{tissue}|{types[k]}", int((labels == k).sum())) for k in range(len(types))]
            order = np.concatenate([np.flatnonzero(labels == k) for k in range(len(types))])
            X = sp.vstack(parts, format="csr")[np.argsort(order)]
            assay = ASSAYS[chunk_no % len(ASSAYS)]
            obs = pd.DataFrame({
                "cell_type": np.asarray(types, dtype=object)[labels],
                "tissue": tissue, "tissue_general": tissue, "assay": assay,
                "donor_id": [f"synth-donor-{chunk_no}-{d}" for d in rng.integers(0, 4, n)],
                "is_primary_data": rng.random(n) >= cfg.non_primary_fraction,
                "sex": rng.choice(["female", "male"], n),
            })
            ds = DatasetInfo(dataset_id=f"synthetic-{cfg.seed}-{chunk_no:05d}",
                             title=f"SYNTHETIC {tissue} cells, chunk {chunk_no} (not real data)",
                             collection_name="SYNTHETIC (ingest synth-census)")
            writer.append(obs, X, ds)
            done += n
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log.info("synth-census: %d/%d cells (%.0f cells/s, ETA %.0fs)", done, cfg.n_cells, rate,
                     (cfg.n_cells - done) / rate)
        writer.close()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return Path(out)
