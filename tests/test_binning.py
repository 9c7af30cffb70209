"""Binning (paper eq. 2): the vectorised kernel against a plain per-cell reference, plus properties."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from scgpt_model.binning import bin_csr, bin_nonzero, tie_uniforms


def reference_bins(values: np.ndarray, cell_id: int, *, n_bins: int = 51, seed: int = 0) -> np.ndarray:
    """The definition, one cell at a time: np.quantile edges, np.digitize both sides, the
    reference's ``ceil(u * (left - right) + right)`` with the same hashed draws."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    u = tie_uniforms(seed, cell_id, np.arange(values.size))
    return np.ceil(u * (left - right) + right).astype(np.int64)


def _block(cells: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in cells])]).astype(np.int64)
    data = np.concatenate(cells) if cells else np.zeros(0)
    return indptr, data


def _check_against_reference(cells, ids, n_bins=51, seed=0):
    indptr, data = _block(cells)
    got = bin_nonzero(indptr, data, ids, n_bins=n_bins, seed=seed)
    assert got.dtype == np.uint8 and got.shape == data.shape
    for r, c in enumerate(cells):
        if len(c) == 0:
            continue
        want = reference_bins(c, int(ids[r]), n_bins=n_bins, seed=seed)
        np.testing.assert_array_equal(got[indptr[r]:indptr[r + 1]], want, err_msg=f"cell {r} (n={len(c)})")
    return got


def test_matches_reference_on_varied_cells():
    rng = np.random.default_rng(1)
    cells = [
        np.array([7.0]),                                   # one gene: every edge equals it
        np.full(40, 3.0),                                  # all equal
        np.array([1.0, 1.0, 1.0, 2.0, 2.0, 9.0]),          # heavy ties, few values
        rng.integers(1, 4, 500).astype(np.float32),        # heavy ties, many values
        rng.negative_binomial(2, 0.2, 20_000).astype(np.float32) + 1,  # 20,000 genes
        rng.lognormal(0, 2, 1500),                          # continuous, no ties
        np.log1p(rng.integers(1, 50, 800)),                 # normalised-looking values
        np.array([1.0, 2.0]),
    ]
    ids = np.array([0, 5, 17, 2**40, 123456789, 3, 8, 9], dtype=np.int64)
    got = _check_against_reference(cells, ids)
    assert got.min() >= 1 and got.max() <= 50
    # the one-gene cell and the all-equal cell spread over all 50 bins (draws, not a constant)
    assert len(np.unique(got[1:41])) > 10


@pytest.mark.parametrize("n_bins", [3, 11, 51, 101])
def test_matches_reference_other_bin_counts(n_bins):
    rng = np.random.default_rng(n_bins)
    cells = [rng.integers(1, 30, rng.integers(1, 300)).astype(np.float64) for _ in range(60)]
    got = _check_against_reference(cells, np.arange(60, dtype=np.int64) * 7, n_bins=n_bins, seed=11)
    assert got.min() >= 1 and got.max() <= n_bins - 1


def test_empty_rows_and_empty_block():
    cells = [np.zeros(0), np.array([2.0, 5.0]), np.zeros(0)]
    got = _check_against_reference(cells, np.array([1, 2, 3]))
    assert got.shape == (2,)
    assert bin_nonzero(np.array([0]), np.zeros(0), np.zeros(0, dtype=np.int64)).shape == (0,)


def test_bin_csr_keeps_pattern_and_explicit_zeros():
    rng = np.random.default_rng(3)
    X = sp.random(30, 200, density=0.2, format="csr", random_state=4, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    X.data[::7] = 0  # explicit zeros stay 0
    ids = np.arange(30, dtype=np.int64) + 1000
    B = bin_csr(X, ids)
    assert B.dtype == np.float32 and np.array_equal(B.indptr, X.indptr) and np.array_equal(B.indices, X.indices)
    assert np.all(B.data[X.data == 0] == 0) and np.all(B.data[X.data != 0] >= 1)
    Xe = X.copy()
    Xe.eliminate_zeros()
    np.testing.assert_array_equal(B.toarray() > 0, X.toarray() > 0)
    np.testing.assert_array_equal(bin_csr(Xe, ids).toarray(), B.toarray())
    del rng


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="n_bins"):
        bin_nonzero(np.array([0, 1]), np.array([1.0]), np.array([0]), n_bins=300)
    with pytest.raises(ValueError, match="> 0"):
        bin_nonzero(np.array([0, 2]), np.array([1.0, 0.0]), np.array([0]))
    with pytest.raises(ValueError, match="finite"):
        bin_nonzero(np.array([0, 1]), np.array([np.nan]), np.array([0]))
    with pytest.raises(ValueError, match="one id per row"):
        bin_nonzero(np.array([0, 1]), np.array([1.0]), np.array([0, 1]))


def test_tie_uniforms_are_open_unit_and_spread():
    u = tie_uniforms(0, np.repeat(np.arange(100), 100), np.tile(np.arange(100), 100))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and len(np.unique(u)) == u.size
    assert not np.array_equal(tie_uniforms(1, 5, np.arange(10)), tie_uniforms(2, 5, np.arange(10)))


# ---- properties ------------------------------------------------------------------------
counts_cell = st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=300)
PROPS = settings(max_examples=60, deadline=None, derandomize=True)


@PROPS
@given(cells=st.lists(counts_cell, min_size=1, max_size=6), seed=st.integers(0, 2**32),
       n_bins=st.sampled_from([5, 21, 51]))
def test_prop_range_and_monotone(cells, seed, n_bins):
    cells = [np.array(c, dtype=np.float64) for c in cells]
    indptr, data = _block(cells)
    b = bin_nonzero(indptr, data, np.arange(len(cells)), n_bins=n_bins, seed=seed)
    assert b.min() >= 1 and b.max() <= n_bins - 1
    for r in range(len(cells)):
        v, bb = data[indptr[r]:indptr[r + 1]], b[indptr[r]:indptr[r + 1]].astype(int)
        order = np.argsort(v, kind="stable")
        vs, bs = v[order], bb[order]
        strictly_up = vs[1:] > vs[:-1]
        assert np.all(bs[1:][strictly_up] >= bs[:-1][strictly_up])  # larger value, bin never lower
        # identical across runs
        np.testing.assert_array_equal(bb, bin_nonzero(indptr, data, np.arange(len(cells)), n_bins=n_bins,
                                                      seed=seed)[indptr[r]:indptr[r + 1]])


@PROPS
@given(dense=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=200),
       seed=st.integers(0, 1000))
def test_prop_zeros_stay_zero(dense, seed):
    X = sp.csr_matrix(np.array([dense], dtype=np.float32))
    B = bin_csr(X, np.array([seed]))
    d = np.asarray(dense)
    np.testing.assert_array_equal(B.toarray()[0] == 0, d == 0)


@PROPS
@given(cell=counts_cell, log2_scale=st.integers(-10, 10), cid=st.integers(0, 2**40),
       library_size=st.sampled_from([1e4, 1e6]))
def test_prop_invariant_to_scaling_and_log1p(cell, log2_scale, cid, library_size):
    v = np.array(cell, dtype=np.float64)
    ip = np.array([0, v.size])
    base = bin_nonzero(ip, v, np.array([cid]))
    # exact per-cell scaling (a power of two: no rounding) and log1p of it
    np.testing.assert_array_equal(bin_nonzero(ip, v * 2.0**log2_scale, np.array([cid])), base)
    np.testing.assert_array_equal(bin_nonzero(ip, np.log1p(v), np.array([cid])), base)
    # the usual normalise_total + log1p of a count cell
    norm = np.log1p(v / v.sum() * library_size)
    np.testing.assert_array_equal(bin_nonzero(ip, norm, np.array([cid])), base)


@pytest.mark.parametrize("n_bins,ok", [(2, False), (3, True), (51, True), (256, True), (257, False), (51.0, False),
                                       (True, False)])
def test_one_n_bins_range_for_ingest_binning_and_the_model(n_bins, ok):
    from ingest.errors import IngestError
    from ingest.query import IngestConfig
    from scgpt_model.config import ModelConfig

    checks = [(lambda: bin_nonzero(np.array([0, 1]), np.array([1.0]), np.array([0]), n_bins=n_bins), ValueError),
              (lambda: IngestConfig(out="x", n_bins=n_bins).check(), IngestError),
              (lambda: ModelConfig(vocab_size=10, n_bins=n_bins), ValueError)]
    for call, error in checks:
        if ok:
            call()
        else:
            with pytest.raises(error, match="from 3 to 256"):
                call()
