"""Comparison helpers that say *where* two derivative results disagree."""

from __future__ import annotations

import numpy as np

FIELDS = ("value", "jacobian", "hessian", "third")


def relative_error(actual, expected) -> float:
    """max |a - e| / max(max |e|, 1e-30): a relative error per tensor, robust to zero entries."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def assert_derivatives_close(actual, expected, rtol: float, label: str = "") -> float:
    """Assert each field agrees to ``rtol`` (relative to the field's largest entry).

    Returns the largest relative error seen; on failure names the field and entry.
    """
    worst = 0.0
    for name, a, e in zip(FIELDS, actual, expected):
        if e is None:
            assert a is None, f"{label}: {name} should be None"
            continue
        assert a is not None, f"{label}: {name} is None"
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{label}: {name} has shape {a.shape}, expected {e.shape}"
        err = relative_error(a, e)
        if not err <= rtol:
            idx = np.unravel_index(np.argmax(np.abs(a - e)), a.shape)
            raise AssertionError(
                f"{label}: {name} differs by {err:.3e} relative (> {rtol:g}); worst entry {idx}: "
                f"{a[idx]!r} vs {e[idx]!r}"
            )
        worst = max(worst, err)
    return worst
