"""Peak memory of order-3 derivatives of the bundled model on large batches.

Each case runs in a fresh Python process (peak RSS, ``resource.getrusage().ru_maxrss``,
only grows, so cases must not share a process) and reports:

* ``baseline``: peak RSS after importing JAX, loading the model and creating the input;
* ``peak``: peak RSS after computing all derivatives of every point;
* ``output``: the bytes of the result itself (which no method can avoid holding).

``peak - baseline - output`` is the working memory beyond the result. Without
``batch_size`` the analytic kernel still loops over cache-sized chunks inside its one
XLA program, but that program's buffers (input copies, the unchunked tail, the final
expansion to full tensors) grow with the batch; with ``batch_size`` they are those of
one chunk.

Usage: ``python benchmarks/peak_memory.py [--points 100000 1000000] [--batch-size 8192]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(points: int, batch_size: int | None, layout: str, method: str) -> dict:
    import resource

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import nnderiv

    net = nnderiv.bundled_network()
    x = np.random.default_rng(0).uniform(-1, 1, size=(points, 3))
    derivs = nnderiv.derivs_fn(net, order=3, method=method, layout=layout, batch_size=batch_size)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    d = derivs(x)
    jax.block_until_ready(d)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output = sum(f.nbytes for f in d if f is not None)
    return {
        "points": points,
        "batch_size": batch_size,
        "layout": layout,
        "method": method,
        "baseline_mb": baseline / 2**20,
        "peak_mb": peak / 2**20,
        "output_mb": output / 2**20,
        "extra_mb": (peak - baseline - output) / 2**20,
        "seconds": seconds,
        "finite": bool(all(np.isfinite(np.asarray(f)).all() for f in d)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        points, batch_size, layout, method = args.child
        print(json.dumps(child(int(points), None if batch_size == "none" else int(batch_size), layout, method)))
        return
    rows = []
    for points in args.points:
        for layout in ("full", "packed"):
            for batch_size in (None, args.batch_size):
                cmd = [sys.executable, __file__, "--child", str(points), str(batch_size).lower(), layout, args.method]
                done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if done.returncode != 0:
                    raise SystemExit(f"case {cmd[3:]} failed:\n{done.stderr[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"{r['points']:>9,} points  batch_size={str(r['batch_size']):>5}  {r['layout']:>6}: "
                    f"peak {r['peak_mb']:7.0f} MB  (baseline {r['baseline_mb']:4.0f}, output {r['output_mb']:6.0f}, "
                    f"extra {r['extra_mb']:6.0f})  {r['seconds']:6.1f} s",
                    flush=True,
                )
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
