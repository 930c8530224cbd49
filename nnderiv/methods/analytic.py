"""The analytic methods: forward and forward-over-reverse on packed Taylor coefficients.

``"forward"`` and ``"fwdrev"`` run one algorithm each; ``"analytic"`` runs the one
predicted to be faster for this network, batch and order. A plain MLP up to order 3 runs
the hand-written kernels (``forward.py``, ``fwdrev.py``); any other model, and any order,
runs the Taylor engine (``nnderiv._taylor``), which raises
:class:`~nnderiv._network.UnsupportedModelError` naming a primitive it has no rule for.
"""

from __future__ import annotations

import jax

from .. import _batching, _native, _network, _taylor
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
    """Run over the batch in chunks of ``chunk`` points, to stay in cache."""
    return _batching.over_chunks(lambda xs: _run(kernel, stages, xs, n, order), x, chunk)


def engine_choice(net, m: int, dtype, order: int) -> str:
    """``"forward"`` or ``"fwdrev"``: the engine algorithm with fewer matrix-product flops."""
    if order <= 1:
        return "forward"
    work = _taylor.work(net, m, dtype, order)
    return "fwdrev" if work["fwdrev"] < work["forward"] else "forward"


def _engine(net, x: jax.Array, order: int, kernel: str | None) -> Derivatives:
    algorithms = {"forward": _taylor.forward, "fwdrev": _taylor.fwdrev}
    if kernel is not None:
        return algorithms[kernel](net, x, order)
    try:
        first = engine_choice(net, x.shape[-1], x.dtype, order)
    except _network.UnsupportedModelError:
        first = "forward"
    try:
        return algorithms[first](net, x, order)
    except _network.UnsupportedModelError:
        # The other program may have rules for everything (jacrev turns a cumprod into
        # sums and products); if neither has, its error names the primitive.
        other = "fwdrev" if first == "forward" else "forward"
        return algorithms[other](net, x, order)


def _method(kernel: str | None):
    def run(net, x: jax.Array, order: int) -> Derivatives:
        structure = _network.mlp_structure(net, x.shape[-1], x.dtype)
        if isinstance(structure, str) or order > 3:
            return _engine(net, x, order, kernel)
        stages = _network.runtime_stages(net, structure, structure.dtype)
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
