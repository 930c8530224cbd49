"""The ``nnderiv`` command line (also ``python -m nnderiv``).

Subcommands:

``compare``
    Runs every method (``analytic``, ``jet``, ``nested``, ``auto``) on a batch of random
    points of a model (by default the bundled one, see :mod:`nnderiv._bundled`) and
    reports each method's deviation from nested AD and its speed. Exits with status 1
    when a method deviates by more than the tolerance.

``check``
    Checks one model, typically a checkpoint saved with :func:`nnderiv.save_checkpoint`
    (``--checkpoint PATH``, the Flax module built by ``--module pkg.module:Factory`` with
    ``--module-kwargs JSON``, or from the architecture in the checkpoint's metadata), a
    ``--model`` JSON as for ``compare``, or by default the bundled model: every applicable
    method (``analytic``, ``forward``, ``fwdrev``, ``jet``, ``nested``; the first three
    only for MLPs) at ``--points`` random points of the model's domain (the metadata's
    ``domain``, else a standard normal), reporting the largest relative deviation from
    nested AD per method and field (value, Jacobian, Hessian, third). Exit status 0 when
    all agree within ``--rtol``, 1 when a method disagrees or fails, 2 for a usage error
    (no such file, module not importable, checkpoint not fitting the module), with the
    reason on stderr.

Example:
  >>> from nnderiv.cli import build_parser
  >>> args = build_parser().parse_args(["compare", "--batch", "8", "--float32"])
  >>> args.command, args.batch, args.order, args.float32
  ('compare', 8, 3, True)
  >>> args = build_parser().parse_args(["check", "--checkpoint", "runs/ckpt", "--points", "16"])
  >>> args.command, args.checkpoint, args.points, args.order
  ('check', 'runs/ckpt', 16, 3)
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
    _add_check_parser(sub)

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
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given, for reports that record it
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

    return _bench.run(args, args.argv[1:])


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


# --------------------------------------------------------------------------------------
# check

CHECK_METHODS = ("analytic", "forward", "fwdrev", "jet", "nested")
ANALYTIC_FAMILY = frozenset({"analytic", "forward", "fwdrev"})


def _add_check_parser(sub) -> None:
    import textwrap

    check = sub.add_parser(
        "check",
        help="check that every method gives the same derivatives of a model (e.g. a saved checkpoint)",
        description=textwrap.fill(
            "Load a model (the bundled one by default, a checkpoint saved with nnderiv.save_checkpoint, or a "
            "--model JSON as for compare), compute its value, Jacobian, Hessian and third derivatives with every "
            "applicable method (analytic, forward, fwdrev, jet, nested) at random points of its domain, and report "
            "each method's largest relative deviation from nested AD per field. The analytic family (analytic, "
            "forward, fwdrev) is skipped, with the reason, for a model that is not an MLP. Points are drawn "
            "uniformly in the metadata's 'domain' ([lo, hi], or one [lo, hi] per input) when there is one, else "
            "from a standard normal. Exit status: 0 all methods agree, 1 a method disagrees or fails, 2 usage "
            "error (bad path, module not importable, checkpoint not fitting the module).",
            width=88,
        ),
        epilog=(
            "examples:\n"
            "  nnderiv check                                   # the bundled model\n"
            "  nnderiv check --checkpoint runs/ckpt --module mypkg.models:make_mlp \\\n"
            "      --module-kwargs '{\"widths\": [64, 64]}' --input-dim 3\n"
            "  nnderiv check --checkpoint runs/surrogate.msgpack   # architecture from runs/surrogate.json\n"
            "  nnderiv check --model my_model.json --float32 --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = check.add_argument_group("model (default: the bundled model)")
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a checkpoint written by nnderiv.save_checkpoint: an orbax directory or a .msgpack file",
    )
    source.add_argument(
        "--module",
        metavar="PKG.MODULE:FACTORY",
        help="with --checkpoint: a callable (a Flax module class or a function returning a linen or nnx module) "
        "imported from a module on the Python path or the current directory, or FILE.py:FACTORY. Without it the "
        "architecture comes from the checkpoint's metadata (keys widths, output_dim, activation, as written by "
        "examples/train_surrogate.py)",
    )
    source.add_argument(
        "--module-kwargs",
        metavar="JSON",
        default="{}",
        help="keyword arguments for --module, as a JSON object (default {})",
    )
    source.add_argument(
        "--input-dim",
        type=_positive_int,
        default=None,
        help="the number of inputs of a linen --module (default: from the metadata or the checkpoint's shapes)",
    )
    source.add_argument(
        "--model",
        default="bundled",
        help="instead of --checkpoint: 'bundled' (default) or a JSON metadata file with its .msgpack beside it, "
        "as for compare",
    )
    check.add_argument("--points", type=_positive_int, default=64, help="number of random points (default 64)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    check.add_argument("--order", type=int, choices=(0, 1, 2, 3), default=3, help="highest order (default 3)")
    check.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="tolerance on the deviation from nested AD relative to the field's largest entry "
        f"(default {RTOL_FLOAT64:g} in float64, {RTOL_FLOAT32:g} in float32)",
    )
    check.add_argument(
        "--float32", action="store_true", help="compute in float32 (default: float64, with jax_enable_x64)"
    )
    check.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    check.set_defaults(func=_check_command)


def _check_command(args: argparse.Namespace) -> int:
    import jax

    if args.checkpoint is None and (args.module is not None or args.input_dim is not None):
        raise CommandError("--module and --input-dim describe the model of a --checkpoint; pass --checkpoint PATH")
    if args.checkpoint is not None and args.model != "bundled":
        raise CommandError("pass either --checkpoint or --model, not both")
    try:
        module_kwargs = json.loads(args.module_kwargs)
    except json.JSONDecodeError as err:
        raise CommandError(f"--module-kwargs is not valid JSON: {err}") from None
    if not isinstance(module_kwargs, dict):
        raise CommandError(f"--module-kwargs must be a JSON object, got {args.module_kwargs!r}")
    with jax.enable_x64(not args.float32):  # as for compare: no global configuration change
        report = run_check(
            model=args.model,
            checkpoint=args.checkpoint,
            module=args.module,
            module_kwargs=module_kwargs,
            input_dim=args.input_dim,
            points=args.points,
            seed=args.seed,
            order=args.order,
            rtol=args.rtol,
            float32=args.float32,
        )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_check(report)
    return 0 if report["ok"] else 1


def _import_factory(spec: str):
    """The callable named by ``pkg.module:Name`` or ``path/file.py:Name``."""
    import importlib
    import importlib.util

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CommandError(f"--module must look like pkg.module:Factory or file.py:Factory, got {spec!r}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CommandError(f"--module: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # The console script does not put the working directory on the path; a user
            # running `nnderiv check` next to their models.py expects it to be found.
            added = str(Path.cwd()) not in sys.path
            if added:
                sys.path.append(str(Path.cwd()))
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except CommandError:
        raise
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module
        raise CommandError(f"--module {spec}: could not import {target}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CommandError(f"--module {spec}: {target} has no callable {name!r}")
    return factory


def _check_model(checkpoint: str, module_spec: str | None, module_kwargs: dict, input_dim: int | None, dtype):
    """(network, metadata) for ``--checkpoint``; every user error becomes a :class:`CommandError`."""
    from flax import linen, nnx

    from . import _bundled, _checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise CommandError(f"--checkpoint: no checkpoint at {path}")
    try:
        meta = _checkpoint.checkpoint_metadata(path) or {}
    except ValueError as err:
        raise CommandError(str(err)) from None
    if module_spec is not None:
        factory = _import_factory(module_spec)
        try:
            module = factory(**module_kwargs)
        except Exception as err:  # noqa: BLE001 - the user's factory, reported with its arguments
            raise CommandError(
                f"--module {module_spec}: calling it with {module_kwargs} failed: {type(err).__name__}: {err}"
            ) from None
        if not isinstance(module, linen.Module | nnx.Module):
            raise CommandError(
                f"--module {module_spec} returned {type(module).__name__}, not a flax.linen or flax.nnx module"
            )
    elif {"widths", "output_dim"} <= set(meta):
        try:
            module = _bundled.module_from_metadata(meta)
        except (KeyError, TypeError, ValueError) as err:
            raise CommandError(f"the architecture in {_checkpoint.metadata_path(path)} is not usable: {err}") from None
    else:
        raise CommandError(
            f"no architecture for {path}: pass --module pkg.module:Factory (and --module-kwargs) to build the "
            f"Flax module, or save the checkpoint with metadata holding widths, output_dim and activation"
        )
    if isinstance(module, nnx.Module) and input_dim is not None:
        raise CommandError("--input-dim is for linen modules; an nnx module knows its input size")
    try:
        net = _checkpoint.from_checkpoint(module, path, input_dim=input_dim, dtype=dtype)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise CommandError(str(err)) from None
    return net, {**meta, "source": str(path)}


def _domain_points(meta: dict, m: int, count: int, seed: int, dtype):
    """``count`` points: uniform in the metadata's domain, else standard normal."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    domain = meta.get("domain")
    if domain is None:
        return jnp.asarray(rng.standard_normal((count, m)), dtype=dtype), "standard normal"
    bounds = np.asarray(domain, dtype=np.float64)
    if bounds.shape == (2,):
        bounds = np.broadcast_to(bounds, (m, 2))
    if bounds.shape != (m, 2) or not np.all(bounds[:, 0] < bounds[:, 1]):
        raise CommandError(f"the metadata's domain {domain!r} is neither [lo, hi] nor one [lo, hi] per input (m={m})")
    x = rng.uniform(bounds[:, 0], bounds[:, 1], size=(count, m))
    boxes = [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in bounds]
    box = f"{boxes[0]}^{m}" if len(set(boxes)) == 1 else " x ".join(boxes)
    return jnp.asarray(x, dtype=dtype), f"uniform in {box}"


def run_check(
    *,
    model: str = "bundled",
    checkpoint: str | None = None,
    module: str | None = None,
    module_kwargs: dict | None = None,
    input_dim: int | None = None,
    points: int = 64,
    seed: int = 0,
    order: int = 3,
    rtol: float | None = None,
    float32: bool = False,
) -> dict[str, Any]:
    r"""Compare every applicable method with nested AD on one model; the report of ``nnderiv check``.

    For each method and each field (value, Jacobian, Hessian, third) the deviation is
    :math:`\max |d_\text{method} - d_\text{nested}| / \max |d_\text{nested}|` over all
    points and entries; a method passes when every field's deviation is at most ``rtol``.

    Call it with x64 enabled for float64 (as ``nnderiv check`` does). Raises
    :class:`CommandError` for a model that cannot be loaded.

    Returns:
      A JSON-serialisable dict: ``model``, ``dtype``, ``points``, ``domain``, ``rtol``,
      ``methods`` (one entry per method: ``status`` ``"ok"``, ``"FAIL"``, ``"error"`` or
      ``"skipped"``, ``max_rel_dev``, ``per_field``, ``reason``) and ``ok``.

    Example:
      >>> import jax
      >>> from nnderiv.cli import run_check
      >>> with jax.enable_x64(True):
      ...     report = run_check(points=4, order=2)
      >>> report["ok"], [row["status"] for row in report["methods"]]
      (True, ['ok', 'ok', 'ok', 'ok', 'ok'])
    """
    import jax
    import jax.numpy as jnp

    from . import _api, _network

    dtype = jnp.dtype(jnp.float32 if float32 else jnp.float64)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs jax_enable_x64: wrap the call in `with jax.enable_x64(True):`")
    rtol = rtol if rtol is not None else (RTOL_FLOAT32 if float32 else RTOL_FLOAT64)
    if checkpoint is not None:
        net, meta = _check_model(checkpoint, module, module_kwargs or {}, input_dim, dtype)
    else:
        try:
            net, meta = _load_model(model, dtype)
        except (KeyError, TypeError, ValueError) as err:  # a metadata file that does not describe the parameters
            raise CommandError(f"--model {model}: {type(err).__name__}: {err}") from None
    m = net.input_dim
    if m is None:
        raise CommandError("the model's input size could not be inferred; pass --input-dim")
    x, domain = _domain_points(meta, m, points, seed, dtype)

    try:
        structure = _network.mlp_structure(net, m, dtype)
    except Exception as err:  # noqa: BLE001 - the model could not even be traced
        raise CommandError(
            f"the model cannot be evaluated on inputs of size {m}: {type(err).__name__}: {err}"
        ) from None
    not_mlp = structure if isinstance(structure, str) else None

    results: dict[str, Any] = {}
    rows = []
    for method in CHECK_METHODS:
        row: dict[str, Any] = {"method": method}
        if not_mlp is not None and method in ANALYTIC_FAMILY:
            row.update(status="skipped", reason=f"not an MLP: {not_mlp}")
        else:
            try:
                results[method] = jax.block_until_ready(_api.derivs_fn(net, order, method)(x))
            except Exception as err:  # noqa: BLE001 - reported, and fails the check
                row.update(
                    status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
        rows.append(row)

    reference = results.get(REFERENCE)
    for row in rows:
        out = results.get(row["method"])
        if out is None:
            continue
        if reference is None:
            row.update(status="error", reason=f"no {REFERENCE} reference")
            continue
        dev = _deviation(out, reference)
        finite = all(bool(jnp.all(jnp.isfinite(f))) for f in out if f is not None)
        ok = finite and dev["max_rel_dev"] <= rtol
        row.update(
            status="ok" if ok else "FAIL",
            max_rel_dev=dev["max_rel_dev"],
            per_field={k: v["max_rel"] for k, v in dev["per_field"].items()},
        )
        if not finite:
            row["reason"] = "non-finite values"
        elif row["method"] == REFERENCE:
            row["reason"] = "the reference"
    checked = [row for row in rows if row["status"] != "skipped"]
    return {
        "model": {
            "source": meta.get("source"),
            "name": net.spec.name,
            "input_dim": m,
            "output_dim": None if reference is None else int(reference.value.shape[-1]),
            "mlp": not_mlp is None,
        },
        "dtype": dtype.name,
        "device": str(jax.devices()[0]),
        "points": points,
        "domain": domain,
        "seed": seed,
        "order": order,
        "rtol": rtol,
        "reference": REFERENCE,
        "methods": rows,
        "ok": bool(checked) and all(row["status"] == "ok" for row in checked),
    }


def _print_check(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    model = report["model"]
    console.print(
        f"[bold]model[/bold] {model['name']} ({model['source']}): m={model['input_dim']}, n={model['output_dim']}, "
        f"{'an MLP' if model['mlp'] else 'not an MLP'}",
        highlight=False,
    )
    console.print(
        f"{report['points']} points ({report['domain']}, seed {report['seed']}), order {report['order']}, "
        f"{report['dtype']} on {report['device']}",
        highlight=False,
    )
    fields = FIELDS[: report["order"] + 1]
    table = Table(
        title=f"max relative deviation from {report['reference']} AD",
        caption="per field: max |method - nested| / max |nested| over all points and entries",
    )
    table.add_column("method", no_wrap=True)
    for field in fields:
        table.add_column(field, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in report["methods"]:
        status = row["status"]
        color = {"ok": "green", "skipped": "yellow"}.get(status, "red")
        label = f"[{color}]{status}[/{color}]" + (f" ({row['reason']})" if row.get("reason") else "")
        per_field = row.get("per_field", {})
        table.add_row(row["method"], *(f"{per_field[f]:.2e}" if f in per_field else "-" for f in fields), label)
    console.print(table)
    verdict = "[green]all methods agree[/green]" if report["ok"] else "[red]some methods disagree or failed[/red]"
    console.print(f"{verdict} with {report['reference']} (tolerance {report['rtol']:g})")
