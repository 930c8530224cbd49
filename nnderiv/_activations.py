"""Elementwise activations and their derivatives, to order three and to any order.

Each entry maps an activation to ``taylor(z) -> (s, s', s'', s''')`` in closed form
(what the order-3 kernels use) and to ``derivatives(z, k) -> [s, s', ..., s^(k)]`` for
any ``k`` (what the Taylor engine uses), both
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

import contextlib
import dataclasses
import functools
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
    """An elementwise function with its derivatives to order three and to any order.

    Attributes:
      name: a readable name (``"tanh"``, ``"leaky_relu(0.01)"``, ``"generic"``, ...).
      taylor: ``z -> (s(z), s'(z), s''(z), s'''(z))``, elementwise.
      closed_form: whether the derivatives are hand-written (True) or derived by AD (False).
      any_order: ``(z, k) -> [s(z), s'(z), ..., s^(k)(z)]``; None: by AD of the function.
    """

    name: str
    taylor: Taylor
    closed_form: bool = True
    any_order: Callable[[jax.Array, int], list] | None = dataclasses.field(default=None, compare=False)

    def __call__(self, z):
        return self.taylor(z)[0]

    def derivatives(self, z, k: int) -> list:
        """``[s(z), s'(z), ..., s^(k)(z)]`` elementwise, for any ``k >= 0``."""
        if self.any_order is not None:
            return list(self.any_order(z, k))
        if k <= 3:
            return list(self.taylor(z)[: k + 1])
        return _ad_derivatives(self.__call__, z, k)


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

    def any_order(z, k):
        return list(taylor(z)[: min(k, 1) + 1]) + [jnp.zeros_like(z)] * (k - 1)

    return Activation(f"leaky_relu({slope:g})", taylor, any_order=any_order)


# --------------------------------------------------------------------------------------
# Any order. Saturating functions are written as polynomials in quantities that stay
# accurate in the tails (sech^2 from exp(-2|z|), never 1 - tanh^2), so every derivative
# keeps its relative accuracy until the true value underflows.


@functools.cache
def _tanh_polynomials(k: int) -> tuple[dict[tuple[int, int], int], ...]:
    """``d^n tanh / dz^n`` for n = 1..k as polynomials ``{(a, b): c}``, i.e. sum c t^a s^b.

    ``t = tanh z``, ``s = sech^2 z``: ``t' = s``, ``s' = -2 t s``, so
    ``(t^a s^b)' = a t^(a-1) s^(b+1) - 2 b t^(a+1) s^b``. Every term has ``b >= 1``: each
    derivative is a multiple of ``sech^2``, with no cancellation against 1 in the tails.
    """
    out = [{(0, 1): 1}]
    for _ in range(k - 1):
        nxt: dict[tuple[int, int], int] = {}
        for (a, b), c in out[-1].items():
            if a:
                nxt[(a - 1, b + 1)] = nxt.get((a - 1, b + 1), 0) + a * c
            nxt[(a + 1, b)] = nxt.get((a + 1, b), 0) - 2 * b * c
        out.append({key: c for key, c in nxt.items() if c})
    return tuple(out[:k])


def _eval_ts(poly, t, s):
    total = None
    for (a, b), c in sorted(poly.items()):
        term = float(c) * (t**a if a else 1.0) * s**b
        total = term if total is None else total + term
    return total


def _tanh_any(z, k):
    t = jnp.tanh(z)
    s = _sech2(z)
    return [t] + [_eval_ts(p, t, s) for p in _tanh_polynomials(k)]


def _sigmoid_any(z, k):
    # sigma(z) = (1 + tanh(z/2)) / 2, so sigma^(n)(z) = tanh^(n)(z/2) / 2^(n+1).
    half = 0.5 * z
    t = jnp.tanh(half)
    s = _sech2(half)
    polys = _tanh_polynomials(k)
    return [jax.nn.sigmoid(z)] + [_eval_ts(p, t, s) * 0.5 ** (n + 1) for n, p in enumerate(polys, 1)]


def _softplus_any(z, k):
    return [jax.nn.softplus(z)] + (_sigmoid_any(z, k - 1) if k else [])


def _silu_any(z, k):
    sig = _sigmoid_any(z, k)
    return [z * sig[0]] + [z * sig[n] + n * sig[n - 1] for n in range(1, k + 1)]


def _hermite_e(z, k):
    """Probabilists' Hermite polynomials He_0..He_k at z."""
    he = [jnp.ones_like(z), z]
    for n in range(1, k):
        he.append(z * he[n] - n * he[n - 1])
    return he[: k + 1]


def _gelu_erf_any(z, k):
    # g = z Phi(z); g' = Phi + z phi; g^(n) = (-1)^(n-1) phi (He_n - He_(n-2)) for n >= 2.
    cdf = 0.5 * jax.lax.erfc(-z / math.sqrt(2.0))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
    zc = jnp.clip(z, -40.0, 40.0)  # pdf is exactly 0 beyond; keeps the polynomials finite
    out = [z * cdf]
    if k >= 1:
        out.append(cdf + zc * pdf)
    he = _hermite_e(zc, k)
    for n in range(2, k + 1):
        out.append((-1.0) ** (n - 1) * pdf * (he[n] - he[n - 2]))
    return out


def series_compose(outer: list, inner: list, k: int) -> list:
    """Univariate series composition: the Taylor coefficients of ``s(u(z0 + e))`` in ``e``.

    ``outer[p] = s^(p)(u0) / p!``, ``inner[j]`` the Taylor coefficients of ``u`` (``inner[0]``
    is not used). Returns the coefficients of orders 0..k.
    """
    delta = [None] + list(inner[1 : k + 1]) + [None] * max(0, k + 1 - len(inner))
    out = [outer[0]] + [None] * k
    power = delta
    for p in range(1, k + 1):
        for j in range(p, k + 1):
            if power[j] is not None:
                term = outer[p] * power[j]
                out[j] = term if out[j] is None else out[j] + term
        if p < k:
            nxt = [None] * (k + 1)
            for j in range(p + 1, k + 1):
                acc = None
                for i in range(1, j - p + 1):
                    if delta[i] is not None and power[j - i] is not None:
                        t = delta[i] * power[j - i]
                        acc = t if acc is None else acc + t
                nxt[j] = acc
            power = nxt
    return [jnp.zeros_like(outer[0]) if o is None else o for o in out]


def _gelu_tanh_any(z, k):
    # g = z h, h(z) = sigmoid(2 u(z)), u = c (z + kappa z^3): compose the series of
    # sigmoid(2 .) with u's (a cubic), then g^(n) = z h^(n) + n h^(n-1).
    c = _SQRT_2_OVER_PI
    u = c * (z + _GELU_CUBIC * z**3)
    inner = [u, c * (1.0 + 3.0 * _GELU_CUBIC * z * z), 3.0 * c * _GELU_CUBIC * z, c * _GELU_CUBIC + 0.0 * z]
    sig = _sigmoid_any(2.0 * u, k)
    outer = [sig[p] * (2.0**p / math.factorial(p)) for p in range(k + 1)]
    h = series_compose(outer, inner, k)
    h = [h[n] * math.factorial(n) for n in range(k + 1)]  # derivatives of h
    return [z * h[0]] + [z * h[n] + n * h[n - 1] for n in range(1, k + 1)]


def _cycle(f, df):
    """A function with ``f'' = -f`` (sin, cos): derivatives cycle with period four."""

    def derivs(z, k):
        v, d = f(z), df(z)
        base = [v, d, -v, -d]
        return [base[n % 4] for n in range(k + 1)]

    return derivs


def _exp_any(z, k):
    e = jnp.exp(z)
    return [e] * (k + 1)


def _identity_any(z, k):
    zero = jnp.zeros_like(z)
    return [z, jnp.ones_like(z), *[zero] * max(0, k - 1)][: k + 1]


def _relu_any(z, k):
    return list(_relu(z)[: min(k, 1) + 1]) + [jnp.zeros_like(z)] * max(0, k - 1)


def _ad_derivatives(fn: Callable, z, k: int) -> list:
    """``[s, s', ..., s^(k)]`` of an elementwise ``fn`` by ``jax.experimental.jet``.

    One univariate Taylor series along a vector of ones (jet's terms are derivatives:
    ``factorial_scaled=True``); nested ``jvp`` where jet has no rule for one of the
    function's primitives (jet raises a bare KeyError then).
    """
    from jax.experimental import jet as jax_jet

    z = jnp.asarray(z)
    if k == 0:
        return [fn(z)]
    ones = jnp.ones_like(z)
    try:
        primal, series = jax_jet.jet(fn, (z,), ((ones,) + (jnp.zeros_like(z),) * (k - 1),))
        return [primal, *series]
    except (KeyError, NotImplementedError):
        pass
    out, g = [fn(z)], fn
    for _ in range(k):
        g = (lambda h: lambda u: jax.jvp(h, (u,), (jnp.ones_like(u),))[1])(g)
        out.append(g(z))
    return out


#: The activations with closed-form derivatives, by name.
ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", _tanh, any_order=_tanh_any),
    "sigmoid": Activation("sigmoid", _sigmoid, any_order=_sigmoid_any),
    "softplus": Activation("softplus", _softplus, any_order=_softplus_any),
    "silu": Activation("silu", _silu, any_order=_silu_any),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, any_order=_gelu_tanh_any),
    "gelu_erf": Activation("gelu_erf", _gelu_erf, any_order=_gelu_erf_any),
    "sin": Activation("sin", _sin, any_order=_cycle(jnp.sin, jnp.cos)),
    "cos": Activation("cos", _cos, any_order=_cycle(jnp.cos, lambda z: -jnp.sin(z))),
    "exp": Activation("exp", _exp, any_order=_exp_any),
    "identity": Activation("identity", _identity, any_order=_identity_any),
    "relu": Activation("relu", _relu, any_order=_relu_any),
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


@contextlib.contextmanager
def eager():
    """Within the block, JAX computes on concrete values now, whatever transformation traces.

    The analysis evaluates functions on probe points while it may run inside the caller's
    ``jit`` or ``vmap``. ``jax.ensure_compile_time_eval`` alone does not escape a ``vmap``:
    a ``custom_jvp`` function (``jax.nn.relu``) then returns a batched tracer. So the
    current trace is set to JAX's eval trace as well, where this JAX has one.
    """
    with jax.ensure_compile_time_eval():
        try:
            from jax._src import core

            context = core.set_current_trace(core.eval_trace)
        except (ImportError, AttributeError, TypeError):  # another JAX: the public part only
            context = contextlib.nullcontext()
        with context:
            yield


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
    with eager():
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

    return Activation(name, taylor, closed_form=False, any_order=lambda z, k: _ad_derivatives(fn, z, k))


@dataclasses.dataclass(frozen=True)
class ColumnActivation(Activation):
    """Activations side by side: ``parts[i][0]`` on the ``i``-th block of ``parts[i][1]`` columns.

    What ``concatenate([sin(z), cos(z)])`` (Fourier features) becomes once ``z`` is
    repeated (the affine layer before it, its columns repeated): an elementwise map
    whose function changes from block to block of units.
    """

    parts: tuple[tuple[Activation, int], ...] = ()


def columns(parts) -> ColumnActivation:
    """The :class:`ColumnActivation` of ``parts``, a sequence of ``(activation, width)``."""
    parts = tuple((act, int(width)) for act, width in parts)
    edges = np.cumsum([0] + [w for _, w in parts])

    def blocks(z):
        return [z[..., int(a) : int(b)] for a, b in zip(edges[:-1], edges[1:])]

    def taylor(z):
        per = [act.taylor(zi) for (act, _), zi in zip(parts, blocks(z))]
        return tuple(jnp.concatenate([p[i] for p in per], axis=-1) for i in range(4))

    def any_order(z, k):
        per = [act.derivatives(zi, k) for (act, _), zi in zip(parts, blocks(z))]
        return [jnp.concatenate([p[i] for p in per], axis=-1) for i in range(k + 1)]

    name = "[" + " | ".join(f"{act.name} x{w}" for act, w in parts) + "]"
    closed = all(act.closed_form for act, _ in parts)
    return ColumnActivation(name, taylor, closed_form=closed, any_order=any_order, parts=parts)


@dataclasses.dataclass(frozen=True)
class LinearActivation(Activation):
    """An elementwise affine map ``z -> a z + b`` (``a``, ``b`` per unit), as written in the model.

    Input standardisation ``(x - mu) / sigma``, output de-scaling ``y * s + t``, DeepXDE's
    ``2x - 1``: the function is kept as traced (its rounding is the model's), its slope is
    one ``jvp``, and every higher derivative is exactly zero.
    """

    function: Callable[[jax.Array], jax.Array] | None = dataclasses.field(default=None, compare=False)

    def slope(self, z):
        """``a`` at ``z`` (the same everywhere, computed where asked)."""
        return jax.jvp(self.function, (z,), (jnp.ones_like(z),))[1]


def linear(fn: Callable[[jax.Array], jax.Array], name: str = "linear") -> LinearActivation:
    """The :class:`LinearActivation` of an elementwise affine ``fn``."""

    def taylor(z):
        value, slope = jax.jvp(fn, (z,), (jnp.ones_like(z),))
        zero = jnp.zeros_like(value)
        return value, slope, zero, zero

    def any_order(z, k):
        return list(taylor(z)[:2])[: k + 1] + [jnp.zeros_like(z)] * max(k - 1, 0)

    return LinearActivation(name, taylor, closed_form=True, any_order=any_order, function=fn)
