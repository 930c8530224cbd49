"""``nnderiv check``: every method against nested AD on the bundled model or a saved checkpoint.

``check`` and ``compare`` share one run loop (``nnderiv.cli.run``): the model options,
the method list and the judgement tested here hold for both; tests/test_examples.py
runs ``compare`` for its timings.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

import nnderiv
from nnderiv import cli
from nnderiv._tolerance import RTOL
from nnderiv.methods import METHODS

from . import _models

ALL = list(nnderiv.METHODS)  # every method, auto included: the list comes from the methods table
FACTORY = "tests._models:checkpoint_mlp"
WIDTHS_8_8 = '{"widths": [8, 8]}'


def _check(capsys, *argv):
    """(exit status, parsed JSON report or None, stderr) of ``nnderiv check ARGV --json``."""
    status = cli.main(["check", *argv, "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out) if captured.out.strip() else None
    return status, report, captured.err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking MLP (2 -> 8 -> 8 -> 1, tanh) saved in both formats, with a domain."""
    root = tmp_path_factory.mktemp("check")
    case = _models.linen_mlp(2, [8, 8], 1, "tanh", seed=5)
    meta = {"domain": [[-2.0, 2.0], [0.0, 1.0]], "input_dim": 2}
    return {
        "orbax": nnderiv.save_checkpoint(root / "ckpt", case.variables, metadata=meta),
        # With the architecture in the metadata (the format of compare --model): no --module needed.
        "msgpack": nnderiv.save_checkpoint(
            root / "model.msgpack",
            case.variables,
            metadata={**meta, "widths": [8, 8], "output_dim": 1, "activation": "tanh"},
        ),
    }


def test_bundled_passes(capsys):
    status, report, err = _check(capsys, "--points", "8")
    assert status == 0 and report["ok"], err
    assert [row["method"] for row in report["methods"]] == ALL
    assert report["model"]["name"] == "MLP" and report["model"]["mlp"]
    assert report["command"] == "check" and report["forward_pass"] is None  # no timings
    assert report["points"] == 8 and report["dtype"] == "float64" and report["domain"] == "uniform in [-1, 1]^3"
    for row in report["methods"]:
        assert row["status"] == "ok"
        assert set(row["per_field"]) == {"value", "jacobian", "hessian", "third"}
        assert 0 <= row["max_rel_dev"] <= 1e-12, row  # rounding only
        assert "compile_s" not in row
    assert {row["method"]: row for row in report["methods"]}["nested"]["max_rel_dev"] == 0.0  # the reference
    assert report["methods"][0]["resolved"] in {"forward", "fwdrev", "fwdadj", "nested"}  # what auto ran


def test_checkpoint_with_module_factory(capsys, saved):
    status, report, err = _check(
        capsys, "--checkpoint", str(saved["orbax"]), "--module", FACTORY, "--module-kwargs", WIDTHS_8_8,
        "--points", "6", "--order", "2", "--seed", "3",
    )  # fmt: skip
    assert status == 0 and report["ok"], err
    assert report["model"]["source"] == str(saved["orbax"]) and report["model"]["input_dim"] == 2
    assert report["domain"] == "uniform in [-2, 2] x [0, 1]"
    assert all(set(row["per_field"]) == {"value", "jacobian", "hessian"} for row in report["methods"])


def test_checkpoint_architecture_from_metadata(capsys, saved):
    status, report, err = _check(
        capsys, "--checkpoint", str(saved["msgpack"]), "--points", "4", "--float32", "--order", "2"
    )
    assert status == 0 and report["ok"], err
    assert report["dtype"] == "float32"
    assert report["rtol"] == dict(zip(["value", "jacobian", "hessian"], RTOL["float32"]))  # the package's table
    # The same files also work as compare's --model format.
    status, report, err = _check(
        capsys, "--model", str(saved["msgpack"].with_suffix(".json")), "--points", "4", "--order", "1"
    )
    assert status == 0 and report["ok"], err


def test_not_an_mlp_runs_the_analytic_family_on_the_engine(capsys, tmp_path):
    module = _models.NormMLP()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    path = nnderiv.save_checkpoint(tmp_path / "norm.msgpack", variables)
    status, report, err = _check(
        capsys, "--checkpoint", str(path), "--module", "tests._models:NormMLP", "--points", "4", "--order", "2"
    )
    assert status == 0 and report["ok"], err
    assert not report["model"]["mlp"]
    assert report["domain"] == "standard normal"  # no metadata
    statuses = {row["method"]: row["status"] for row in report["methods"]}
    # A LayerNorm is no layer of an MLP, but every primitive in it has a rule: the engine runs it.
    # fwdadj, the native kernel's alone, runs forward's algorithm there.
    assert statuses == {
        "auto": "ok", "analytic": "ok", "forward": "ok", "fwdrev": "ok", "fwdadj": "ok", "jet": "ok", "nested": "ok"
    }  # fmt: skip
    assert report["methods"][0]["resolved"] in ("forward", "fwdrev", "nested")


def test_a_primitive_without_a_forward_rule_skips_forward_and_analytic_runs_fwdrev(capsys, tmp_path):
    module = _models.CumprodMLP()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    path = nnderiv.save_checkpoint(tmp_path / "cumprod.msgpack", variables)
    status, report, err = _check(
        capsys, "--checkpoint", str(path), "--module", "tests._models:CumprodMLP", "--points", "4", "--order", "2"
    )
    assert status == 0 and report["ok"], err
    statuses = {row["method"]: row["status"] for row in report["methods"]}
    # cumprod has no forward rule; the program of its jacrev (cumsums and products) has
    # and "analytic" runs that one
    assert statuses == {"auto": "ok", "analytic": "ok", "forward": "skipped", "fwdrev": "ok", "fwdadj": "skipped",
                        "jet": "ok", "nested": "ok"}  # fmt: skip
    assert all("cumprod" in row["reason"] for row in report["methods"] if row["status"] == "skipped")
    assert report["methods"][0]["resolved"] in ("fwdrev", "nested")  # what the engine can run, or nested AD


def test_disagreement_exits_1(capsys, monkeypatch):
    exact_jet = METHODS["jet"]

    def perturbed_jet(net, x, order):
        # A method that is wrong in the 6th digit of its third derivatives only.
        d = exact_jet(net, x, order)
        return d._replace(third=d.third * (1 + 1e-6))

    # derivatives() looks the method up in this table at call time.
    monkeypatch.setitem(METHODS, "jet", perturbed_jet)
    status, report, _ = _check(capsys, "--points", "4")
    assert status == 1 and not report["ok"]
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["jet"]["status"] == "FAIL"
    assert 1e-7 < rows["jet"]["per_field"]["third"] < 1e-5
    assert rows["jet"]["per_field"]["hessian"] < 1e-12  # only the perturbed field is off
    assert all(rows[m]["status"] == "ok" for m in ALL if m != "jet")
    # The table says so too (printed from the same report: no second run).
    cli.print_report(report)
    out = capsys.readouterr().out
    assert "FAIL" in out and "some methods disagree" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--checkpoint", "no/such/ckpt", "--module", FACTORY], "no checkpoint at no/such/ckpt"),
        (["--checkpoint", "{orbax}", "--module", "no_such_package.models:make"], "could not import no_such_package"),
        (["--checkpoint", "{orbax}", "--module", "tests._models:no_such_factory"], "has no callable 'no_such_factory'"),
        (["--checkpoint", "{orbax}", "--module", "tests._models"], "must look like pkg.module:Factory"),
        (["--checkpoint", "{orbax}", "--module", FACTORY, "--module-kwargs", "{widths: 8}"], "not valid JSON"),
        (["--checkpoint", "{orbax}", "--module", FACTORY, "--module-kwargs", '{"depth": 3}'], "unexpected keyword"),
        (["--checkpoint", "{orbax}"], "pass --module pkg.module:Factory"),  # no architecture in its metadata
        (
            ["--checkpoint", "{orbax}", "--module", FACTORY, "--module-kwargs", '{"widths": [8, 9]}'],
            r"params/Dense_1/kernel: shape \(8, 8\) in the checkpoint, the module expects \(8, 9\)",
        ),
        (
            ["--checkpoint", "{orbax}", "--module", FACTORY, "--module-kwargs", WIDTHS_8_8, "--input-dim", "5"],
            r"params/Dense_0/kernel: shape \(2, 8\) in the checkpoint, the module expects \(5, 8\)",
        ),
        (["--module", FACTORY], "pass --checkpoint PATH"),
        (["--model", "no-such-model.json"], "neither 'bundled' nor a JSON file"),
    ],
    ids=[
        "missing-path", "not-importable", "no-factory", "bad-spec", "bad-json", "bad-kwargs", "no-architecture",
        "wrong-width", "wrong-input", "module-without-checkpoint", "missing-model",
    ],
)  # fmt: skip
def test_usage_errors_exit_2(capsys, saved, argv, message):
    import re

    argv = [a.replace("{orbax}", str(saved["orbax"])) for a in argv]
    status, report, err = _check(capsys, *argv)
    assert status == 2 and report is None
    assert err.startswith("nnderiv check: error: ") and "Traceback" not in err
    assert re.search(message, err), err
