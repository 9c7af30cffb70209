"""What a raw count is: the one rule ``ingest build-census``, the ``ingest census`` workers and
``evaluate`` apply to expression values.

A raw UMI count is finite, non-negative and integer-valued, exactly: float32 holds every integer
up to 2**24 exactly, so a tolerance would only admit normalised data. Every value is checked (no
prefix), and the first bad value in array order is reported with its kind, classified in the order
of ``KINDS``. The ``ingest census`` workers run the same rule fused into their numba pass
(``ingest.csr``); ``tests/test_counts.py`` binds the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NONFINITE, NEGATIVE, NONINTEGER = "non-finite (NaN/inf)", "negative", "non-integer"
KINDS: tuple[str, ...] = (NONFINITE, NEGATIVE, NONINTEGER)
_BLOCK = 1 << 20  # values checked per step: bounded temporaries on any matrix size


@dataclass(frozen=True, slots=True)
class BadCount:
    """The first value that is not a raw count: its ``kind`` (one of ``KINDS``), flat ``index`` and ``value``."""

    kind: str
    index: int
    value: float


def kind_of(x: float) -> str | None:
    """The kind of one value that is not a raw count, None for a raw count."""
    if not np.isfinite(x):
        return NONFINITE
    if x < 0:
        return NEGATIVE
    if x != np.floor(x):
        return NONINTEGER
    return None


def first_bad_count(values) -> BadCount | None:
    """The first value of ``values`` (any shape, flattened in C order) that is not a raw count, or None."""
    v = np.asarray(values)
    if v.dtype.kind not in "fiub":
        raise TypeError(f"expression values must be numeric, got dtype {v.dtype}")
    v = v.ravel()
    if v.dtype.kind in "ub":
        return None
    for lo in range(0, v.size, _BLOCK):
        blk = v[lo:lo + _BLOCK]
        bad = blk < 0
        if v.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                bad |= ~np.isfinite(blk) | (blk != np.floor(blk))
        if bad.any():
            i = int(np.argmax(bad))
            return BadCount(kind_of(float(blk[i])), lo + i, blk[i].item())
    return None
