"""The analytic methods: the forward and forward-over-reverse kernels on a traced MLP.

``"forward"`` and ``"fwdrev"`` run one kernel each; ``"analytic"`` runs the one the
cost model (``_cost``) predicts to be faster for this network, batch and order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _native, _network
from .._derivatives import Derivatives
from . import _cost
from .forward import forward_stack, unpack
from .fwdrev import fwdrev_kernel


def mlp_stages(net, x: jax.Array):
    """The runtime stages of ``net`` for inputs like ``x``, and the computation dtype."""
    structure = _network.mlp_structure(net, x.shape[-1], x.dtype)
    if isinstance(structure, str):
        raise _network.NotAnMLPError(
            f"the analytic methods need a plain MLP (affine layers and elementwise activations), "
            f"but this model is not one: {structure}. Use method='nested' or method='jet', "
            f"which work on any model, or method='auto', which picks one."
        )
    return _network.runtime_stages(net, structure, structure.dtype), structure


def _value_only(stages, x):
    value = x
    for stage in stages:
        if isinstance(stage, _network.RuntimeAffine):
            value = value @ stage.weight + (0 if stage.bias is None else stage.bias)
        else:
            value = stage(value)
    return Derivatives(value)


def _run(kernel: str, stages, x: jax.Array, n: int, order: int) -> Derivatives:
    if order == 0:
        return _value_only(stages, x)
    if kernel == "forward":
        return unpack(forward_stack(stages, x, order), x.shape[-1], order)
    return fwdrev_kernel(stages, x, n, order)


def _chunked(kernel: str, stages, x: jax.Array, n: int, order: int, chunk: int) -> Derivatives:
    """Run over the batch in chunks of ``chunk`` points (``lax.map``), to stay in cache."""
    batch = x.shape[0]
    if chunk >= batch:
        return _run(kernel, stages, x, n, order)
    full, rest = divmod(batch, chunk)
    body = x[: full * chunk].reshape(full, chunk, x.shape[-1])
    mapped = jax.lax.map(lambda xs: _run(kernel, stages, xs, n, order), body)
    mapped = jax.tree_util.tree_map(lambda a: a.reshape(full * chunk, *a.shape[2:]), mapped)
    if not rest:
        return mapped
    tail = _run(kernel, stages, x[full * chunk :], n, order)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), mapped, tail)


def _method(kernel: str | None):
    def run(net, x: jax.Array, order: int) -> Derivatives:
        stages, structure = mlp_stages(net, x)
        x = x.astype(structure.dtype)
        plan = _cost.plan(stages, x.shape[0], x.shape[-1], structure.output_dim, order, x.dtype, kernel)
        if plan.kernel == "forward" and order > 0:
            # The native kernel (one custom call, whole batch, tiles itself), if it applies.
            native = _native.native_derivatives(stages, x, order, _native.requested_layout())
            if native is not None:
                return Derivatives(*native)
        return _chunked(plan.kernel, stages, x, structure.output_dim, order, plan.chunk)

    return run


forward_method = _method("forward")
fwdrev_method = _method("fwdrev")
analytic_method = _method(None)
