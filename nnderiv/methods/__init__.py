"""The table of methods: name -> ``(net, x (B, m), order) -> Derivatives``."""

from __future__ import annotations

from collections.abc import Callable

from .. import _native, _network, _taylor
from .._derivatives import Derivatives
from . import _cost
from .analytic import analytic_method, forward_method, fwdrev_method
from .jet import jet_method
from .nested import nested

Method = Callable[[_network.Network, object, int], Derivatives]


def choose(net, m: int, dtype, order: int, batch: int = 1024) -> str:
    """The method ``"auto"`` runs for ``batch`` points of ``m`` inputs of ``dtype`` at ``order``.

    For an MLP, the cheapest of ``"forward"``, ``"fwdrev"`` and ``"nested"`` by the cost
    model of :mod:`nnderiv.methods._cost`, with this machine's rates
    (:mod:`nnderiv.methods._calibration`). For any other model the Taylor engine's forward or
    forward-over-reverse algorithm, or nested AD, whichever does the fewest matrix-product
    flops per point (counted by interpreting the programs abstractly); ``"nested"`` where
    the engine does not apply.
    """
    structure = _network.mlp_structure(net, m, dtype)
    if isinstance(structure, str):
        return _choose_general(net, m, dtype, order)
    layers = [(s.fan_in, s.fan_out) for s in structure.stages if isinstance(s, _network.AffineStage)]
    stages = _network.runtime_stages(net, structure, structure.dtype)
    native = _native.applies(stages, _cost._ShapeOnly((batch, m), structure.dtype), order)
    return _cost.choose(layers, m, structure.output_dim, order, structure.dtype, batch, native=native)


def _choose_general(net, m: int, dtype, order: int) -> str:
    if order == 0:
        return "forward"
    try:
        work = _taylor.work(net, m, dtype, order)
    except _network.UnsupportedModelError:
        return "nested"
    n = _network.output_dim(net, m, dtype)
    # Nested AD: jacrev pushes 1 + n columns through the model's products, each jacfwd
    # multiplies them by 1 + m (the primal and m tangents).
    costs = {
        "forward": work["forward"],
        "fwdrev": work["fwdrev"],
        "nested": work["plain"] * (1 + n) * (1 + m) ** (order - 1),
    }
    return min(costs, key=costs.get)


def auto(net, x, order: int) -> Derivatives:
    return METHODS[choose(net, x.shape[-1], x.dtype, order, x.shape[0])](net, x, order)


METHODS: dict[str, Method] = {
    "auto": auto,
    "analytic": analytic_method,
    "forward": forward_method,
    "fwdrev": fwdrev_method,
    "jet": jet_method,
    "nested": nested,
}
