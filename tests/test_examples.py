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
    status = cli.main(["compare", "--batch", "8", "--repeats", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"]
    methods = (
        {row["method"] for row in report["methods"]} if isinstance(report["methods"], list) else set(report["methods"])
    )
    assert {"analytic", "jet", "nested"} <= {m.split(" ")[0] for m in methods}


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
