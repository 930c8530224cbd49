"""The examples and the command line run, at small sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nnderiv import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_compare_json(capsys):
    """compare: the report of the one run loop (as check's), with timings for every method."""
    import nnderiv

    status = cli.main(["compare", "--batch", "8", "--repeats", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"] and report["command"] == "compare"
    assert [row["method"] for row in report["methods"]] == list(nnderiv.METHODS)
    assert report["points"] == 8 and report["repeats"] == 2
    assert report["forward_pass"]["per_point_us"] > 0
    for row in report["methods"]:
        assert row["status"] == "ok", row
        assert row["compile_s"] > 0 and row["per_point_us"] > 0 and row["single_point_us"] > 0
        assert row["relative_to_forward"] == row["per_point_us"] / report["forward_pass"]["per_point_us"]
        assert set(row["per_field"]) == {"value", "jacobian", "hessian", "third"}


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:  # argparse rejects the value itself
        cli.main(["compare", "--batch", "0"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    assert cli.main(["compare", "--model", "no-such-model.json"]) == 2


@pytest.mark.parametrize("script,args", [("quickstart.py", ["--steps", "60"])])
def test_example_scripts_run(script, args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _run_example_json(script: str, *args: str) -> dict:
    """Run ``examples/<script> --quiet --json *args``; its JSON summary (the script must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quiet", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout)


def test_simulation_example_small():
    report = _run_example_json("simulation.py", "--steps", "1000", "--starts", "16", "--repeats", "1")
    assert report["grad_norm_eq"] < 1e-10 and report["starts_at_eq"] >= 1  # Halley converged to a minimum
    assert report["halley_iterations_median"] <= report["newton_iterations_median"]
    assert 0 < report["omega"][0] <= report["omega"][1] <= report["omega"][2]
    # auto and nested give the same trajectory; the third tensor makes the integrator better.
    assert report["path_deviation"] < 1e-10
    assert report["energy_error"] < 1e-8 < report["energy_error_no_third"]
    assert report["us_per_step"]["auto"] > 0 and report["us_per_step"]["nested"] > 0


def test_pinn_kdv_example_small():
    report = _run_example_json("pinn_kdv.py", "--steps", "40", "--points", "128", "--width", "16", "--depth", "2")
    assert report["u_xxx_max_rel_dev"] < 1e-10  # analytic u_xxx == nested AD's
    assert report["exact_max_residual"] < 1e-10  # the residual code vanishes on the exact soliton
    assert report["final_loss"] < report["initial_loss"]
    assert 0 < report["rel_l2"] < 10


def test_train_surrogate_example(tmp_path):
    """examples/train_surrogate.py at a tiny size: it trains, logs, saves, reloads and checks."""
    import nnderiv

    from . import _models

    out = tmp_path / "surrogate"
    args = ["--steps", "40", "--width", "8", "--depth", "1", "--out", str(out), "--quiet"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_surrogate.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "bit-identical derivatives: True" in result.stdout
    checkpoint = out / "checkpoint"
    assert checkpoint.is_dir() and (out / "loss_log.csv").is_file()
    log = (out / "loss_log.csv").read_text().splitlines()
    assert log[0] == "step,phase,loss,elapsed_s" and log[-1].startswith("40,lbfgs,")
    meta = nnderiv.checkpoint_metadata(checkpoint)
    assert meta["widths"] == [8] and meta["input_dim"] == 3 and len(meta["domain"]) == 3
    errors = json.loads((out / "errors.json").read_text())["relative_error_by_order"]
    assert sorted(errors) == ["0", "1", "2", "3"]
    # The checkpoint loads into a module of the recorded architecture, from this process too.
    net = nnderiv.from_checkpoint(_models.checkpoint_mlp(widths=meta["widths"]), checkpoint)
    assert net.input_dim == 3
    variables = nnderiv.load_checkpoint(checkpoint, _models.checkpoint_mlp(widths=meta["widths"]))
    assert variables["params"]["Dense_0"]["kernel"].shape == (3, 8)
    assert variables["params"]["Dense_0"]["kernel"].dtype == "float64"
