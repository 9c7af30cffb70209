"""One chunk of soma_joinids -> one Parquet shard. Runs as a Ray task; opens the store itself.

Memory: the chunk's X rows as flat (nnz,) numpy arrays plus the Arrow table being written,
i.e. proportional to ``cells_per_shard``, never to the size of the query.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.csr import BadCounts, RowAssembler, Scratch, row_sums
from ingest.errors import DiskFull, IngestError, is_disk_full
from ingest.shard_writer import write_shard
from scgpt_model.binning import bin_nonzero
from scgpt_model.schema import (
    BINS,
    COUNTS,
    GENES,
    N_GENES,
    OBS_COLUMNS,
    SHARD_SCHEMA,
    SOMA_JOINID,
    TOTAL_COUNTS,
)
from shardset import is_validation, sha256_file, shard_name

log = logging.getLogger(__name__)

_OBS_DICT = pa.dictionary(pa.int32(), pa.string())

# TileDB result buffers per X read. Small buffers stream a chunk as several Arrow tables whose
# memory the allocator recycles, instead of fresh pages for the whole chunk (Census's 1 GiB
# default); less CPU per read (BENCHMARKS.md, measurements moved from code comments).
READ_BUFFER_BYTES = 16 << 20


# Environment of the Ray worker processes (glibc malloc). By default glibc hands freed heap
# memory back to the kernel at once, so every chunk re-faults (and the kernel re-zeroes) the
# hundreds of MB TileDB and Arrow allocated for the previous chunk. Keeping up to 256 MiB of free
# heap (64 MiB top pad) makes reads cheaper; two arenas instead of one per TileDB thread keep
# fragmentation from growing the heap, so a worker's RSS stays flat over many chunks (figures:
# BENCHMARKS.md, measurements moved from code comments).
WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_TOP_PAD_": str(64 << 20), "MALLOC_ARENA_MAX": "2"}

# This process's reused work arrays (X genes/counts, bins): one set per Ray worker process.
_SCRATCH = Scratch()


def rows_from_tables(tables: Iterable[pa.Table], joinids: np.ndarray, var_to_vocab: np.ndarray, *,
                     merge_duplicates: bool = False, scratch: Scratch | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X tables (soma_dim_0, soma_dim_1, soma_data) of the cells ``joinids`` -> CSR rows in
    ``joinids`` order: (indptr, vocabulary ids ascending per cell, counts float32). Counts are
    checked (finite, non-negative, integer) as each table arrives; genes outside the vocabulary
    and explicit zeros are dropped, duplicate tokens summed when ``merge_duplicates``. With
    ``scratch`` the genes and counts are views into its reused buffers."""
    asm = RowAssembler(joinids, var_to_vocab, merge_duplicates=merge_duplicates)
    for tbl in tables:
        try:
            asm.add(*(_column(tbl, c) for c in ("soma_dim_0", "soma_dim_1", "soma_data")))
        except BadCounts as e:
            raise IngestError(f"X/raw has {e.kind} values (e.g. {e.value!r} in cell soma_joinid {e.soma_joinid}); "
                              "ingest bins raw UMI counts. Point --census-uri at a store whose X layer 'raw' holds "
                              "raw integer counts (rebuild it with `ingest build-census --layer counts` if "
                              "needed)") from None
    return asm.finish(scratch)


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


# The store this worker process has open: (key, census handle, experiment). A worker runs many
# chunks of one ingest; reopening per chunk built a new TileDB context each time (thread pools,
# buffers, fragment metadata), a cost per chunk in reads and obs lookups (BENCHMARKS.md).
_OPEN: tuple | None = None


def _open_experiment(spec: dict):
    """The experiment of ``spec``'s store, opened once per worker process and ingest run."""
    global _OPEN
    from ingest.query import experiment_of, open_census

    key = (json.dumps(spec["source"], sort_keys=True), spec["organism"], spec["out"], spec.get("run_token"))
    if _OPEN is None or _OPEN[0] != key:
        if _OPEN is not None:
            _OPEN[1].close()
            _OPEN = None
        census = open_census(spec["source"], {"soma.init_buffer_bytes": READ_BUFFER_BYTES})
        try:
            exp = experiment_of(census, spec["organism"], "store")
        except BaseException:
            census.close()
            raise
        _OPEN = (key, census, exp)
    return _OPEN[2]


def _rss_mb() -> float:
    """This process's resident memory now (MB), for the debug log."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class _Stages:
    """Wall and CPU (this process, all threads) seconds per stage, for the debug log."""

    def __init__(self) -> None:
        self.t0 = self.w = time.perf_counter()
        self.c = time.process_time()
        self.stages: dict[str, tuple[float, float]] = {}

    def mark(self, name: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.stages[name] = (round(w - self.w, 4), round(c - self.c, 4))
        self.w, self.c = w, c


def process_chunk(spec: dict) -> dict:
    """Read, map genes, check, bin and write one shard. ``spec`` carries everything: source,
    organism, index, joinids (sorted int64), out, var_to_vocab (n_var,) int32 (-1 = not in vocab),
    merge_duplicates, n_bins, seed, val_fraction, min_genes, and run_token (chunks of one run share
    this process's open store handle). The only state kept between chunks is that handle and the
    scratch arrays, never data."""
    st = _Stages()
    joinids = np.asarray(spec["joinids"], dtype=np.int64)
    out = Path(spec["out"])
    final = out / shard_name(spec["index"])
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    exp = _open_experiment(spec)
    st.mark("open")
    # the assembler keeps every table until its scatter pass anyway, so reading them all first
    # costs no memory and lets the log tell reading from assembling
    tables = list(exp.ms["RNA"].X["raw"].read(coords=(joinids,)).tables())
    st.mark("read")
    indptr, gid, val = rows_from_tables(tables, joinids, np.asarray(spec["var_to_vocab"], dtype=np.int32),
                                        merge_duplicates=bool(spec.get("merge_duplicates")), scratch=_SCRATCH)
    del tables
    st.mark("assemble")
    n_genes = np.diff(indptr)
    keep_rows = n_genes >= max(int(spec["min_genes"]), 1)
    if not keep_rows.all():
        mask = np.repeat(keep_rows, n_genes)
        gid, val = gid[mask], val[mask]
        n_genes = n_genes[keep_rows]
        indptr = np.concatenate([[0], np.cumsum(n_genes)]).astype(np.int64)
    kept_ids = joinids[keep_rows]
    bins = bin_nonzero(indptr, val, kept_ids, n_bins=spec["n_bins"], seed=spec["seed"],
                       out=_SCRATCH.array("bins", val.size, np.uint8))
    st.mark("bin")
    totals = row_sums(indptr, val)
    obs = _obs_columns(exp, joinids, kept_ids)
    st.mark("obs")

    table = pa.Table.from_pydict({
        SOMA_JOINID: pa.array(kept_ids, pa.int64()),
        GENES: _list_array(indptr, gid, pa.int32()),
        COUNTS: _list_array(indptr, val, pa.float32()),
        BINS: _list_array(indptr, bins, pa.uint8()),
        N_GENES: pa.array(n_genes.astype(np.int32)),
        TOTAL_COUNTS: pa.array(totals, pa.float32()),
        **obs,
    }, schema=SHARD_SCHEMA)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write_shard(table, tmp)
        os.replace(tmp, final)  # the shard becomes visible only when complete
    except OSError as e:
        if is_disk_full(e):  # one message naming the path, not a worker traceback
            raise DiskFull.at(tmp, out) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    st.mark("write")
    val_mask = is_validation(kept_ids, spec["val_fraction"], spec["seed"])
    digest = sha256_file(final)
    st.mark("sha256")
    return {
        "index": int(spec["index"]),
        "path": shard_name(spec["index"]),
        "n_rows": int(kept_ids.size),
        "n_bytes": final.stat().st_size,
        "sha256": digest,
        "joinid_min": int(joinids[0]),
        "joinid_max": int(joinids[-1]),
        "n_train": int((~val_mask).sum()),
        "n_val": int(val_mask.sum()),
        "nnz": int(val.size),
        "n_dropped_min_genes": int((~keep_rows).sum()),
        "pid": os.getpid(),
        "rss_mb": _rss_mb(),
        "t_start": st.t0,
        "stages": st.stages,
    }
