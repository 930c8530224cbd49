"""The engine's fused path for a layered model: Faà di Bruno recursion on whole stacks.

Where a model (or a prefix of it, ``_engine.layered_prefix``) is a layered form (affine
layers, elementwise activations, skips and concatenations: ``_network``), the engine
does not interpret it equation by equation: each layer is one matmul of the batch's
whole Taylor stack and one fused elementwise rule. :func:`derivatives` runs it on the
native kernel where that applies, else on this XLA recursion (forward) or on
``_layered_fwdrev`` (forward over reverse).

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

from .. import _batching, _network, _symmetric
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


def _value_only(stages, x: jax.Array) -> jax.Array:
    """The model's value at ``x`` (B, m): order 0, no Taylor stack."""
    kept = {s.source for s in stages if isinstance(s, _network.RuntimeSkip)}
    saved = {0: x}
    value = x
    for index, stage in enumerate(stages):
        if isinstance(stage, _network.RuntimeSkip):
            value = value + saved[stage.source]
        elif isinstance(stage, _network.RuntimeAffine):
            value = value @ stage.weight + (0 if stage.bias is None else stage.bias)
        else:
            value = stage(value)
        if index + 1 in kept:
            saved[index + 1] = value
    return value


# A chunk's coefficient stack (chunk x K x width) is sized to a few MB: small enough to
# stay in the last-level cache across a layer's matmul and elementwise pass, large enough
# for XLA to split each op over the CPU's threads. Measured on the 2-core CI machine
# (benchmarks/): 16-point chunks ran single-threaded and unchunked batches of 1024+
# spilled the cache; both were up to 2x slower than this.
_CHUNK_BYTES = 4 << 20
_MIN_CHUNK, _MAX_CHUNK = 16, 512


def columns(algorithm: str, m: int, n: int, order: int) -> int:
    """Taylor columns per point and unit in the hidden layers: C(m+k, k) forward,
    (1 + n) C(m+k-1, k-1) fwdrev, C(m+k-1, k-1) + 1 + n fwdadj (the stacks below the top
    order, the pre-pass's value and its n adjoints; its layers after the last activation
    carry C(m+k-1, k-1), or forward's C(m+k, k) with a single activation)."""
    if algorithm == "forward":
        return sum(_blocks(m, order))
    if algorithm == "fwdadj":
        return sum(_blocks(m, order - 1)) + 1 + n
    return (1 + n) * sum(_blocks(m, order - 1))


def chunk_size(algorithm: str, layers, batch: int, m: int, n: int, order: int, dtype) -> int:
    """Points per chunk of an XLA recursion on ``batch`` points (``batch``: no chunking)."""
    k = columns(algorithm, m, n, order)
    widest = max([1] + [max(shape) for shape in layers])
    per_point = k * widest * jnp.dtype(dtype).itemsize
    if batch * per_point <= 2 * _CHUNK_BYTES:
        # The whole batch fits: a loop would only add per-iteration overhead (measured 5x
        # slower than nested AD on a 1x16 tanh net at batch 8192 when chunked by 512).
        return batch
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, _CHUNK_BYTES // per_point))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two
    return chunk if batch > 2 * chunk else batch


def derivatives(net, structure, x: jax.Array, order: int, algorithm: str = "forward", chunk: int | None = None):
    """Packed (or, from the native kernel, full) derivatives of a layered model at ``x`` (B, m).

    ``structure``: the model's layered form (``_network.mlp_structure``), orders 0-3.
    ``algorithm``: ``"forward"``, ``"fwdrev"`` or ``"fwdadj"``, on the native kernel where
    it applies, else on XLA in cache-sized chunks (``"fwdadj"``, the native kernel's
    alone, then runs the forward recursion: the same numbers up to rounding).
    """
    from .. import _native
    from ._layered_fwdrev import fwdrev_kernel

    stages = _network.runtime_stages(net, structure, structure.dtype)
    x = x.astype(structure.dtype)
    m = x.shape[-1]
    if order == 0:
        return Derivatives(_value_only(stages, x), layout="packed", m=m)
    native = _native.native_derivatives(stages, x, order, _native.requested_layout(), algorithm)
    if native is not None:
        return Derivatives(*native, layout="full" if _native.is_full(native) else "packed", m=m)
    n = structure.output_dim
    algorithm = "forward" if algorithm == "fwdadj" else algorithm
    chunk = chunk or chunk_size(algorithm, structure.affine_shapes, x.shape[0], m, n, order, x.dtype)
    if algorithm == "forward":
        kernel = lambda xs: tuple(unpack(forward_stack(stages, xs, order), m, order))  # noqa: E731
    else:
        kernel = lambda xs: tuple(fwdrev_kernel(stages, xs, n, order))  # noqa: E731
    fields = _batching.over_chunks(kernel, x, chunk)
    return Derivatives(*fields, layout="packed", m=m)
