"""Interleaved timings: the Taylor engine vs nested AD on the non-MLP models (float64, order 3).

Usage: PYTHONPATH=$PWD python benchmarks/engine_models.py [--batches 512 1024] [--chunks 0 128 256]
``--chunks 0`` is the engine's own chunk rule, ``-1`` the rule before engine3 (4 MiB
chunks, a batch of up to 8 MiB unchunked); other values force that chunk size.
Prints per-point microseconds (best of rounds) and nested/engine ratios.
Calls are pipelined (issued back to back, then awaited once): on CPU, JAX's asynchronous
dispatch lets consecutive independent calls overlap and fill both cores, so these figures
can be up to 1.5x better than the benchmark's (``nnderiv bench`` awaits every call, as a
simulation whose steps depend on each other does).
"""

import argparse

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
from _pipelined import ab  # noqa: E402  (benchmarks/, the script's folder)

import nnderiv  # noqa: E402
from nnderiv import _taylor  # noqa: E402
from nnderiv.bench import _suite as S  # noqa: E402


def old_chunk(net, alg, m, order, batch):
    """The chunk rule before engine3 (a fixed 4 MiB per chunk, up to 8 MiB unchunked)."""
    import numpy as np

    from nnderiv import _network
    from nnderiv._taylor import _tables

    program = (
        _network.trace_program(net, m, jnp.float64)
        if alg == "forward"
        else _taylor.jacobian_program(net, m, jnp.float64)
    )
    k = order if alg == "forward" else order - 1
    coefficients = sum(_tables.block_size(m, j) for j in range(k + 1))
    widest = max([m] + [int(np.prod(o.shape)) for e in program.eqns for o in e.outputs])
    per_point = coefficients * widest * 8
    if batch * per_point <= 2 * (4 << 20):
        return batch
    chunk = min(512, max(16, (4 << 20) // per_point))
    chunk = 1 << (int(chunk).bit_length() - 1)
    return chunk if batch > 2 * chunk else batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--chunks", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=["residual", "fourier", "layernorm"])
    p.add_argument("--algorithms", nargs="+", default=["forward", "fwdrev"])
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    cfg = S.MODEL_CONFIGS[-1]
    for kind in a.models:
        module = S.MODEL_NETS[kind](cfg.width, cfg.depth, cfg.n)
        variables = jax.tree_util.tree_map(lambda v: jnp.asarray(v, "float64"), S._variables(module, cfg.m, scale=1.0))
        net = nnderiv.from_flax(module, variables)
        for batch in a.batches:
            x = S.make_points(cfg.m, batch, "float64")
            fns = {"nested": nnderiv.derivs_fn(net, 3, "nested"), "analytic": nnderiv.derivs_fn(net, 3, "analytic")}
            for alg in a.algorithms:
                for c in a.chunks:
                    f = getattr(_taylor, alg)
                    name = {0: "auto", -1: "old"}.get(c, c)
                    if c == -1:
                        c = old_chunk(net, alg, cfg.m, 3, batch)
                    fns[f"{alg}/{name}"] = jax.jit(lambda x, f=f, c=c: tuple(f(net, x, 3, chunk=c or None)))
            best = ab(fns, x, a.rounds)
            nest = best["nested"]
            cells = "  ".join(f"{k}={v / batch * 1e6:6.2f}us({nest / v:4.2f}x)" for k, v in best.items())
            print(f"{kind:10s} B={batch:5d} {cells}", flush=True)


if __name__ == "__main__":
    main()
