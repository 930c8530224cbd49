"""The reference method: nested ``jax.jacrev`` / ``jax.jacfwd``.

The gradient is taken in reverse mode (one sweep per output), then differentiated twice
in forward mode; each level returns the lower orders as auxiliary data, so one trace
yields all of them and XLA shares the common work.
"""

from __future__ import annotations

import jax

from .._derivatives import Derivatives, pack_full


def nested_point(f, x: jax.Array, order: int) -> Derivatives:
    """All derivatives of ``f: (m,) -> (n,)`` at one point, by nested AD."""
    if order == 0:
        return Derivatives(f(x))

    def level1(u):
        y = f(u)
        return y, (y,)

    fn = jax.jacrev(level1, has_aux=True)
    for _ in range(order - 1):
        fn = _one_more(fn)
    top, lower = fn(x)
    return Derivatives(*lower, top)


def _one_more(fn):
    def with_aux(u):
        top, lower = fn(u)
        return top, (*lower, top)

    return jax.jacfwd(with_aux, has_aux=True)


def nested(net, x: jax.Array, order: int) -> Derivatives:
    """Nested AD on a batch ``x`` of shape (B, m), vectorised with ``vmap``; packed result."""
    full = jax.vmap(lambda u: nested_point(net.apply_point, u, order))(x)
    return Derivatives(*full[:2], *(pack_full(t, k) for k, t in enumerate(full[2:], start=2)))
