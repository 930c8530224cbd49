"""Independent extended-precision reference for MLP input derivatives (any order).

This module deliberately uses only :mod:`mpmath` and :mod:`numpy` -- no JAX and no
automatic differentiation -- so that it can serve as a ground truth for the library.

* The network is evaluated entirely in mpmath arithmetic (:func:`mlp_forward_mp`).
* Derivatives are obtained by *finite differences in extended precision* with
  :func:`mpmath.diff`. mpmath chooses a step ``h = 2**-(prec + addprec)`` and
  evaluates the function at ``(n + 1) * (prec + 2 * addprec)`` bits, so both the
  truncation error (``O(h**2)`` for central differences) and the cancellation error
  are far below the target precision. With the default ``dps=40`` the results are
  accurate to roughly 1e-38 relative to the output scale for smooth activations --
  comfortably better than the 1e-25 needed -- before the final rounding to float64.

Conventions (Flax ``Dense``): each layer is ``(W, b)`` with ``W`` of shape
``(in, out)``, ``b`` of shape ``(out,)`` and ``y = x @ W + b``. The activation list has
one entry per hidden layer; the last layer is affine.

Weights and inputs are float64; converting a float64 to an mpmath ``mpf`` is exact
(at any precision >= 53 bits), so the reference differentiates exactly the network
the library sees, only evaluated without rounding error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import mpmath
import numpy as np

__all__ = [
    "ACTIVATIONS",
    "activation_mp",
    "mlp_forward_mp",
    "reference_derivatives",
    "closed_form_single_neuron",
]

mp = mpmath.mp


# ---------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------
# Every function below works at the *current* mpmath precision (``mp.prec``). They
# must never set the precision themselves: ``mpmath.diff`` raises the working
# precision while evaluating the function, and a function that pinned its own
# precision would destroy the extended-precision finite differences.
#
# Constants are given by their exact mathematical values (e.g. 0.044715 as a decimal,
# sqrt(2/pi) to working precision). A float64 implementation uses the nearest
# doubles instead; the induced difference is ~1e-17 relative and irrelevant at
# float64 comparison tolerances.


def _tanh(z):
    return mpmath.tanh(z)


def _sigmoid(z):
    return 1 / (1 + mpmath.exp(-z))


def _softplus(z):
    # log(1 + e^z); mpmath has no overflow, log1p keeps accuracy for very negative z.
    return mpmath.log1p(mpmath.exp(z))


def _silu(z):
    return z * _sigmoid(z)


def _gelu_tanh(z):
    c = mpmath.sqrt(2 / mpmath.pi)
    return z * (1 + mpmath.tanh(c * (z + mpmath.mpf("0.044715") * z**3))) / 2


def _gelu_erf(z):
    # z * Phi(z) with Phi(z) = erfc(-z / sqrt 2) / 2 (erfc avoids cancellation for z << 0).
    return z * mpmath.erfc(-z / mpmath.sqrt(2)) / 2


def _sin(z):
    return mpmath.sin(z)


def _cos(z):
    return mpmath.cos(z)


def _exp(z):
    return mpmath.exp(z)


def _identity(z):
    return +z  # unary plus rounds to the working precision, like every other op


def _relu(z):
    return z if z > 0 else mpmath.mpf(0)


def _leaky_relu(z):
    return z if z > 0 else mpmath.mpf("0.01") * z


def _elu(z):
    return z if z > 0 else mpmath.expm1(z)


def _softsign(z):
    return z / (1 + abs(z))


ACTIVATIONS: dict[str, Callable] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "silu": _silu,
    "gelu_tanh": _gelu_tanh,
    "gelu_erf": _gelu_erf,
    "sin": _sin,
    "cos": _cos,
    "exp": _exp,
    "identity": _identity,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "softsign": _softsign,
}
"""Activation name -> scalar mpmath function (evaluated at the current precision).

``relu``, ``leaky_relu``, ``elu`` and ``softsign`` are not smooth at 0; the reference
is only meaningful when no pre-activation lies within the finite-difference step of
a kink (the step is ~1e-44 at ``dps=40``, so "away from 0" is plenty).
"""


def activation_mp(name: str) -> Callable:
    """Return the scalar mpmath activation called ``name``; ``ValueError`` if unknown."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------


def _to_mp(a) -> list:
    """Nested lists of ``mpf`` from a float64 array (exact: 53-bit mantissas fit)."""
    a = np.asarray(a, dtype=np.float64)
    with mpmath.workprec(max(mp.prec, 53)):
        return np.vectorize(lambda v: mpmath.mpf(float(v)), otypes=[object])(a).tolist()


def _prepare(layers, activations):
    """Validate the network description and convert weights to mpmath once."""
    layers = list(layers)
    activations = list(activations)
    if not layers:
        raise ValueError("need at least one layer")
    if len(activations) != len(layers) - 1:
        raise ValueError(
            f"need one activation per hidden layer: got {len(activations)} activations for {len(layers)} layers"
        )
    act_fns = [activation_mp(name) for name in activations]  # fail early on bad names
    mp_layers = []
    fan_in = None
    for i, (W, b) in enumerate(layers):
        W = np.asarray(W, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ValueError(f"layer {i}: W must be (in, out) and b (out,); got {W.shape} and {b.shape}")
        if fan_in is not None and W.shape[0] != fan_in:
            raise ValueError(f"layer {i}: expected fan-in {fan_in}, got {W.shape[0]}")
        fan_in = W.shape[1]
        mp_layers.append((_to_mp(W), _to_mp(b)))
    return mp_layers, act_fns


def _forward(mp_layers, act_fns, xs) -> list:
    """Forward pass on pre-converted weights; ``xs`` is a sequence of mpf inputs."""
    h = list(xs)
    last = len(mp_layers) - 1
    for i, (W, b) in enumerate(mp_layers):
        # y_o = b_o + sum_k h_k W_ko at the current precision (the one mpmath.diff
        # asked for); fsum rounds the sum once instead of once per term.
        h = [b[o] + mpmath.fsum(h[k] * W[k][o] for k in range(len(h))) for o in range(len(b))]
        if i < last:
            act = act_fns[i]
            h = [act(z) for z in h]
    return h


def mlp_forward_mp(layers, activations, x) -> list:
    """Evaluate the MLP in mpmath arithmetic at the *current* precision.

    Args:
      layers: list of ``(W, b)`` float64 arrays, ``W`` of shape ``(in, out)``.
      activations: activation names, one per hidden layer (``len(layers) - 1``).
      x: the input, a length-``m`` sequence of numbers or ``mpf``.

    Returns:
      A list of ``n`` ``mpf`` outputs. Wrap the call in ``mpmath.workdps(...)`` to pick
      the precision; this function intentionally does not set it.
    """
    mp_layers, act_fns = _prepare(layers, activations)
    xs = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in x]
    if len(xs) != len(mp_layers[0][0]):
        raise ValueError(f"x has {len(xs)} entries, first layer expects {len(mp_layers[0][0])}")
    return _forward(mp_layers, act_fns, xs)


# ---------------------------------------------------------------------------------
# Derivatives
# ---------------------------------------------------------------------------------


def _fill_symmetric(out: np.ndarray, index: tuple, values) -> None:
    """Write ``values`` (length n) into every permutation of ``index`` of ``out``."""
    for perm in set(itertools.permutations(index)):
        out[(slice(None),) + perm] = values


def reference_derivatives(layers, activations, x, order: int = 3, dps: int = 40):
    """Input derivatives of an MLP by extended-precision finite differences.

    Args:
      layers: list of ``(W, b)`` float64 arrays, ``W`` of shape ``(in, out)``.
      activations: activation names, one per hidden layer.
      x: float64 input of shape ``(m,)``.
      order: highest derivative order to compute (any integer >= 0; the cost grows
        with the number of unique partials, C(m+k-1, k) per order k).
      dps: decimal digits of the working precision (mpmath raises it further
        internally for the finite differences).

    Returns:
      ``(value, jacobian, hessian, third, ...)`` as float64 arrays of shapes ``(n,)``,
      ``(n, m)``, ``(n, m, m)``, ``(n, m, m, m)``, ... (at least four entries, one per
      order up to ``order``); entries above ``order`` are ``None``.
      ``jacobian[i, j] = d y_i / d x_j`` etc.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be an integer >= 0, got {order!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must have shape (m,), got {x.shape}")
    m = x.shape[0]

    with mpmath.workdps(dps):
        mp_layers, act_fns = _prepare(layers, activations)
        if len(mp_layers[0][0]) != m:
            raise ValueError(f"x has {m} entries, first layer expects {len(mp_layers[0][0])}")
        n = len(mp_layers[-1][1])
        xs = [mpmath.mpf(float(v)) for v in x]

        # Vector-valued function of m scalar arguments. mpmath.diff only combines the
        # sampled values linearly (sums of integer multiples, then a division by
        # (2h)^k), which mpmath matrices support, so differentiating an (n x 1)
        # matrix yields all n output partials from one set of evaluations instead
        # of n separate finite-difference runs.
        def f(*args):
            return mpmath.matrix(_forward(mp_layers, act_fns, args))

        def to_f64(col) -> np.ndarray:
            return np.array([float(col[i]) for i in range(n)], dtype=np.float64)

        results = [to_f64(f(*xs))] + [None] * max(3, order)
        for k in range(1, order + 1):
            tensor = np.empty((n,) + (m,) * k, dtype=np.float64)
            # Only the unique partials j1 <= ... <= jk; the rest follow by symmetry.
            for index in itertools.combinations_with_replacement(range(m), k):
                counts = [index.count(j) for j in range(m)]
                d = mpmath.diff(f, xs, counts)
                _fill_symmetric(tensor, index, to_f64(d))
            results[k] = tensor
    return tuple(results)


def closed_form_single_neuron(w, b, v, activation: str, x, dps: int = 40):
    """Closed-form derivatives of ``y = v * s(w . x + b)`` (a one-neuron network).

    With ``z = w . x + b``: ``y_j = v s'(z) w_j``, ``y_jk = v s''(z) w_j w_k`` and
    ``y_jkl = v s'''(z) w_j w_k w_l``. The scalar derivatives ``s^(k)(z)`` are taken
    with :func:`mpmath.diff` at ``dps`` digits, so this is an independent check on
    :func:`reference_derivatives` (no nested multivariate differences involved).

    Returns:
      ``(value, jacobian, hessian, third)`` with shapes ``(1,)``, ``(1, m)``,
      ``(1, m, m)``, ``(1, m, m, m)`` as float64 arrays.
    """
    s = activation_mp(activation)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if w.shape != x.shape:
        raise ValueError(f"w and x must have the same shape, got {w.shape}, {x.shape}")
    m = w.shape[0]

    with mpmath.workdps(dps):
        wm = [mpmath.mpf(float(t)) for t in w]
        z = mpmath.fsum(wm[j] * mpmath.mpf(float(x[j])) for j in range(m))
        z += mpmath.mpf(float(b))
        vm = mpmath.mpf(float(v))
        ds = [vm * mpmath.diff(s, z, k) for k in range(4)]  # v * s^(k)(z)

        value = np.array([float(ds[0])])
        jac = np.empty((1, m))
        hess = np.empty((1, m, m))
        third = np.empty((1, m, m, m))
        for j in range(m):
            jac[0, j] = float(ds[1] * wm[j])
            for k in range(m):
                hess[0, j, k] = float(ds[2] * wm[j] * wm[k])
                for l in range(m):
                    third[0, j, k, l] = float(ds[3] * wm[j] * wm[k] * wm[l])
    return value, jac, hess, third
