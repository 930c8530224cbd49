"""Comparison helpers that say *where* two derivative results disagree.

The metric and the tolerances are the package's own (:mod:`nnderiv._tolerance`), the
ones ``nnderiv check`` and the benchmark use.
"""

from __future__ import annotations

import numpy as np

from nnderiv._tolerance import FIELDS, RTOL, relative_error
from nnderiv._tolerance import rtol as tolerance

__all__ = ["FIELDS", "RTOL", "assert_derivatives_close", "relative_error", "tolerance"]


def assert_derivatives_close(actual, expected, rtol: float | None = None, label: str = "", dtype="float64") -> float:
    """Assert each field agrees within its tolerance (relative to the field's largest entry).

    ``rtol=None`` takes each field's tolerance from the package's table for ``dtype``
    (:data:`nnderiv._tolerance.RTOL`); a number applies to every field (for tests that
    assert more than agreement between methods, e.g. the same program run twice).
    Returns the largest relative error seen; on failure names the field and entry.
    """
    worst = 0.0
    for order, (name, a, e) in enumerate(zip(FIELDS, actual, expected)):
        if e is None:
            assert a is None, f"{label}: {name} should be None"
            continue
        assert a is not None, f"{label}: {name} is None"
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{label}: {name} has shape {a.shape}, expected {e.shape}"
        tol = rtol if rtol is not None else tolerance(dtype, order)
        err = relative_error(a, e)
        if not err <= tol:
            idx = np.unravel_index(np.nanargmax(np.abs(a - e)), a.shape) if a.size else ()
            raise AssertionError(
                f"{label}: {name} differs by {err:.3e} relative (> {tol:g}); worst entry {idx}: "
                f"{a[idx]!r} vs {e[idx]!r}"
            )
        worst = max(worst, err)
    return worst
