"""Interleaved timings: the Taylor engine vs the hand-written XLA kernels on plain MLPs (float64).

Usage: NNDERIV_NATIVE=0 PYTHONPATH=$PWD python benchmarks/engine_mlp.py [--m 3 8] [--orders 1 2 3] [--old-chunk]
Per-point microseconds (best of rounds) of ``_taylor.forward``/``fwdrev`` (the engine) and
the XLA kernels (``derivs_fn(net, k, "forward"/"fwdrev", layout="packed")`` with the native
kernel off), and engine/kernel ratios (< 1: the engine is faster).
Calls are pipelined (issued back to back, then awaited once): on CPU, JAX's asynchronous
dispatch lets consecutive independent calls overlap and fill both cores, so these figures
can be up to 1.5x better than the benchmark's (``nnderiv bench`` awaits every call, as a
simulation whose steps depend on each other does).
"""

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)
from _pipelined import ab  # noqa: E402  (benchmarks/, the script's folder)

import nnderiv  # noqa: E402
from nnderiv import _taylor  # noqa: E402
from nnderiv.bench import _suite as S  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[3, 8])
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--old-chunk", action="store_true", help="also time the engine with the old chunk rule")
    a = p.parse_args()
    assert os.environ.get("NNDERIV_NATIVE") in ("0", "off"), "run with NNDERIV_NATIVE=0 (the XLA kernels)"
    for m in a.m:
        cfg = S.Config(m, 64, 3, 1, a.batch, "tanh")
        net = S.build_net(cfg, "float64")
        x = S.make_points(m, a.batch, "float64")
        for order in a.orders:
            fns = {}
            for alg in ("forward", "fwdrev"):
                fns[f"kernel-{alg}"] = nnderiv.derivs_fn(net, order, alg, layout="packed")
                f = getattr(_taylor, alg)
                fns[f"engine-{alg}"] = jax.jit(lambda x, f=f: tuple(f(net, x, order)))
                if a.old_chunk:  # the engine's chunk rule before engine3
                    from engine_models import old_chunk

                    c = old_chunk(net, alg, m, order, a.batch)
                    fns[f"oldchunk-{alg}"] = jax.jit(lambda x, f=f, c=c: tuple(f(net, x, order, chunk=c)))
            best = ab(fns, x, a.rounds)
            cells = "  ".join(f"{k}={v / a.batch * 1e6:6.2f}us" for k, v in best.items())
            ratios = "  ".join(
                f"{alg}: {best[f'{e}-{alg}'] / best[f'kernel-{alg}']:4.2f}"
                for e in ("engine", "oldchunk")
                for alg in ("forward", "fwdrev")
                if f"{e}-{alg}" in best
            )
            print(f"m={m} order={order} B={a.batch} {cells}   engine(,oldchunk)/kernel {ratios}", flush=True)


if __name__ == "__main__":
    main()
