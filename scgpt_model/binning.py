"""Value binning, paper eq. 2 (§4.1), seeded and vectorised over a whole CSR block.

Per cell, over its nonzero values only:

* edges = ``np.quantile(nonzero, np.linspace(0, 1, n_bins - 1))`` (numpy's default
  "linear" method, reproduced bit for bit below so that ties with data values are exact);
* a value ``x`` lies between ``R = #edges < x`` (``np.digitize(x, edges, right=True)``) and
  ``L = #edges <= x`` (``np.digitize(x, edges)``); its bin is ``ceil(u * (L - R) + R)``,
  the reference scGPT formula, so ties over several equal edges are spread uniformly over
  ``R+1 .. L`` and a value strictly between two edges gets ``R == L``;
* bins are ``1 .. n_bins - 1``; zeros are not in the input and stay bin 0.

The reference draws ``u`` from an unseeded global RNG (scGPT #319, #281). Here ``u`` is a
counter-based hash of ``(seed, cell id, position of the value within the cell)``: the same cell
always gets the same bins, whatever chunk or worker processes it, and no RNG state is carried.

The kernel is a numba loop over rows (per-row argsort of ~1.5k values, 50 edges, one merge sweep),
compiled once and cached on disk. No Python-level loop over cells.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from scgpt_model.schema import DEFAULT_N_BINS, DEFAULT_SEED, n_bins_problem

__all__ = ["bin_nonzero", "bin_csr", "tie_uniforms", "quantile_levels"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@numba.njit(inline="always")
def _splitmix64(x):  # uint64 -> uint64, a bijective mixer (Steele et al., SplitMix64 finaliser)
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always")
def _uniform(seed, cell, pos):
    """A uniform in the OPEN interval (0, 1) from (seed, cell, pos), all uint64.

    Open at 0 so that ``ceil(u * (L - R) + R) >= R + 1`` whenever ``L > R`` (the reference's
    ``np.random.rand`` can return exactly 0 and then yields bin 0 for the smallest value).
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed) ^ cell) ^ pos)
    return (np.float64(h >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)  # 2**53


@numba.njit(cache=True, nogil=True)
def _uniforms_kernel(seed, cell_ids, positions, out):
    for i in range(out.shape[0]):
        out[i] = _uniform(seed, cell_ids[i], positions[i])


@numba.njit(cache=True, nogil=True)
def _order(vals, buf):
    """Ascending order of ``vals`` (n,). Raw counts (small integers, the common case) use a
    counting sort, O(n + max); anything else np.argsort. Returns an empty array when the
    counts need more than ``buf`` holds, so the caller can grow it (buf stays all-zero)."""
    n = vals.shape[0]
    vmax = 0.0
    for j in range(n):
        x = vals[j]
        if x != np.floor(x) or x > 4.0 * n + 1024.0:
            return np.argsort(vals)
        if x > vmax:
            vmax = x
    m = int(vmax) + 2
    if m > buf.shape[0]:
        return np.empty(0, dtype=np.int64)
    for j in range(n):
        buf[int(vals[j]) + 1] += 1
    for k in range(1, m):
        buf[k] += buf[k - 1]
    order = np.empty(n, dtype=np.int64)
    for j in range(n):
        k = int(vals[j])
        order[buf[k]] = j
        buf[k] += 1
    for k in range(m):
        buf[k] = 0
    return order


@numba.njit(cache=True, nogil=True)
def _bin_kernel(indptr, data, cell_ids, levels, seed, out):
    """indptr (R+1,) int64; data (nnz,) float32 or float64, finite and > 0; cell_ids (R,) uint64;
    levels (E,) float64; out (nnz,) uint8 written in place. E = n_bins - 1 edges per cell.
    Returns the index of the first value that is not finite and > 0 (nothing is binned from
    that row on), or -1.

    Per row: one argsort, the E edges from the sorted values, then a single merge-like sweep
    over values and edges in ascending order (both monotone), O(n log n + E) per cell.
    """
    n_edges = levels.shape[0]
    edges = np.empty(n_edges, dtype=np.float64)
    buf = np.zeros(4096, dtype=np.int64)
    for r in range(indptr.shape[0] - 1):
        start = indptr[r]
        n = indptr[r + 1] - start
        if n == 0:
            continue
        vals = data[start:start + n]
        for j in range(n):
            if not (vals[j] > 0 and vals[j] < np.inf):
                return start + j
        order = _order(vals, buf)
        if order.shape[0] == 0:  # counting buffer too small: grow it and retry
            buf = np.zeros(2 * buf.shape[0] + int(vals.max()) + 2, dtype=np.int64)
            order = _order(vals, buf)
        # numpy "linear" quantile, exactly: virtual index (n-1)*q, gamma = frac part, and
        # numpy's _lerp (a + d*t for t < 0.5, b - d*(1-t) otherwise; keeps edges monotone).
        for k in range(n_edges):
            vi = (n - 1) * levels[k]
            if vi >= n - 1:
                edges[k] = np.float64(vals[order[n - 1]])
                continue
            lo = int(np.floor(vi))
            t = vi - lo
            a = np.float64(vals[order[lo]])
            b = np.float64(vals[order[lo + 1]])
            d = b - a
            if t >= 0.5:
                edges[k] = b - d * (1.0 - t)
            else:
                edges[k] = a + d * t
        cell = cell_ids[r]
        right = 0  # #edges <  x == np.digitize(x, edges, right=True)
        left = 0   # #edges <= x == np.digitize(x, edges)
        for j in range(n):
            pos = order[j]
            x = np.float64(vals[pos])
            while right < n_edges and edges[right] < x:
                right += 1
            if left < right:
                left = right
            while left < n_edges and edges[left] <= x:
                left += 1
            if left == right:
                out[start + pos] = right
            else:
                u = _uniform(seed, cell, np.uint64(pos))
                out[start + pos] = int(np.ceil(u * (left - right) + right))
    return -1


def quantile_levels(n_bins: int) -> np.ndarray:
    """The quantile levels of the edges, exactly as the reference builds them."""
    return np.linspace(0, 1, n_bins - 1)


def _check_n_bins(n_bins: int) -> None:
    problem = n_bins_problem(n_bins)  # the one range (scgpt_model.schema)
    if problem:
        raise ValueError(f"n_bins {problem}")


def tie_uniforms(seed: int, cell_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The hashed draws: u in (0, 1) for each (cell id, position) pair (arrays broadcast)."""
    cell_ids, positions = np.broadcast_arrays(np.asarray(cell_ids, dtype=np.int64),
                                              np.asarray(positions, dtype=np.int64))
    out = np.empty(cell_ids.size, dtype=np.float64)
    _uniforms_kernel(np.uint64(int(seed) & int(_MASK64)),
                     np.array(cell_ids, dtype=np.int64).ravel().view(np.uint64),
                     np.array(positions, dtype=np.int64).ravel().view(np.uint64), out)
    return out.reshape(cell_ids.shape)


def bin_nonzero(indptr: np.ndarray, data: np.ndarray, cell_ids: np.ndarray, *,
                n_bins: int = DEFAULT_N_BINS, seed: int = DEFAULT_SEED, out: np.ndarray | None = None) -> np.ndarray:
    """Bins (uint8, aligned with ``data``, each in 1..n_bins-1) of a CSR block's nonzero values.

    indptr: (R+1,) row offsets into ``data``; data: (nnz,) values, all > 0 and finite;
    cell_ids: (R,) int64 stable per-cell ids (``soma_joinid``) that seed the tie draws;
    out: optional (nnz,) uint8 array to write the bins into (every element is written).
    """
    _check_n_bins(n_bins)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    data = np.asarray(data)  # float32 is binned as is (exact in float64); anything else as float64
    data = np.ascontiguousarray(data, dtype=data.dtype if data.dtype in (np.float32, np.float64) else np.float64)
    cell_ids = np.ascontiguousarray(cell_ids, dtype=np.int64)
    if indptr.ndim != 1 or cell_ids.shape != (indptr.shape[0] - 1,):
        raise ValueError(f"cell_ids must have one id per row: {cell_ids.shape} ids for {indptr.shape[0] - 1} rows")
    if indptr[0] != 0 or indptr[-1] != data.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must start at 0, be non-decreasing and end at len(data)")
    if out is None:
        out = np.zeros(data.shape[0], dtype=np.uint8)
    elif out.shape != data.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 array of shape {data.shape}")
    bad = _bin_kernel(indptr, data, cell_ids.view(np.uint64), quantile_levels(n_bins),
                      np.uint64(int(seed) & int(_MASK64)), out)
    if bad >= 0:
        raise ValueError(f"bin_nonzero takes the nonzero values only: all must be finite and > 0, got {data[bad]!r}")
    return out


def bin_csr(X: sp.csr_matrix, cell_ids: np.ndarray, *, n_bins: int = DEFAULT_N_BINS,
            seed: int = DEFAULT_SEED) -> sp.csr_matrix:
    """Same sparsity pattern as ``X``, values = bins (float32). Explicit zeros stay 0.

    Positions (for the tie draws) count the cell's stored nonzero values in CSR order.
    """
    X = sp.csr_matrix(X)
    data = np.asarray(X.data)
    keep = data != 0
    if keep.all():
        bins = bin_nonzero(X.indptr, data, cell_ids, n_bins=n_bins, seed=seed).astype(np.float32)
    else:  # bin only the true nonzeros, scatter back; explicit zeros keep value 0
        row = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row[keep], minlength=X.shape[0]))])
        bins = np.zeros(data.shape[0], dtype=np.float32)
        bins[keep] = bin_nonzero(indptr, data[keep], cell_ids, n_bins=n_bins, seed=seed)
    return sp.csr_matrix((bins, X.indices.copy(), X.indptr.copy()), shape=X.shape)
