"""The methods, by name: :class:`Method` objects with an ``init`` (analysis, once per model
and shape) and a ``compute`` (per batch) step; calling one, ``METHODS[name](net, x, order)``,
runs both.

``"forward"``, ``"fwdrev"`` and ``"fwdadj"`` run one algorithm of the Taylor engine each (a
layered model up to order 3 on its fused path, the native kernel where it applies;
``"fwdadj"`` is the native kernel's alone and runs forward's recursion elsewhere);
``"analytic"`` runs the fastest of the three, ``"auto"`` the fastest of those and nested
AD, as decided by :func:`select` (``_plan``); ``"jet"`` and ``"nested"`` are the references.
"""

from __future__ import annotations

from .. import _native, _network
from ._plan import (
    ALGORITHMS,
    Analysis,
    Method,
    Plan,
    analyse,
    analytic_method,
    auto_method,
    forward_method,
    fwdadj_method,
    fwdrev_method,
    jet_method_obj,
    nested_method,
    select,
)


def choose(net, m: int, dtype, order: int, batch: int = 1024, layout: str = "full") -> str:
    """The algorithm ``method="auto"`` runs for ``batch`` points of ``m`` inputs of ``dtype`` at ``order``.

    ``layout`` is the result's (as for :func:`nnderiv.derivs_fn`): it changes which
    algorithm is fastest, since the native kernel writes the full layout itself.

    One of ``"forward"``, ``"fwdrev"``, ``"fwdadj"`` and ``"nested"``: the cheapest by the cost model
    (:mod:`nnderiv.methods._cost` for MLPs, with this machine's rates; the engine's flop
    counts for other models), or the one measured fastest on this machine where a
    ``derivs_fn`` timed the close candidates before (:mod:`nnderiv.methods._measured`);
    ``"nested"`` where the Taylor engine does not apply.
    """
    if not isinstance(net, _network.Network):
        raise TypeError(f"expected an nnderiv.Network, got {type(net).__name__}")
    with _native.layout_request(layout):
        return auto_method.init(net, m, dtype, order, batch).algorithm


METHODS: dict[str, Method] = {
    "auto": auto_method,
    "analytic": analytic_method,
    "forward": forward_method,
    "fwdrev": fwdrev_method,
    "fwdadj": fwdadj_method,
    "jet": jet_method_obj,
    "nested": nested_method,
}

__all__ = ["ALGORITHMS", "METHODS", "Analysis", "Method", "Plan", "analyse", "choose", "select"]
