"""Benchmark every nnderiv method against the nested-AD code users write today.

One process, one run, four sections (see ``benchmarks/README.md`` for the columns):

``grid``
    For a set of MLP configurations (input dim m, hidden width, depth, outputs n, batch,
    activation) and each dtype: time per point of ``nnderiv.derivs_fn(net, 3, M)`` for
    every ``M`` in ``nnderiv.METHODS`` (read at run time) and of a plain
    ``jax.jit(jax.vmap(f_all))`` baseline; the speedup of ``auto`` over the best of
    {nested, jet, baseline}; the ratio of ``auto`` to a matmul floor measured in the same
    run. Every method's result is checked against nested AD.
``latency``
    One point ``x`` of shape (m,): ``derivs_fn(net, 3)(x)`` against a jitted forward pass.
``scan``
    Per-step cost inside a jitted ``lax.scan`` simulation loop whose update consumes the
    value, Jacobian, Hessian and third tensor of the state.
``models``
    Models that are not plain MLPs (residual blocks, Fourier features, LayerNorm, a hard
    output constraint): the analytic engine, ``auto`` and jet against nested AD.

Run ``nnderiv bench --help`` (or ``python benchmarks/bench.py --help``, the same code);
``--quick`` is a < 1 minute smoke run. Importable: ``main(argv) -> exit status`` (0: every
method agreed with nested AD).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import _tolerance
from .._mlp import MLP

SCHEMA = "nnderiv-bench/1"
FIELDS = ("value", "jacobian", "hessian", "third")
BASELINE = "baseline"
REFERENCE = "nested"
FORWARD_PASS = "forward_pass"  # the plain jitted forward pass of the latency section
DISPATCH_FLOOR = "dispatch_floor"  # a jitted call returning derivs' output shapes, no arithmetic
#: The "built-in" competitors of auto: what a user could already use without a kernel.
COMPETITORS = ("nested", "jet", BASELINE)
DTYPES = ("float64", "float32")


# Agreement with nested AD: the package's one metric and tolerance table (by dtype and order).
RTOL = _tolerance.RTOL

PROBE_MARGIN = 1.5


# --------------------------------------------------------------------------------------
# Configurations


@dataclasses.dataclass(frozen=True)
class Config:
    """One MLP: ``depth`` hidden layers of ``width`` units, ``m`` inputs, ``n`` outputs."""

    m: int
    width: int
    depth: int
    n: int
    batch: int
    activation: str = "tanh"

    @property
    def name(self) -> str:
        return f"m{self.m}-w{self.width}x{self.depth}-n{self.n}-b{self.batch}-{self.activation}"

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.width,) * self.depth

    @property
    def layers(self) -> list[tuple[int, int]]:
        sizes = [self.m, *self.widths, self.n]
        return list(zip(sizes[:-1], sizes[1:]))

    def replace(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)


BASE = Config(m=3, width=64, depth=3, n=1, batch=1024, activation="tanh")


def _sweeps(center: Config, label: str, axes: dict[str, Sequence]) -> list[tuple[str, Config]]:
    out = []
    for axis, values in axes.items():
        for v in values:
            out.append((f"{label}:{axis}", center.replace(**{axis: v})))
    return out


def full_grid() -> list[tuple[str, Config]]:
    """(group, config): one-factor-at-a-time sweeps around two centres, plus corners."""
    grid = [("base", BASE)]
    grid += _sweeps(
        BASE,
        "sweep@m3",
        {
            "m": [1, 2, 4, 6, 8, 10, 16],
            "width": [16, 32, 128, 256],
            "depth": [1, 2, 4, 5],
            "n": [3, 8],
            "batch": [1, 64, 8192],
            "activation": ["softplus", "silu", "gelu"],
        },
    )
    # A second centre where the symmetric counts matter (C(11,3) = 165 coefficients).
    m8 = BASE.replace(m=8)
    grid += _sweeps(
        m8,
        "sweep@m8",
        {
            "width": [128, 256],
            "depth": [5],
            "n": [3, 8],
            "batch": [64, 8192],
            "activation": ["softplus", "gelu"],
        },
    )
    corner = "corner"
    grid += [
        (corner, Config(16, 64, 3, 8, 1024, "tanh")),  # many inputs and outputs
        (corner, Config(16, 256, 2, 8, 64, "silu")),  # many inputs, wide
        (corner, Config(16, 16, 2, 1, 8192, "softplus")),  # many inputs, large batch
        (corner, Config(8, 128, 3, 8, 1024, "gelu")),
        (corner, Config(6, 128, 4, 3, 1024, "silu")),
        (corner, Config(3, 128, 4, 1, 8192, "tanh")),  # big net, large batch
        (corner, Config(2, 256, 5, 8, 1024, "tanh")),  # widest, deepest
        (corner, Config(4, 32, 2, 3, 8192, "gelu")),
        (corner, Config(1, 16, 1, 1, 8192, "tanh")),  # smallest net, overhead-bound
    ]
    # Realistic surrogates: scalar or few outputs, m = 2..12, widths 32..128, depths 2..4.
    surrogate = "surrogate"
    grid += [
        (surrogate, Config(2, 32, 2, 1, 4096, "softplus")),
        (surrogate, Config(4, 32, 3, 1, 1024, "gelu")),
        (surrogate, Config(6, 64, 3, 1, 1024, "silu")),
        (surrogate, Config(12, 64, 2, 1, 512, "tanh")),
        (surrogate, Config(3, 128, 4, 2, 2048, "softplus")),
        (surrogate, Config(9, 96, 3, 1, 256, "tanh")),
        (surrogate, Config(5, 48, 2, 3, 128, "silu")),
        (surrogate, Config(2, 64, 4, 1, 4096, "gelu")),
    ]
    return _dedupe(grid)


def quick_grid() -> list[tuple[str, Config]]:
    return [
        ("quick", Config(2, 16, 2, 1, 64, "softplus")),
        ("quick", Config(4, 8, 2, 3, 1, "silu")),
    ]


def _dedupe(grid):
    seen, out = set(), []
    for group, cfg in grid:
        if cfg.name not in seen:
            seen.add(cfg.name)
            out.append((group, cfg))
    return out


LATENCY_NETS = [
    Config(3, 64, 3, 1, 1, "tanh"),  # the headline net (first: used in the summary)
    Config(2, 32, 2, 1, 1, "silu"),
    Config(6, 128, 2, 3, 1, "softplus"),
    Config(1, 16, 1, 1, 1, "tanh"),
]
SCAN_NETS = [Config(3, 64, 3, 1, 1, "tanh"), Config(2, 32, 2, 1, 1, "silu")]
QUICK_LATENCY_NETS = [Config(3, 16, 2, 1, 1, "tanh")]
QUICK_SCAN_NETS = [Config(3, 16, 2, 1, 1, "tanh")]


# --------------------------------------------------------------------------------------
# Models, inputs, the baseline


def _variables(module: nn.Module, m: int, seed: int = 0, scale: float = 1.5) -> dict:
    """Weights ~ N(0, scale^2 / fan_in): pre-activations O(1), so every activation is exercised
    away from its linear regime (as in a trained net), not near zero as with Flax's init."""
    shapes = module.init(jax.random.PRNGKey(seed), jnp.ones(m))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    drawn = [
        np.asarray(jax.random.normal(k, leaf.shape, jnp.float64))
        * scale
        / np.sqrt(leaf.shape[0] if leaf.ndim == 2 else 4)
        for leaf, k in zip(leaves, keys)
    ]
    return {"params": jax.tree_util.tree_unflatten(treedef, drawn)}


_CASES: dict = {}


def build_net(cfg: Config, dtype: str):
    """The ``nnderiv.Network`` of ``cfg`` (an :class:`nnderiv.MLP`) in ``dtype``."""
    import nnderiv

    key = (cfg.m, cfg.widths, cfg.n, cfg.activation)
    if key not in _CASES:
        _CASES.clear()  # one architecture at a time: keeps memory flat
        module = MLP(cfg.widths, cfg.n, cfg.activation)
        _CASES[key] = (module, _variables(module, cfg.m))
    module, variables = _CASES[key]
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
    return nnderiv.from_flax(module, variables)


def make_points(m: int, batch: int | None, dtype: str, seed: int = 0) -> jax.Array:
    shape = (m,) if batch is None else (batch, m)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def plain_all(net, x):
    """What users write today: value, jacrev, jacfwd(jacrev), jacfwd(jacfwd(jacrev)) at one point."""
    f = net.apply_point
    return (
        f(x),
        jax.jacrev(f)(x),
        jax.jacfwd(jax.jacrev(f))(x),
        jax.jacfwd(jax.jacfwd(jax.jacrev(f)))(x),
    )


def baseline_fn(net) -> Callable:
    """``jax.jit(jax.vmap(f_all))`` with ``f_all`` closing over the network, as users write it.

    The parameters are then compile-time constants, as they are in ``nnderiv.derivs_fn``.
    """
    return jax.jit(jax.vmap(lambda x: plain_all(net, x)))


def method_fn(net, method: str) -> Callable:
    import nnderiv

    if method == BASELINE:
        return baseline_fn(net)
    return nnderiv.derivs_fn(net, order=3, method=method)


def auto_choice(net, m: int, dtype: str, batch: int = 1024) -> str | None:
    """The kernel ``auto`` runs for ``batch`` points, where ``nnderiv.methods.choose`` says
    (after auto's ``derivs_fn`` ran: its measured choice, if it timed the candidates)."""
    import nnderiv.methods

    choose = getattr(nnderiv.methods, "choose", None)
    if choose is None:
        return None
    try:
        return str(choose(net, m, jnp.dtype(dtype), 3, batch))
    except Exception as err:  # noqa: BLE001 - informational only
        return f"? ({type(err).__name__})"


# --------------------------------------------------------------------------------------
# Timing


def _stats(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples)
    q25, med, q75 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "median_s": med,
        "q25_s": q25,
        "q75_s": q75,
        "iqr_s": q75 - q25,
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "repeats": len(samples),
    }


def _call_s(fn: Callable, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


@dataclasses.dataclass
class Warm:
    """A compiled function ready for timing: its first (compiling) call and one warm call."""

    fn: Callable
    args: tuple
    first_call_s: float
    warm_call_s: float


def warm_up(fn: Callable, args: tuple) -> tuple[Any, Warm]:
    """Call once (trace, compile, run), then time one warm call; returns the first output."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    return out, Warm(fn, args, first, _call_s(fn, args))


def timed_rounds(
    warm: dict[str, Warm],
    *,
    target_s: float,
    rounds: int = 5,
    max_repeats: int = 100,
    slow_s: float = 0.25,
) -> dict[str, dict[str, Any]]:
    """Time the functions interleaved, in rounds, so that slow drifts of the machine's load
    (other processes) hit all of them alike; every call is awaited with ``block_until_ready``.

    A function gets about ``target_s`` of timed calls (at least ``rounds`` calls, at most
    ``max_repeats``); one whose warm call took over ``slow_s`` gets 3 samples (its warm call
    and one call in each of the first two rounds). Returns ``_stats`` per name.
    """
    per_round, samples = {}, {}
    for name, w in warm.items():
        if w.warm_call_s > slow_s:
            per_round[name], samples[name] = 1, [w.warm_call_s]
        else:
            per_round[name] = max(
                1, min(max_repeats // rounds, math.ceil(target_s / rounds / max(w.warm_call_s, 1e-7)))
            )
            samples[name] = []
    names = list(warm)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)] if names else []:
            if warm[name].warm_call_s > slow_s and r >= 2:
                continue
            w = warm[name]
            samples[name] += [_call_s(w.fn, w.args) for _ in range(per_round[name])]
    return {name: _stats(samples[name]) for name in names}


def measure(fn: Callable, args: tuple, *, target_s: float, rounds: int = 5) -> dict[str, Any]:
    """One function: warm up, then ``timed_rounds``."""
    _, w = warm_up(fn, args)
    return {"first_call_s": w.first_call_s, **timed_rounds({"f": w}, target_s=target_s, rounds=rounds)["f"]}


def gemm_rate(dtype: str, target_s: float) -> dict[str, Any]:
    """flop/s of an (8192 x 256) @ (256 x 256) product, jitted, in ``dtype``."""
    rows, inner, cols = 8192, 256, 256
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((rows, inner)), dtype)
    b = jnp.asarray(rng.standard_normal((inner, cols)), dtype)
    matmul = jax.jit(jnp.matmul)
    rec = measure(matmul, (a, b), target_s=target_s, rounds=10)
    flops = 2 * rows * inner * cols
    return {
        "shape": [[rows, inner], [inner, cols]],
        "flops": flops,
        "median_s": rec["median_s"],
        "iqr_s": rec["iqr_s"],
        "repeats": rec["repeats"],
        "flop_per_s": flops / rec["median_s"],
        "peak_flop_per_s": flops / rec["min_s"],
        "min_s": rec["min_s"],
    }


def merge_gemm(first: dict, second: dict) -> dict:
    """Two GEMM measurements (start and end of a section): keep the faster as the rate."""
    best = max(first, second, key=lambda g: g["peak_flop_per_s"])
    return {
        **best,
        "flop_per_s_floor": best["peak_flop_per_s"],
        "measurements": [
            {k: g[k] for k in ("median_s", "min_s", "flop_per_s", "peak_flop_per_s")} for g in (first, second)
        ],
    }


# --------------------------------------------------------------------------------------
# The floor, and the cost model's estimate that decides about probing and skipping


def floor_terms(cfg: Config) -> dict[str, Any]:
    """The matmul flops of the cheapest packed algorithm (see README), and its columns K."""
    from nnderiv.methods import _cost

    per_point = kernel_flops(cfg)
    cheapest = min(_cost.ANALYTIC, key=per_point.__getitem__)
    macs = sum(i * o for i, o in cfg.layers[1:])
    return {
        "algorithm": cheapest,
        "K": per_point[cheapest] / (2 * macs) if macs else 0.0,  # columns per layer, on average
        "K_forward": _cost.columns("forward", cfg.m, cfg.n, 3),  # value + all unique partials to order 3
        "K_fwdrev": _cost.columns("fwdrev", cfg.m, cfg.n, 3),  # forward to order 2, reverse per output
        "K_fwdadj": _cost.columns("fwdadj", cfg.m, cfg.n, 3),  # forward to order 2, the value, n adjoints
        "macs_after_first": macs,
        "flops": cfg.batch * per_point[cheapest],
    }


def kernel_flops(cfg: Config) -> dict[str, float]:
    """Matmul flops per point of each algorithm (forward, fwdrev, fwdadj, nested), unweighted."""
    from nnderiv.methods import _cost

    work = _cost.work(cfg.layers, cfg.m, cfg.n, 3, native=True)
    return {algorithm: work[algorithm].flops for algorithm in _cost.ALGORITHMS}


# What each benchmarked callable runs, in the cost model's terms (auto: its cheapest).
_ALGORITHM_OF = {
    BASELINE: "nested",
    "jet": "jet",
    "forward": "forward",
    "fwdrev": "fwdrev",
    "fwdadj": "fwdadj",
    "nested": "nested",
}


def cost_estimate(method: str, cfg: Config, dtype: str) -> tuple[float, float]:
    """(seconds per call, bytes of the largest intermediate) by the cost model of ``auto``.

    Used only to decide whether a call needs a probe first, or is skipped as too slow or
    too large; the cost model's rates are this machine's (see ``nnderiv bench --calibrate``).
    """
    from nnderiv.methods import _cost

    if method in _ALGORITHM_OF:
        algorithms = [_ALGORITHM_OF[method]]
    else:  # auto, analytic: the cheaper of what they may run
        algorithms = list(_cost.ANALYTIC if method == "analytic" else _cost.ALGORITHMS)
    predicted = _cost.predicted_seconds(cfg.layers, cfg.m, cfg.n, 3, dtype, cfg.batch)
    # jet: nested AD's code with jet's columns (a rough figure, for skipping only)
    jet_columns = _cost.columns("jet", cfg.m, cfg.n, 3) / _cost.columns("nested", cfg.m, cfg.n, 3)
    predicted["jet"] = predicted["nested"] * jet_columns
    per_point = {a: predicted[a] for a in algorithms}
    algorithm = min(per_point, key=per_point.get)
    itemsize = jnp.dtype(dtype).itemsize
    columns = _cost.columns(algorithm, cfg.m, cfg.n, 3)
    # a few stacks of (batch, columns, width) live at once, and the full third tensor
    nbytes = 3 * cfg.batch * columns * max(cfg.width, cfg.n) * itemsize + cfg.batch * cfg.n * cfg.m**3 * itemsize
    return per_point[algorithm] * cfg.batch, nbytes


# --------------------------------------------------------------------------------------
# Checks


def deviation(got, ref) -> dict[str, float]:
    """Per field: max |got - ref| / max |ref| (both float64 NumPy), over the reference points."""
    out = {}
    for i, name in enumerate(FIELDS):
        r = np.asarray(ref[i], np.float64)
        g = np.asarray(got[i], np.float64)[: r.shape[0]]
        out[name] = _tolerance.relative_error(g, r)
    return out


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _error_text(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:300]


# --------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass
class Options:
    target_s: float
    max_call_s: float
    max_mem_bytes: float
    probe_points: int
    ref_points: int
    steps: int
    dt: float
    latency_target_s: float


def _method_names(selected: Sequence[str] | None) -> list[str]:
    import nnderiv

    names = list(nnderiv.METHODS)
    if selected:
        names = [m for m in names if m in selected or m == "auto"]
    return names + [BASELINE]


def run_config(cfg: Config, group: str, dtype: str, methods: list[str], gemm: dict, opts: Options) -> dict[str, Any]:
    """Every method (and the baseline) on one configuration; checked against nested AD."""
    wall = time.perf_counter()
    net = build_net(cfg, dtype)
    x = make_points(cfg.m, cfg.batch, dtype)
    probe_n = min(cfg.batch, opts.probe_points)
    ref_n = min(cfg.batch, opts.ref_points)
    entry: dict[str, Any] = {
        "name": cfg.name,
        "group": group,
        "dtype": dtype,
        **dataclasses.asdict(cfg),
        "widths": list(cfg.widths),
        "auto_choice": auto_choice(net, cfg.m, dtype, cfg.batch),
    }
    results: dict[str, dict[str, Any]] = {}
    reference = None  # nested AD on x[:ref_n], float64 NumPy
    checks: dict[str, Any] = {}
    ready: dict[str, Warm] = {}

    # Phase 1, one method at a time: decide about skipping, compile, check the output.
    # nested first: its output is the reference for the others.
    order = [REFERENCE] + [m for m in methods if m != REFERENCE] if REFERENCE in methods else list(methods)
    for method in order:
        rec: dict[str, Any] = {}
        est_s, est_bytes = cost_estimate(method, cfg, dtype)
        rec["cost_model_estimate_s"] = est_s
        out = None
        try:
            if est_bytes > opts.max_mem_bytes:
                rec.update(
                    status="skipped",
                    reason=f"cost model: ~{est_bytes / 2**30:.0f} GiB of intermediates",
                    estimate_s=est_s,
                )
            elif est_s > 20 * opts.max_call_s:
                rec.update(status="skipped", reason=f"cost model: ~{est_s:.0f} s per call", estimate_s=est_s)
            else:
                fn = method_fn(net, method)
                estimate = None
                if est_s > 0.3 * opts.max_call_s and cfg.batch > probe_n:
                    xp = x[:probe_n]
                    jax.block_until_ready(fn(xp))
                    start = time.perf_counter()
                    jax.block_until_ready(fn(xp))
                    estimate = (time.perf_counter() - start) * cfg.batch / probe_n
                    rec["probe"] = {"points": probe_n, "estimate_s": estimate}
                # a 64-point probe underestimates a large batch by up to ~1.5x (caches)
                if estimate is not None and PROBE_MARGIN * estimate > opts.max_call_s:
                    rec.update(
                        status="skipped",
                        reason=f"probe on {probe_n} points extrapolates to {estimate:.1f} s per call",
                        estimate_s=estimate,
                    )
                else:
                    out, warm = warm_up(fn, (x,))
                    rec["first_call_s"] = warm.first_call_s
                    if warm.warm_call_s > opts.max_call_s:
                        rec.update(
                            status="skipped",
                            reason=f"one warm call took {warm.warm_call_s:.1f} s > {opts.max_call_s:g} s",
                            estimate_s=warm.warm_call_s,
                        )
                    else:
                        rec["status"] = "ready"
                        ready[method] = warm
                del fn
        except Exception as err:  # noqa: BLE001 - recorded; the run goes on
            rec.update(status="error", error=_error_text(err))
            out = None
        if rec.get("status") == "skipped" and "estimate_s" in rec:
            rec["estimate_per_point_s"] = rec["estimate_s"] / cfg.batch

        if method == REFERENCE and out is not None:
            reference = tuple(np.asarray(f[:ref_n], np.float64) for f in out)
        if reference is None and method == order[0]:  # nested did not run: a separate call
            reference = _separate_reference(net, x[:ref_n])
            checks["reference_source"] = "separate call" if reference is not None else "unavailable"
        if out is not None:
            if reference is not None:
                dev = deviation(out, reference)
                checks[method] = {
                    "per_field": dev,
                    "max_rel_dev": max(dev.values()),
                    "third_rel_dev": dev["third"],
                    "agree": _tolerance.agrees(dev, dtype),
                }
            else:
                checks[method] = {"agree": None}
        results[method] = rec
        del out

    # Phase 2: time all methods that ran, interleaved in rounds.
    try:
        timings = timed_rounds(ready, target_s=opts.target_s)
    except Exception as err:  # noqa: BLE001
        timings = {}
        for method in ready:
            results[method].update(status="error", error=_error_text(err))
    for method, stats in timings.items():
        rec = results[method]
        rec.update(status="ok", **stats)
        rec["per_point_s"] = rec["median_s"] / cfg.batch
        rec["per_point_iqr_s"] = rec["iqr_s"] / cfg.batch
    ready.clear()
    checks.setdefault("reference_source", "nested output")
    checks["reference"] = REFERENCE
    checks["points"] = ref_n
    checks["rtol"] = RTOL[dtype]
    checked = [c for k, c in checks.items() if isinstance(c, dict) and "agree" in c]
    checks["all_agree"] = bool(checked) and all(c["agree"] is True for c in checked)
    # What auto ran: its derivs_fn may have timed the candidates while compiling.
    entry["auto_choice"] = auto_choice(net, cfg.m, dtype, cfg.batch)
    entry["results"] = {m: results[m] for m in methods if m in results}
    entry["check"] = checks
    entry.update(_derived(entry, cfg, gemm))
    entry["wall_s"] = time.perf_counter() - wall
    gc.collect()
    return entry


def _separate_reference(net, xr):
    try:
        import nnderiv

        out = nnderiv.derivs_fn(net, 3, REFERENCE)(xr)
        return tuple(np.asarray(f, np.float64) for f in out)
    except Exception:  # noqa: BLE001
        return None


def _time_of(rec: dict | None, allow_estimate: bool) -> tuple[float | None, bool]:
    if not rec:
        return None, False
    if rec.get("status") == "ok":
        return rec["per_point_s"], False
    if allow_estimate and rec.get("status") == "skipped" and rec.get("estimate_per_point_s"):
        return rec["estimate_per_point_s"], True
    return None, False


def _config_of(entry: dict) -> Config:
    return Config(*(entry[f.name] for f in dataclasses.fields(Config)))


def _derived(entry: dict, cfg: Config, gemm: dict) -> dict[str, Any]:
    """Speedup of auto over the best competitor, its ratio to the best kernel and the floor."""
    res = entry["results"]
    auto_t, _ = _time_of(res.get("auto"), False)
    out: dict[str, Any] = {}

    # best of {nested, jet, baseline}: measured ones; estimates only if none was measured
    measured = {m: _time_of(res.get(m), False)[0] for m in COMPETITORS}
    measured = {m: t for m, t in measured.items() if t is not None}
    estimated = False
    if not measured:
        measured = {m: _time_of(res.get(m), True)[0] for m in COMPETITORS}
        measured = {m: t for m, t in measured.items() if t is not None}
        estimated = bool(measured)
    if measured and auto_t:
        best = min(measured, key=measured.get)
        out["best_competitor"] = {"method": best, "per_point_s": measured[best], "estimated": estimated}
        out["speedup"] = measured[best] / auto_t
    else:
        out["best_competitor"] = None
        out["speedup"] = None

    # auto against the fastest concrete kernel (does auto pick well?)
    kernels = {m: _time_of(r, False)[0] for m, r in res.items() if m not in ("auto", BASELINE)}
    kernels = {m: t for m, t in kernels.items() if t is not None}
    if kernels and auto_t:
        fastest = min(kernels, key=kernels.get)
        out["fastest_kernel"] = {"method": fastest, "per_point_s": kernels[fastest]}
        out["auto_over_fastest"] = auto_t / kernels[fastest]
    else:
        out["fastest_kernel"], out["auto_over_fastest"] = None, None

    floor = floor_terms(cfg)
    floor["seconds"] = floor["flops"] / gemm["peak_flop_per_s"]
    floor["per_point_s"] = floor["seconds"] / cfg.batch
    out["floor"] = floor
    out["floor_ratio"] = auto_t / floor["per_point_s"] if auto_t and floor["per_point_s"] > 0 else None
    # Each algorithm against its own floor: its matmul flops at the GEMM rate.
    out["kernel_floor_ratio"] = {}
    for algorithm, per_point_flops in kernel_flops(cfg).items():
        t, _ = _time_of(res.get(algorithm), False)
        own = per_point_flops / gemm["peak_flop_per_s"]
        out["kernel_floor_ratio"][algorithm] = t / own if t and own > 0 else None
    nested_t, _ = _time_of(res.get(REFERENCE), False)
    out["auto_over_nested_speedup"] = nested_t / auto_t if nested_t and auto_t else None
    out["cost_model"] = _cost_model_check(entry, cfg)
    return out


def _cost_model_check(entry: dict, cfg: Config) -> dict[str, Any]:
    """The cost model's predicted time per point next to the measured one, per algorithm."""
    from nnderiv.methods import _cost

    predicted = _cost.predicted_seconds(cfg.layers, cfg.m, cfg.n, 3, entry["dtype"], cfg.batch)
    measured = {a: _time_of(entry["results"].get(a), False)[0] for a in predicted}
    measured = {a: t for a, t in measured.items() if t is not None}
    out: dict[str, Any] = {"predicted_per_point_s": predicted, "measured_per_point_s": measured}
    choice = entry.get("auto_choice")
    if measured and choice in measured:
        # How much slower auto's pick ran than the fastest algorithm measured (1 = oracle).
        out["choice_over_fastest"] = measured[choice] / min(measured.values())
    return out


def _time_all(
    prepared: dict[str, tuple[Callable, tuple]], target_s: float, max_repeats: int, rounds: int = 5
) -> dict[str, dict]:
    """Warm up each function (errors recorded per name), then time them interleaved."""
    records, outputs, ready = {}, {}, {}
    for name, (fn, args) in prepared.items():
        try:
            outputs[name], w = warm_up(fn, args)
            ready[name] = w
            records[name] = {"first_call_s": w.first_call_s}
        except Exception as err:  # noqa: BLE001
            records[name] = {"status": "error", "error": _error_text(err)}
    for name, stats in timed_rounds(ready, target_s=target_s, max_repeats=max_repeats, rounds=rounds).items():
        records[name].update(status="ok", **stats)
    return {name: (records[name], outputs.get(name)) for name in prepared}


def run_latency(cfg: Config, dtype: str, methods: list[str], opts: Options) -> dict[str, Any]:
    """One point: every method against a plain jitted forward pass of the same network."""
    net = build_net(cfg, dtype)
    x = make_points(cfg.m, None, dtype)
    # FORWARD_PASS is not a method name (nnderiv has a method called "forward")
    prepared: dict[str, tuple[Callable, tuple]] = {FORWARD_PASS: (jax.jit(net.apply_point), (x,))}
    # The floor of a call that returns what derivs returns: a jitted function writing
    # outputs of the same shapes with no arithmetic (dispatch, and one buffer per output).
    shapes = [s for s in jax.eval_shape(method_fn(net, "auto"), x) if s is not None]
    prepared[DISPATCH_FLOOR] = (jax.jit(lambda u: tuple(jnp.broadcast_to(u[0], s.shape) for s in shapes)), (x,))
    for method in methods:
        if method == BASELINE:
            prepared[method] = (jax.jit(lambda u: plain_all(net, u)), (x,))
        else:
            prepared[method] = (method_fn(net, method), (x,))
    # many short rounds: calls of ~10-100 µs are sensitive to other processes' bursts
    timed = _time_all(prepared, opts.latency_target_s, max_repeats=4000, rounds=20)
    entry: dict[str, Any] = {"name": cfg.name, "dtype": dtype, "m": cfg.m, "widths": list(cfg.widths), "n": cfg.n}
    entry["activation"] = cfg.activation
    entry["auto_choice"] = auto_choice(net, cfg.m, dtype, 1)
    fwd = entry[FORWARD_PASS] = timed[FORWARD_PASS][0]
    entry[DISPATCH_FLOOR] = timed[DISPATCH_FLOOR][0]
    if entry[DISPATCH_FLOOR].get("status") == "ok" and fwd.get("status") == "ok":
        entry[DISPATCH_FLOOR]["ratio_to_forward"] = entry[DISPATCH_FLOOR]["median_s"] / fwd["median_s"]
    reference = _separate_reference(net, x[None])
    rows = {}
    for method in methods:
        rec, out = timed[method]
        if rec.get("status") == "ok" and fwd.get("status") == "ok":
            rec["ratio_to_forward"] = rec["median_s"] / fwd["median_s"]
        if out is not None and reference is not None:
            dev = deviation(tuple(np.asarray(f)[None] for f in out), reference)
            rec["max_rel_dev"] = max(dev.values())
            rec["agree"] = _tolerance.agrees(dev, dtype)
        rows[method] = rec
    entry["results"] = rows
    return entry


class ResidualMLP(nn.Module):
    """``x -> tanh(Dense(x))``, then ``h + tanh(Dense(h))`` blocks, then ``Dense(out)``."""

    width: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.width)(x))
        for _ in range(self.depth - 1):
            h = h + jnp.tanh(nn.Dense(self.width)(h))
        return nn.Dense(self.out)(h)


class FourierMLP(nn.Module):
    """The PINN input layer: ``[sin(Bx), cos(Bx)]`` with a learned ``B``, then a tanh MLP."""

    width: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x):
        proj = nn.Dense(self.width // 2, use_bias=False)(x)
        h = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)])
        for _ in range(self.depth - 1):
            h = jnp.tanh(nn.Dense(self.width)(h))
        return nn.Dense(self.out)(h)


class LayerNormMLP(nn.Module):
    """``Dense -> LayerNorm -> tanh`` layers, then ``Dense(out)``."""

    width: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = jnp.tanh(nn.LayerNorm()(nn.Dense(self.width)(x)))
        return nn.Dense(self.out)(x)


class HardConstraintMLP(nn.Module):
    """A hard boundary condition on the output: ``x0 (1 - x0) * mlp(x)`` (DeepXDE's output transform)."""

    width: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x):
        return x[0] * (1.0 - x[0]) * MLP((self.width,) * self.depth, self.out, "tanh")(x)


#: Models that are not plain MLPs, which the analytic engine takes and the old kernels did not.
MODEL_NETS = {
    "residual": ResidualMLP,
    "fourier": FourierMLP,
    "layernorm": LayerNormMLP,
    "hard-constraint": HardConstraintMLP,
}
#: Width 64, depth 3, order 3, at both ends of the batch range the targets name (512-1024).
MODEL_CONFIGS = (Config(3, 64, 3, 1, 512, "tanh"), Config(3, 64, 3, 1, 1024, "tanh"))
QUICK_MODEL_CONFIG = Config(2, 16, 2, 1, 64, "tanh")
MODEL_METHODS = ("analytic", "auto", "jet", "nested")


def run_model(kind: str, cfg: Config, dtype: str, opts: Options) -> dict[str, Any]:
    """One non-MLP model: the analytic engine, auto and jet against nested AD."""
    import nnderiv

    module = MODEL_NETS[kind](cfg.width, cfg.depth, cfg.n)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), _variables(module, cfg.m, scale=1.0))
    net = nnderiv.from_flax(module, variables)
    x = make_points(cfg.m, cfg.batch, dtype)
    if kind == "hard-constraint":
        x = jnp.abs(x) / (1 + jnp.abs(x))  # inside the unit interval the constraint is built for
    prepared = {method: (nnderiv.derivs_fn(net, 3, method), (x,)) for method in MODEL_METHODS}
    timed = _time_all(prepared, opts.target_s, max_repeats=100)
    ref_n = min(cfg.batch, opts.ref_points)
    reference = timed[REFERENCE][1]
    reference = None if reference is None else tuple(np.asarray(f[:ref_n], np.float64) for f in reference)
    entry: dict[str, Any] = {"name": f"{kind}-{cfg.name}", "kind": kind, "dtype": dtype, **dataclasses.asdict(cfg)}
    entry["auto_choice"] = auto_choice(net, cfg.m, dtype, cfg.batch)
    rows = {}
    for method in MODEL_METHODS:
        rec, out = timed[method]
        if rec.get("status") == "ok":
            rec["per_point_s"] = rec["median_s"] / cfg.batch
        if out is not None and reference is not None:
            dev = deviation(out, reference)
            rec["max_rel_dev"] = max(dev.values())
            rec["agree"] = _tolerance.agrees(dev, dtype)
        rows[method] = rec
    entry["results"] = rows
    nested_t = rows[REFERENCE].get("median_s")
    for method in ("analytic", "auto"):
        t = rows[method].get("median_s")
        entry[f"{method}_speedup_over_nested"] = nested_t / t if t and nested_t else None
    return entry


def print_models(console, entries: list[dict], dtype: str, methods: list[str]) -> None:
    from rich.table import Table

    table = Table(title=f"models that are not plain MLPs, order 3, {dtype}: µs per point")
    table.add_column("model", no_wrap=True)
    table.add_column("auto →", no_wrap=True)
    for m in MODEL_METHODS:
        table.add_column(m, justify="right", no_wrap=True)
    table.add_column("analytic vs nested", justify="right")
    for e in entries:
        speed = e.get("analytic_speedup_over_nested")
        table.add_row(
            e["name"],
            e["auto_choice"] or "-",
            *[_cell(e["results"].get(m)) for m in MODEL_METHODS],
            f"{speed:.2f}" if speed else "-",
        )
    console.print(table)


def _run_models(cfg: Config, dtype: str, methods: list[str], opts: Options) -> list[dict[str, Any]]:
    return [run_model(kind, cfg, dtype, opts) for kind in MODEL_NETS]


def run_scan(cfg: Config, dtype: str, methods: list[str], opts: Options) -> dict[str, Any]:
    """Per-step cost of a jitted ``lax.scan`` whose update uses all four outputs."""
    import nnderiv

    net = build_net(cfg, dtype)
    x0 = 0.5 * make_points(cfg.m, None, dtype, seed=3)
    dt = opts.dt

    def simulation(point_derivs):
        """jit(x0 -> scan), calling ``point_derivs`` (built outside, for the fixed net) each step."""

        def run(x0):
            def step(x, _):
                value, jac, hess, third = point_derivs(x)
                g = jac.sum(0)  # (m,)
                update = value.sum() * g + hess.sum(0) @ g + jnp.einsum("jkl,k,l->j", third.sum(0), g, g)
                return x - dt * jnp.tanh(update), value[0]

            return jax.lax.scan(step, x0, None, length=opts.steps)

        return jax.jit(run)

    # The floor of a step: the same update from arrays of derivs' shapes made with no
    # arithmetic, i.e. the loop and the update alone.
    shapes = [s for s in jax.eval_shape(method_fn(net, "auto"), x0) if s is not None]
    prepared = {DISPATCH_FLOOR: (simulation(lambda u: tuple(jnp.broadcast_to(u[0], s.shape) for s in shapes)), (x0,))}
    for method in methods:
        if method == BASELINE:
            prepared[method] = (simulation(lambda u: plain_all(net, u)), (x0,))
        else:
            derivs = nnderiv.derivs_fn(net, 3, method)  # as a user writes it, outside the loop
            prepared[method] = (simulation(lambda u, derivs=derivs: tuple(derivs(u))), (x0,))
    timed = _time_all(prepared, opts.target_s, max_repeats=50)
    entry: dict[str, Any] = {"name": cfg.name, "dtype": dtype, "m": cfg.m, "widths": list(cfg.widths), "n": cfg.n}
    entry.update(activation=cfg.activation, steps=opts.steps, auto_choice=auto_choice(net, cfg.m, dtype, 1))
    rows, finals = {}, {}
    floor = entry[DISPATCH_FLOOR] = timed[DISPATCH_FLOOR][0]
    if floor.get("status") == "ok":
        floor["per_step_s"] = floor["median_s"] / opts.steps
    for method in methods:
        rec, out = timed[method]
        if rec.get("status") == "ok":
            rec["per_step_s"] = rec["median_s"] / opts.steps
        if out is not None:
            finals[method] = np.asarray(out[0], np.float64)
        rows[method] = rec
    ref = finals.get(REFERENCE)
    for method, final in finals.items():
        if ref is not None:
            rows[method]["final_state_rel_dev"] = _tolerance.relative_error(final, ref)
    auto, nested, base = (rows.get(k, {}).get("per_step_s") for k in ("auto", REFERENCE, BASELINE))
    entry["results"] = rows
    entry["ratio_auto_to_nested"] = auto / nested if auto and nested else None
    entry["ratio_auto_to_baseline"] = auto / base if auto and base else None
    return entry


# --------------------------------------------------------------------------------------
# Machine, summary, output


def machine_info() -> dict[str, Any]:
    import flax

    import nnderiv

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or None
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    device = jax.devices()[0]
    import jaxlib

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "memory_bytes": mem,
        "jax": jax.__version__,
        "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
        "jaxlib": getattr(jaxlib, "__version__", None),
        "flax": flax.__version__,
        "numpy": np.__version__,
        "nnderiv": nnderiv.__version__,
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(report: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in report["dtypes"]:
        grid = [c for c in report["grid"] if c["dtype"] == dtype]
        s: dict[str, Any] = {"configs": len(grid)}
        measured = [c for c in grid if c["speedup"] and not c["best_competitor"]["estimated"]]
        s["geomean_speedup"] = _geomean([c["speedup"] for c in measured])
        s["speedup_configs"] = len(measured)
        s["speedup_estimated_configs"] = [c["name"] for c in grid if c["speedup"] and c["best_competitor"]["estimated"]]
        m2 = [c for c in measured if c["m"] >= 2]
        if m2:
            worst = min(m2, key=lambda c: c["speedup"])
            s["min_speedup_m_ge_2"] = {"value": worst["speedup"], "config": worst["name"]}
        nested_speedups = [c for c in grid if c.get("auto_over_nested_speedup")]
        if nested_speedups:
            s["geomean_speedup_over_nested"] = _geomean([c["auto_over_nested_speedup"] for c in nested_speedups])
            worst = min(nested_speedups, key=lambda c: c["auto_over_nested_speedup"])
            s["min_speedup_over_nested"] = {"value": worst["auto_over_nested_speedup"], "config": worst["name"]}
        for label, low, high in (("width_ge_64", 64, 10**9), ("width_32_63", 32, 63)):
            band = [c for c in grid if c["batch"] >= 64 and low <= c["width"] <= high and c["floor_ratio"]]
            if band:
                worst = max(band, key=lambda c: c["floor_ratio"])
                s[f"max_floor_ratio_{label}"] = {"value": worst["floor_ratio"], "config": worst["name"]}
        floors = [c for c in grid if c["batch"] >= 64 and c["floor_ratio"]]
        if floors:
            worst = max(floors, key=lambda c: c["floor_ratio"])
            s["max_floor_ratio_batch_ge_64"] = {"value": worst["floor_ratio"], "config": worst["name"]}
            s["median_floor_ratio_batch_ge_64"] = float(np.median([c["floor_ratio"] for c in floors]))
        # auto slower than another kernel (if that kernel is auto's own choice, it is noise)
        slow = [
            c
            for c in grid
            if c["auto_over_fastest"]
            and c["auto_over_fastest"] > 1.2
            and c["fastest_kernel"]["method"] != c["auto_choice"]
        ]
        s["auto_not_fastest"] = [
            {"config": c["name"], "auto_over_fastest": c["auto_over_fastest"], "fastest": c["fastest_kernel"]["method"]}
            for c in slow
        ]
        checks = [c["cost_model"] for c in grid if c.get("cost_model") and c["batch"] >= 64]
        losses = [c["choice_over_fastest"] for c in checks if "choice_over_fastest" in c]
        if losses:
            s["cost_model_choice_over_fastest"] = {"geomean": _geomean(losses), "max": max(losses)}
        log_errors = [
            math.log(c["predicted_per_point_s"][a] / t) for c in checks for a, t in c["measured_per_point_s"].items()
        ]
        if log_errors:
            # geometric standard deviation of predicted/measured: 1.0 would be a perfect model
            s["cost_model_geo_sd"] = math.exp(float(np.sqrt(np.mean(np.square(log_errors)))))
        lat = [e for e in report["latency"] if e["dtype"] == dtype]
        if lat and lat[0]["results"].get("auto", {}).get("ratio_to_forward"):
            s["latency_ratio"] = {"value": lat[0]["results"]["auto"]["ratio_to_forward"], "net": lat[0]["name"]}
            floor = lat[0].get(DISPATCH_FLOOR, {}).get("ratio_to_forward")
            if floor:  # the least any call returning these arrays costs, in forward passes
                s["latency_dispatch_floor_ratio"] = {"value": floor, "net": lat[0]["name"]}
        models = [e for e in report.get("models", []) if e["dtype"] == dtype]
        speedups = [e["analytic_speedup_over_nested"] for e in models if e.get("analytic_speedup_over_nested")]
        if speedups:
            worst = min(models, key=lambda e: e.get("analytic_speedup_over_nested") or math.inf)
            s["min_model_speedup_over_nested"] = {"value": min(speedups), "config": worst["name"]}
        scan = [e for e in report["scan"] if e["dtype"] == dtype]
        if scan:
            s["scan_ratio_auto_to_nested"] = {"value": scan[0]["ratio_auto_to_nested"], "net": scan[0]["name"]}
            s["scan_ratio_auto_to_baseline"] = {"value": scan[0]["ratio_auto_to_baseline"], "net": scan[0]["name"]}
        out[dtype] = s
    disagree, errors, skipped, worst = [], [], [], {}
    for c in report["grid"]:
        for method, chk in c["check"].items():
            if isinstance(chk, dict) and chk.get("agree") is False:
                disagree.append(f"{c['dtype']} {c['name']} {method}: {chk['max_rel_dev']:.2e}")
            if isinstance(chk, dict) and chk.get("max_rel_dev") is not None:
                worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), chk["max_rel_dev"])
        for method, rec in c["results"].items():
            if rec.get("status") == "error":
                errors.append(f"{c['dtype']} {c['name']} {method}: {rec['error']}")
            if rec.get("status") == "skipped":
                skipped.append(f"{c['dtype']} {c['name']} {method}")
    for section in ("latency", "scan", "models"):
        for e in report.get(section, []):
            for method, rec in e["results"].items():
                if rec.get("status") == "error":
                    errors.append(f"{section} {e['dtype']} {e['name']} {method}: {rec['error']}")
                if rec.get("agree") is False:
                    disagree.append(f"{section} {e['dtype']} {e['name']} {method}: {rec['max_rel_dev']:.2e}")
    out["all_agree"] = not disagree
    out["disagreements"] = disagree
    out["errors"] = errors
    out["skipped"] = skipped
    out["worst_rel_dev"] = worst
    return out


def default_out(quick: bool, directory: Path | None = None) -> Path:
    """``DIR/bench-HOST-STAMP[-quick].json``; DIR defaults to the current directory."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname().split(".")[0]) or "host"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (directory or Path.cwd()) / f"bench-{host}-{stamp}{'-quick' if quick else ''}.json"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Printing


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    return f"{us:.3g}" if us < 1000 else f"{us:,.0f}"


def _cell(rec: dict | None, per: str = "per_point_s") -> str:
    if not rec:
        return ""
    if rec.get("status") == "error":
        return "[red]error[/red]"
    if rec.get("status") == "skipped":
        est = rec.get("estimate_s")
        return "[dim]skip[/dim]" + (f" [dim]~{est:.0f}s[/dim]" if est else "")
    spread = rec["iqr_s"] / rec["median_s"] * 100 if rec.get("median_s") else 0
    return f"{_us(rec[per])} [dim]±{spread:.0f}%[/dim]"


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=max(console.width, 200))
    return console


def print_grid(console, entries: list[dict], dtype: str, methods: list[str], gemm: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"derivatives to order 3, {dtype}: µs per point (median ± IQR/median)",
        caption=(
            f"speedup: best of {{nested, jet, baseline}} / auto; vs nested: nested / auto; × floor: auto / matmul "
            f"floor of the cheapest packed algorithm; × own floor: each algorithm / its own matmul flops "
            f"(GEMM {gemm['peak_flop_per_s'] / 1e9:.1f} Gflop/s); dev: max rel. deviation from nested"
        ),
    )
    table.add_column("config", no_wrap=True)
    table.add_column("auto →", no_wrap=True)
    for m in methods:
        table.add_column(m, justify="right", no_wrap=True)
    table.add_column("speedup", justify="right", no_wrap=True)
    table.add_column("vs nested", justify="right", no_wrap=True)
    table.add_column("× floor", justify="right", no_wrap=True)
    table.add_column("× own floor fwd/fwdrev/fwdadj/nested", justify="right", no_wrap=True)
    table.add_column("dev", justify="right", no_wrap=True)
    for e in entries:
        best = e["best_competitor"]
        speed = "-"
        if e["speedup"]:
            speed = f"{e['speedup']:.2f} ({best['method']}{', est' if best['estimated'] else ''})"
        devs = [c["max_rel_dev"] for c in e["check"].values() if isinstance(c, dict) and "max_rel_dev" in c]
        dev = f"{max(devs):.0e}" if devs else "-"
        if not e["check"]["all_agree"]:
            dev = f"[red]{dev} FAIL[/red]"
        table.add_row(
            e["name"],
            e["auto_choice"] or "-",
            *[_cell(e["results"].get(m)) for m in methods],
            speed,
            f"{e['auto_over_nested_speedup']:.2f}" if e.get("auto_over_nested_speedup") else "-",
            f"{e['floor_ratio']:.1f}" if e["floor_ratio"] else "-",
            "/".join(f"{r:.1f}" if r else "-" for r in e.get("kernel_floor_ratio", {}).values()),
            dev,
        )
    console.print(table)


def print_latency(console, entries: list[dict], dtype: str, methods: list[str]) -> None:
    from rich.table import Table

    table = Table(
        title=f"single-point latency, {dtype}: µs per call (× the jitted forward pass, 'fwd pass'); "
        "'outputs only': a jitted call returning the same arrays with no arithmetic"
    )
    table.add_column("net", no_wrap=True)
    table.add_column("fwd pass", justify="right", no_wrap=True)
    table.add_column("outputs only", justify="right", no_wrap=True)
    for m in methods:
        table.add_column(m, justify="right", no_wrap=True)
    for e in entries:
        cells = []
        for m in methods:
            rec = e["results"].get(m, {})
            if rec.get("status") != "ok":
                cells.append(_cell(rec))
            else:
                flag = "" if rec.get("agree", True) else " [red]FAIL[/red]"
                cells.append(f"{_us(rec['median_s'])} [dim](×{rec['ratio_to_forward']:.1f})[/dim]{flag}")
        floor = e.get(DISPATCH_FLOOR, {})
        floor_cell = (
            f"{_us(floor['median_s'])} [dim](×{floor['ratio_to_forward']:.1f})[/dim]"
            if floor.get("ratio_to_forward")
            else _cell(floor)
        )
        table.add_row(e["name"].rsplit("-b", 1)[0], _us(e[FORWARD_PASS]["median_s"]), floor_cell, *cells)
    console.print(table)


def print_scan(console, entries: list[dict], dtype: str, methods: list[str]) -> None:
    from rich.table import Table

    table = Table(
        title=f"lax.scan simulation, {dtype}: µs per step; 'update only': the step with derivs' arrays made "
        "with no arithmetic"
    )
    table.add_column("net", no_wrap=True)
    table.add_column("steps", justify="right")
    table.add_column("update only", justify="right", no_wrap=True)
    for m in methods:
        table.add_column(m, justify="right", no_wrap=True)
    table.add_column("auto / nested", justify="right")
    table.add_column("auto / baseline", justify="right")
    for e in entries:
        r1, r2 = e["ratio_auto_to_nested"], e["ratio_auto_to_baseline"]
        table.add_row(
            e["name"].rsplit("-b", 1)[0],
            str(e["steps"]),
            _cell(e.get(DISPATCH_FLOOR), "per_step_s"),
            *[_cell(e["results"].get(m), "per_step_s") for m in methods],
            f"{r1:.2f}" if r1 else "-",
            f"{r2:.2f}" if r2 else "-",
        )
    console.print(table)


def print_summary(console, report: dict) -> None:
    from rich.table import Table

    summary = report["summary"]
    table = Table(title="summary")
    table.add_column("")
    for dtype in report["dtypes"]:
        table.add_column(dtype, justify="right")

    def fmt(s, key, digits=2):
        v = s.get(key)
        if isinstance(v, dict):
            val = v.get("value")
            where = v.get("config") or v.get("net") or ""
            return f"{val:.{digits}f} ({where})" if val is not None else "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))

    rows = [
        ("configs", "configs"),
        ("geomean speedup of auto over best of {nested, jet, baseline}", "geomean_speedup"),
        ("min speedup, m ≥ 2", "min_speedup_m_ge_2"),
        ("geomean speedup of auto over nested", "geomean_speedup_over_nested"),
        ("min speedup of auto over nested", "min_speedup_over_nested"),
        ("max auto / floor, batch ≥ 64, width ≥ 64", "max_floor_ratio_width_ge_64"),
        ("max auto / floor, batch ≥ 64, width 32-63", "max_floor_ratio_width_32_63"),
        ("max auto / floor, batch ≥ 64", "max_floor_ratio_batch_ge_64"),
        ("median auto / floor, batch ≥ 64", "median_floor_ratio_batch_ge_64"),
        ("latency: auto / forward (one point)", "latency_ratio"),
        ("latency: outputs only / forward (one point)", "latency_dispatch_floor_ratio"),
        ("scan: auto / nested per step", "scan_ratio_auto_to_nested"),
        ("scan: auto / baseline per step", "scan_ratio_auto_to_baseline"),
        ("models: min analytic speedup over nested", "min_model_speedup_over_nested"),
    ]
    for label, key in rows:
        table.add_row(label, *[fmt(summary[d], key) for d in report["dtypes"]])
    table.add_row(
        "cost model: auto's pick / fastest (geomean, max)",
        *[
            "{geomean:.2f}, {max:.2f}".format(**summary[d]["cost_model_choice_over_fastest"])
            if summary[d].get("cost_model_choice_over_fastest")
            else "-"
            for d in report["dtypes"]
        ],
    )
    table.add_row(
        "cost model: predicted / measured (geometric s.d.)",
        *[fmt(summary[d], "cost_model_geo_sd") for d in report["dtypes"]],
    )
    table.add_row(
        "GEMM Gflop/s (floor rate)", *[f"{report['gemm'][d]['peak_flop_per_s'] / 1e9:.1f}" for d in report["dtypes"]]
    )
    table.add_row(
        "worst deviation from nested",
        *[f"{summary['worst_rel_dev'][d]:.1e}" if d in summary["worst_rel_dev"] else "-" for d in report["dtypes"]],
    )
    console.print(table)
    for d in report["dtypes"]:
        for item in summary[d].get("auto_not_fastest", []):
            console.print(
                f"[yellow]{d} {item['config']}: auto is {item['auto_over_fastest']:.2f}× the fastest kernel "
                f"({item['fastest']})[/yellow]"
            )
    if summary["errors"]:
        console.print("[red]errors:[/red]\n  " + "\n  ".join(summary["errors"]))
    if summary["disagreements"]:
        console.print("[red]methods disagreeing with nested AD:[/red]\n  " + "\n  ".join(summary["disagreements"]))
    else:
        console.print("[green]every method that ran agreed with nested AD[/green]")
    console.print(f"{len(summary['skipped'])} (config, method) pairs skipped as too slow; see the JSON for reasons")


# --------------------------------------------------------------------------------------
# Command line


def build_parser(parser: argparse.ArgumentParser | None = None, prog: str = "bench.py") -> argparse.ArgumentParser:
    """The benchmark's options, added to ``parser`` (a ``nnderiv bench`` subparser) or a new one."""
    p = parser or argparse.ArgumentParser(
        prog=prog,
        description="Time every nnderiv method (and a plain jacfwd/jacrev baseline) on a grid of MLPs; "
        "single-point latency; per-step cost in a lax.scan loop. Writes all numbers to JSON.",
    )
    p.add_argument("--quick", action="store_true", help="a handful of tiny configs (< 1 minute): a smoke test")
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--filter", default=None, help="regex on grid config names, e.g. 'm16|b8192' or '^m3-w64x3'")
    p.add_argument(
        "--sections",
        default="grid,latency,scan,models",
        help="comma-separated subset of grid,latency,scan,models (default all)",
    )
    p.add_argument("--methods", default=None, help="comma-separated nnderiv methods (default: all; auto always runs)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default ./bench-HOST-DATE.json)")
    p.add_argument("--max-call-s", type=float, default=5.0, help="skip a method whose call would take longer (5)")
    p.add_argument("--max-mem-gb", type=float, default=8.0, help="skip a method needing more memory by the cost model")
    p.add_argument("--target-s", type=float, default=None, help="time budget of one measurement (0.3; quick 0.05)")
    p.add_argument("--steps", type=int, default=None, help="lax.scan steps (2000; quick 200)")
    p.add_argument("--list", action="store_true", help="print the selected grid configs and exit")
    p.add_argument(
        "--sync-dispatch",
        action="store_true",
        help="run CPU computations on the calling thread (jax_cpu_enable_async_dispatch=False): on a VM this "
        "removes a thread hand-off of tens of µs from every top-level call, which single-point latency measures",
    )
    p.add_argument(
        "--json", action="store_true", help="print the JSON report to stdout (tables and progress go to stderr)"
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine's rates for auto's cost model now (about a second), write them to the "
        "cache, say which rates were in use before, forget the choices auto measured, and exit",
    )
    return p


def _calibration_record(cal) -> dict[str, Any]:
    return {
        "dtype": cal.dtype,
        "source": cal.source,
        "note": cal.note,
        "path": str(cal.path) if cal.path else None,
        "rates": cal.rates.to_json(),
    }


def run_calibration(args: argparse.Namespace) -> int:
    """``--calibrate``: report the rates in use, measure anew, write the cache."""
    from nnderiv.methods import _calibration

    console = _console(stderr=args.json)
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    out = {"schema": "nnderiv-calibration-run/1", "cache": str(_calibration.cache_path()), "dtypes": {}}
    for dtype in dtypes:
        before = _calibration.calibrate(dtype, measure=False)
        console.print(f"{dtype}: in use before: {before.source} rates ({before.note})", highlight=False)
        if before.source == "default" and _calibration.mode() == "off":
            console.print(f"  ({_calibration.ENV_MODE}=off: derivative calls keep using the defaults)")
        after = _calibration.calibrate(dtype, force=True)
        rates = after.rates
        matmul = ", ".join(f"d={d}: {r / 1e9:.1f}" for d, r in rates.matmul)
        console.print(
            f"  measured now ({after.note}): matmul Gflop/s by contraction depth {matmul}; "
            f"elementwise {rates.elementwise_s * 1e9:.2f} ns/element; {rates.op_s * 1e6:.2f} µs/op",
            highlight=False,
        )
        out["dtypes"][dtype] = {"before": _calibration_record(before), "after": _calibration_record(after)}
    _calibration.reset()
    from nnderiv.methods import _measured

    # Choices timed under the old rates (or on a busier machine) are measured again.
    out["measured_choices"] = _measured.forget()
    console.print(f"measured choices of auto: {out['measured_choices']}; the next derivs_fn times them anew")
    if args.json:
        sys.stdout.write(json.dumps(_json_safe(out), indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None, default_dir: Path | None = None) -> int:
    """Run the benchmark; returns 0 if every method agreed with nested AD and none failed."""
    return run(build_parser().parse_args(argv), argv, default_dir)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None, default_dir: Path | None = None) -> int:
    """Run the benchmark for parsed ``args`` (see :func:`build_parser`)."""
    jax.config.update("jax_enable_x64", True)
    if args.calibrate:
        return run_calibration(args)
    if args.sync_dispatch:
        # Takes effect only before the CPU client exists, i.e. before the first computation.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    started = time.perf_counter()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"grid", "latency", "scan", "models"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    grid = quick_grid() if args.quick else full_grid()
    if args.filter:
        pattern = re.compile(args.filter)
        grid = [(g, c) for g, c in grid if pattern.search(c.name)]
    if args.list:
        for g, c in grid:
            print(f"{c.name:32s} {g}")
        return 0
    selected = [m.strip() for m in args.methods.split(",")] if args.methods else None
    methods = _method_names(selected)
    opts = Options(
        target_s=args.target_s if args.target_s is not None else (0.05 if args.quick else 0.3),
        max_call_s=args.max_call_s,
        max_mem_bytes=args.max_mem_gb * 2**30,
        probe_points=64,
        ref_points=16,
        steps=args.steps if args.steps is not None else (200 if args.quick else 2000),
        dt=1e-3,
        latency_target_s=0.05 if args.quick else 0.3,
    )
    out_path = args.out or default_out(args.quick, default_dir)
    console = _console(stderr=args.json)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "mode": "quick" if args.quick else "full",
        "filter": args.filter,
        "sections": sorted(sections),
        "dtypes": dtypes,
        "methods": methods,
        "nnderiv_methods": [m for m in methods if m != BASELINE],
        "machine": machine_info(),
        "load_average_start": list(os.getloadavg()),
        "settings": {**dataclasses.asdict(opts), "rtol": RTOL, "competitors": list(COMPETITORS)},
        "gemm": {},
        "calibration": {},
        "grid": [],
        "latency": [],
        "scan": [],
        "models": [],
        "complete": False,
    }

    def checkpoint():
        """Write what there is so far: a run that is stopped early still leaves its numbers."""
        report["summary"] = summarize(report)
        report["elapsed_s"] = time.perf_counter() - started
        write_json(report, out_path)

    mach = report["machine"]
    console.print(
        f"[bold]nnderiv benchmark[/bold] ({report['mode']}): {len(grid)} grid configs × {dtypes}, methods {methods}\n"
        f"{mach['cpu_model']}, {mach['cores']} cores, jax {mach['jax']} on {mach['device_kind']}"
    )
    load = report["load_average_start"][0]
    if load > 0.5:
        console.print(f"[yellow]load average {load:.2f} before starting: other work competes for the CPU[/yellow]")
    for dtype in dtypes:
        from nnderiv.methods import _calibration

        cal = _calibration.current(dtype)
        report["calibration"][dtype] = _calibration_record(cal)
        console.print(f"{dtype}: auto's cost model uses {cal.source} rates ({cal.note})", highlight=False)
        gemm = gemm_rate(dtype, target_s=max(opts.target_s, 0.2))
        report["gemm"][dtype] = gemm
        console.print(f"{dtype}: GEMM (8192×256)@(256×256) {gemm['peak_flop_per_s'] / 1e9:.1f} Gflop/s (best call)")
        if "grid" in sections:
            entries = []
            for i, (group, cfg) in enumerate(grid, 1):
                entry = run_config(cfg, group, dtype, methods, gemm, opts)
                entries.append(entry)
                report["grid"].append(entry)
                checkpoint()
                auto = entry["results"].get("auto", {})
                speed = f"{entry['speedup']:.2f}×" if entry["speedup"] else "-"
                console.print(
                    f"  [{i}/{len(grid)}] {dtype} {cfg.name:30s} auto {_us(auto.get('per_point_s'))} µs/pt, "
                    f"speedup {speed}, {'ok' if entry['check']['all_agree'] else '[red]DISAGREE[/red]'} "
                    f"({entry['wall_s']:.1f} s)",
                    highlight=False,
                )
            # the floor uses the faster of two GEMM measurements, before and after the grid
            again = gemm_rate(dtype, target_s=max(opts.target_s, 0.2))
            report["gemm"][dtype] = gemm = merge_gemm(gemm, again)
            for entry in entries:
                entry.update(_derived(entry, _config_of(entry), gemm))
            print_grid(console, entries, dtype, methods, gemm)
        single_point_sections = (
            ("latency", QUICK_LATENCY_NETS, LATENCY_NETS, run_latency, print_latency),
            ("scan", QUICK_SCAN_NETS, SCAN_NETS, run_scan, print_scan),
            ("models", [QUICK_MODEL_CONFIG], list(MODEL_CONFIGS), _run_models, print_models),
        )
        for section, quick_nets, full_nets, run_one, print_section in single_point_sections:
            if section not in sections:
                continue
            entries = [run_one(cfg, dtype, methods, opts) for cfg in (quick_nets if args.quick else full_nets)]
            if section == "models":
                entries = [e for group in entries for e in group]
            report[section] += entries
            checkpoint()
            print_section(console, entries, dtype, methods)
    report["load_average_end"] = list(os.getloadavg())
    report["summary"] = summarize(report)
    report["elapsed_s"] = time.perf_counter() - started
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["complete"] = True
    write_json(report, out_path)
    print_summary(console, report)
    console.print(f"total {report['elapsed_s']:.0f} s; wrote {out_path}")
    if args.json:
        sys.stdout.write(json.dumps(_json_safe(report), indent=1) + "\n")
    summary = report["summary"]
    return 0 if summary["all_agree"] and not summary["errors"] else 1
