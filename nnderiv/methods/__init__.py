"""The table of methods: name -> ``(net, x (B, m), order) -> Derivatives``."""

from __future__ import annotations

from collections.abc import Callable

from .. import _network
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
    (:mod:`nnderiv.methods._calibration`); for any other model, ``"nested"``.
    """
    structure = _network.mlp_structure(net, m, dtype)
    if isinstance(structure, str):
        return "nested"
    layers = [(s.fan_in, s.fan_out) for s in structure.stages if isinstance(s, _network.AffineStage)]
    return _cost.choose(layers, m, structure.output_dim, order, structure.dtype, batch)


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
