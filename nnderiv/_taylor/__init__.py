"""The packed Taylor engine: any JAX model of supported primitives, any order.

Every live variable of the model's flat per-point program carries its truncated
multivariate Taylor polynomial in the ``m`` inputs (``_poly``); one rule per primitive
(``_rules``) maps polynomials to polynomials for every order; the interpreter
(``_engine``) runs the program on them, and is ``vmap``-ed over the batch. Two algorithms
on top:

* :func:`forward` -- the program of ``f`` at order ``k``: every unique partial of
  orders ``0..k`` is ``alpha!`` times a Taylor coefficient of the output;
* :func:`fwdrev` -- forward over reverse: the program of ``jax.jacrev(f)`` at order
  ``k - 1``; the order-``q`` partial ``d_p d^alpha f_i`` (``p`` the smallest index of the
  sorted tuple) is ``alpha!`` times the ``alpha`` coefficient of ``J[i, p]``. Reading only
  sorted tuples makes the expanded result exactly symmetric.

Both return packed results (orders >= 2 hold their unique entries), or full ones where
the native kernel wrote them. A model that is a layered form throughout (an MLP, with
skips, concatenations and affine maps: ``_network``) takes the fused path (``_layered``:
one matmul and one elementwise rule per layer, on the native kernel where it applies) at
orders up to 3; in any other model the native kernel runs its :func:`layered_prefixes`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _batching, _cpu, _jaxpr, _network
from .._derivatives import Derivatives
from . import _engine, _layered, _poly, _tables
from ._engine import Counter, UnsupportedModelError, layered_prefix, layered_prefixes, run, segments
from ._poly import Poly
from ._rules import RULES

__all__ = [
    "RULES",
    "Counter",
    "UnsupportedModelError",
    "forward",
    "fwdadj",
    "fwdrev",
    "jacobian_program",
    "layered_prefix",
    "layered_prefixes",
    "work",
    "run",
    "segments",
]


def jacobian_program(net: _network.Network, m: int, dtype) -> _jaxpr.FlatProgram:
    """The flat program of ``(*param_leaves, x) -> (J (n, m), f (n,))`` for one point."""

    def with_value(f):
        def value_twice(u):
            y = f(u)
            return y, y

        return jax.jacrev(value_twice, has_aux=True)

    return _network.trace_program(net, m, dtype, "jacrev", with_value)


def _block(out, j: int, m: int, shape, dtype):
    """Block ``j`` (P_j, *shape) of an output: zeros for a None block or a non-live output."""
    size = _tables.block_size(m, j)
    if isinstance(out, Poly):
        if j == 0:
            return out.value
        b = out.blocks[j]
        if b is not None:
            return _poly.broadcast_block(b, tuple(shape)).astype(dtype)
    elif j == 0:
        return jnp.broadcast_to(jnp.asarray(out, dtype), shape)
    return jnp.zeros((size, *shape), dtype)


def _forward_point(program, leaves, x, order: int, counter=None, layered=None) -> list:
    (y,) = run(program, leaves, x, order, counter, layered=layered)
    shape = tuple(program.outputs[0].shape) if isinstance(program.outputs[0], _jaxpr.FlatVar) else np.shape(y)
    m = x.shape[0]
    fields = [_block(y, 0, m, shape, x.dtype)]
    for j in range(1, order + 1):
        block = _block(y, j, m, shape, x.dtype)  # (P_j, n) Taylor coefficients
        fields.append(jnp.moveaxis(block, 0, -1) * jnp.asarray(_tables.factorials(m, j), x.dtype))
    return fields


def _fwdrev_point(program, leaves, x, order: int, counter=None) -> list:
    jac, y = run(program, leaves, x, order - 1, counter)
    m = x.shape[0]
    (n,) = program.outputs[1].shape if isinstance(program.outputs[1], _jaxpr.FlatVar) else np.shape(y)
    fields = [_block(y, 0, m, (n,), x.dtype), _block(jac, 0, m, (n, m), x.dtype)]
    for q in range(2, order + 1):
        block = _block(jac, q - 1, m, (n, m), x.dtype)  # (P_{q-1}, n, m)
        slot, col, fact = _tables.fwdrev_table(m, q)
        picked = block[slot, :, col]  # (P_q, n)
        fields.append(jnp.moveaxis(picked, 0, -1) * jnp.asarray(fact, x.dtype))
    return fields


# The batch runs in chunks whose widest Taylor stack (chunk x coefficients x widest value)
# is about the combined L2 capacity of the cores, read at run time (``_cpu``): XLA:CPU
# splits each fusion over the cores, so each core's share of the stacks a fusion streams
# stays near its own L2. Measured on a 2-core EPYC VM (L2 512 KiB per core): an unchunked
# batch of 512 ran 1.2-1.7x slower per point than chunks of 128-256 (benchmarks/
# engine_models.py); chunks much smaller than the cache leave the cores idle between
# many small fusions (fewer of them are split over the cores).
_MIN_CHUNK, _MAX_CHUNK = 16, 512


def chunk_size(
    program: _jaxpr.FlatProgram, m: int, order: int, itemsize: int, batch: int, cache_bytes: int | None = None
) -> int:
    """Points per chunk: ``cache_bytes / per_point`` rounded to the nearest power of two.

    ``per_point`` is the bytes of one point's widest Taylor stack (all coefficients of
    orders ``0..order`` of the widest variable); ``cache_bytes`` defaults to the total L2 of
    the usable cores. Rounding in log scale keeps the stack within sqrt(2) of the cache
    either way. Clamped to ``[_MIN_CHUNK, _MAX_CHUNK]``; the whole batch when it fits one chunk.
    """
    if cache_bytes is None:
        cache_bytes = _cpu.l2_bytes()
    coefficients = sum(_tables.block_size(m, j) for j in range(order + 1))
    widest = max([m] + [int(np.prod(o.shape)) for e in program.eqns for o in e.outputs])
    per_point = coefficients * widest * itemsize
    exact = max(cache_bytes / per_point, 1.0)
    chunk = 1 << round(math.log2(exact))
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, chunk))
    return chunk if batch > chunk else batch


def default_chunk(net: _network.Network, algorithm: str, m: int, dtype, order: int, batch: int) -> int:
    """The points per chunk :func:`forward` (or :func:`fwdrev`) uses for ``batch`` points by default."""
    if algorithm == "fwdrev" and order > 0:
        return chunk_size(jacobian_program(net, m, dtype), m, order - 1, jnp.dtype(dtype).itemsize, batch)
    return chunk_size(_network.trace_program(net, m, dtype), m, order, jnp.dtype(dtype).itemsize, batch)


def _batched(point_fn, x: jax.Array, chunk: int) -> list:
    """``vmap(point_fn)`` over the batch ``x`` (B, m), ``chunk`` points at a time."""
    return _batching.over_chunks(jax.vmap(point_fn), x, chunk)


def _layered_form(net: _network.Network, m: int, dtype, order: int):
    """The model's layered form, where the fused path takes it (orders 0-3), else None."""
    if order > 3:
        return None
    structure = _network.mlp_structure(net, m, dtype)
    return None if isinstance(structure, str) else structure


def forward(
    net: _network.Network, x: jax.Array, order: int, chunk: int | None = None, fused: bool = True
) -> Derivatives:
    """The engine's forward algorithm on a batch ``x`` (B, m): packed derivatives to ``order``.

    ``fused=False`` interprets a layered model equation by equation too (for comparisons).
    """
    m = x.shape[-1]
    structure = _layered_form(net, m, x.dtype, order) if fused else None
    if structure is not None:
        return _layered.derivatives(net, structure, x, order, "forward", chunk)
    program = _network.trace_program(net, m, x.dtype)
    leaves = jax.tree_util.tree_leaves(net.params)
    segments(program)  # identified by value here, outside the batch vmap (cached)
    prefixes = layered_prefixes(program)  # likewise
    chunk = chunk or chunk_size(program, m, order, x.dtype.itemsize, x.shape[0])

    def chunk_fields(xs):
        pre = _engine.prefix_fields(prefixes, leaves, xs, order)
        if all(f is None for f in pre):
            return jax.vmap(lambda u: _forward_point(program, leaves, u, order))(xs)
        return jax.vmap(lambda u, f: _forward_point(program, leaves, u, order, layered=f))(xs, pre)

    fields = _batching.over_chunks(chunk_fields, x, chunk)
    return Derivatives(*fields, layout="packed", m=m)


def fwdrev(
    net: _network.Network, x: jax.Array, order: int, chunk: int | None = None, fused: bool = True
) -> Derivatives:
    """The engine's forward-over-reverse algorithm on a batch ``x`` (B, m).

    A layered model up to order 3 takes the fused path (the native kernel where it
    applies, else the XLA recursion of ``_layered_fwdrev``), unless ``fused=False``; any
    other model or order runs the interpreter on the program of ``jax.jacrev(f)`` at
    order ``order - 1``.
    """
    if order == 0:
        return forward(net, x, 0, fused=fused)
    m = x.shape[-1]
    structure = _layered_form(net, m, x.dtype, order) if fused else None
    if structure is not None:
        return _layered.derivatives(net, structure, x, order, "fwdrev", chunk)
    program = jacobian_program(net, m, x.dtype)
    leaves = jax.tree_util.tree_leaves(net.params)
    segments(program)
    chunk = chunk or chunk_size(program, m, order - 1, x.dtype.itemsize, x.shape[0])
    fields = _batched(lambda u: _fwdrev_point(program, leaves, u, order), x, chunk)
    return Derivatives(*fields, layout="packed", m=m)


def fwdadj(
    net: _network.Network, x: jax.Array, order: int, chunk: int | None = None, fused: bool = True
) -> Derivatives:
    """Forward with the top order by adjoint on a batch ``x`` (B, m): the native kernel's
    third algorithm (``nnderiv._native``, algorithm ``"fwdadj"``).

    The top-order Taylor coefficient enters every later layer linearly, through the value
    path's Jacobian: an activation's is ``s'(z) z_top + r`` with ``r`` made of lower orders
    only. So the outputs' order-``k`` derivatives are ``sum_l A_l r_l``, ``A_l`` the
    first-order adjoint at activation ``l``'s output, and the hidden layers' matmuls carry
    only the ``C(m+k-1, k-1)`` coefficients below order ``k`` (plus the value and ``n``
    adjoint rows of a pre-pass) instead of ``C(m+k, k)``. Where the native kernel does not
    take the model (no C++ compiler, another backend, a model that is not layered, skip
    connections, orders above 3) this is :func:`forward`: the same numbers up to rounding.
    """
    m = x.shape[-1]
    structure = _layered_form(net, m, x.dtype, order) if fused else None
    if structure is not None and order > 0:
        return _layered.derivatives(net, structure, x, order, "fwdadj", chunk)
    return forward(net, x, order, chunk, fused)


def work(net: _network.Network, m: int, dtype, order: int) -> dict[str, float]:
    """Per-point matrix-product flops of the engine's two algorithms, counted by interpreting
    the programs abstractly (``jax.eval_shape``: nothing is computed). Raises
    :class:`UnsupportedModelError` where the engine does not apply."""
    leaves = jax.tree_util.tree_leaves(net.params)
    specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    x = jax.ShapeDtypeStruct((m,), dtype)
    out = {}
    fwd = Counter()
    program = _network.trace_program(net, m, dtype)
    segments(program)
    prefixes = layered_prefixes(program)

    def point(ls, u):
        pre = _engine.prefix_fields(prefixes, ls, u[None], order)
        pre = [None if f is None else [a[0] for a in f] for f in pre]
        return _forward_point(program, ls, u, order, fwd, pre if any(f is not None for f in pre) else None)

    jax.eval_shape(point, specs, x)
    out["forward"] = fwd.flops
    if order >= 1:
        rev = Counter()
        jprogram = jacobian_program(net, m, dtype)
        segments(jprogram)
        jax.eval_shape(lambda ls, u: _fwdrev_point(jprogram, ls, u, order, rev), specs, x)
        out["fwdrev"] = rev.flops
    out["plain"] = _plain_flops(program)
    return out


def _plain_flops(program: _jaxpr.FlatProgram) -> float:
    """Flops of the input-dependent matrix products of one plain evaluation."""
    kind = _engine._kinds(program)  # noqa: SLF001
    counter = Counter()
    for eqn in program.eqns:
        if eqn.primitive is jax.lax.dot_general_p and any(_engine.kind_of(kind, i) == "live" for i in eqn.inputs):
            counter.count(eqn)
    return counter.flops
