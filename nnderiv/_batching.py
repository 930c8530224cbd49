"""Evaluating a per-batch function over large batches: in chunks, and across devices.

Every method computes each point independently, so a batch ``(B, m)`` can be split
along its first axis in any way without changing a single result row. Three ways are
used here:

* :func:`map_chunks`: inside a trace (the caller's ``jit``), pad the batch to a multiple
  of the chunk size and ``lax.map`` over the chunks; XLA's loop writes every chunk's
  result into the stacked output, so the intermediates of only one chunk are alive.
* :class:`ChunkedRunner`: for concrete inputs, a Python loop over chunks calls one
  compiled chunk program of fixed shape ``(batch_size, m)`` (the last, partial chunk is
  padded with zeros and its padding dropped), and a small donated program writes each
  chunk in place into a preallocated output. The chunk program never recompiles for a
  new total size, and the peak memory is the output plus one chunk's working set.
* :func:`shard_batch`: ``shard_map`` over a device mesh: every device runs the
  function (optionally chunked) on its slice of the batch, and the output stays sharded
  along the batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._derivatives import Derivatives

#: The mesh axis name used when ``mesh="all"`` builds a mesh over every device.
BATCH_AXIS = "batch"


def check_batch_size(batch_size) -> int | None:
    """``batch_size`` as a positive int, or None; a ValueError that says what is wrong."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer (points per chunk) or None for no chunking, got {batch_size!r}"
        )
    return int(batch_size)


def resolve_mesh(mesh) -> Mesh | None:
    """``None`` (one device), ``"all"`` (every device, one axis) or a ``jax.sharding.Mesh``."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, str) and mesh == "all":
        return Mesh(np.array(jax.devices()), (BATCH_AXIS,))
    raise TypeError(f"mesh must be None, 'all' or a jax.sharding.Mesh, got {mesh!r}")


def _pad_rows(x, rows: int):
    """``x`` with ``rows`` zero rows appended (zeros: padding must not create NaN or inf)."""
    if rows == 0:
        return x
    return jnp.concatenate([x, jnp.zeros((rows, *x.shape[1:]), x.dtype)])


def over_chunks(fn: Callable, x: jax.Array, chunk: int | None, pad: bool = False):
    """``fn(x)`` for a batch ``x`` (B, m), evaluated ``chunk`` rows at a time (``lax.map``).

    The one chunker of nnderiv: traceable, for any pytree output with a leading batch axis.
    With ``pad=False`` the full chunks run in the loop and the remainder in one call
    after it (the kernels' cache-sized chunks); with ``pad=True`` the batch is padded
    with zero rows to a multiple of ``chunk`` and the padding's results are dropped, so
    only one chunk program exists (``batch_size=``; zeros create no NaN or inf, and rows
    never interact, so padding cannot change the others).
    """
    batch = x.shape[0]
    if chunk is None or batch <= chunk:
        return fn(x)
    if pad:
        chunks = math.ceil(batch / chunk)
        xs = _pad_rows(x, chunks * chunk - batch).reshape(chunks, chunk, *x.shape[1:])
        out = jax.lax.map(fn, xs)
        return jax.tree_util.tree_map(lambda a: a.reshape(chunks * chunk, *a.shape[2:])[:batch], out)
    full, rest = divmod(batch, chunk)
    body = x[: full * chunk].reshape(full, chunk, *x.shape[1:])
    mapped = jax.tree_util.tree_map(lambda a: a.reshape(full * chunk, *a.shape[2:]), jax.lax.map(fn, body))
    if not rest:
        return mapped
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), mapped, fn(x[full * chunk :]))


def map_chunks(fn: Callable, x: jax.Array, batch_size: int | None):
    """``fn(x)`` evaluated ``batch_size`` rows at a time, padded: one chunk program (see :func:`over_chunks`)."""
    return over_chunks(fn, x, batch_size, pad=True)


def shard_batch(fn: Callable, x: jax.Array, mesh: Mesh, batch_size: int | None):
    """``fn(x)`` for ``x`` (B, m) with the batch split over every device of ``mesh``.

    Traceable (call it under ``jit``). The batch is padded to a multiple of the number of
    devices; each device evaluates its contiguous block, in chunks of ``batch_size`` if
    given, and the result is sharded along the batch axis over all mesh axes when ``B``
    is a multiple of the number of devices. JAX arrays cannot be sharded unevenly, so for
    other ``B`` dropping the padding leaves a replicated (gathered) result.
    """
    batch, devices = x.shape[0], mesh.devices.size
    spec = PartitionSpec(tuple(mesh.axis_names))
    padded = _pad_rows(x, -batch % devices)
    padded = jax.lax.with_sharding_constraint(padded, NamedSharding(mesh, spec))
    # Each block is (B_pad / devices, m): the per-device program is the one-device one.
    # check_vma=False: the per-point program has no collectives, and jet's rules mix
    # device-varying values with replicated constants, which the check rejects.
    local = jax.shard_map(
        lambda block: map_chunks(fn, block, batch_size), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
    )
    out = local(padded)
    return jax.tree_util.tree_map(lambda a: a[:batch], out)


class ChunkedRunner:
    """Evaluate ``chunk_fn`` (a jitted ``(batch_size, m) -> Derivatives``) over any batch.

    ``__call__(x)``: ``x`` is a validated, concrete ``(B, m)`` array; returns the fields
    with leading axis ``batch_shape`` (``B`` points reshaped). Peak memory: the output,
    the input on the host, and one chunk's working set.
    """

    def __init__(self, chunk_fn: Callable, batch_size: int):
        self.chunk_fn, self.batch_size = chunk_fn, batch_size
        # ``out`` is donated: XLA updates it in place instead of copying the whole output
        # for every chunk. ``count`` (rows to keep: batch_size, or fewer for the last
        # chunk) is static; ``start`` is traced, so one program serves every chunk.
        self._write = jax.jit(_write_rows, static_argnums=(2,), donate_argnums=(0,))

    def __call__(self, x, batch_shape: tuple[int, ...]) -> Derivatives:
        bs = self.batch_size
        batch, m = x.shape
        shapes = jax.eval_shape(self.chunk_fn, jax.ShapeDtypeStruct((bs, m), x.dtype))
        out = [None if s is None else jnp.zeros((*batch_shape, *s.shape[1:]), s.dtype) for s in shapes]
        layout = shapes.layout
        if batch == 0:
            return Derivatives(*out, layout=layout)
        # Chunks are cut on the host: slicing a device array at many static offsets would
        # compile one slicing program per offset. On CPU this is a view, not a copy.
        host = np.asarray(x)
        for start in range(0, batch, bs):
            count = min(bs, batch - start)
            chunk = host[start : start + count]
            if count < bs:  # pad the last chunk to the compiled shape; its padding is dropped
                chunk = np.concatenate([chunk, np.zeros((bs - count, m), chunk.dtype)])
            result = self.chunk_fn(chunk)
            out = self._write(out, list(result), count, np.int32(start) if batch < 2**31 else np.int64(start))
        return Derivatives(*out, layout=layout)


def _write_rows(out, result, count: int, start):
    """``out`` (fields of shape (*batch, ...)) with rows ``start : start + count`` (flat) set."""
    written = []
    for o, r in zip(out, result):
        if o is None:
            written.append(None)
            continue
        flat = o.reshape(-1, *r.shape[1:])  # a bitcast for row-major buffers, so in place
        index = (start,) + (jnp.zeros((), start.dtype),) * (flat.ndim - 1)
        flat = jax.lax.dynamic_update_slice(flat, r[:count].astype(flat.dtype), index)
        written.append(flat.reshape(o.shape))
    return written
