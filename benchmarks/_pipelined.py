"""Pipelined interleaved timing for the engine scripts in this folder.

``ab`` issues each function's calls back to back and awaits only the last: on CPU, JAX's
asynchronous dispatch lets consecutive independent calls overlap, so the figures can be up
to 1.5x better than the benchmark's (``nnderiv bench`` awaits every call).
"""

import time

import jax


def block(out):
    """Wait for every array in ``out``."""
    jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def ab(fns, x, rounds, target=0.15):
    """Best seconds per call of each ``fns[k](x)``, in ``rounds`` interleaved rounds of ~``target`` s."""
    reps = {}
    for k, f in fns.items():
        block(f(x))
        t = time.perf_counter()
        block(f(x))
        reps[k] = max(1, int(target / max(time.perf_counter() - t, 1e-6)))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(reps[k]):
                out = f(x)
            block(out)
            best[k] = min(best[k], (time.perf_counter() - t) / reps[k])
    return best
