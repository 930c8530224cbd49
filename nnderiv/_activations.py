"""Elementwise activations and their derivatives to order three.

Each entry maps an activation to ``taylor(z) -> (s, s', s'', s''')`` in closed form,
written to stay finite and accurate for large ``|z|`` (the derivatives of saturating
functions are built from ``sech^2`` and ``sigmoid(z) * sigmoid(-z)``, never from
``1 - tanh(z)^2`` or ``1 - sigmoid(z)``, which cancel to zero long before the true value
underflows).

Activations found in a traced model are identified by *value*: the elementwise segment
between two affine layers is evaluated on probe points and compared with each known
function. So ``x * sigmoid(x)``, ``jax.nn.silu`` and ``jax.nn.swish`` are all recognised
as SiLU, whatever ops they trace to. A segment matching none of them is still handled:
its derivatives are taken by nested ``jvp`` of the segment itself (:func:`generic`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Taylor = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise function with its derivatives to order three.

    Attributes:
      name: a readable name (``"tanh"``, ``"leaky_relu(0.01)"``, ``"generic"``, ...).
      taylor: ``z -> (s(z), s'(z), s''(z), s'''(z))``, elementwise.
      closed_form: whether ``taylor`` is hand-written (True) or derived by AD (False).
    """

    name: str
    taylor: Taylor
    closed_form: bool = True

    def __call__(self, z):
        return self.taylor(z)[0]


def _sech2(z):
    # sech^2 z = 4 e / (1 + e)^2 with e = exp(-2|z|): no overflow, full relative accuracy.
    e = jnp.exp(-2.0 * jnp.abs(z))
    return 4.0 * e / (1.0 + e) ** 2


def _tanh(z):
    t = jnp.tanh(z)
    s1 = _sech2(z)
    return t, s1, -2.0 * t * s1, s1 * (4.0 * t * t - 2.0 * s1)


def _sigmoid_parts(z):
    """``sigma(z)`` and its derivatives to order 3, ``tanh(z/2)`` and ``softplus(z)``.

    From ``e = exp(-|z|)`` and ``tanh(z/2)`` (and ``log1p(e)`` for softplus; XLA drops
    what a caller does not use): ``sigma(|z|) = 1 / (1 + e)``, ``sigma(-|z|) = e / (1 + e)``,
    so ``sigma' = sigma(z) sigma(-z) = e / (1 + e)^2`` keeps its relative accuracy in the
    tails, and ``1 - 2 sigma = -tanh(z/2)`` is never formed by cancellation. Two
    transcendentals where two sigmoids and a tanh took three.
    """
    a = jnp.abs(z)
    e = jnp.exp(-a)
    inv = 1.0 / (1.0 + e)
    positive = z >= 0
    sig = jnp.where(positive, inv, e * inv)
    d1 = e * inv * inv
    th = jnp.tanh(0.5 * z)
    d2 = -d1 * th
    d3 = d1 * (th * th - 2.0 * d1)
    softplus = jnp.maximum(z, 0.0) + jnp.log1p(e)
    return sig, d1, d2, d3, th, softplus


def _sigmoid(z):
    return _sigmoid_parts(z)[:4]


def _softplus(z):
    sig, d1, d2, _, _, softplus = _sigmoid_parts(z)
    return softplus, sig, d1, d2


def _silu(z):
    sig, d1, d2, d3, _, _ = _sigmoid_parts(z)
    return z * sig, sig + z * d1, 2.0 * d1 + z * d2, 3.0 * d2 + z * d3


def _gelu_tanh(z):
    # g = z * h(u), h = (1 + tanh u)/2 = sigmoid(2u), u = c (z + k z^3).
    u = _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3)
    u1 = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * z * z)
    u2 = 6.0 * _SQRT_2_OVER_PI * _GELU_CUBIC * z
    u3 = 6.0 * _SQRT_2_OVER_PI * _GELU_CUBIC
    t = jnp.tanh(u)
    sech2 = _sech2(u)
    h = jax.nn.sigmoid(2.0 * u)
    # Derivatives of tanh(u(z)) by the chain rule (Faà di Bruno to order 3).
    t1 = sech2 * u1
    t2 = sech2 * (u2 - 2.0 * t * u1 * u1)
    t3 = sech2 * ((4.0 * t * t - 2.0 * sech2) * u1**3 - 6.0 * t * u1 * u2 + u3)
    return z * h, h + 0.5 * z * t1, t1 + 0.5 * z * t2, 1.5 * t2 + 0.5 * z * t3


def _gelu_erf(z):
    cdf = 0.5 * jax.lax.erfc(-z / math.sqrt(2.0))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
    # pdf underflows to exactly 0 beyond |z| = 40 (exp(-800)); clipping z in the polynomial
    # factors there changes nothing, and keeps z*z from overflowing (|z| > 1e154) into
    # inf * 0 = NaN.
    zc = jnp.clip(z, -40.0, 40.0)
    return z * cdf, cdf + zc * pdf, pdf * (2.0 - zc * zc), pdf * zc * (zc * zc - 4.0)


def _sin(z):
    s, c = jnp.sin(z), jnp.cos(z)
    return s, c, -s, -c


def _cos(z):
    s, c = jnp.sin(z), jnp.cos(z)
    return c, -s, -c, s


def _exp(z):
    e = jnp.exp(z)
    return e, e, e, e


def _identity(z):
    zero = jnp.zeros_like(z)
    return z, jnp.ones_like(z), zero, zero


def _relu(z):
    # jax.nn.relu's custom JVP takes the derivative at 0 to be 0; so do we.
    zero = jnp.zeros_like(z)
    return jnp.maximum(z, 0.0), (z > 0).astype(z.dtype), zero, zero


def leaky_relu(slope: float) -> Activation:
    """``z if z >= 0 else slope * z`` (derivative at 0 taken as 1, like ``jax.nn.leaky_relu``)."""

    def taylor(z):
        zero = jnp.zeros_like(z)
        return jnp.where(z >= 0, z, slope * z), jnp.where(z >= 0, 1.0, slope).astype(z.dtype), zero, zero

    return Activation(f"leaky_relu({slope:g})", taylor)


#: The activations with closed-form derivatives, by name.
ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", _tanh),
    "sigmoid": Activation("sigmoid", _sigmoid),
    "softplus": Activation("softplus", _softplus),
    "silu": Activation("silu", _silu),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh),
    "gelu_erf": Activation("gelu_erf", _gelu_erf),
    "sin": Activation("sin", _sin),
    "cos": Activation("cos", _cos),
    "exp": Activation("exp", _exp),
    "identity": Activation("identity", _identity),
    "relu": Activation("relu", _relu),
}

# Reference implementations the recognizer compares a traced segment with: JAX's own,
# so that a segment built from jax.nn matches to the last bit.
_REFERENCE_VALUES: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "gelu_erf": lambda z: jax.nn.gelu(z, approximate=False),
    "sin": jnp.sin,
    "cos": jnp.cos,
    "exp": jnp.exp,
    "identity": lambda z: z,
    "relu": jax.nn.relu,
}

# Spread over the saturated and central regions, never exactly at a kink (0).
PROBE_POINTS = np.array(
    [-30.0, -9.7, -4.3, -2.1, -1.3, -0.71, -0.23, -0.017, 0.031, 0.37, 0.88, 1.6, 2.7, 5.1, 12.5, 30.0]
)


def recognize(values: np.ndarray, dtype) -> Activation | None:
    """Identify the activation whose values at :data:`PROBE_POINTS` are ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return None
    # Same ops on the same dtype agree to a few ulps; distinct activations differ by far
    # more (gelu_tanh vs gelu_erf by ~1e-3).
    tol = 64 * float(jnp.finfo(dtype).eps)

    def close(ref) -> bool:
        ref = np.asarray(ref, dtype=np.float64)
        return bool(np.all(np.abs(values - ref) <= tol * (1.0 + np.abs(ref))))

    # Evaluate eagerly even when called while tracing (arrays made inside the block).
    with jax.ensure_compile_time_eval():
        probes = jnp.asarray(PROBE_POINTS, dtype=dtype)
        for name, fn in _REFERENCE_VALUES.items():
            if close(fn(probes)):
                return ACTIVATIONS[name]
        # A piecewise-linear z -> (z if z >= 0 else a z): read a off a negative probe.
        slope = float(values[0] / PROBE_POINTS[0])
        if close(jnp.where(probes >= 0, probes, jnp.asarray(slope, dtype) * probes)):
            return leaky_relu(slope)
    return None


def generic(fn: Callable[[jax.Array], jax.Array], name: str = "generic") -> Activation:
    """Derivatives of any elementwise ``fn`` by nested forward-mode AD.

    Because ``fn`` acts elementwise, its Jacobian is diagonal and one ``jvp`` along a
    vector of ones returns ``s'(z)`` for every element at once; nesting gives ``s''``
    and ``s'''``.
    """

    def taylor(z):
        ones = jnp.ones_like(z)

        def d1(u):
            return jax.jvp(fn, (u,), (ones,))[1]

        def d2(u):
            return jax.jvp(d1, (u,), (ones,))[1]

        def d3(u):
            return jax.jvp(d2, (u,), (ones,))[1]

        return fn(z), d1(z), d2(z), d3(z)

    return Activation(name, taylor, closed_form=False)
