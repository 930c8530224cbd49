r"""The one error metric and the one tolerance table of every cross-check in nnderiv.

``nnderiv check`` and ``nnderiv compare``, the benchmark's agreement check and the test
suite all judge "two ways of computing the same derivatives agree" with
:func:`relative_error` against :data:`RTOL`, so a change here changes all of them.

The metric, per field (value, Jacobian, Hessian, third tensor):

.. math::
    e = \frac{\max |a - r|}{\max |r|}

over all points and entries, where ``r`` is the reference (nested AD, or an
extended-precision one). Normalising by the field's largest entry rather than entry by
entry keeps entries that cancel to (nearly) zero from producing huge "relative" errors
that mean nothing; a genuine mistake (a wrong coefficient, a swapped index) is O(1) on
this scale.

Example:
  >>> from nnderiv._tolerance import RTOL, agrees, relative_error
  >>> relative_error([1.0, 2.0 + 1e-12], [1.0, 2.0])  # 1e-12 / 2
  5e-13
  >>> RTOL["float64"][3], agrees({"value": 0.0, "third": 2e-10}, "float64")
  (1e-10, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

FIELDS = ("value", "jacobian", "hessian", "third")

# Tolerances on relative_error, by dtype and then by derivative order (0 = value, ...,
# 3 = third tensor), for comparisons between methods (or against an exact reference).
# Every method computes the same exact derivatives; they differ only in the order of
# the floating-point operations, so the gap is rounding: a multiple of the machine
# epsilon (2.2e-16 in float64, 1.2e-7 in float32) that grows with the order, since
# each order multiplies in one more factor of layer derivatives summed over a layer's
# width, with cancellation between the terms.
#
# Measured (largest over the benchmark grid, benchmarks/results/bench-vm-*.json: widths
# 32 to 256, depths 2 to 4, tanh/softplus/silu/gelu, every method against nested AD; and
# the test suite's cases, up to depth 4 and 14 activations, against 40-digit mpmath):
#
#   order:      0         1         2         3
#   float64   6e-16     6e-15     1.6e-13   1.5e-12   (the worst: gelu, the tanh form)
#   float32   2.4e-7    1.9e-6    2.4e-5    3.6e-4    (the worst: gelu again)
#
# float64: 1e-13 .. 1e-10 sit 60-170x above the worst case seen and are still at or
# below 1e-10 relative, 9 decades below an O(1) mistake.
# float32: the gelu third tensor is 3.6e-4 for *every* method, the plain jitted
# jacfwd(jacfwd(jacrev)) baseline included: the tanh-form GELU, differentiated three
# times, subtracts nearly equal terms, and the float32 rounding of the reference itself
# is that large. 5e-3 leaves 14x over it; the lower orders keep 20-40x. For smooth
# activations without that cancellation (tanh, softplus, silu) float32 stays below
# 3e-6 at every order, so these tolerances are loose for them and tight for gelu.
RTOL: dict[str, tuple[float, float, float, float]] = {
    "float64": (1e-13, 1e-12, 1e-11, 1e-10),
    "float32": (1e-5, 1e-4, 5e-4, 5e-3),
}


#: The smallest scale :func:`relative_error` divides by. Derivatives of a network with
#: O(1) inputs and weights are O(1); entries below 1e-30 are zero up to rounding in any
#: dtype nnderiv computes in (float32's smallest normal number is 1.2e-38).
SCALE_FLOOR = 1e-30


def rtol(dtype, order: int) -> float:
    """The tolerance of :data:`RTOL` for ``dtype`` (a name or dtype) at derivative ``order``."""
    name = np.dtype(dtype).name
    if name not in RTOL:
        raise ValueError(f"no tolerance for dtype {name}; known: {sorted(RTOL)}")
    return RTOL[name][order]


def relative_error(actual, expected) -> float:
    """``max |actual - expected| / max |expected|``, computed in float64.

    The scale has a floor, :data:`SCALE_FLOOR`: a reference whose entries are all below
    it (an exactly zero Hessian of a piecewise-linear net, which an extended-precision
    reference gives as 1e-54) counts as zero, so ``actual`` must be within 1e-30 of it
    in absolute terms. ``inf`` when the shapes differ; NaN when either holds a NaN (so
    that ``error <= tolerance`` is False).
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return math.inf
    gap = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    if math.isnan(gap) or math.isnan(scale):
        return math.nan
    return gap / max(scale, SCALE_FLOOR)


def deviation(actual: Iterable, expected: Iterable) -> dict[str, float]:
    """:func:`relative_error` per field of two results (``Derivatives`` or tuples of fields).

    Fields that are ``None`` in ``expected`` are left out.
    """
    return {name: relative_error(a, e) for name, a, e in zip(FIELDS, actual, expected) if e is not None}


def agrees(per_field: Mapping[str, float], dtype, rtol_override: float | None = None) -> bool:
    """Whether every field's error is within its tolerance (or ``rtol_override`` for all)."""
    return all(
        err <= (rtol_override if rtol_override is not None else rtol(dtype, FIELDS.index(name)))
        for name, err in per_field.items()
    )
