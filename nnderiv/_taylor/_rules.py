"""The rule registry: one Taylor rule per primitive, keyed by the primitive object.

A rule maps the operands of one equation (a :class:`~._poly.Poly` for each live operand,
the plain value for the others) to its outputs (a ``Poly`` for each), for every order at
once. Rules come from a few builders, so that most entries are one line:

* :func:`deflinear` -- linear in the live operands, coefficient by coefficient (the
  primitive itself applied to every block, vmapped over the coefficient axis); non-live
  operands listed as *additive* (a bias, the other branch of a concatenation) enter the
  value only;
* :func:`defbilinear` -- ``mul``, ``dot_general``: linear when one operand is not live,
  else the truncated product of the two polynomials;
* :func:`defunary` -- ``s(u)`` by univariate composition, from ``s^(p)(u_0)`` for ``p <= k``;
* :func:`defconstant` -- outputs whose derivatives vanish (comparisons, ``floor``, ...);
* piecewise rules (``max``, ``min``, ``abs``, ``clamp``, ``select_n``): the taken branch.

A primitive without a rule on the live path is refused by the interpreter with an error
naming it and its module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _activations, _jaxpr
from . import _poly, _tables
from ._poly import Poly

Rule = Callable[..., list]
RULES: dict[object, Rule] = {}

#: Primitives that act elementwise (operands of one shape, or scalars): the building blocks
#: of activation segments.
ELEMENTWISE: set[object] = set()


def _bind(eqn: _jaxpr.FlatEqn, args) -> list:
    return _jaxpr.bind(eqn, args)


def _is_poly(a) -> bool:
    return isinstance(a, Poly)


def _value(a):
    return a.value if _is_poly(a) else a


def _differentiable(a) -> bool:
    return _is_poly(a) and jnp.issubdtype(a.dtype, jnp.inexact)


def _constant_outputs(eqn, values, m, order) -> list:
    return [_poly.constant(v, m, order) for v in values]


def _linear(eqn, ins, additive=(), kept=()):
    """Apply ``eqn`` to every coefficient block of its live operands.

    ``additive``: operand positions whose non-live values enter the value only (replaced
    by zeros in the higher blocks). Other non-live operands (a weight, an index) are kept.
    """
    live = [i for i, a in enumerate(ins) if _differentiable(a) and i not in kept]
    first = ins[live[0]]
    m, order = first.m, first.order
    values = _bind(eqn, [_value(a) for a in ins])
    out_blocks = [[v] for v in values]
    for j in range(1, order + 1):
        present = [i for i in live if ins[i].blocks[j] is not None]
        if not present:
            for blocks in out_blocks:
                blocks.append(None)
            continue
        args, axes = [], []
        for i, a in enumerate(ins):
            if i in live:
                args.append(a.block_or_zeros(j))
                axes.append(0)
            elif i in additive:
                v = _value(a)
                args.append(jnp.zeros(jnp.shape(v), jnp.result_type(v)))
                axes.append(None)
            else:
                args.append(_value(a))
                axes.append(None)
        result = jax.vmap(lambda *xs: _bind(eqn, xs), in_axes=tuple(axes))(*args)
        for blocks, r in zip(out_blocks, result):
            blocks.append(r)
    return [
        Poly(b, m) if jnp.issubdtype(jnp.result_type(b[0]), jnp.inexact) else _poly.constant(b[0], m, order)
        for b in out_blocks
    ]


def deflinear(prim, additive: Callable[[_jaxpr.FlatEqn], tuple] | tuple = (), kept: tuple = ()) -> None:
    """Register ``prim`` as linear in its (differentiable) live operands."""

    def rule(eqn, ins, ctx):
        add = additive(eqn) if callable(additive) else additive
        return _linear(eqn, ins, add, kept)

    RULES[prim] = rule


def _add_sub(sign: float):
    def rule(eqn, ins, ctx):
        a, b = ins
        values = _bind(eqn, [_value(a), _value(b)])
        shape = jnp.shape(values[0])
        ref = a if _is_poly(a) else b
        m, order = ref.m, ref.order
        blocks = [values[0]]
        for j in range(1, order + 1):
            ua = a.blocks[j] if _differentiable(a) else None
            ub = b.blocks[j] if _differentiable(b) else None
            if ub is not None and sign < 0:
                ub = -ub
            if ua is None and ub is None:
                blocks.append(None)
                continue
            parts = [_poly.broadcast_block(u, shape) for u in (ua, ub) if u is not None]
            blocks.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
        return [Poly(blocks, m)]

    return rule


def defbilinear(prim, linear_additive=()) -> None:
    """``prim(u, v)`` bilinear: linear if one operand is not live, else the truncated product."""

    def rule(eqn, ins, ctx):
        a, b = ins
        if _differentiable(a) and _differentiable(b):
            ctx.count(eqn, a, b)
            params = eqn.primitive.get_bind_params(eqn.params)
            f = lambda x, y: eqn.primitive.bind(x, y, **params)  # noqa: E731
            same = prim is lax.mul_p and a.shape == b.shape
            return [_poly.bilinear(a, b, None if same else f)]
        ctx.count(eqn, a if _is_poly(a) else b)
        return _linear(eqn, ins, linear_additive)

    RULES[prim] = rule


def defunary(prim, derivatives: Callable[[jax.Array, int, _jaxpr.FlatEqn], list]) -> None:
    """``s(u)`` from ``derivatives(u0, k, eqn) = [s(u0), s'(u0), ..., s^(k)(u0)]``."""

    def rule(eqn, ins, ctx):
        (u,) = [a for a in ins if _is_poly(a)]
        if not _differentiable(u):
            return _constant_outputs(eqn, _bind(eqn, [_value(a) for a in ins]), u.m, u.order)
        derivs = derivatives(u.value, u.order, eqn)
        if u.is_constant():
            return [_poly.constant(derivs[0], u.m, u.order)]
        return [_poly.compose(u, _poly.derivative_coefficients(derivs))]

    RULES[prim] = rule
    ELEMENTWISE.add(prim)


def deftaylor(prim, coefficients: Callable[[jax.Array, int, _jaxpr.FlatEqn], list]) -> None:
    """Like :func:`defunary`, from the Taylor coefficients ``s^(p)(u0) / p!`` directly."""

    def rule(eqn, ins, ctx):
        (u,) = [a for a in ins if _is_poly(a)]
        coeffs = coefficients(u.value, u.order, eqn)
        if u.is_constant():
            return [_poly.constant(coeffs[0], u.m, u.order)]
        return [_poly.compose(u, coeffs)]

    RULES[prim] = rule
    ELEMENTWISE.add(prim)


def defconstant(prim, elementwise: bool = True) -> None:
    """Outputs that are piecewise constant in the live operands: only the value is kept."""

    def rule(eqn, ins, ctx):
        ref = next(a for a in ins if _is_poly(a))
        return _constant_outputs(eqn, _bind(eqn, [_value(a) for a in ins]), ref.m, ref.order)

    RULES[prim] = rule
    if elementwise:
        ELEMENTWISE.add(prim)


# --------------------------------------------------------------------------------------
# Linear and structural primitives.

for _prim in (
    lax.neg_p,
    lax.reshape_p,
    lax.broadcast_in_dim_p,
    lax.squeeze_p,
    lax.transpose_p,
    lax.reduce_sum_p,
    lax.copy_p,
    lax.slice_p,
    lax.rev_p,
    lax.cumsum_p,
    lax.real_p,
    lax.reduce_precision_p,
    lax.split_p,
):
    deflinear(_prim)

deflinear(lax.convert_element_type_p)
deflinear(lax.concatenate_p, additive=lambda eqn: tuple(range(len(eqn.inputs))))
deflinear(lax.pad_p, additive=(1,))
deflinear(lax.select_n_p, additive=lambda eqn: tuple(range(1, len(eqn.inputs))), kept=(0,))
deflinear(lax.dynamic_slice_p)
deflinear(lax.dynamic_update_slice_p, additive=(0, 1))
deflinear(lax.gather_p)
RULES[lax.add_p] = _add_sub(1.0)
RULES[lax.sub_p] = _add_sub(-1.0)
for _prim in (lax.neg_p, lax.copy_p, lax.real_p, lax.convert_element_type_p, lax.select_n_p, lax.add_p, lax.sub_p):
    ELEMENTWISE.add(_prim)

try:  # the add of two cotangents in a jacrev program
    from jax._src.ad_util import add_jaxvals_p as _add_any

    RULES[_add_any] = _add_sub(1.0)
    ELEMENTWISE.add(_add_any)
except ImportError:  # pragma: no cover - older or newer JAX without it
    pass

defbilinear(lax.mul_p)
defbilinear(lax.dot_general_p)
defbilinear(lax.conv_general_dilated_p)
ELEMENTWISE.add(lax.mul_p)


def _div(eqn, ins, ctx):
    a, b = ins
    if not _differentiable(b):
        return _linear(eqn, ins)
    recip = _poly.compose(b, _power_coefficients(b.value, -1.0, b.order))
    if not _differentiable(a):
        out = _linear_scale(recip, a)
        return [out]
    return [_poly.bilinear(a, recip)]


def _linear_scale(p: Poly, c) -> Poly:
    """``c * p`` for a non-live ``c``."""
    blocks = [p.blocks[0] * c] + [None if b is None else b * (c[None] if jnp.ndim(c) else c) for b in p.blocks[1:]]
    return Poly(blocks, p.m)


RULES[lax.div_p] = _div
ELEMENTWISE.add(lax.div_p)


# --------------------------------------------------------------------------------------
# Unary functions.


def _power_coefficients(u0, c: float, order: int) -> list:
    """Taylor coefficients of ``u^c`` at ``u0``: binom(c, p) u0^(c - p)."""
    coeffs = []
    integer = float(c).is_integer()
    for p in range(order + 1):
        binom = math.prod((c - i) for i in range(p)) / math.factorial(p)
        if binom == 0.0:
            coeffs.append(None if p else jnp.zeros_like(u0))
            continue
        if integer:
            power = lax.integer_pow(u0, int(c) - p) if int(c) - p != 0 else jnp.ones_like(u0)
        else:
            power = jnp.power(u0, c - p)
        coeffs.append(power if p == 0 else binom * power)
    return coeffs


deftaylor(lax.integer_pow_p, lambda u, k, eqn: _power_coefficients(u, eqn.params["y"], k))
deftaylor(lax.square_p, lambda u, k, eqn: _power_coefficients(u, 2, k))
deftaylor(lax.sqrt_p, lambda u, k, eqn: [jnp.sqrt(u)] + _power_coefficients(u, 0.5, k)[1:])
deftaylor(lax.rsqrt_p, lambda u, k, eqn: [lax.rsqrt(u)] + _power_coefficients(u, -0.5, k)[1:])
deftaylor(lax.cbrt_p, lambda u, k, eqn: [lax.cbrt(u)] + _power_coefficients(u, 1.0 / 3.0, k)[1:])


def _exp_coeffs(u, k, eqn):
    e = jnp.exp(u)
    return [e] + [e / math.factorial(p) for p in range(1, k + 1)]


def _exp2_coeffs(u, k, eqn):
    e, ln2 = jnp.exp2(u), math.log(2.0)
    return [e] + [e * (ln2**p / math.factorial(p)) for p in range(1, k + 1)]


def _expm1_coeffs(u, k, eqn):
    e = jnp.exp(u)
    return [jnp.expm1(u)] + [e / math.factorial(p) for p in range(1, k + 1)]


def _log_like(shift: float, fn):
    def coeffs(u, k, eqn):
        inv = 1.0 / (u + shift) if shift else 1.0 / u
        out = [fn(u)]
        power = inv
        for p in range(1, k + 1):
            out.append(((-1.0) ** (p - 1) / p) * power)
            power = power * inv
        return out

    return coeffs


def _erf_derivatives(u, k, eqn, sign: float = 1.0, value=None):
    # erf^(p)(u) = 2/sqrt(pi) (-1)^(p-1) H_(p-1)(u) exp(-u^2), H the physicists' Hermite.
    g = (2.0 / math.sqrt(math.pi)) * jnp.exp(-u * u)
    uc = jnp.clip(u, -40.0, 40.0)
    h = [jnp.ones_like(u), 2.0 * uc]
    for n in range(1, k):
        h.append(2.0 * uc * h[n] - 2.0 * n * h[n - 1])
    out = [lax.erf(u) if value is None else value(u)]
    for p in range(1, k + 1):
        out.append(sign * (-1.0) ** (p - 1) * h[p - 1] * g)
    return out


def _activation(name):
    act = _activations.ACTIVATIONS[name]
    return lambda u, k, eqn: act.derivatives(u, k)


def _sinh_cosh(first, second):
    def derivs(u, k, eqn):
        a, b = first(u), second(u)
        return [a if p % 2 == 0 else b for p in range(k + 1)]

    return derivs


def _generic(fn_of_eqn):
    def derivs(u, k, eqn):
        return _activations._ad_derivatives(lambda z: fn_of_eqn(eqn, z), u, k)  # noqa: SLF001

    return derivs


def _bind_unary(eqn, z):
    return _bind(eqn, [z])[0]


defunary(lax.tanh_p, _activation("tanh"))
defunary(lax.logistic_p, _activation("sigmoid"))
defunary(lax.sin_p, _activation("sin"))
defunary(lax.cos_p, _activation("cos"))
deftaylor(lax.exp_p, _exp_coeffs)
deftaylor(lax.exp2_p, _exp2_coeffs)
deftaylor(lax.expm1_p, _expm1_coeffs)
deftaylor(lax.log_p, _log_like(0.0, jnp.log))
deftaylor(lax.log1p_p, _log_like(1.0, jnp.log1p))
defunary(lax.erf_p, _erf_derivatives)
defunary(lax.erfc_p, lambda u, k, eqn: _erf_derivatives(u, k, eqn, -1.0, lax.erfc))
defunary(lax.sinh_p, _sinh_cosh(jnp.sinh, jnp.cosh))
defunary(lax.cosh_p, _sinh_cosh(jnp.cosh, jnp.sinh))
for _prim in (
    lax.tan_p,
    lax.atan_p,
    lax.asin_p,
    lax.acos_p,
    lax.asinh_p,
    lax.acosh_p,
    lax.atanh_p,
    lax.erf_inv_p,
    lax.lgamma_p,
    lax.digamma_p,
):
    defunary(_prim, _generic(_bind_unary))


def _pow(eqn, ins, ctx):
    base, expo = ins
    if not _differentiable(expo):
        c = _value(expo)
        try:
            scalar = float(np.asarray(c)) if np.ndim(c) == 0 else None
        except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            scalar = None  # an array or traced exponent
        if scalar is not None:
            return [_poly.compose(base, _pow_coefficients(base.value, scalar, base.order))]
        # u^c = exp(c log u).
        log_u = _poly.compose(base, _log_like(0.0, jnp.log)(base.value, base.order, eqn))
        return [_exp_of(_linear_scale(log_u, c))]
    log_b = _poly.compose(base, _log_like(0.0, jnp.log)(base.value, base.order, eqn)) if _differentiable(base) else None
    if log_b is None:  # c^v = exp(v log c)
        return [_exp_of(_linear_scale(expo, jnp.log(_value(base))))]
    return [_exp_of(_poly.bilinear(expo, log_b))]


def _pow_coefficients(u0, c, order):
    coeffs = _power_coefficients(u0, c, order)
    coeffs[0] = jnp.power(u0, c)
    return coeffs


def _exp_of(p: Poly) -> Poly:
    return _poly.compose(p, _exp_coeffs(p.value, p.order, None))


RULES[lax.pow_p] = _pow
ELEMENTWISE.add(lax.pow_p)

# --------------------------------------------------------------------------------------
# Piecewise: the taken branch.


def _select_blocks(pred, a, b, m, order, shape):
    """``where(pred, a, b)`` coefficient by coefficient (a, b: Poly or non-live values)."""
    blocks = [jnp.where(pred, _value(a), _value(b))]
    for j in range(1, order + 1):
        ua = a.blocks[j] if _differentiable(a) else None
        ub = b.blocks[j] if _differentiable(b) else None
        if ua is None and ub is None:
            blocks.append(None)
            continue
        size = _tables.block_size(m, j)
        za = jnp.zeros((size, *shape)) if ua is None else _poly.broadcast_block(ua, shape)
        zb = jnp.zeros((size, *shape)) if ub is None else _poly.broadcast_block(ub, shape)
        blocks.append(jnp.where(pred[None] if jnp.ndim(pred) else pred, za, zb).astype(blocks[0].dtype))
    return Poly(blocks, m)


def _max_min(is_max: bool):
    def rule(eqn, ins, ctx):
        a, b = ins
        ref = a if _is_poly(a) else b
        value = _bind(eqn, [_value(a), _value(b)])[0]
        shape = jnp.shape(value)
        va, vb = jnp.broadcast_to(_value(a), shape), jnp.broadcast_to(_value(b), shape)
        pick_a = va > vb if is_max else va < vb
        # At a tie, JAX's own derivative of max/min is the average of both branches.
        out = _select_blocks(pick_a, a, b, ref.m, ref.order, shape)
        other = _select_blocks(pick_a, b, a, ref.m, ref.order, shape)
        tie = va == vb
        blocks = [value]
        for j in range(1, ref.order + 1):
            x, y = out.blocks[j], other.blocks[j]
            if x is None:
                blocks.append(None)
                continue
            blocks.append(jnp.where(tie[None] if tie.ndim else tie, 0.5 * (x + y), x))
        return [Poly(blocks, ref.m)]

    return rule


RULES[lax.max_p] = _max_min(True)
RULES[lax.min_p] = _max_min(False)
ELEMENTWISE.update({lax.max_p, lax.min_p})


def _abs(eqn, ins, ctx):
    (u,) = ins
    sign = jnp.sign(u.value)
    return [
        Poly(
            [jnp.abs(u.value)]
            + [None if b is None else b * sign[None] if sign.ndim else b * sign for b in u.blocks[1:]],
            u.m,
        )
    ]


RULES[lax.abs_p] = _abs
ELEMENTWISE.add(lax.abs_p)


def _clamp(eqn, ins, ctx):
    lo, x, hi = ins
    ref = next(a for a in ins if _is_poly(a))
    value = _bind(eqn, [_value(a) for a in ins])[0]
    shape = jnp.shape(value)
    xv = jnp.broadcast_to(_value(x), shape)
    below = xv < jnp.broadcast_to(_value(lo), shape)
    above = xv > jnp.broadcast_to(_value(hi), shape)
    inner = _select_blocks(above, hi, x, ref.m, ref.order, shape)
    out = _select_blocks(below, lo, inner, ref.m, ref.order, shape)
    out.blocks[0] = value
    return [out]


RULES[lax.clamp_p] = _clamp
ELEMENTWISE.add(lax.clamp_p)

for _prim in (
    lax.eq_p,
    lax.ne_p,
    lax.lt_p,
    lax.le_p,
    lax.gt_p,
    lax.ge_p,
    lax.and_p,
    lax.or_p,
    lax.not_p,
    lax.xor_p,
    lax.is_finite_p,
    lax.sign_p,
    lax.floor_p,
    lax.ceil_p,
    lax.round_p,
    lax.stop_gradient_p,
):
    defconstant(_prim)
