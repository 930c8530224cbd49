"""The benchmark script runs end to end (``--quick``) and writes a well-formed report.

No timing assertions: only structure, and that every method agreed with nested AD.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

import nnderiv
from nnderiv import cli
from nnderiv.bench import _suite as bench


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick run through the ``nnderiv bench`` command, JSON on stdout and in the file.

    Float64 only: the harness is the same code for both dtypes, and a second dtype doubles
    the compilations (about a minute of CI); test_float32 covers the methods in float32.
    """
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["bench", "--quick", "--dtype", "float64", "--json", "--out", str(out)])
    report = json.loads(out.read_text())
    assert json.loads(stdout.getvalue()) == report
    return status, report


def _ok_timing(rec, per):
    assert rec["status"] == "ok", rec
    assert rec["median_s"] > 0 and rec["iqr_s"] >= 0 and rec["repeats"] >= 1
    assert rec["q25_s"] <= rec["median_s"] <= rec["q75_s"]
    assert rec[per] > 0


def test_quick_run_succeeds_and_all_methods_agree(quick_report):
    status, report = quick_report
    summary = report["summary"]
    assert summary["errors"] == []
    assert summary["disagreements"] == []
    assert summary["all_agree"] is True
    assert status == 0


def test_report_header(quick_report):
    _, report = quick_report
    assert report["schema"] == bench.SCHEMA
    assert report["mode"] == "quick"
    assert report["complete"] is True
    assert report["dtypes"] == ["float64"]
    assert report["nnderiv_methods"] == list(nnderiv.METHODS)
    assert report["methods"] == [*nnderiv.METHODS, "baseline"]
    machine = report["machine"]
    for key in ("platform", "cpu_model", "cores", "jax", "device_kind", "backend"):
        assert key in machine
    assert machine["cores"] >= 1
    for dtype in report["dtypes"]:
        gemm = report["gemm"][dtype]
        assert gemm["flop_per_s"] > 0 and gemm["flops"] == 2 * 8192 * 256 * 256
    assert report["elapsed_s"] > 0


def test_grid_entries(quick_report):
    _, report = quick_report
    grid = report["grid"]
    assert len(grid) == len(bench.quick_grid())
    for entry in grid:
        assert entry["dtype"] in ("float64", "float32")
        for key in ("m", "n", "width", "depth", "batch", "activation", "name", "auto_choice"):
            assert key in entry
        assert set(entry["results"]) == set(report["methods"])
        for method, rec in entry["results"].items():
            _ok_timing(rec, "per_point_s")  # quick configs are small: nothing is skipped
            check = entry["check"][method]
            assert check["agree"] is True
            assert set(check["per_field"]) == {"value", "jacobian", "hessian", "third"}
            assert 0 <= check["third_rel_dev"] <= entry["check"]["rtol"][3]  # the third-order tolerance
        assert entry["check"]["all_agree"] is True
        floor = entry["floor"]
        m, n, w, depth = entry["m"], entry["n"], entry["width"], entry["depth"]
        assert floor["flops"] == pytest.approx(entry["batch"] * min(_packed_flops(m, n, w, depth).values()))
        assert floor["flops"] > 0 and floor["seconds"] > 0
        assert entry["floor_ratio"] > 0
        assert entry["speedup"] > 0
        assert entry["best_competitor"]["method"] in bench.COMPETITORS
        assert entry["auto_choice"] in ("forward", "fwdrev", "fwdadj", "nested")
        model = entry["cost_model"]
        assert set(model["predicted_per_point_s"]) == {"forward", "fwdrev", "fwdadj", "nested"}
        assert all(t > 0 for t in model["predicted_per_point_s"].values())
        assert model["choice_over_fastest"] >= 1.0


def test_latency_and_scan_entries(quick_report):
    _, report = quick_report
    for section, per in (("latency", "median_s"), ("scan", "per_step_s")):
        entries = report[section]
        assert len(entries) == 1  # one net, one dtype
        for entry in entries:
            assert set(entry["results"]) == set(report["methods"])
            for rec in entry["results"].values():
                _ok_timing(rec, per)
    for entry in report["latency"]:
        assert entry["forward_pass"]["median_s"] > 0
        assert entry["dispatch_floor"]["ratio_to_forward"] > 0  # the outputs-only call
        for rec in entry["results"].values():
            assert rec["ratio_to_forward"] > 0 and rec["agree"] is True
    for entry in report["scan"]:
        assert entry["ratio_auto_to_nested"] > 0 and entry["ratio_auto_to_baseline"] > 0
        assert entry["dispatch_floor"]["per_step_s"] > 0  # the update-only step
        assert entry["steps"] > 0


def test_summary(quick_report):
    _, report = quick_report
    for dtype in report["dtypes"]:
        s = report["summary"][dtype]
        assert s["configs"] == len(bench.quick_grid())
        assert s["geomean_speedup"] > 0
        assert s["min_speedup_m_ge_2"]["value"] > 0
        assert s["max_floor_ratio_batch_ge_64"]["value"] > 0
        assert s["latency_ratio"]["value"] > 0
        assert s["latency_dispatch_floor_ratio"]["value"] > 0
        assert s["scan_ratio_auto_to_nested"]["value"] > 0
        assert s["cost_model_geo_sd"] >= 1.0
        assert s["cost_model_choice_over_fastest"]["geomean"] >= 1.0


def _packed_flops(m: int, n: int, width: int, depth: int) -> dict[str, int]:
    # Matmul flops per point after the first layer, from the closed forms (benchmarks/README.md).
    hidden, out = (depth - 1) * width * width, width * n
    c2, c3 = bench.math.comb(m + 2, 2), bench.math.comb(m + 3, 3)
    top = bench.math.comb(m + 2, 3)  # the unique third-order coefficients
    # fwdadj's contraction of the n adjoints with the top-order terms, per activation: three
    # multiply-adds form each term's rule and one per output contracts it (one output: three)
    macs = 3 + n if n > 1 else 3
    contraction = 2 * macs * top * width * depth if depth > 1 else 0
    return {
        "forward": 2 * c3 * (hidden + out),
        "fwdrev": 2 * (1 + n) * c2 * (hidden + out),
        "fwdadj": 2 * (c2 + 1 + n) * hidden + 2 * (c2 if depth > 1 else c3) * out + contraction,
    }


def test_floor_terms():
    cfg = bench.Config(m=3, width=64, depth=3, n=1, batch=1024)
    terms = bench.floor_terms(cfg)
    assert terms["K_forward"] == 20 and terms["K_fwdrev"] == 20 and terms["K_fwdadj"] == 12
    assert terms["macs_after_first"] == 64 * 64 * 2 + 64
    # fwdadj: 12 columns through the hidden layers, the 10 below order 3 through the output
    # layer, and at each of the 3 activations the 1 adjoint against the 10 top-order terms,
    # three multiply-adds per term and unit
    flops = 2 * 12 * 64 * 64 * 2 + 2 * 10 * 64 + 3 * 2 * 3 * 10 * 64
    assert terms["algorithm"] == "fwdadj" and terms["flops"] == 1024 * flops
    assert terms["flops"] == 1024 * min(_packed_flops(3, 1, 64, 3).values())
    wide = bench.floor_terms(bench.Config(m=16, width=64, depth=3, n=1, batch=1))
    assert wide["algorithm"] == "fwdadj" and wide["flops"] == min(_packed_flops(16, 1, 64, 3).values())
    many = bench.floor_terms(bench.Config(m=3, width=64, depth=3, n=16, batch=1))
    assert many["algorithm"] == "forward"  # 20 columns against 10 + 1 + 16 and 17 x 10


def test_full_grid_shape():
    grid = bench.full_grid()
    names = [c.name for _, c in grid]
    assert len(names) == len(set(names))
    assert 40 <= len(grid) <= 60
    assert bench.BASE.name in names


def test_bench_command_help_and_list(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert cli.main(["bench", "--quick", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert [c.name for _, c in bench.quick_grid()] == [w for w in listed if w.startswith("m")]
