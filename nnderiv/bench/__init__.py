"""The benchmark suite behind ``nnderiv bench`` and ``benchmarks/bench.py``.

Tooling on top of the package: it times what a user calls (``nnderiv.derivs_fn`` with
each name of ``nnderiv.METHODS``, a hand-written nested-AD baseline) and reads the cost
model (``nnderiv.methods._cost``) only to report predicted next to measured times.
``main(argv) -> exit status``; the code is in :mod:`nnderiv.bench._suite`.
"""

from ._suite import build_parser as build_parser
from ._suite import main as main
from ._suite import run as run

__all__ = ["build_parser", "main", "run"]
