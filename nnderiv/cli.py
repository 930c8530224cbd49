"""The ``nnderiv`` command line (also ``python -m nnderiv``).

Subcommands:

``compare``
    Runs every method (``analytic``, ``jet``, ``nested``, ``auto``) on a batch of random
    points of a model (by default the bundled one, see :mod:`nnderiv._bundled`) and
    reports each method's deviation from nested AD and its speed. Exits with status 1
    when a method deviates by more than the tolerance.

Example:
  >>> from nnderiv.cli import build_parser
  >>> args = build_parser().parse_args(["compare", "--batch", "8", "--float32"])
  >>> args.command, args.batch, args.order, args.float32
  ('compare', 8, 3, True)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

METHOD_ORDER = ("analytic", "jet", "nested", "auto")
REFERENCE = "nested"
FIELDS = ("value", "jacobian", "hessian", "third")

# Tolerances on the deviation from nested AD, relative to max |reference| per field.
# All methods compute the same exact derivatives; they differ only in the order of the
# floating-point operations. For a small MLP that rounding is a modest multiple of the
# machine epsilon (2.2e-16 in float64, 1.2e-7 in float32), growing with the order (each
# order adds a product of layer derivatives) and the width (sums over ~32 units per
# layer). 1e-10 in float64 leaves ~5 decades of margin while still catching any real
# error (a wrong coefficient or index is O(1)). In float32 the same reasoning gives
# ~1e-6..1e-5 for third derivatives, whose entries also cancel against each other more
# (the relative error of a small entry is normalised by the field's largest); 1e-4 is a
# decade above that, and still far below any genuine mistake.
RTOL_FLOAT64 = 1e-10
RTOL_FLOAT32 = 1e-4


class CommandError(Exception):
    """A user error (bad option value, missing file): reported by :func:`main`, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nnderiv`` command (no side effects)."""
    parser = argparse.ArgumentParser(
        prog="nnderiv",
        description="All input derivatives up to order 3 of trained Flax MLPs: cross-checks and timings.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    compare = sub.add_parser(
        "compare",
        help="compare every method against nested AD on random points (accuracy and speed)",
        description=(
            "Run each method (analytic, jet, nested, auto) on a batch of random points, print its "
            "deviation from nested AD (max over value, Jacobian, Hessian, third derivatives) and its "
            "time per point. Exit status 1 if any method deviates by more than --rtol."
        ),
    )
    compare.add_argument(
        "--model",
        default="bundled",
        help="'bundled' (default: the MLP shipped with nnderiv) or the path of a JSON metadata file "
        "as written by examples/train_bundled.py, with its .msgpack parameters beside it",
    )
    compare.add_argument("--batch", type=_positive_int, default=256, help="number of random points (default 256)")
    compare.add_argument("--order", type=int, choices=(0, 1, 2, 3), default=3, help="highest order (default 3)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    compare.add_argument(
        "--float32", action="store_true", help="compute in float32 (default: float64, with jax_enable_x64)"
    )
    compare.add_argument(
        "--repeats", type=_positive_int, default=25, help="timed calls per measurement; the median is reported"
    )
    compare.add_argument(
        "--rtol",
        type=float,
        default=None,
        help=f"tolerance on the relative deviation (default {RTOL_FLOAT64:g} in float64, {RTOL_FLOAT32:g} in float32)",
    )
    compare.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    compare.set_defaults(func=_compare_command)

    from . import _bench

    bench = sub.add_parser(
        "bench",
        help="the benchmark suite: every method on a grid of MLPs, single-point latency, lax.scan loop",
        description=(
            "Time every method (and a plain jit(vmap(jacfwd(jacfwd(jacrev)))) baseline) in float64 and float32 "
            "on a grid of MLPs, check each against nested AD, and report the speedup of auto, its ratio to a "
            "matmul floor, single-point latency and per-step cost in a lax.scan loop. Prints tables with progress "
            "lines and writes all numbers to JSON. The full grid takes about 15 minutes on 2 cores; --quick "
            "under a minute. Exit status 1 if a method disagreed with nested AD or failed."
        ),
    )
    _bench.build_parser(bench)
    bench.set_defaults(func=_bench_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnderiv`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CommandError as err:
        print(f"nnderiv {args.command}: error: {err}", file=sys.stderr)
        return 2


def _bench_command(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.run(args, sys.argv[2:])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# --------------------------------------------------------------------------------------
# compare


def _compare_command(args: argparse.Namespace) -> int:
    import jax

    # A context, not jax.config.update: main() can be called from a running program
    # (or twice, with and without --float32) without changing its global configuration.
    with jax.enable_x64(not args.float32):
        report = run_compare(
            model=args.model,
            batch=args.batch,
            order=args.order,
            seed=args.seed,
            float32=args.float32,
            repeats=args.repeats,
            rtol=args.rtol,
        )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_compare(report)
    return 0 if report["ok"] else 1


def _load_model(model: str, dtype):
    """(network, metadata) for ``--model``."""
    from . import _bundled
    from ._flax import from_flax

    if model == "bundled":
        meta = _bundled.bundled_metadata()
        return _bundled.bundled_network(dtype), {**meta, "source": "bundled"}
    path = Path(model)
    if not path.is_file():
        raise CommandError(f"--model {model!r} is neither 'bundled' nor a JSON file")
    meta = json.loads(path.read_text(encoding="utf-8"))
    params_path = path.with_suffix(".msgpack")
    if not params_path.is_file():
        raise CommandError(f"no parameters at {params_path} (expected beside --model {model})")
    module = _bundled.module_from_metadata(meta)
    variables = _bundled.restore_variables(module, int(meta["input_dim"]), params_path.read_bytes(), dtype)
    return from_flax(module, variables, input_dim=int(meta["input_dim"])), {**meta, "source": str(path)}


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` (results awaited with ``block_until_ready``); call once before."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timings(fn: Callable[[Any], Any], x, repeats: int) -> dict[str, float]:
    """Compile time, batch time per point and single-point latency of a jitted ``fn``."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))  # warm-up: trace and compile for the batch shape
    compile_s = time.perf_counter() - start
    one = x[0]
    jax.block_until_ready(fn(one))  # warm-up for the single-point shape
    batch_s = _median_seconds(lambda: fn(x), repeats)
    single_s = _median_seconds(lambda: fn(one), repeats)
    return {
        "out": out,
        "compile_s": compile_s,
        "per_point_us": batch_s / x.shape[0] * 1e6,
        "batch_us": batch_s * 1e6,
        "single_point_us": single_s * 1e6,
    }


def _deviation(result, reference) -> dict[str, Any]:
    import numpy as np

    per_field = {}
    for name in FIELDS:
        ref, got = getattr(reference, name), getattr(result, name)
        if ref is None:
            continue
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        abs_dev = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        rel_dev = abs_dev / scale if scale > 0 else (0.0 if abs_dev == 0 else math.inf)
        per_field[name] = {"max_abs": abs_dev, "max_rel": rel_dev, "max_abs_ref": scale}
    worst = max(per_field, key=lambda f: per_field[f]["max_rel"])
    worst = worst if per_field[worst]["max_rel"] > 0 else None
    return {
        "max_abs_dev": max(v["max_abs"] for v in per_field.values()),
        "max_rel_dev": max(v["max_rel"] for v in per_field.values()),
        "worst_field": worst,
        "per_field": per_field,
    }


def run_compare(
    *,
    model: str = "bundled",
    batch: int = 256,
    order: int = 3,
    seed: int = 0,
    float32: bool = False,
    repeats: int = 25,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Run the comparison and return the report (a JSON-serialisable dict).

    Call it with x64 enabled for float64 (as ``nnderiv compare`` does).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import _api
    from .methods import choose

    dtype = jnp.dtype(jnp.float32 if float32 else jnp.float64)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs jax_enable_x64: wrap the call in `with jax.enable_x64(True):`")
    rtol = rtol if rtol is not None else (RTOL_FLOAT32 if float32 else RTOL_FLOAT64)
    net, meta = _load_model(model, dtype)
    m = net.input_dim
    lo, hi = meta.get("domain", (-1.0, 1.0))
    x = jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=(batch, m)), dtype=dtype)

    forward = jax.jit(lambda net, u: net(u))
    fwd = _timings(lambda u: forward(net, u), x, repeats)

    runs: dict[str, dict[str, Any]] = {}
    for method in METHOD_ORDER:
        entry: dict[str, Any] = {"method": method}
        if method == "auto":
            try:
                entry["resolved"] = choose(net, m, dtype, order)
            except Exception:  # noqa: BLE001 - informational only
                entry["resolved"] = None
        try:
            entry.update(_timings(_api.derivs_fn(net, order, method), x, repeats))
        except Exception as err:  # noqa: BLE001 - reported, and fails the comparison
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        runs[method] = entry

    reference = runs[REFERENCE].get("out")
    rows = []
    for method in METHOD_ORDER:
        entry = runs[method]
        out = entry.pop("out", None)
        if out is not None and reference is not None:
            entry.update(_deviation(out, reference))
            entry["ok"] = bool(entry["max_rel_dev"] <= rtol)
        else:
            entry.setdefault("error", f"no {REFERENCE} reference")
            entry["ok"] = False
        if "per_point_us" in entry:
            entry["relative_to_forward"] = entry["per_point_us"] / fwd["per_point_us"]
        rows.append(entry)

    try:
        description = net.describe(dtype=dtype)
    except Exception as err:  # noqa: BLE001
        description = f"(describe failed: {type(err).__name__}: {err})"
    return {
        "model": {
            "source": meta.get("source"),
            "name": net.spec.name,
            "description": description,
            "input_dim": m,
            "output_dim": int(reference.value.shape[-1]) if reference is not None else meta.get("output_dim"),
            "target": meta.get("target"),
        },
        "dtype": dtype.name,
        "device": str(jax.devices()[0]),
        "batch": batch,
        "order": order,
        "seed": seed,
        "repeats": repeats,
        "rtol": rtol,
        "reference": REFERENCE,
        "forward": {k: v for k, v in fwd.items() if k != "out"},
        "methods": rows,
        "ok": all(r["ok"] for r in rows),
    }


def _print_compare(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    model = report["model"]
    console.print(f"[bold]model[/bold] ({model['source']}, target: {model['target']}):")
    console.print(model["description"], highlight=False)
    console.print(
        f"{report['batch']} random points, order {report['order']}, {report['dtype']} on {report['device']}, "
        f"median of {report['repeats']} calls; reference: {report['reference']}"
    )
    fwd = report["forward"]
    console.print(
        f"plain jitted forward pass: {fwd['per_point_us']:.3f} µs/point in the batch, "
        f"{fwd['single_point_us']:.1f} µs for one point"
    )

    table = Table(
        title=f"derivatives up to order {report['order']} vs {report['reference']} AD",
        caption="rel dev: |method - nested| / max |nested| per field; × fwd: µs/pt over the forward pass's",
    )
    table.add_column("method", no_wrap=True)
    table.add_column("max abs dev", justify="right", no_wrap=True)
    table.add_column("max rel dev", justify="right", no_wrap=True)
    table.add_column("worst field", no_wrap=True)
    table.add_column("µs/pt batch", justify="right", no_wrap=True)
    table.add_column("× fwd", justify="right", no_wrap=True)
    table.add_column("µs 1 pt", justify="right", no_wrap=True)
    table.add_column("compile s", justify="right", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    for row in report["methods"]:
        name = row["method"] + (f" ({row['resolved']})" if row.get("resolved") else "")
        if "error" in row:
            table.add_row(name, "[red]" + row["error"] + "[/red]", "", "", "", "", "", "", "[red]FAIL[/red]")
            continue
        table.add_row(
            name,
            f"{row['max_abs_dev']:.2e}",
            f"{row['max_rel_dev']:.2e}",
            row["worst_field"] or "-",
            f"{row['per_point_us']:.3f}",
            f"{row['relative_to_forward']:.1f}",
            f"{row['single_point_us']:.1f}",
            f"{row['compile_s']:.2f}",
            "[green]ok[/green]" if row["ok"] else "[red]FAIL[/red]",
        )
    console.print(table)
    verdict = "[green]all methods agree[/green]" if report["ok"] else "[red]some methods disagree[/red]"
    console.print(f"{verdict} with {report['reference']} (tolerance on the relative deviation: {report['rtol']:g})")
