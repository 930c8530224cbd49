"""The ``nnderiv`` command line (also ``python -m nnderiv``): tooling on the public API.

Subcommands:

``compare``
    Every method of :data:`nnderiv.METHODS` on a batch of points of a model (by default
    the bundled one): each method's deviation from nested AD, per field, and its speed
    (compile time, µs per point in the batch and for one point, against the plain
    forward pass). Exit status 1 when a method deviates by more than the tolerance.

``check``
    The same run without the timings, for verifying a model: typically a checkpoint
    saved with :func:`nnderiv.save_checkpoint` (``--checkpoint PATH``, the Flax module
    built by ``--module pkg.module:Factory`` with ``--module-kwargs JSON``, or from the
    architecture in the checkpoint's metadata, see :func:`nnderiv.module_from_metadata`).

``bench``
    The benchmark suite.

Both ``compare`` and ``check`` take the same model options (``--model``, ``--checkpoint``,
``--module``, ``--module-kwargs``, ``--input-dim``), draw their points uniformly in the
metadata's ``domain`` (else from a standard normal), judge every method with the
package's one tolerance table (by dtype and order; ``--rtol`` sets one for all fields),
skip the analytic family (with the reason) on a model that is not an MLP, and exit
with 0 when all agree, 1 when a method disagrees or fails, 2 for a usage error (no
such file, module not importable, checkpoint not fitting the module), with the reason
on stderr. ``--json`` prints the report (one schema for both: see :func:`run`).

Layout: ``_load.py`` turns the options into a model, ``_run.py`` is the run loop and the
report; both use only the public API of :mod:`nnderiv`.

Example:
  >>> from nnderiv.cli import build_parser
  >>> args = build_parser().parse_args(["compare", "--batch", "8", "--float32"])
  >>> args.command, args.points, args.order, args.float32
  ('compare', 8, 3, True)
  >>> args = build_parser().parse_args(["check", "--checkpoint", "runs/ckpt", "--points", "16"])
  >>> args.command, args.checkpoint, args.points, args.order
  ('check', 'runs/ckpt', 16, 3)
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from ._load import CommandError as CommandError
from ._run import print_report as print_report
from ._run import run as run

__all__ = ["CommandError", "build_parser", "main", "print_report", "run"]

_DESCRIPTIONS = {
    "compare": (
        "Run every method of nnderiv.METHODS on a batch of points of a model (the bundled one by default), "
        "print each method's relative deviation from nested AD per field (value, Jacobian, Hessian, third) and "
        "its speed: compile time, µs per point in the batch and for one point, and its ratio to the plain "
        "jitted forward pass."
    ),
    "check": (
        "Load a model (the bundled one by default, a checkpoint saved with nnderiv.save_checkpoint, or a "
        "--model JSON), compute its value, Jacobian, Hessian and third derivatives with every method of "
        "nnderiv.METHODS and report each method's largest relative deviation from nested AD per field."
    ),
}
_COMMON = (
    " The analytic family (auto's kernels, analytic, forward, fwdrev) is skipped, with the reason, for a model "
    "that is not an MLP. Points are drawn uniformly in the metadata's 'domain' ([lo, hi], or one [lo, hi] per "
    "input) when there is one, else from a standard normal. Tolerances: the package's table by dtype and "
    "order (float64: 1e-13 for the value up to 1e-10 for the third tensor), or --rtol for every field. "
    "Exit status: 0 all methods agree, 1 a method disagrees or fails, 2 usage error (bad path, module not "
    "importable, checkpoint not fitting the module)."
)
_EPILOGS = {
    "compare": (
        "examples:\n"
        "  nnderiv compare                                 # the bundled model\n"
        "  nnderiv compare --model runs/model.json --float32 --json\n"
        "  nnderiv compare --checkpoint runs/surrogate/checkpoint --batch 1024"
    ),
    "check": (
        "examples:\n"
        "  nnderiv check                                   # the bundled model\n"
        "  nnderiv check --checkpoint runs/ckpt --module mypkg.models:make_mlp \\\n"
        "      --module-kwargs '{\"widths\": [64, 64]}' --input-dim 3\n"
        "  nnderiv check --checkpoint runs/surrogate.msgpack   # architecture from runs/surrogate.json\n"
        "  nnderiv check --model my_model.json --float32 --json"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nnderiv`` command (no side effects)."""
    from .. import __version__
    from .. import bench as _bench

    parser = argparse.ArgumentParser(
        prog="nnderiv",
        description="All input derivatives up to order 3 of trained Flax MLPs: cross-checks and timings.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "compare": "every method against nested AD on random points: agreement and speed",
        "check": "check that every method gives the same derivatives of a model (e.g. a saved checkpoint)",
    }
    for command, default_points in (("compare", 256), ("check", 64)):
        _add_run_parser(sub, command, helps[command], default_points)

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


def _add_run_parser(sub, command: str, help_text: str, default_points: int) -> None:
    """``compare`` and ``check``: the same options (compare adds --repeats)."""
    p = sub.add_parser(
        command,
        help=help_text,
        description=textwrap.fill(_DESCRIPTIONS[command] + _COMMON, width=88),
        epilog=_EPILOGS[command],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("model (default: the bundled model)")
    source.add_argument(
        "--model",
        default="bundled",
        help="'bundled' (default: the MLP shipped with nnderiv) or a JSON metadata file with its .msgpack "
        "parameters beside it (the files nnderiv.save_checkpoint writes for a .msgpack path)",
    )
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="instead of --model: a checkpoint written by nnderiv.save_checkpoint (an orbax directory or a "
        ".msgpack file)",
    )
    source.add_argument(
        "--module",
        metavar="PKG.MODULE:FACTORY",
        help="with --checkpoint: a callable (a Flax module class or a function returning a linen or nnx module) "
        "imported from a module on the Python path or the current directory, or FILE.py:FACTORY. Without it the "
        "architecture comes from the checkpoint's metadata (keys widths, output_dim, activation: the schema of "
        "nnderiv.module_from_metadata)",
    )
    source.add_argument(
        "--module-kwargs", metavar="JSON", default="{}", help="keyword arguments for --module, as a JSON object"
    )
    source.add_argument(
        "--input-dim",
        type=_positive_int,
        default=None,
        help="the number of inputs of a linen --module (default: from the metadata or the checkpoint's shapes)",
    )
    p.add_argument(
        "--points",
        "--batch",
        dest="points",
        type=_positive_int,
        default=default_points,
        help=f"number of random points (default {default_points})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    p.add_argument("--order", type=int, choices=(0, 1, 2, 3), default=3, help="highest order (default 3)")
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="one tolerance for every field, on the deviation relative to the field's largest entry "
        "(default: the package's table by dtype and order)",
    )
    p.add_argument("--float32", action="store_true", help="compute in float32 (default: float64, with jax_enable_x64)")
    if command == "compare":
        p.add_argument(
            "--repeats", type=_positive_int, default=25, help="timed calls per measurement; the median is reported"
        )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=_run_command)


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


def _run_command(args: argparse.Namespace) -> int:
    import jax

    try:
        module_kwargs = json.loads(args.module_kwargs)
    except json.JSONDecodeError as err:
        raise CommandError(f"--module-kwargs is not valid JSON: {err}") from None
    if not isinstance(module_kwargs, dict):
        raise CommandError(f"--module-kwargs must be a JSON object, got {args.module_kwargs!r}")
    # A context, not jax.config.update: main() can be called from a running program
    # (or twice, with and without --float32) without changing its global configuration.
    with jax.enable_x64(not args.float32):
        report = run(
            args.command,
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
            repeats=getattr(args, "repeats", None),
        )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report)
    return 0 if report["ok"] else 1


def _bench_command(args: argparse.Namespace) -> int:
    from .. import bench as _bench

    return _bench.run(args, args.argv[1:])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
