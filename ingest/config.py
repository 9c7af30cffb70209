"""The arguments of ``ingest census``: one dataclass, whose defaults are the command line's.

Light to import (no tiledbsoma), so ``ingest --help`` can show the defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ingest.errors import IngestError
from scgpt_model.schema import DEFAULT_N_BINS, DEFAULT_SEED, DEFAULT_VAL_FRACTION, n_bins_problem

__all__ = ["IngestConfig"]


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    """Arguments of `ingest census` (SPEC §3). Defaults say why they are what they are."""

    out: str
    census_uri: str | None = None          # a local copy (the way to avoid S3 timeouts); wins over version
    census_version: str = "stable"         # the public Census release when no --census-uri
    organism: str = "Homo sapiens"
    tissues: tuple[str, ...] = ()          # tissue_general values, OR-ed
    diseases: tuple[str, ...] = ()
    assays: tuple[str, ...] = ()
    obs_filters: tuple[str, ...] = ()      # raw SOMA value filters, AND-ed with the rest
    include_non_primary: bool = False      # primary only by default: Census repeats cells across collections
    min_genes: int = 1                     # in-vocabulary nonzero genes a cell needs (0-gene cells break training)
    n_bins: int = DEFAULT_N_BINS           # paper default 51
    vocab: str | None = None               # reuse a vocabulary (e.g. a checkpoint's); default: the store's var
    gene_key: Literal["feature_id", "feature_name"] | None = None  # default: the vocab's key, else feature_id
    cells_per_shard: int = 10_000          # one Ray task per shard; bounds worker memory (BENCHMARKS.md)
    max_cells: int | None = None           # a seeded sample of the query for quick runs
    seed: int = DEFAULT_SEED               # tie draws in binning, split, sampling
    val_fraction: float = DEFAULT_VAL_FRACTION  # paper §4.8: 97% / 3%
    ray_address: str | None = None         # None: a local Ray started (and stopped) by this command
    num_cpus: int | None = None            # local Ray only; None: all cores
    progress_every_s: float = 2.0         # at most one progress line per this many seconds
    stop_grace_s: float = 15.0            # on a signal or an error, how long the shards being written may finish

    def check(self) -> None:
        """Refuse out-of-range arguments (IngestError naming the option); `ingest validate` is the shard check."""
        if problem := n_bins_problem(self.n_bins):
            raise IngestError(f"--n-bins {self.n_bins}: {problem}")
        if self.cells_per_shard < 1:
            raise IngestError(f"--cells-per-shard {self.cells_per_shard}: must be >= 1")
        if self.max_cells is not None and self.max_cells < 1:
            raise IngestError(f"--max-cells {self.max_cells}: must be >= 1 (or leave it out for all cells)")
        if not (0.0 <= self.val_fraction < 1.0):
            raise IngestError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.min_genes < 0:
            raise IngestError(f"--min-genes {self.min_genes}: must be >= 0")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise IngestError(f"--num-cpus {self.num_cpus}: must be >= 1")
        if self.gene_key not in (None, "feature_id", "feature_name"):
            raise IngestError(f"--gene-key {self.gene_key}: use feature_id (Ensembl) or feature_name (symbol)")
