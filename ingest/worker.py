"""One chunk of soma_joinids -> one Parquet shard. Runs as a Ray task; opens the store itself.

Memory: the chunk's X rows as flat (nnz,) numpy arrays plus the Arrow table being written,
i.e. proportional to ``cells_per_shard``, never to the size of the query.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.csr import group_by_row, rows_of
from ingest.errors import IngestError
from ingest.manifest import is_validation, sha256_file
from scgpt_model.binning import bin_nonzero
from scgpt_model.schema import (
    BINS,
    COUNTS,
    GENES,
    N_GENES,
    OBS_COLUMNS,
    SHARD_COMPRESSION,
    SHARD_SCHEMA,
    SOMA_JOINID,
    TOTAL_COUNTS,
)

log = logging.getLogger(__name__)

_OBS_DICT = pa.dictionary(pa.int32(), pa.string())


def shard_name(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


def read_chunk(exp, joinids: np.ndarray, var_to_vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream the chunk's X rows as Arrow tables, compacting each table as it arrives.

    Returns flat (nnz,) arrays: row (int32, index into ``joinids``), gene (int32 vocabulary id,
    -1 = not in the vocabulary), value (float32). Counts are checked table by table.
    """
    rows, genes, vals = [], [], []
    for tbl in exp.ms["RNA"].X["raw"].read(coords=(joinids,)).tables():
        d0 = tbl.column("soma_dim_0").to_numpy()
        val = tbl.column("soma_data").to_numpy()
        check_chunk_counts(val, d0)
        row = rows_of(d0, joinids)
        rows.append(row)
        genes.append(var_to_vocab[tbl.column("soma_dim_1").to_numpy()])
        vals.append(val.astype(np.float32, copy=False))
    if not rows:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(genes), np.concatenate(vals)


def check_chunk_counts(values: np.ndarray, joinids: np.ndarray) -> None:
    """Raw counts only: finite, non-negative, integer. Names the first offending cell."""
    bad = ~np.isfinite(values)
    what = "non-finite (NaN/inf)"
    if not bad.any():
        bad, what = values < 0, "negative"
    if not bad.any():
        bad, what = values != np.floor(values), "non-integer"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise IngestError(f"X/raw has {what} values (e.g. {values[i]!r} in cell soma_joinid {int(joinids[i])}); "
                          "ingest bins raw UMI counts. Point --census-uri at a store whose X layer 'raw' holds raw "
                          "integer counts (rebuild it with `ingest build-census --layer counts` if needed)")


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
    with open_census(spec["source"]) as census:
        exp = experiment_of(census, spec["organism"], "store")
        row, gid, val = read_chunk(exp, joinids, np.asarray(spec["var_to_vocab"], dtype=np.int32))
        t_read = time.perf_counter() - t0
        if gid.size and ((gid < 0).any() or (val == 0).any()):  # genes not in the vocabulary, explicit zeros
            keep = (gid >= 0) & (val != 0)
            row, gid, val = row[keep], gid[keep], val[keep]
        # (nnz,) unordered triples -> CSR with genes ascending per cell (duplicate tokens summed)
        indptr, gid, val = group_by_row(row, gid, val, joinids.size, merge_duplicates=bool(spec.get("merge_duplicates")))
        del row
        n_genes = np.diff(indptr)
        keep_rows = n_genes >= max(int(spec["min_genes"]), 1)
        if not keep_rows.all():
            mask = np.repeat(keep_rows, n_genes)
            gid, val = gid[mask], val[mask]
            n_genes = n_genes[keep_rows]
            indptr = np.concatenate([[0], np.cumsum(n_genes)]).astype(np.int64)
        kept_ids = joinids[keep_rows]
        bins = bin_nonzero(indptr, val, kept_ids, n_bins=spec["n_bins"], seed=spec["seed"])
        totals = np.add.reduceat(val.astype(np.float64), indptr[:-1]) if val.size else np.zeros(0)
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
        pq.write_table(table, tmp, compression=SHARD_COMPRESSION)
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
        "total_s": round(time.perf_counter() - t0, 4),
    }
