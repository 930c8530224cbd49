r"""The one run loop of ``nnderiv compare`` and ``nnderiv check``, on the public API only.

:func:`run` loads the model, draws the points, runs every method of
:data:`nnderiv.METHODS` (for ``compare`` also timing each) and judges each against nested
AD with the package's one metric and tolerance table (:mod:`nnderiv._tolerance`): per
field (value, Jacobian, Hessian, third),
:math:`\max |d_\text{method} - d_\text{nested}| / \max |d_\text{nested}|` over all points
and entries, within the field's tolerance for the dtype (or ``--rtol`` for all fields).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import nnderiv

from .. import _tolerance
from ._load import CommandError, domain_points, load

REFERENCE = "nested"
FIELDS = _tolerance.FIELDS


def _error_text(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` (results awaited with ``block_until_ready``); call once before."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn: Callable[[Any], Any], x, repeats: int) -> tuple[Any, dict[str, float]]:
    """``fn(x)`` and the timings of a jitted ``fn``: compile, per point in the batch, one point."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))  # warm-up: trace and compile for the batch shape
    compile_s = time.perf_counter() - start
    one = x[0]
    jax.block_until_ready(fn(one))  # warm-up for the single-point shape
    batch_s = _median_seconds(lambda: fn(x), repeats)
    single_s = _median_seconds(lambda: fn(one), repeats)
    return out, {
        "compile_s": compile_s,
        "per_point_us": batch_s / x.shape[0] * 1e6,
        "batch_us": batch_s * 1e6,
        "single_point_us": single_s * 1e6,
    }


def _auto_choice(net, m: int, dtype, order: int) -> str | None:
    try:
        return nnderiv.methods.choose(net, m, dtype, order)
    except Exception:  # noqa: BLE001 - informational only
        return None


def run(
    command: str,
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
    repeats: int | None = None,
) -> dict[str, Any]:
    """Every method of :data:`nnderiv.METHODS` against nested AD on one model: the report.

    ``repeats=None`` (``check``) runs each method once; a number (``compare``) also times
    each: compile time, median time per point in the batch and for a single point,
    over ``repeats`` calls, and the same for the plain jitted forward pass.

    Call it with x64 enabled for float64 (as the commands do). Raises
    :class:`CommandError` for a model that cannot be loaded.

    Returns:
      A JSON-serialisable dict: ``command``, ``model``, ``dtype``, ``device``, ``points``,
      ``domain``, ``seed``, ``order``, ``rtol`` (per field), ``reference``, ``repeats``,
      ``forward_pass`` (timings, or None), ``methods`` (one row per method: ``status``
      ``"ok"``, ``"FAIL"``, ``"error"`` or ``"skipped"``, ``reason``, ``max_rel_dev``,
      ``worst_field``, ``per_field``, the timings, and for ``auto`` the method it ran,
      ``resolved``) and ``ok``.

    Example:
      >>> import jax
      >>> from nnderiv.cli import run
      >>> with jax.enable_x64(True):
      ...     report = run("check", points=4, order=2)
      >>> report["ok"], [(row["method"], row["status"]) for row in report["methods"]][:2]
      (True, [('auto', 'ok'), ('analytic', 'ok')])
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(jnp.float32 if float32 else jnp.float64)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs jax_enable_x64: wrap the call in `with jax.enable_x64(True):`")
    try:
        net, meta = load(
            model=model, checkpoint=checkpoint, module=module, module_kwargs=module_kwargs, input_dim=input_dim,
            dtype=dtype,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:  # a metadata file that does not describe the parameters
        raise CommandError(f"{checkpoint or model}: {_error_text(err)}") from None
    m = net.input_dim
    if m is None:
        raise CommandError("the model's input size could not be inferred; pass --input-dim")
    x, domain = domain_points(meta, m, points, seed, dtype)
    try:
        jax.eval_shape(net, jax.ShapeDtypeStruct((1, m), dtype))
    except Exception as err:  # noqa: BLE001 - the model cannot even be traced
        raise CommandError(f"the model cannot be evaluated on inputs of size {m}: {_error_text(err)}") from None

    forward_pass = None
    if repeats is not None:
        forward = jax.jit(lambda net, u: net(u))
        forward_pass = _timed(lambda u: forward(net, u), x, repeats)[1]

    outputs: dict[str, Any] = {}
    rows = []
    for method in nnderiv.METHODS:
        row: dict[str, Any] = {"method": method}
        if method == "auto":
            row["resolved"] = _auto_choice(net, m, dtype, order)
        derivs = nnderiv.derivs_fn(net, order, method)
        try:
            if repeats is None:
                outputs[method] = jax.block_until_ready(derivs(x))
            else:
                outputs[method], timings = _timed(derivs, x, repeats)
                row.update(timings)
                if forward_pass is not None:
                    row["relative_to_forward"] = row["per_point_us"] / forward_pass["per_point_us"]
        except nnderiv.UnsupportedModelError as err:
            row.update(status="skipped", reason=f"unsupported by the engine: {str(err).splitlines()[0]}")
        except Exception as err:  # noqa: BLE001 - reported, and fails the run
            row.update(status="error", reason=_error_text(err))
        rows.append(row)

    reference = outputs.get(REFERENCE)
    for row in rows:
        out = outputs.get(row["method"])
        if out is None:
            continue
        if reference is None:
            row.update(status="error", reason=f"no {REFERENCE} reference")
            continue
        per_field = _tolerance.deviation(out, reference)
        finite = all(bool(jnp.all(jnp.isfinite(f))) for f in out if f is not None)
        worst = max(per_field, key=per_field.get)
        row.update(
            status="ok" if finite and _tolerance.agrees(per_field, dtype, rtol) else "FAIL",
            max_rel_dev=per_field[worst],
            worst_field=worst if per_field[worst] > 0 else None,
            per_field=per_field,
        )
        if not finite:
            row["reason"] = "non-finite values"
        elif row["method"] == REFERENCE:
            row["reason"] = "the reference"
    checked = [row for row in rows if row["status"] != "skipped"]
    try:
        description = net.describe(dtype=dtype)
    except Exception as err:  # noqa: BLE001
        description = f"(describe failed: {_error_text(err)})"
    return {
        "command": command,
        "model": {
            "source": meta.get("source"),
            "name": net.spec.name,
            "description": description,
            "input_dim": m,
            "output_dim": None if reference is None else int(reference.value.shape[-1]),
            "mlp": "not an MLP" not in description,
            "target": meta.get("target"),
        },
        "dtype": dtype.name,
        "device": str(jax.devices()[0]),
        "points": points,
        "domain": domain,
        "seed": seed,
        "order": order,
        "rtol": {
            name: rtol if rtol is not None else _tolerance.rtol(dtype, k) for k, name in enumerate(FIELDS[: order + 1])
        },
        "reference": REFERENCE,
        "repeats": repeats,
        "forward_pass": forward_pass,
        "methods": rows,
        "ok": bool(checked) and all(row["status"] == "ok" for row in checked),
    }


def print_report(report: dict[str, Any]) -> None:
    """The report as tables (the same for ``compare`` and ``check``; timings when there are any)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    model = report["model"]
    console.print(
        f"[bold]model[/bold] {model['name']} ({model['source']}): m={model['input_dim']}, n={model['output_dim']}, "
        f"{'an MLP' if model['mlp'] else 'not an MLP'}",
        highlight=False,
    )
    console.print(model["description"], highlight=False)
    console.print(
        f"{report['points']} points ({report['domain']}, seed {report['seed']}), order {report['order']}, "
        f"{report['dtype']} on {report['device']}",
        highlight=False,
    )
    timed = report["forward_pass"] is not None
    if timed:
        fwd = report["forward_pass"]
        console.print(
            f"median of {report['repeats']} calls; plain jitted forward pass: {fwd['per_point_us']:.3f} µs/point "
            f"in the batch, {fwd['single_point_us']:.1f} µs for one point",
            highlight=False,
        )
    fields = list(report["rtol"])
    table = Table(
        title=f"relative deviation from {report['reference']} AD, derivatives up to order {report['order']}",
        caption="per field: max |method - nested| / max |nested| over all points and entries"
        + ("; × fwd: µs/pt over the forward pass's" if timed else ""),
    )
    table.add_column("method", no_wrap=True)
    for field in fields:
        table.add_column(field, justify="right", no_wrap=True)
    timing_columns = [
        ("µs/pt batch", "per_point_us", 3), ("× fwd", "relative_to_forward", 1),
        ("µs 1 pt", "single_point_us", 1), ("compile s", "compile_s", 2),
    ]  # fmt: skip
    for label, _, _ in timing_columns if timed else []:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in report["methods"]:
        name = row["method"] + (f" ({row['resolved']})" if row.get("resolved") else "")
        per_field = row.get("per_field", {})
        cells = [f"{per_field[f]:.2e}" if f in per_field else "-" for f in fields]
        cells += [f"{row[key]:.{digits}f}" if key in row else "-" for _, key, digits in timing_columns] if timed else []
        color = {"ok": "green", "skipped": "yellow"}.get(row["status"], "red")
        label = f"[{color}]{row['status']}[/{color}]" + (f" ({row['reason']})" if row.get("reason") else "")
        table.add_row(name, *cells, label)
    console.print(table)
    tolerances = ", ".join(f"{f} {t:g}" for f, t in report["rtol"].items())
    verdict = "[green]all methods agree[/green]" if report["ok"] else "[red]some methods disagree or failed[/red]"
    console.print(f"{verdict} with {report['reference']} (tolerances: {tolerances})")
