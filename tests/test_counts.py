"""One raw-count rule (shardset.counts) for build-census, the census workers and evaluate."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from eval.data import check_counts as eval_check
from eval.errors import EvalError
from ingest.csr import _KINDS, _first_bad
from ingest.errors import IngestError
from ingest.store_writer import check_counts as store_check
from shardset.counts import KINDS, NEGATIVE, NONFINITE, NONINTEGER, first_bad_count


def _cases() -> list[tuple[np.ndarray, str | None, int]]:
    """(values, expected kind or None, expected index) covering every kind, order and dtype."""
    rng = np.random.default_rng(0)
    good = rng.poisson(2.0, 5000).astype(np.float32)
    out: list[tuple[np.ndarray, str | None, int]] = [(good, None, -1), (good.astype(np.int32), None, -1),
                                                     (np.zeros(0, np.float32), None, -1)]
    for value, kind in ((np.nan, NONFINITE), (np.inf, NONFINITE), (-np.inf, NONFINITE), (-1.0, NEGATIVE),
                        (-0.5, NEGATIVE), (0.5, NONINTEGER), (3.25, NONINTEGER)):
        for dtype in (np.float32, np.float64):
            v = good.astype(dtype)
            v[1234] = value
            v[4000] = 0.5  # a later bad value of another kind: the first in array order wins
            out.append((v, kind, 1234))
    near = good.astype(np.float64)
    near[7] = 1.0 + 1e-7  # within the 1e-6 that eval once tolerated: not a count
    out.append((near, NONINTEGER, 7))
    neg_int = good.astype(np.int64)
    neg_int[9] = -2
    out.append((neg_int, NEGATIVE, 9))
    return out


@pytest.mark.parametrize("values,kind,index", _cases())
def test_the_rule_and_the_fused_census_kernel_agree(values, kind, index):
    bad = first_bad_count(values)
    assert (bad.kind if bad else None) == kind
    assert (bad.index if bad else -1) == index
    code, i = _first_bad(values)  # the numba pass of ingest.csr
    assert (_KINDS[code] if code else None) == kind
    assert i == index
    assert set(_KINDS.values()) == set(KINDS)


@pytest.mark.parametrize("values,kind,index", _cases())
def test_build_census_and_evaluate_refuse_the_same_values(values, kind, index):
    a = ad.AnnData(X=np.asarray(values, dtype=np.float64).reshape(50, -1) if values.size else np.zeros((0, 0)))
    if kind is None:
        store_check(values, "x")
        eval_check(a, "x")
        return
    word = kind.split(" ")[0]
    with pytest.raises(IngestError, match=word):
        store_check(values, "x")
    with pytest.raises(EvalError, match=word):
        eval_check(a, "x")


def test_every_value_is_checked_not_a_prefix():
    v = np.ones(3_000_000, dtype=np.float32)
    v[-1] = 0.25
    assert first_bad_count(v).index == v.size - 1
    a = ad.AnnData(X=sp.csr_matrix(v.reshape(1000, -1)))
    with pytest.raises(EvalError, match="non-integer"):
        eval_check(a, "x")


def test_non_numeric_values_are_refused_with_the_dtype():
    with pytest.raises(TypeError, match="numeric"):
        first_bad_count(np.array(["1", "2"]))
