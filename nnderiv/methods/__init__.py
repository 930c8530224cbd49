"""The table of methods: name -> ``(net, x (B, m), order) -> Derivatives``."""

from __future__ import annotations

from collections.abc import Callable

from .. import _network
from .._derivatives import Derivatives
from .analytic import analytic_method, forward_method, fwdrev_method
from .jet import jet_method
from .nested import nested

Method = Callable[[_network.Network, object, int], Derivatives]


def choose(net, m: int, dtype, order: int) -> str:
    """The method ``"auto"`` runs: the analytic kernels for MLPs, nested AD otherwise."""
    structure = _network.mlp_structure(net, m, dtype)
    return "nested" if isinstance(structure, str) else "analytic"


def auto(net, x, order: int) -> Derivatives:
    return METHODS[choose(net, x.shape[-1], x.dtype, order)](net, x, order)


METHODS: dict[str, Method] = {
    "auto": auto,
    "analytic": analytic_method,
    "forward": forward_method,
    "fwdrev": fwdrev_method,
    "jet": jet_method,
    "nested": nested,
}
