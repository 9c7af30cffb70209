"""Turning an unordered stream of (row, gene, value) triples into per-cell CSR, in O(nnz).

TileDB returns sparse reads in its global (tile) order, not row-major; asking it for row-major
is ~15x slower. Within one row, the tile order already yields ascending column ids, so a stable
counting sort by row gives rows with ascending genes; rows that are not (a vocabulary that
reorders genes) are sorted individually, and duplicate genes in a row (several var entries
mapped to one token) are summed.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _group_kernel(row, gid, val, n_rows, merge):
    """row (nnz,) int32 in [0, n_rows); gid (nnz,) int32; val (nnz,) float32.
    Returns indptr (n_rows+1,) int64, genes (m,) int32, values (m,) float32 with m <= nnz."""
    nnz = row.shape[0]
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for i in range(nnz):
        counts[row[i] + 1] += 1
    indptr = np.cumsum(counts)
    fill = indptr[:-1].copy()
    g = np.empty(nnz, dtype=np.int32)
    v = np.empty(nnz, dtype=np.float32)
    for i in range(nnz):  # stable counting sort by row
        p = fill[row[i]]
        g[p] = gid[i]
        v[p] = val[i]
        fill[row[i]] = p + 1
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
        for k in range(s, e):  # compact in place; duplicates of one gene are summed or kept
            if merge and k > s and g[k] == g[w - 1]:
                v[w - 1] += v[k]
            else:
                g[w] = g[k]
                v[w] = v[k]
                w += 1
        out_ptr[r + 1] = w
    return out_ptr, g[:w], v[:w]


def group_by_row(row: np.ndarray, gid: np.ndarray, val: np.ndarray, n_rows: int, *,
                 merge_duplicates: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, genes ascending per row, values) from unordered triples; see module doc."""
    return _group_kernel(np.ascontiguousarray(row, dtype=np.int32), np.ascontiguousarray(gid, dtype=np.int32),
                         np.ascontiguousarray(val, dtype=np.float32), int(n_rows), bool(merge_duplicates))


def rows_of(d0: np.ndarray, joinids: np.ndarray) -> np.ndarray:
    """(nnz,) int32 index into the sorted ``joinids`` of each soma_dim_0 value.

    A chunk is a contiguous slice of a sorted query, so a dense lookup table over its joinid
    span is cheap (span <= 8x its size) and avoids a binary search per nonzero.
    """
    lo, hi = int(joinids[0]), int(joinids[-1])
    if hi - lo + 1 <= 8 * joinids.size + 1024:
        table = np.full(hi - lo + 1, -1, dtype=np.int32)
        table[joinids - lo] = np.arange(joinids.size, dtype=np.int32)
        return table[d0 - lo]
    return np.searchsorted(joinids, d0).astype(np.int32)
