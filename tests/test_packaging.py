"""The README's commands and CI stay in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = [line for line in ci if "pytest" in line and not line.startswith("#")]
    assert len(command) == 1, command
    assert command[0] in (ROOT / "README.md").read_text(), "README's test command differs from .ci/run"


def test_readme_main_job_uses_the_console_script():
    readme = (ROOT / "README.md").read_text()
    assert "nnderiv compare" in readme
    assert "[project.scripts]" in (ROOT / "pyproject.toml").read_text()
