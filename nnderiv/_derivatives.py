"""The result type, and expansion of packed symmetric tensors to full ones."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _symmetric


class Derivatives(NamedTuple):
    """Value and input derivatives of a model ``f: R^m -> R^n`` at a batch of points.

    A NamedTuple, hence a pytree: it passes through ``jit``, ``vmap``, ``lax.scan`` and
    ``grad``. Fields above the requested ``order`` are ``None``.

    Attributes:
      value: ``(*batch, n)``; ``value[..., i] = f_i(x)``.
      jacobian: ``(*batch, n, m)``; ``jacobian[..., i, j] = df_i / dx_j``.
      hessian: ``(*batch, n, m, m)``; ``hessian[..., i, j, k] = d2 f_i / dx_j dx_k``.
      third: ``(*batch, n, m, m, m)``; ``third[..., i, j, k, l] = d3 f_i / dx_j dx_k dx_l``.
    """

    value: jax.Array | None
    jacobian: jax.Array | None = None
    hessian: jax.Array | None = None
    third: jax.Array | None = None

    @property
    def order(self) -> int:
        """The highest order present (0 to 3)."""
        return sum(f is not None for f in self) - 1

    def packed(self, order: int) -> jax.Array | None:
        """The unique entries of the order-``order`` tensor, shape ``(*batch, n, C(m+k-1, k))``.

        Entries come in lexicographic order of sorted index tuples: for order 2
        ``(0,0), (0,1), ..., (0,m-1), (1,1), ...``; for order 3 ``(j,k,l)`` with
        ``j <= k <= l``. ``nnderiv.packed_indices(m, order)`` lists them.
        """
        if order not in (1, 2, 3):
            raise ValueError(f"packed() takes order 1, 2 or 3, got {order!r}")
        full = self[order]
        return None if full is None else pack_full(full, order)


def expand_packed(packed: jax.Array, m: int, order: int, axis: int) -> jax.Array:
    """Expand ``packed`` (unique entries along ``axis``) to a full symmetric tensor.

    The packed axis is replaced by ``order`` axes of size ``m``.
    """
    axis = axis % packed.ndim
    position = _symmetric.packed_position(m, order)
    full = jnp.take(packed, position.reshape(-1), axis=axis)
    shape = full.shape[:axis] + (m,) * order + full.shape[axis + 1 :]
    return full.reshape(shape)


def pack_full(full: jax.Array | None, order: int) -> jax.Array | None:
    """The unique entries of a full symmetric tensor (last ``order`` axes of size m)."""
    if full is None or order < 2:
        return full
    idx = _symmetric.sorted_tuples(full.shape[-1], order)
    return full[(..., *(idx[:, c] for c in range(order)))]


def expand_fields(packed: Derivatives, m: int) -> Derivatives:
    """Full tensors from a result whose Hessian and third tensor are packed."""
    return Derivatives(
        *packed[:2],
        *(None if f is None else expand_packed(f, m, k, axis=-1) for k, f in enumerate(packed[2:], start=2)),
    )
