"""Where the engine's time goes at batch 512: chunking layout and core use (residual MLP, order 3).

Usage: PYTHONPATH=$PWD python benchmarks/engine_threads.py [--batch 512] [--model residual]
For each variant prints wall us/point (best of rounds) and CPU/wall (cores kept busy).
Variants: unchunked vmap; lax.map over chunks of c (sequential loop); c-point chunks as
independent computations in one program (XLA may run them concurrently).
Calls are pipelined (issued back to back, then awaited once): on CPU, JAX's asynchronous
dispatch lets consecutive independent calls overlap and fill both cores, so these figures
can be up to 1.5x better than the benchmark's (``nnderiv bench`` awaits every call, as a
simulation whose steps depend on each other does).
"""

import argparse
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
from _pipelined import block  # noqa: E402  (benchmarks/, the script's folder)

import nnderiv  # noqa: E402
from nnderiv import _taylor  # noqa: E402
from nnderiv.bench import _suite as S  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--model", default="residual")
    p.add_argument("--algorithm", default="forward")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    cfg = S.MODEL_CONFIGS[-1]
    module = S.MODEL_NETS[a.model](cfg.width, cfg.depth, cfg.n)
    variables = jax.tree_util.tree_map(lambda v: jnp.asarray(v, "float64"), S._variables(module, cfg.m, scale=1.0))
    net = nnderiv.from_flax(module, variables)
    x = S.make_points(cfg.m, a.batch, "float64")
    alg = getattr(_taylor, a.algorithm)

    def split(c):
        def f(x):
            parts = [tuple(alg(net, x[i : i + c], 3, chunk=c)) for i in range(0, x.shape[0], c)]
            return tuple(jnp.concatenate(fs) for fs in zip(*parts))

        return f

    fns = {"nested": nnderiv.derivs_fn(net, 3, "nested"), "vmap": lambda x: tuple(alg(net, x, 3, chunk=x.shape[0]))}
    for c in (64, 128, 256):
        if c < a.batch:
            fns[f"map{c}"] = lambda x, c=c: tuple(alg(net, x, 3, chunk=c))
            fns[f"split{c}"] = split(c)
    fns = {k: jax.jit(f) if k != "nested" else f for k, f in fns.items()}
    reps = {}
    for k, f in fns.items():
        block(f(x))
        t = time.perf_counter()
        block(f(x))
        reps[k] = max(1, int(0.15 / (time.perf_counter() - t)))
    best = {k: (float("inf"), 0.0) for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps[k]):
                out = f(x)
            block(out)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if wall / reps[k] < best[k][0]:
                best[k] = (wall / reps[k], cpu / wall)
    nest = best["nested"][0]
    for k, (t, busy) in best.items():
        print(f"{a.model} B={a.batch} {k:9s} {t / a.batch * 1e6:7.2f} us/pt  {nest / t:4.2f}x  cpu/wall {busy:4.2f}")


if __name__ == "__main__":
    main()
