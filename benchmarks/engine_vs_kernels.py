"""Side by side in one run: the hand-written XLA kernels the engine replaces, the engine, nested AD.

Usage: PYTHONPATH=$PWD python benchmarks/engine_vs_kernels.py [--batch 1024] [--rounds 5] [--out FILE.json]

Float64, order 3, per-point microseconds (best of interleaved rounds, pipelined calls:
``_pipelined.ab``). Columns, each jitted on the same points:

* ``xla-forward``, ``xla-fwdrev``: ``method="forward"``/``"fwdrev"`` with the native kernel
  off: on a layered model, the engine's fused path on XLA (``_taylor._layered``,
  ``_layered_fwdrev``: until 2026-12-02 the separate kernels ``methods/forward.py`` and
  ``methods/fwdrev.py``, the ``old-*`` columns of ``results/engine-vs-kernels-20261202``);
* ``interp-forward``, ``interp-fwdrev``: the engine's interpreter alone, native off
  (``_taylor.forward``/``fwdrev`` with ``fused=False``: the program of ``f``, of ``jacrev(f)``);
* ``native-forward``, ``native-fwdrev``: the same methods with the native kernel;
* ``nested``: ``jit(vmap(jacfwd(jacfwd(jacrev))))`` as ``method="nested"`` runs it.
"""

import argparse
import contextlib
import json
import platform

import jax

jax.config.update("jax_enable_x64", True)
from _pipelined import ab  # noqa: E402  (benchmarks/, the script's folder)

import nnderiv  # noqa: E402
from nnderiv import _api, _native, _taylor  # noqa: E402
from nnderiv.bench import _suite as S  # noqa: E402

GRID = [
    S.Config(3, 64, 3, 1, 0, "tanh"),
    S.Config(2, 32, 2, 1, 0, "softplus"),
    S.Config(3, 128, 2, 1, 0, "tanh"),
    S.Config(6, 64, 3, 1, 0, "silu"),
    S.Config(8, 64, 2, 1, 0, "tanh"),
    S.Config(3, 64, 4, 3, 0, "gelu"),
]
MODELS = ("residual", "fourier")


def _method(net, method, native):
    def run(x):
        with contextlib.nullcontext() if native else _native.disabled():
            return tuple(f for f in _api._derivatives(net, x, 3, method, "packed") if f is not None)

    return jax.jit(run)


def _interp(net, algorithm):
    def run(x):
        with _native.disabled():
            return tuple(getattr(_taylor, algorithm)(net, x, 3, fused=False))[:4]

    return jax.jit(run)


def row(name, net, m, batch, rounds):
    x = S.make_points(m, batch, "float64")
    fns = {}
    fns["xla-forward"] = _method(net, "forward", False)
    fns["xla-fwdrev"] = _method(net, "fwdrev", False)
    fns["interp-forward"] = _interp(net, "forward")
    fns["interp-fwdrev"] = _interp(net, "fwdrev")
    fns["native-forward"] = _method(net, "forward", True)
    fns["native-fwdrev"] = _method(net, "fwdrev", True)
    fns["nested"] = _method(net, "nested", True)
    best = ab(fns, x, rounds)
    us = {k: v / batch * 1e6 for k, v in best.items()}
    print(f"{name:28s} " + "  ".join(f"{k}={v:7.2f}" for k, v in us.items()), flush=True)
    return {"name": name, "batch": batch, "us_per_point": us}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    gemm = S.gemm_rate("float64", 0.5)
    print(f"GEMM {gemm['peak_flop_per_s'] / 1e9:.1f} Gflop/s (best), {platform.machine()}", flush=True)
    rows = []
    for cfg in GRID:
        cfg = S.Config(cfg.m, cfg.width, cfg.depth, cfg.n, a.batch, cfg.activation)
        net = S.build_net(cfg, "float64")
        rows.append(row(f"mlp-{cfg.name}", net, cfg.m, a.batch, a.rounds))
    for kind in MODELS:
        module = S.MODEL_NETS[kind](64, 3, 1)
        variables = S._variables(module, 3, scale=1.0)  # noqa: SLF001
        variables = jax.tree_util.tree_map(lambda v: jax.numpy.asarray(v, "float64"), variables)
        net = nnderiv.from_flax(module, variables)
        rows.append(row(f"{kind}-64x3", net, 3, a.batch, a.rounds))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gemm": gemm, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
