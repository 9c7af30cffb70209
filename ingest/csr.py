"""Arrow tables of (soma_dim_0, soma_dim_1, soma_data) -> per-cell CSR, in two passes over the data.

TileDB returns sparse reads in its global (tile) order, not row-major; asking it for row-major
is far slower (BENCHMARKS.md, measurements moved from code comments). Within one row, the tile
order already yields ascending column ids, so a stable counting sort by row gives rows with
ascending genes; rows that are not (a vocabulary that reorders genes) are sorted individually,
and duplicate genes in a row (several var entries mapped to one token) are summed.

``RowAssembler`` fuses everything a chunk needs into two numba passes over each Arrow table,
zero-copy on its buffers: the count check (finite, non-negative, integer), soma_joinid -> row,
var joinid -> vocabulary id, dropping genes outside the vocabulary and explicit zeros, and the
counting-sort scatter. No (nnz,) temporaries besides the output.
"""

from __future__ import annotations

import numba
import numpy as np

from shardset.counts import NEGATIVE, NONFINITE, NONINTEGER

# codes of the first bad count a pass finds (0 = none)
BAD_NONFINITE, BAD_NEGATIVE, BAD_NONINTEGER, BAD_ROW = 1, 2, 3, 4


@numba.njit(inline="always")
def _row(d, lo, table, joinids):
    """Index into the sorted ``joinids`` of soma_joinid ``d``; -1 when it is not in the chunk."""
    if table.shape[0]:
        k = d - lo
        if k < 0 or k >= table.shape[0]:
            return -1
        return table[k]
    k = np.searchsorted(joinids, d)
    if k < joinids.shape[0] and joinids[k] == d:
        return k
    return -1


@numba.njit(cache=True, nogil=True)
def _n_bad(val):
    """How many values are not raw counts (NaN/inf, negative or fractional); branch-free, so it
    vectorises: ``x - x`` is NaN exactly for NaN and +-inf."""
    n = 0
    for i in range(val.shape[0]):
        x = val[i]
        n += (x < 0) | (x != np.floor(x)) | ((x - x) != 0)
    return n


@numba.njit(cache=True, nogil=True)
def _first_bad(val):
    for i in range(val.shape[0]):
        x = val[i]
        if not np.isfinite(x):
            return BAD_NONFINITE, i
        if x < 0:
            return BAD_NEGATIVE, i
        if x != np.floor(x):
            return BAD_NONINTEGER, i
    return 0, -1


@numba.njit(cache=True, nogil=True)
def _count_pass(d0, d1, val, lo, table, joinids, var_to_vocab, counts):
    """Checks counts, counts the kept entries per row into ``counts[row + 1]``.
    Returns (code, index) of the first bad entry, (0, -1) when all are good."""
    if _n_bad(val):
        return _first_bad(val)
    n_var = var_to_vocab.shape[0]
    for i in range(val.shape[0]):
        c = d1[i]
        if val[i] == 0 or c < 0 or c >= n_var or var_to_vocab[c] < 0:
            continue
        r = _row(d0[i], lo, table, joinids)
        if r < 0:
            return BAD_ROW, i
        counts[r + 1] += 1
    return 0, -1


@numba.njit(cache=True, nogil=True)
def _scatter_pass(d0, d1, val, lo, table, joinids, var_to_vocab, fill, genes, values):
    """Stable counting-sort scatter of the kept entries (same filter as ``_count_pass``)."""
    for i in range(val.shape[0]):
        x = val[i]
        if x == 0:
            continue
        c = d1[i]
        if c < 0 or c >= var_to_vocab.shape[0]:
            continue
        g = var_to_vocab[c]
        if g < 0:
            continue
        r = _row(d0[i], lo, table, joinids)
        p = fill[r]
        genes[p] = g
        values[p] = x
        fill[r] = p + 1


@numba.njit(cache=True, nogil=True)
def _sort_merge_rows(indptr, g, v, merge):
    """Genes ascending within each row (sorting only rows that are not), duplicates summed or
    kept; compacts in place. Returns the new indptr and the used length."""
    n_rows = indptr.shape[0] - 1
    out_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    w = 0
    for r in range(n_rows):
        s, e = indptr[r], indptr[r + 1]
        ordered = True
        for k in range(s + 1, e):
            if g[k] <= g[k - 1]:
                ordered = False
                break
        if not ordered:  # rare: sort this row by gene (stable, so merged sums keep read order)
            order = np.argsort(g[s:e], kind="mergesort")
            gs = g[s:e][order]
            vs = v[s:e][order]
            g[s:e] = gs
            v[s:e] = vs
        for k in range(s, e):
            if merge and k > s and g[k] == g[w - 1]:
                v[w - 1] += v[k]
            else:
                g[w] = g[k]
                v[w] = v[k]
                w += 1
        out_ptr[r + 1] = w
    return out_ptr, w


@numba.njit(cache=True, nogil=True)
def row_sums(indptr, values):
    """Per-row sums of a CSR block, accumulated in float64, returned as float32 (``total_counts``).
    (``np.add.reduceat`` with a float64 accumulator took 0.02-0.27 s per 10k cells, erratically.)"""
    n = indptr.shape[0] - 1
    out = np.zeros(n, dtype=np.float32)
    for r in range(n):
        acc = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            acc += values[k]
        out[r] = acc
    return out


def _row_table(joinids: np.ndarray) -> tuple[int, np.ndarray]:
    """A dense soma_joinid -> row lookup over the chunk's joinid span when that span is small
    (a chunk is a slice of a sorted query, usually near-contiguous); else empty (binary search)."""
    lo, hi = int(joinids[0]), int(joinids[-1])
    if hi - lo + 1 <= 8 * joinids.size + 1024:
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[joinids - lo] = np.arange(joinids.size, dtype=np.int64)
        return lo, table
    return lo, np.zeros(0, dtype=np.int64)


class BadCounts(ValueError):
    """A count that is not a raw UMI count: ``kind`` names it, ``soma_joinid`` and ``value`` show it."""

    def __init__(self, kind: str, soma_joinid: int, value: float) -> None:
        super().__init__(f"{kind} value {value!r} in cell soma_joinid {soma_joinid}")
        self.kind, self.soma_joinid, self.value = kind, soma_joinid, value


# the rule of shardset.counts, fused into the numba pass (tests/test_counts.py binds the two)
_KINDS = {BAD_NONFINITE: NONFINITE, BAD_NEGATIVE: NEGATIVE, BAD_NONINTEGER: NONINTEGER}


class RowAssembler:
    """Collects a chunk's X tables and assembles them into CSR rows ordered like ``joinids``.

    ``add`` runs the first pass (checks and per-row counts) as each table arrives and keeps a
    reference to its buffers; ``finish`` allocates the output once and scatters every table.
    """

    def __init__(self, joinids: np.ndarray, var_to_vocab: np.ndarray, *, merge_duplicates: bool = False) -> None:
        self.joinids = np.ascontiguousarray(joinids, dtype=np.int64)
        self.var_to_vocab = np.ascontiguousarray(var_to_vocab, dtype=np.int32)
        self.merge = bool(merge_duplicates)
        self.lo, self.table = _row_table(self.joinids) if self.joinids.size else (0, np.zeros(0, np.int64))
        self.counts = np.zeros(self.joinids.size + 1, dtype=np.int64)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, d0: np.ndarray, d1: np.ndarray, val: np.ndarray) -> None:
        d0 = np.ascontiguousarray(d0, dtype=np.int64)
        d1 = np.ascontiguousarray(d1, dtype=np.int64)
        val = np.ascontiguousarray(val)
        if val.dtype.kind not in "fiu":
            raise TypeError(f"X values must be numeric, got {val.dtype}")
        code, i = _count_pass(d0, d1, val, self.lo, self.table, self.joinids, self.var_to_vocab, self.counts)
        if code == BAD_ROW:
            raise RuntimeError(f"the store returned soma_joinid {int(d0[i])}, which was not requested")
        if code:
            raise BadCounts(_KINDS[code], int(d0[i]), val[i].item())
        self.parts.append((d0, d1, val))

    def finish(self, scratch: Scratch | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr (n+1,) int64, genes (nnz,) int32 ascending per row, values (nnz,) float32).
        With ``scratch``, genes and values are views into its reused buffers (valid until the
        next chunk uses them)."""
        indptr = np.cumsum(self.counts)
        nnz = int(indptr[-1])
        if scratch is None:
            genes, values = np.empty(nnz, dtype=np.int32), np.empty(nnz, dtype=np.float32)
        else:
            genes, values = scratch.array("genes", nnz, np.int32), scratch.array("values", nnz, np.float32)
        fill = indptr[:-1].copy()
        for d0, d1, val in self.parts:
            _scatter_pass(d0, d1, val, self.lo, self.table, self.joinids, self.var_to_vocab, fill, genes, values)
        self.parts.clear()
        indptr, w = _sort_merge_rows(indptr, genes, values, self.merge)
        if w < genes.size:
            genes, values = genes[:w], values[:w]
            if scratch is None:
                genes, values = genes.copy(), values.copy()
        return indptr, genes, values


class Scratch:
    """Large per-process work arrays reused from one chunk to the next.

    A fresh 60 MB numpy array is a fresh mmap: the kernel zero-fills every page on first touch,
    a measurable cost per chunk (BENCHMARKS.md, measurements moved from code comments). Arrays
    handed out here are views of buffers that are kept and grown (with 25% headroom) on demand,
    so memory stays bounded by the largest chunk. A view is valid only until the same name is
    requested again.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def array(self, name: str, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.size < n:  # 25% headroom: chunks vary in size
            grown = buf.size if buf is not None and buf.dtype == dtype else 0
            buf = self._bufs[name] = np.empty(int(1.25 * max(n, grown)), dtype=dtype)
        return buf[:n]

