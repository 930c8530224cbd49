"""Execute the notebooks in ``notebooks/`` at reduced size and check their key outputs.

Each notebook has a first code cell tagged ``parameters`` (``SMALL = False``, ``BENCH_JSON =
None``); like papermill, we insert a cell right after it that overrides those values, run
the notebook top to bottom in a fresh kernel, and never write the result back: the
committed notebooks keep their full-size outputs.

The kernel is the interpreter running the tests (``sys.executable``), not whatever
``python3`` kernel a user has registered: we write a throwaway kernelspec for it and put
it first on ``JUPYTER_PATH``. That works the same in a fresh CI virtualenv, where
``pip install -e ".[test]"`` brings nbclient, nbformat and ipykernel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "benchmarks" / "results"
KERNEL_NAME = "nnderiv-tests"
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """The name of a kernelspec that runs this interpreter, visible only to this test."""
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL_NAME


def run_notebook(name: str, kernel_name: str, overrides: str):
    """Execute ``notebooks/<name>`` with ``overrides`` injected after its parameters cell.

    Runs in the notebooks folder (the notebooks find the repository by relative paths) and
    returns the executed notebook; a cell that raises fails the test with its traceback.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged, f"{name} has no cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def stdout_of(nb) -> str:
    """Everything the notebook printed."""
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def count_images(nb) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.parametrize("name", ["accuracy.ipynb", "speed.ipynb", "walkthrough.ipynb"])
def test_committed_notebook_is_executed(name):
    """The notebooks are committed with their full-size outputs, so that they read without running."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{name}: run it and save it with outputs"
    assert not any(out.output_type == "error" for cell in code for out in cell.outputs), f"{name} has an error output"
    assert count_images(nb) >= 1
    assert path.stat().st_size < 1_500_000, f"{name} is {path.stat().st_size} bytes; lower the figure dpi"


def test_accuracy_notebook(kernel):
    nb = run_notebook("accuracy.ipynb", kernel, "SMALL = True")
    text = stdout_of(nb)
    # The notebook's last cell asserts these bounds itself; check that it got there.
    assert "worst float64 relative error" in text and "worst float32 relative error" in text
    for method in ("analytic", "forward", "fwdrev", "jet", "nested"):
        assert method in text
    assert count_images(nb) >= 2  # error per order, heatmaps


def small_bench_json(path: Path) -> Path:
    """A few entries of the newest committed benchmark run: enough for every plot, quick to read.

    Keeps the sweeps around the base configuration (about half the grid) in every dtype,
    all latency and scan entries and the summary: the real schema, in a smaller file.
    """
    runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("*.json"))]
    runs = [run for run in runs if run.get("mode") == "full" and run.get("grid")]  # not latency-only runs
    if not runs:
        pytest.skip("no full benchmark run in benchmarks/results")
    bench = max(runs, key=lambda run: run.get("created", ""))
    base = {"m": 3, "width": 64, "depth": 3, "n": 1, "batch": 1024, "activation": "tanh"}

    def differs_in_at_most_one(entry):
        return sum(entry[key] != value for key, value in base.items()) <= 1

    bench["grid"] = [e for e in bench["grid"] if differs_in_at_most_one(e)]
    path.write_text(json.dumps(bench))
    return path


def test_speed_notebook(kernel, tmp_path):
    bench_json = small_bench_json(tmp_path / "bench-small.json")
    nb = run_notebook("speed.ipynb", kernel, f"BENCH_JSON = {str(bench_json)!r}")
    text = stdout_of(nb)
    assert "bench-small.json" in text
    assert "geometric-mean speedup of auto over the best built-in" in text
    dtypes = json.loads(bench_json.read_text())["dtypes"]
    assert count_images(nb) >= len(dtypes) + 1  # sweeps (one per dtype of the run), speedups


def test_walkthrough_notebook(kernel):
    nb = run_notebook("walkthrough.ipynb", kernel, "SMALL = True")
    text = stdout_of(nb)
    assert "affine 2 -> 64" in text  # the checkpoint was loaded and wrapped
    assert "speedup of auto over nested" in text
    # Every method agrees with nested AD on the loaded network: lines "<method>: value 0.0e+00 ... third 4.4e-16".
    deviations = [float(x) for x in re.findall(r"(?:value|jacobian|hessian|third) (\d\.\de[-+]\d+)", text)]
    assert len(deviations) == 5 * 4 and max(deviations) < 1e-10, text
