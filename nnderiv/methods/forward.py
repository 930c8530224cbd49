"""The analytic forward kernel: Faà di Bruno recursion on packed Taylor coefficients.

For every quantity ``q`` of the network (pre-activations ``z``, activations ``a``) we
carry, per point and unit, its value and its unique input derivatives

    q_j,  q_jk (j <= k),  q_jkl (j <= k <= l),

stacked along one "coefficient" axis: ``(B, K, width)`` with ``K = 1 + m + C(m+1,2) +
C(m+2,3)`` at order 3. An affine layer is one matmul of the stack (the bias touches the
value only). An activation ``a = s(z)`` is elementwise in the unit axis:

    a_j   = s' z_j
    a_jk  = s'' z_j z_k + s' z_jk
    a_jkl = s''' z_j z_k z_l + s'' (z_jk z_l + z_jl z_k + z_kl z_j) + s' z_jkl

Until the first activation the first derivatives do not depend on the point (they are
the rows of the first weight matrix) and all higher ones vanish; the kernel keeps that
state unstacked, so the first layer costs no matmul of the stack and the first
activation forms its products of weight rows once for the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _network, _symmetric
from .._derivatives import Derivatives


def _blocks(m: int, order: int) -> list[int]:
    return [_symmetric.num_unique(m, k) for k in range(order + 1)]


def _activate_constant(s, rows, m: int, order: int):
    """Apply an activation while first derivatives are the point-independent ``rows``.

    ``rows``: (m, w); ``s``: the activation's ``(s, s', s'', s''')`` at ``(B, w)``.
    Returns the stack ``(B, K, w)``.
    """
    parts = [s[0][:, None, :]]
    if order >= 1:
        parts.append(s[1][:, None, :] * rows[None])
    if order >= 2:
        pairs = _symmetric.sorted_tuples(m, 2)
        parts.append(s[2][:, None, :] * (rows[pairs[:, 0]] * rows[pairs[:, 1]])[None])
    if order >= 3:
        j, k, l, *_ = _symmetric.third_order_tables(m)
        parts.append(s[3][:, None, :] * (rows[j] * rows[k] * rows[l])[None])
    return jnp.concatenate(parts, axis=1)


def _activate_stack(s, stack, m: int, order: int):
    """Apply an activation to a general stack ``(B, K, w)`` (the rule in the docstring)."""
    sizes = _blocks(m, order)
    offsets = [sum(sizes[:k]) for k in range(order + 1)]
    z = [stack[:, offsets[k] : offsets[k] + sizes[k]] for k in range(order + 1)]
    s = [si[:, None, :] for si in s]
    parts = [s[0]]
    if order >= 1:
        parts.append(s[1] * z[1])
    if order >= 2:
        pairs = _symmetric.sorted_tuples(m, 2)
        parts.append(s[2] * z[1][:, pairs[:, 0]] * z[1][:, pairs[:, 1]] + s[1] * z[2])
    if order >= 3:
        j, k, l, jk, jl, kl = _symmetric.third_order_tables(m)
        z1, z2 = z[1], z[2]
        parts.append(
            s[3] * z1[:, j] * z1[:, k] * z1[:, l]
            + s[2] * (z2[:, jk] * z1[:, l] + z2[:, jl] * z1[:, k] + z2[:, kl] * z1[:, j])
            + s[1] * z[3]
        )
    return jnp.concatenate(parts, axis=1)


def _as_stack(value, rows, m: int, order: int):
    """The stack (B, K, w) of a value whose first derivatives are the constant ``rows``."""
    batch, w = value.shape
    rows = jnp.eye(m, dtype=value.dtype) if rows is None else rows
    parts = [value[:, None, :], jnp.broadcast_to(rows[None], (batch, m, w))]
    for k in range(2, order + 1):
        parts.append(jnp.zeros((batch, _symmetric.num_unique(m, k), w), value.dtype))
    return jnp.concatenate(parts[: order + 1], axis=1)


def _add_states(a, b, m: int, order: int):
    """The state (value, rows, stack) of the sum of two states (a skip connection)."""
    (va, ra, sa), (vb, rb, sb) = a, b
    if sa is None and sb is None:
        eye = jnp.eye(m, dtype=va.dtype)
        return va + vb, (eye if ra is None else ra) + (eye if rb is None else rb), None
    sa = _as_stack(va, ra, m, order) if sa is None else sa
    sb = _as_stack(vb, rb, m, order) if sb is None else sb
    return None, None, sa + sb


def propagate(stages, x: jax.Array, order: int, keep_slopes: bool = False):
    """Push the Taylor stack of ``x`` (B, m) through ``stages``.

    Returns ``(stack, slopes)``: the output stack (B, K, n) and, if ``keep_slopes``, for
    every elementwise stage the stack of ``g = s'(z)`` to the same order (what the
    forward-over-reverse kernel's reverse sweep multiplies by). ``g`` obeys the same
    rule as ``a = s(z)``, with the derivatives of ``s`` shifted by one order. A skip
    stage adds the stack kept from an earlier stage.
    """
    batch, m = x.shape
    # The unstacked state: values (B, w) and first-derivative rows (m, w). ``rows=None``
    # is the identity: the first layer's rows are then its weight itself, a constant XLA
    # can fold the first activation's products into, where ``eye(m) @ W`` would be a
    # matmul at run time (two extra ops per call, which single-point latency pays).
    value, rows = x, None
    stack = None
    slopes = []
    kept = {s.source for s in stages if isinstance(s, _network.RuntimeSkip)}
    saved = {0: (value, rows, stack)} if 0 in kept else {}
    for index, stage in enumerate(stages):
        if isinstance(stage, _network.RuntimeSkip):
            value, rows, stack = _add_states((value, rows, stack), saved[stage.source], m, order)
        elif isinstance(stage, _network.RuntimeAffine):
            if stack is None:
                value = value @ stage.weight
                rows = stage.weight if rows is None else rows @ stage.weight
                if stage.bias is not None:
                    value = value + stage.bias
            else:
                stack = jnp.einsum("bkw,wo->bko", stack, stage.weight)
                if stage.bias is not None:
                    # Add the bias to the value row through a parameter-only (K, out) array:
                    # it fuses into the matmul's consumer, where a scatter into the stack
                    # would be a separate pass.
                    rows_bias = jnp.zeros(stack.shape[1:], stack.dtype).at[0].set(stage.bias)
                    stack = stack + rows_bias
        else:
            s = stage.taylor(value if stack is None else stack[:, 0])
            if stack is None:
                rows = jnp.eye(m, dtype=x.dtype) if rows is None else rows
                new = _activate_constant(s[: order + 1], rows, m, order)
                if keep_slopes:
                    slopes.append(_activate_constant(s[1 : order + 2], rows, m, order))
            else:
                new = _activate_stack(s[: order + 1], stack, m, order)
                if keep_slopes:
                    slopes.append(_activate_stack(s[1 : order + 2], stack, m, order))
            stack = new
        if index + 1 in kept:
            saved[index + 1] = (value, rows, stack)
    if stack is None:  # an affine (linear) network
        stack = _as_stack(value, rows, m, order)
    return stack, slopes


def forward_stack(stages, x: jax.Array, order: int) -> jax.Array:
    """Push the Taylor stack of ``x`` (B, m) through ``stages``; returns (B, K, n)."""
    return propagate(stages, x, order)[0]


def unpack(stack: jax.Array, m: int, order: int) -> Derivatives:
    """Split a (B, K, n) stack into packed derivative tensors with outputs first."""
    sizes = _blocks(m, order)
    offsets = [sum(sizes[:k]) for k in range(order + 1)]
    fields = [stack[:, 0]]
    for k in range(1, order + 1):
        block = stack[:, offsets[k] : offsets[k] + sizes[k]]  # (B, P_k, n)
        block = jnp.moveaxis(block, 2, 1)  # (B, n, P_k)
        fields.append(block)
    return Derivatives(*fields)
