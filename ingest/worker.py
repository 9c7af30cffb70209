"""One chunk of soma_joinids -> one Parquet shard. Runs as a Ray task; opens the store itself.

Memory: the chunk's X rows as flat (nnz,) numpy arrays plus the Arrow table being written,
i.e. proportional to ``cells_per_shard``, never to the size of the query.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.csr import BadCounts, RowAssembler
from ingest.errors import IngestError
from ingest.manifest import is_validation, sha256_file
from scgpt_model.binning import bin_nonzero
from scgpt_model.schema import (
    BINS,
    COUNTS,
    GENES,
    N_GENES,
    OBS_COLUMNS,
    SHARD_SCHEMA,
    SHARD_WRITE_OPTIONS,
    SOMA_JOINID,
    TOTAL_COUNTS,
)

log = logging.getLogger(__name__)

_OBS_DICT = pa.dictionary(pa.int32(), pa.string())

# TileDB result buffers per X read. Small buffers stream a chunk as several Arrow tables whose
# memory the allocator recycles, instead of ~650 MB of fresh pages per 10k cells (Census's
# 1 GiB default); measured ~30% less CPU per read on the benchmark store.
READ_BUFFER_BYTES = 16 << 20


def shard_name(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


def assemble(tables: Iterable[pa.Table], joinids: np.ndarray, var_to_vocab: np.ndarray, *,
             merge_duplicates: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X tables (soma_dim_0, soma_dim_1, soma_data) of the cells ``joinids`` -> CSR rows in
    ``joinids`` order: (indptr, vocabulary ids ascending per cell, counts float32). Counts are
    checked (finite, non-negative, integer) as each table arrives; genes outside the vocabulary
    and explicit zeros are dropped, duplicate tokens summed when ``merge_duplicates``."""
    asm = RowAssembler(joinids, var_to_vocab, merge_duplicates=merge_duplicates)
    for tbl in tables:
        try:
            asm.add(*(_column(tbl, c) for c in ("soma_dim_0", "soma_dim_1", "soma_data")))
        except BadCounts as e:
            raise IngestError(f"X/raw has {e.kind} values (e.g. {e.value!r} in cell soma_joinid {e.soma_joinid}); "
                              "ingest bins raw UMI counts. Point --census-uri at a store whose X layer 'raw' holds "
                              "raw integer counts (rebuild it with `ingest build-census --layer counts` if "
                              "needed)") from None
    return asm.finish()


def _column(tbl: pa.Table, name: str) -> np.ndarray:
    col = tbl.column(name)
    return (col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()).to_numpy(zero_copy_only=False)


def _obs_columns(exp, joinids: np.ndarray, keep_ids: np.ndarray) -> dict[str, pa.Array]:
    """Obs metadata for ``keep_ids`` (sorted), dictionary<int32, string> as SHARD_SCHEMA wants."""
    names = set(exp.obs.schema.names)
    cols = [c for c in OBS_COLUMNS if c in names]
    tbl = exp.obs.read(coords=(joinids,), column_names=[SOMA_JOINID, *cols]).concat()
    ids = tbl.column(SOMA_JOINID).to_numpy()
    order = np.argsort(ids, kind="stable")
    take = pa.array(order[np.searchsorted(ids[order], keep_ids)])
    out: dict[str, pa.Array] = {}
    for c in OBS_COLUMNS:
        if c not in cols:
            out[c] = pa.array(["unknown"] * len(keep_ids)).dictionary_encode().cast(_OBS_DICT)
            continue
        arr = tbl.column(c).combine_chunks().take(take)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        out[c] = arr.cast(pa.string()).dictionary_encode().cast(_OBS_DICT)
    return out


def _list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=typ))


def process_chunk(spec: dict) -> dict:
    """Read, map genes, check, bin and write one shard. ``spec`` carries everything (no globals):
    source, organism, index, joinids (sorted int64), out, var_to_vocab (n_var,) int32 (-1 = not in
    vocab), merge_duplicates, n_bins, seed, val_fraction, min_genes."""
    from ingest.query import experiment_of, open_census

    t0 = time.perf_counter()
    joinids = np.asarray(spec["joinids"], dtype=np.int64)
    out = Path(spec["out"])
    final = out / shard_name(spec["index"])
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open_census(spec["source"], {"soma.init_buffer_bytes": READ_BUFFER_BYTES}) as census:
        exp = experiment_of(census, spec["organism"], "store")
        tables = exp.ms["RNA"].X["raw"].read(coords=(joinids,)).tables()
        indptr, gid, val = assemble(tables, joinids, np.asarray(spec["var_to_vocab"], dtype=np.int32),
                                    merge_duplicates=bool(spec.get("merge_duplicates")))
        t_read = time.perf_counter() - t0
        n_genes = np.diff(indptr)
        keep_rows = n_genes >= max(int(spec["min_genes"]), 1)
        if not keep_rows.all():
            mask = np.repeat(keep_rows, n_genes)
            gid, val = gid[mask], val[mask]
            n_genes = n_genes[keep_rows]
            indptr = np.concatenate([[0], np.cumsum(n_genes)]).astype(np.int64)
        kept_ids = joinids[keep_rows]
        bins = bin_nonzero(indptr, val, kept_ids, n_bins=spec["n_bins"], seed=spec["seed"])
        totals = np.add.reduceat(val, indptr[:-1], dtype=np.float64) if val.size else np.zeros(0)
        obs = _obs_columns(exp, joinids, kept_ids)

    table = pa.Table.from_pydict({
        SOMA_JOINID: pa.array(kept_ids, pa.int64()),
        GENES: _list_array(indptr, gid.astype(np.int32), pa.int32()),
        COUNTS: _list_array(indptr, val, pa.float32()),
        BINS: _list_array(indptr, bins, pa.uint8()),
        N_GENES: pa.array(n_genes.astype(np.int32)),
        TOTAL_COUNTS: pa.array(totals.astype(np.float32), pa.float32()),
        **obs,
    }, schema=SHARD_SCHEMA)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        pq.write_table(table, tmp, **SHARD_WRITE_OPTIONS)
        os.replace(tmp, final)  # the shard becomes visible only when complete
    finally:
        if tmp.exists():
            tmp.unlink()
    val_mask = is_validation(kept_ids, spec["val_fraction"], spec["seed"])
    return {
        "index": int(spec["index"]),
        "path": shard_name(spec["index"]),
        "n_rows": int(kept_ids.size),
        "n_bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "joinid_min": int(joinids[0]),
        "joinid_max": int(joinids[-1]),
        "n_train": int((~val_mask).sum()),
        "n_val": int(val_mask.sum()),
        "nnz": int(val.size),
        "n_dropped_min_genes": int((~keep_rows).sum()),
        "read_s": round(t_read, 4),
        "pid": os.getpid(),
        "t_start": t0,
        "total_s": round(time.perf_counter() - t0, 4),
    }
