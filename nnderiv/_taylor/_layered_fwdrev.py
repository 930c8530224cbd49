"""The fused path's forward-over-reverse for a layered model: cheaper than forward for few outputs.

The forward recursion (``_layered``) carries every unique third derivative, C(m+3,3) coefficients per
unit. Here the forward pass stops at second order (C(m+2,2) coefficients) and keeps, for
every activation ``a = s(z)``, the Taylor stack of its slope ``g = s'(z)``:

    g = s'(z),   g_j = s''(z) z_j,   g_jk = s'''(z) z_j z_k + s''(z) z_jk.

A reverse sweep then carries the adjoint of output ``i`` as a second-order Taylor
polynomial in the input perturbation: it starts as the constant ``e_i``; an affine layer
``z = a W + b`` maps it by ``W``; an activation multiplies it by ``g`` (Leibniz):

    (g abar)   = g abar
    (g abar)_j = g abar_j + g_j abar
    (g abar)_jk = g abar_jk + g_j abar_k + g_k abar_j + g_jk abar.

At the input, the adjoint's coefficients are the gradient of ``y_i`` (value), the
Hessian rows (first order) and ``d3 y_i / dx_p dx_j dx_k`` (second order, pair ``jk``).
The unique entries (``p <= j <= k``) are read off, so the expanded result is exactly
symmetric. Cost: (1 + n) C(m+2,2) columns per layer against C(m+3,3) for the forward
kernel; all n reverse sweeps run as one batch of columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _network, _symmetric
from .._derivatives import Derivatives
from ._layered import propagate


def _leibniz(g: jax.Array, a: jax.Array, m: int, order: int) -> jax.Array:
    """Product of two packed Taylor stacks ``(..., K, w)`` truncated at ``order`` (<= 2)."""
    p = [g[..., :1, :] * a[..., :1, :]]
    if order >= 1:
        g0, a0 = g[..., :1, :], a[..., :1, :]
        g1, a1 = g[..., 1 : 1 + m, :], a[..., 1 : 1 + m, :]
        p.append(g0 * a1 + g1 * a0)
    if order >= 2:
        g2, a2 = g[..., 1 + m :, :], a[..., 1 + m :, :]
        # Static gathers along the coefficient axis: measured faster on XLA:CPU than
        # building the pair block from m slices and a concatenate.
        pairs = _symmetric.sorted_tuples(m, 2)
        j, k = pairs[:, 0], pairs[:, 1]
        cross = g1[..., j, :] * a1[..., k, :] + g1[..., k, :] * a1[..., j, :]
        p.append(g0 * a2 + cross + g2 * a0)
    return jnp.concatenate(p, axis=-2)


def _add_adjoints(a, b, batch: int, order_rows: int):
    """The sum of two adjoints, each ``(constant (n, w), None)`` or ``(None, stack (B, n, K, w))``."""
    (ca, sa), (cb, sb) = a, b
    if sa is None and sb is None:
        return ca + cb, None

    def stacked(c, st):
        if st is not None:
            return st
        n, w = c.shape
        return jnp.zeros((batch, n, order_rows, w), c.dtype).at[:, :, 0].set(c)

    return None, stacked(ca, sa) + stacked(cb, sb)


def reverse_sweep(stages, slopes, n: int, dtype, m: int, order: int):
    """Adjoints of all ``n`` outputs at the input: (B, n, K, m), or (n, m) if constant.

    A skip stage passes its adjoint through and adds it, once the sweep gets there, to
    the adjoint of the earlier value it added.
    """
    constant = jnp.eye(n, dtype=dtype)  # the adjoint while it does not depend on x
    adjoint = None  # (B, n, K, w) once it does
    remaining = list(slopes)
    batch, rows = slopes[0].shape[:2] if slopes else (1, 1)
    pending: dict[int, tuple] = {}
    for index in reversed(range(len(stages))):
        stage = stages[index]
        if index + 1 in pending:
            constant, adjoint = _add_adjoints((constant, adjoint), pending.pop(index + 1), batch, rows)
        if isinstance(stage, _network.RuntimeSkip):
            here = (constant, adjoint)
            earlier = pending.get(stage.source)
            pending[stage.source] = here if earlier is None else _add_adjoints(earlier, here, batch, rows)
        elif isinstance(stage, _network.RuntimeAffine):
            if adjoint is None:
                constant = constant @ stage.weight.T
            else:
                adjoint = jnp.einsum("bnko,io->bnki", adjoint, stage.weight)
        else:
            g = remaining.pop()[:, None]  # (B, 1, K, w)
            if adjoint is None:
                adjoint = g * constant[None, :, None, :]
            else:
                adjoint = _leibniz(g, adjoint, m, order)
    if 0 in pending:
        constant, adjoint = _add_adjoints((constant, adjoint), pending.pop(0), batch, rows)
    return constant if adjoint is None else adjoint


def _read_off(adjoint: jax.Array, m: int, order: int) -> list[jax.Array]:
    """Jacobian and packed Hessian and third tensor from the input adjoints (B, n, K, m)."""
    fields = [adjoint[:, :, 0, :]]
    if order >= 2:
        pairs = _symmetric.sorted_tuples(m, 2)  # (a, b), a <= b: H[a, b] = adjoint_b[a]
        packed = adjoint[:, :, 1 + pairs[:, 1], pairs[:, 0]]
        fields.append(packed)
    if order >= 3:
        triples = _symmetric.sorted_tuples(m, 3)  # (a, b, c): T = adjoint_(b, c)[a]
        slot = _symmetric.packed_position(m, 2)[triples[:, 1], triples[:, 2]]
        packed = adjoint[:, :, 1 + m + slot, triples[:, 0]]
        fields.append(packed)
    return fields


def fwdrev_kernel(stages, x: jax.Array, n: int, order: int) -> Derivatives:
    """Forward-over-reverse on a batch ``x`` (B, m), ``order`` >= 1."""
    batch, m = x.shape
    inner = order - 1  # the Taylor order the sweeps carry
    stack, slopes = propagate(stages, x, inner, keep_slopes=True)
    value = stack[:, 0]
    adjoint = reverse_sweep(stages, slopes, n, x.dtype, m, inner)
    if adjoint.ndim == 2:  # affine network: constant Jacobian, higher orders vanish
        jac = jnp.broadcast_to(adjoint, (batch, n, m))
        zeros = [jnp.zeros((batch, n, _symmetric.num_unique(m, k)), x.dtype) for k in range(2, order + 1)]
        return Derivatives(value, jac, *zeros)
    return Derivatives(value, *_read_off(adjoint, m, order))
