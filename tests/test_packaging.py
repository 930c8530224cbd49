"""Packaging facts, checked by behaviour rather than by grepping for strings.

* The runtime requirements in ``pyproject.toml`` are exactly the distributions the package
  imports; the examples, the notebooks and the tests get the rest from the extras.
* ``.ci/run`` runs the README's test command: both are executed with stub ``python3`` /
  ``python`` programs that record what they were asked to do, and the records must agree.
* The console script of the README's first command resolves to the CLI.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (``"jax>=0.4"`` -> ``"jax"``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _extra(name: str, seen: frozenset = frozenset()) -> set[str]:
    """The distributions an extra brings, following ``nnderiv[other]`` self-references."""
    out = set()
    for req in PYPROJECT["project"]["optional-dependencies"][name]:
        match = re.fullmatch(r"nnderiv\[([a-z,]+)\]", req)
        if match:
            for other in match.group(1).split(","):
                if other not in seen:
                    out |= _extra(other, seen | {name})
        else:
            out.add(_name(req))
    return out


def _imports_of_source(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _imports(paths) -> set[str]:
    names = set()
    for path in paths:
        if path.suffix == ".ipynb":
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            for cell in cells:
                if cell["cell_type"] == "code":
                    source = "".join(cell["source"])
                    code = [line for line in source.splitlines() if not line.startswith(("%", "!"))]  # magics
                    names |= _imports_of_source("\n".join(code))
        else:
            names |= _imports_of_source(path.read_text(encoding="utf-8"))
    return names - set(sys.stdlib_module_names) - {"__future__", "nnderiv", "tests"}


def _distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide the top-level ``modules``."""
    providers = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in providers)
    assert not missing, f"imported but provided by no installed distribution: {missing}"
    # jax and jaxlib both provide "jax"-named modules; a module maps to every provider.
    return {_name(d) for m in modules for d in providers[m] if _name(d) != "nnderiv"}


def _runtime() -> set[str]:
    return {_name(r) for r in PYPROJECT["project"]["dependencies"]}


def test_runtime_requirements_are_what_the_package_imports():
    modules = _imports(p for p in (ROOT / "nnderiv").rglob("*.py"))
    imported = _distributions(modules)
    # jaxlib is imported as jaxlib (and "jax" names it too); orbax-checkpoint provides "orbax".
    assert imported - _runtime() == set(), "the package imports these, but pyproject does not require them"
    assert _runtime() - imported == set(), "pyproject requires these, but the package never imports them"


def test_examples_notebooks_and_tests_get_their_imports_from_the_test_extra():
    """``pip install -e ".[test]"`` is the README's whole set-up for the suite, which runs the examples
    and notebooks: everything they import comes with it."""
    paths = [*(ROOT / "examples").glob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "tests").glob("*.py")]
    needed = _distributions(_imports(paths))
    available = _runtime() | _extra("test")
    # ipykernel runs the notebooks; nbclient/nbformat are imported by the tests themselves.
    assert needed - available == set()
    assert {"optax", "matplotlib"} <= _extra("examples") and not {"optax", "matplotlib"} & _runtime()


_STUB_PYTHON = """#!/usr/bin/env bash
# Records its arguments; "-m venv DIR" makes DIR/bin/activate putting a recording "python" first on PATH.
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    echo "export PATH=\\"$(cd "$3" && pwd)/bin:\\$PATH\\"" > "$3/bin/activate"
fi
"""


def _record(tmp_path: Path, name: str, argv: list[str], cwd: Path) -> list[str]:
    stubs = tmp_path / f"stubs-{name}"
    stubs.mkdir()
    (stubs / "python3").write_text(_STUB_PYTHON)
    (stubs / "python3").chmod(0o755)
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def _readme_command(marker: str) -> str:
    lines = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if marker in line]
    commands = [line for line in lines if line.startswith("python3 -m venv")]
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_runs_the_readme_test_command(tmp_path):
    repo = tmp_path / "repo"  # .ci/run cds to its parent folder: run a copy, not the checkout
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_bytes((ROOT / ".ci" / "run").read_bytes())
    ci = _record(tmp_path, "ci", ["bash", str(repo / ".ci" / "run")], cwd=tmp_path)
    readme_dir = tmp_path / "readme"
    readme_dir.mkdir()
    readme = _record(tmp_path, "readme", ["bash", "-c", _readme_command('".[test]"')], cwd=readme_dir)
    assert ci == readme
    assert ci == ["python3 -m venv .venv", "python -m pip install -e .[test]", "python -m pytest -q"]


def test_readme_main_command_runs_the_console_script():
    words = shlex.split(_readme_command("nnderiv compare").split("&&")[-1])
    assert words == ["nnderiv", "compare"]
    target = PYPROJECT["project"]["scripts"]["nnderiv"]
    module, _, attr = target.partition(":")
    main = getattr(__import__(module, fromlist=[attr]), attr)
    from nnderiv.cli import build_parser

    assert main is __import__("nnderiv.cli", fromlist=["main"]).main
    assert build_parser().parse_args(words[1:]).command == "compare"
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
