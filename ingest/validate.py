"""`ingest validate PATH`: re-check a shard set against its manifest and the data contract.

Checks: manifest hash; vocab.json matches vocab_hash; every planned shard present; per shard:
size and sha256, Arrow schema, row count, joinid range and order, no joinid in two shards, the
list columns aligned with n_genes, genes in the vocabulary (no special tokens) and strictly
ascending within a cell, counts finite positive integers summing to total_counts, bins within
1..n_bins-1, and the split counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.errors import IngestError
from scgpt_model.schema import (
    BINS,
    COUNTS,
    GENES,
    N_GENES,
    N_SPECIAL,
    SHARD_SCHEMA,
    SOMA_JOINID,
    TOTAL_COUNTS,
)
from scgpt_model.vocab import GeneVocab, VocabError
from shardset import VOCAB_FILE, Manifest, ManifestError, ShardEntry, sha256_file

log = logging.getLogger(__name__)


def _offsets_values(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return offsets - offsets[0], values


def _check_shard(table: pa.Table, entry: ShardEntry, manifest: Manifest, n_vocab: int) -> list[str]:
    errs: list[str] = []
    name = entry.path
    if table.schema.remove_metadata() != SHARD_SCHEMA.remove_metadata():
        return [f"{name}: schema differs from scgpt_model.schema.SHARD_SCHEMA"]
    if table.num_rows != entry.n_rows:
        errs.append(f"{name}: {table.num_rows} rows, manifest says {entry.n_rows}")
    ids = table.column(SOMA_JOINID).to_numpy()
    if ids.size and (ids.min() < entry.joinid_min or ids.max() > entry.joinid_max):
        errs.append(f"{name}: soma_joinids outside [{entry.joinid_min}, {entry.joinid_max}]")
    if np.any(np.diff(ids) <= 0):
        errs.append(f"{name}: soma_joinids not strictly ascending")
    n_genes = table.column(N_GENES).to_numpy().astype(np.int64)
    off_g, genes = _offsets_values(table.column(GENES))
    off_c, counts = _offsets_values(table.column(COUNTS))
    off_b, bins = _offsets_values(table.column(BINS))
    if not (np.array_equal(off_g, off_c) and np.array_equal(off_g, off_b) and np.array_equal(np.diff(off_g), n_genes)):
        errs.append(f"{name}: genes/counts/bins lists are not aligned with each other and n_genes")
        return errs
    if np.any(n_genes < manifest.min_genes):
        errs.append(f"{name}: a cell has fewer genes than --min-genes")
    if genes.size:
        if genes.min() < N_SPECIAL or genes.max() >= n_vocab:
            errs.append(f"{name}: gene ids outside the vocabulary's gene range [{N_SPECIAL}, {n_vocab})")
        inner = np.ones(genes.size - 1, dtype=bool)
        starts = off_g[1:-1]
        inner[starts[(starts > 0) & (starts < genes.size)] - 1] = False  # no order across a cell boundary
        if np.any(np.diff(genes)[inner] <= 0):
            errs.append(f"{name}: genes not strictly ascending within a cell")
        if not (np.all(np.isfinite(counts)) and counts.min() > 0 and np.all(counts == np.floor(counts))):
            errs.append(f"{name}: counts are not positive finite integers")
        if bins.min() < 1 or bins.max() > manifest.n_bins - 1:
            errs.append(f"{name}: bins outside 1..{manifest.n_bins - 1}")
        sums = np.add.reduceat(counts.astype(np.float64), off_g[:-1][n_genes > 0]) if n_genes.any() else []
        tot = table.column(TOTAL_COUNTS).to_numpy()[n_genes > 0]
        if not np.allclose(sums, tot, rtol=1e-6):
            errs.append(f"{name}: total_counts differ from the sum of counts")
    val = manifest.split_of(ids)
    if int(val.sum()) != entry.n_val or int((~val).sum()) != entry.n_train:
        errs.append(f"{name}: train/val counts differ from the manifest")
    return errs


# What fixes each kind of problem. A re-run of the command that wrote the folder (same arguments,
# same --out) keeps every shard whose size and sha256 match the manifest, rewrites the rest and
# vocab.json when its bytes differ, and finishes an interrupted ingest (ingest.run.OutputDir). A
# shard whose checksum matches but whose content breaks the contract, or a manifest that
# contradicts itself, was written that way: only a fresh ingest helps.
RERUN, FRESH = "rerun", "fresh"


def _remedy(kind: str, path: Path) -> str:
    if kind == RERUN:
        return (f"fix: re-run the `ingest census` command that wrote {path}, with the same arguments and the same "
                "--out (manifest.json 'args' records them): it keeps the shards that match the manifest and rewrites "
                "these")
    return (f"fix: these were written this way (their checksums match the manifest), so a re-run keeps them: "
            f"ingest again into a fresh --out (or delete {path} first) with this version of `ingest census`")


def _report(path: Path, problems: list[tuple[str, str]]) -> str:
    """The problems grouped under the remedy that fixes them."""
    lines = [f"shard set {path} failed validation ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"]
    for kind in (RERUN, FRESH):
        mine = [msg for k, msg in problems if k == kind]
        if mine:
            lines += [f"  {_remedy(kind, path)}:"] + [f"  - {m}" for m in mine]
    return "\n".join(lines)


def validate_shards(path: str | Path, *, check_checksums: bool = True) -> dict:
    """Re-check the shard set at ``path``; returns a report, raises IngestError listing every problem
    under the remedy that fixes it."""
    path = Path(path)
    try:
        manifest = Manifest.load(path)
    except ManifestError as e:
        raise IngestError(str(e)) from None
    errs: list[tuple[str, str]] = []  # (remedy kind, problem)
    try:
        vocab = GeneVocab.load(path / VOCAB_FILE)
    except VocabError as e:
        raise IngestError(f"{path}: {e}; {_remedy(RERUN, path).removesuffix(' these')} vocab.json") from e
    if vocab.hash() != manifest.vocab_hash:
        what = f"{VOCAB_FILE}: hash {vocab.hash()[:12]} differs from the manifest's {manifest.vocab_hash[:12]}"
        errs.append((RERUN, f"{what} (changed after ingest)"))
    if not manifest.complete or len(manifest.shards) != manifest.n_shards_planned:
        n, planned = len(manifest.shards), manifest.n_shards_planned
        errs.append((RERUN, f"the manifest is not complete ({n} of {planned} shards: an ingest was interrupted)"))
    seen_max = -1
    n_cells = n_nnz = 0
    for entry in manifest.shards:
        f = path / entry.path
        if not f.exists():
            errs.append((RERUN, f"{entry.path}: missing"))
            continue
        if f.stat().st_size != entry.n_bytes:
            errs.append((RERUN, f"{entry.path}: {f.stat().st_size} bytes, manifest says {entry.n_bytes}"))
            continue
        if check_checksums and sha256_file(f) != entry.sha256:
            errs.append((RERUN, f"{entry.path}: sha256 differs from the manifest (file changed after ingest)"))
            continue
        if entry.joinid_min <= seen_max:
            errs.append((FRESH, f"{entry.path}: joinid range overlaps the previous shard"))
        seen_max = entry.joinid_max
        table = pq.read_table(f)
        errs += [(FRESH, e) for e in _check_shard(table, entry, manifest, len(vocab))]
        n_cells += table.num_rows
        n_nnz += int(table.column(N_GENES).to_numpy().sum())
    if n_cells != manifest.totals.cells and not any(k == RERUN for k, _ in errs):
        errs.append((FRESH, f"{n_cells} cells in the shards, the manifest's totals say {manifest.totals.cells}"))
    if errs:
        raise IngestError(_report(path, errs))
    report = {"path": str(path), "ok": True, "n_shards": len(manifest.shards), "n_cells": n_cells,
              "n_nonzeros": n_nnz, "n_val": manifest.totals.n_val, "manifest_hash": manifest.hash(),
              "vocab_size": len(vocab)}
    log.info("validate: %s ok: %d shards, %d cells, %d nonzeros", path, report["n_shards"], n_cells, n_nnz)
    return report
