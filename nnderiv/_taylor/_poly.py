"""Truncated multivariate Taylor polynomials of one point, and their arithmetic.

A :class:`Poly` holds the Taylor polynomial of one variable of the per-point program in
the ``m`` inputs, truncated at order ``k``: ``blocks[0]`` is the value (the variable's own
shape ``S``) and ``blocks[j]`` (``j >= 1``) the Taylor coefficients ``c_alpha = d^alpha q /
alpha!`` for ``|alpha| = j``, shape ``(C(m+j-1, j), *S)``, in packed order (see
``_tables``). A block that is identically zero is ``None`` and costs nothing: the input's
polynomial is ``(x, eye, None, ...)`` and an affine map keeps every block above the first
``None``.

With Taylor (not derivative) coefficients a product is a plain truncated Cauchy product,
``(uv)_gamma = sum_{alpha + beta = gamma} u_alpha v_beta``, and a unary function composes as
``s(u_0 + delta) = sum_p s^(p)(u_0) / p! * delta^p``, ``delta = u - u_0``. The powers
``delta^p`` do not depend on ``s``: they are computed once per polynomial and shared by
every function of it (``sin`` and ``cos`` of the same Fourier features, a value and its
slope).

Everything here acts on one point; the engine is ``vmap``-ed over the batch, so a block
that does not depend on the point (the first layer's weight as the first-order block of
its output) is stored once, not per point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from . import _tables


class Poly:
    """The truncated Taylor polynomial of one variable at one point (see the module docstring)."""

    __slots__ = ("blocks", "m", "_powers")

    def __init__(self, blocks: Sequence, m: int):
        self.blocks = list(blocks)
        self.m = m
        self._powers = None

    @property
    def order(self) -> int:
        return len(self.blocks) - 1

    @property
    def value(self):
        return self.blocks[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.blocks[0]))

    @property
    def dtype(self):
        return jnp.result_type(self.blocks[0])

    def is_constant(self) -> bool:
        """True where every derivative vanishes (piecewise-constant values, comparisons)."""
        return all(b is None for b in self.blocks[1:])

    def block_or_zeros(self, j: int):
        b = self.blocks[j]
        if b is None:
            return jnp.zeros((_tables.block_size(self.m, j), *self.shape), self.dtype)
        return b

    def __repr__(self) -> str:
        present = "".join("x" if b is not None else "." for b in self.blocks)
        return f"Poly(shape={self.shape}, blocks={present})"


def constant(value, m: int, order: int) -> Poly:
    return Poly([value] + [None] * order, m)


def variable(x, order: int) -> Poly:
    """The polynomial of the input ``x`` (m,) itself: ``x + sum_p e_p dx_p``."""
    m = x.shape[0]
    blocks = [x, jnp.eye(m, dtype=x.dtype)] + [None] * (order - 1)
    return Poly(blocks[: order + 1], m)


def broadcast_block(b, shape: tuple[int, ...]):
    """A block ``(P, *s)`` broadcast to ``(P, *shape)`` (numpy rules on the element axes)."""
    extra = len(shape) - (b.ndim - 1)
    if extra > 0:
        b = b.reshape((b.shape[0],) + (1,) * extra + b.shape[1:])
    return jnp.broadcast_to(b, (b.shape[0], *shape))


def _expand(coeff, ndim: int):
    """A per-element array (shape S) broadcast against a block (P, *S)."""
    return coeff[None] if jnp.ndim(coeff) else coeff


def take_rows(u, idx):
    """``u[idx]`` along the leading axis for a static ``idx``, as slices and a concatenate.

    Runs of consecutive indices become one slice and repeats of one index a broadcast.
    XLA:CPU fuses these into the consumer; a gather (``jnp.take``) under the batch
    ``vmap`` is laid out index-major and transposed back (measured 5x slower here).
    """
    idx = [int(i) for i in idx]
    if idx == list(range(u.shape[0])):
        return u
    pieces, start = [], 0
    while start < len(idx):
        stop = start + 1
        if stop < len(idx) and idx[stop] == idx[start]:
            while stop < len(idx) and idx[stop] == idx[start]:
                stop += 1
            pieces.append(jnp.broadcast_to(u[idx[start] : idx[start] + 1], (stop - start, *u.shape[1:])))
        else:
            while stop < len(idx) and idx[stop] == idx[stop - 1] + 1:
                stop += 1
            pieces.append(u[idx[start] : idx[start] + (stop - start)])
        start = stop
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def _pair_terms(f: Callable | None, u, v, m: int, i: int, l: int):
    """``sum_{|alpha|=i, |beta|=l, alpha+beta=gamma} f(u_alpha, v_beta)`` for every gamma."""
    ia, ib, mask = _tables.product_table(m, i, l)
    # One row selection per column of the table: a gather with the 2-D index table lowers
    # to a per-element gather on XLA:CPU under vmap (measured ~100x slower).
    acc = None
    for c in range(ia.shape[1]):
        ua, vb = jnp.take(u, ia[:, c], axis=0), jnp.take(v, ib[:, c], axis=0)
        if f is None and ua.shape != vb.shape:
            # Per-coefficient shapes that only broadcast (a vector times a scalar: lax takes
            # rank-0 operands): broadcast them per row, not from the trailing axis, which
            # would pair the coefficient axis with a value axis.
            f = jnp.multiply
        term = ua * vb if f is None else jax.vmap(f)(ua, vb)
        if not mask[:, c].all():
            term = term * jnp.asarray(mask[:, c], term.dtype).reshape((-1,) + (1,) * (term.ndim - 1))
        acc = term if acc is None else acc + term
    return acc


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def bilinear(u: Poly, v: Poly, f: Callable | None = None) -> Poly:
    """The truncated product of two polynomials under a bilinear ``f`` (None: elementwise ``*``).

    ``f`` acts on one coefficient of each (per-point shapes); e.g. a ``dot_general``.
    """
    m, order = u.m, u.order
    mul = (lambda a, b: a * b) if f is None else f
    blocks = [mul(u.blocks[0], v.blocks[0])]
    for j in range(1, order + 1):
        acc = None
        if v.blocks[j] is not None:
            acc = _add(acc, jax.vmap(lambda b: mul(u.blocks[0], b))(v.blocks[j]))
        if u.blocks[j] is not None:
            acc = _add(acc, jax.vmap(lambda a: mul(a, v.blocks[0]))(u.blocks[j]))
        for i in range(1, j):
            if u.blocks[i] is not None and v.blocks[j - i] is not None:
                acc = _add(acc, _pair_terms(f, u.blocks[i], v.blocks[j - i], m, i, j - i))
        blocks.append(acc)
    return Poly(blocks, m)


def power_block(blocks: Sequence, m: int, p: int, j: int):
    """Block ``j`` of ``delta^p`` from the blocks of ``delta`` (``blocks[i]``, None: zero).

    Every distinct product of ``p`` coefficients is formed once, straight from the blocks
    (``_tables.power_table``): no intermediate power is gathered from again, so XLA fuses
    each block into one loop over the blocks it reads.
    """
    acc = None
    for parts, index, coef in _tables.power_table(m, p, j):
        if any(blocks[i] is None for i in parts):
            continue
        for c in range(index.shape[1]):
            term = None
            for r, i in enumerate(parts):
                factor = jnp.take(blocks[i], index[:, c, r], axis=0)
                term = factor if term is None else term * factor
            weight = coef[:, c]
            if not (weight == 1.0).all():
                term = term * jnp.asarray(weight, term.dtype).reshape((-1,) + (1,) * (term.ndim - 1))
            acc = _add(acc, term)
    return acc


def powers(u: Poly) -> list[list]:
    """``delta^p`` for ``p = 1..k`` (``delta = u - u_0``); ``out[p][j]`` is block ``j`` (None: zero).

    Cached on ``u``: every function of ``u`` shares them.
    """
    if u._powers is not None:
        return u._powers
    m, order = u.m, u.order
    delta = [None] + list(u.blocks[1:])
    out = [None, delta]
    for p in range(2, order + 1):
        out.append([None] * p + [power_block(delta, m, p, j) for j in range(p, order + 1)])
    u._powers = out
    return out


def compose(u: Poly, coefficients: Sequence) -> Poly:
    """``s(u)`` from the univariate Taylor coefficients ``a_p = s^(p)(u_0) / p!``, p = 0..k.

    ``a_p`` are per-element arrays (shape of u) or scalars; ``None`` means zero.
    """
    order = u.order
    pw = powers(u)
    blocks = [coefficients[0]]
    for j in range(1, order + 1):
        acc = None
        for p in range(1, j + 1):
            a, d = coefficients[p], pw[p][j]
            if a is None or d is None:
                continue
            acc = _add(acc, _expand(a, d.ndim) * d)
        blocks.append(acc)
    return Poly(blocks, u.m)


def derivative_coefficients(derivs: Sequence) -> list:
    """``s^(p) / p!`` from ``s^(p)``."""
    out, fact = [], 1.0
    for p, d in enumerate(derivs):
        fact *= max(p, 1)
        out.append(None if d is None else (d if p < 2 else d / fact))
    return out
