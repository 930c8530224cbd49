"""Interleaved A/B timings: native kernel vs the XLA kernel of the same algorithm vs nested AD (float64)."""

import statistics
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
import nnderiv  # noqa: E402
from nnderiv import _native  # noqa: E402
from nnderiv.bench import _suite as _bench  # noqa: E402


def block(out):
    jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def ab(fns, x, reps, rounds=15):
    for f in fns.values():
        block(f(x))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(reps):
                out = f(x)
            block(out)
            times[k].append((time.perf_counter() - t) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt(t):
    return f"{t * 1e6:9.1f} us"


def run(cfg, batch, reps, algorithm="forward"):
    net = _bench.build_net(cfg, "float64")
    x = _bench.make_points(cfg.m, batch, "float64")
    nat = nnderiv.derivs_fn(net, 3, algorithm)
    xla = nnderiv.derivs_fn(net, 3, algorithm)
    with _native.disabled():
        block(xla(x))
    block(nat(x))
    nested = jax.jit(lambda x: _bench.plain_all(net, x)) if batch is None else _bench.baseline_fn(net)
    fns = {"native": nat, f"xla-{algorithm}": xla, "nested": nested}
    if batch is None:
        fns["plain jit(apply_point)"] = jax.jit(net.apply_point)
    res = ab(fns, x, reps)
    name = cfg.replace(batch=batch or 1).name
    print(
        name,
        algorithm,
        "  ".join(f"{k}={fmt(v)}" for k, v in res.items()),
        f" xla/native={res[f'xla-{algorithm}'] / res['native']:.2f} nested/native={res['nested'] / res['native']:.2f}",
        flush=True,
    )
    return res


def scan_step(cfg, steps=256):
    net = _bench.build_net(cfg, "float64")
    xs = _bench.make_points(cfg.m, steps, "float64")
    d_nat = nnderiv.derivs_fn(net, 3, "forward")

    def body_with(fn):
        def body(c, x):
            d = fn(x)
            return c + sum(jnp.sum(f) for f in d), None

        return jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs)[0])

    nat = body_with(d_nat)
    xla = body_with(nnderiv.derivs_fn(net, 3, "forward"))
    with _native.disabled():
        block(xla(xs))
    nested = body_with(lambda x: _bench.plain_all(net, x))
    res = ab({"native": nat, "xla-forward": xla, "nested": nested}, xs, 3)
    print(
        cfg.name,
        "scan per step:",
        "  ".join(f"{k}={fmt(v / steps)}" for k, v in res.items()),
        f" nested/native={res['nested'] / res['native']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    C = _bench.Config
    net = C(3, 64, 3, 1, 1, "tanh")
    print(_native.load(), _native.status())
    run(net, None, 200)
    run(net, 64, 50)
    run(net, 1024, 5)
    run(C(2, 32, 2, 1, 1, "softplus"), 4096, 5)
    run(C(8, 64, 3, 1, 1, "tanh"), 1024, 2)
    run(C(8, 64, 3, 1, 1, "tanh"), 1024, 2, "fwdrev")
    run(C(12, 64, 2, 1, 1, "tanh"), 512, 2, "fwdrev")
    run(C(8, 64, 3, 1, 1, "tanh"), None, 50, "fwdrev")
    scan_step(net)
