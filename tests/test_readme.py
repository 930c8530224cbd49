"""The README's quick start runs as written and shows what it says it shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- quickstart:begin -->\s*```python\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    assert match, "README.md lost its quick start block"
    return match.group(1)


def test_readme_quickstart_runs_and_verifies():
    result = subprocess.run(
        [sys.executable, "-c", _quickstart()], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    agreement = float(lines[0])
    assert agreement < 1e-12  # analytic kernel vs nested AD, relative to each tensor's largest entry
    gradient_norm = float(lines[-1].split()[-1])
    assert gradient_norm < 1e-10  # Halley's iteration converged to a stationary point of V


def test_the_engines_primitive_table_names_only_primitives_it_has_rules_for():
    from nnderiv._taylor import _rules

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\| (linear|products|unary|piecewise|no derivative)", line)]
    assert len(rows) == 5, "README.md lost rows of the engine's primitive table"
    have = {getattr(p, "name", str(p)) for p in _rules.RULES}
    named = {name for row in rows for name in re.findall(r"`([a-z_0-9]+)`", row.split("|")[2])}
    assert named and named <= have, f"the table names primitives without a rule: {sorted(named - have)}"
    refused = next(line for line in text.splitlines() if line.startswith("| **refused**"))
    for name in re.findall(r"`([a-z_0-9]+)`", refused.split("|")[2]):
        assert name in ("while", "scan", "cond", "gather", "dynamic_slice") or name not in have, name
