"""The cost model behind ``method="auto"`` and the machine calibration it reads.

The choice logic is tested on synthetic machine rates (a machine where matmuls are free,
one where elementwise passes are free, one where every op is expensive), never on
constants fitted to one machine; the calibration is tested for every way its cache can
be missing, stale or broken.
"""

from __future__ import annotations

import inspect
import json
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv
from nnderiv.methods import _calibration, _cost, choose

from ._models import linen_mlp, points


def rates(matmul_flops=1e10, elementwise_s=1e-9, op_s=1e-6, slope=1.0) -> _calibration.Rates:
    """Synthetic rates: ``slope`` > 1 makes deep contractions faster than shallow ones."""
    return _calibration.Rates(
        tuple((d, matmul_flops * (d / 256) ** np.log(slope)) for d in (8, 32, 128, 256)), elementwise_s, op_s
    )


FREE_MATMULS = rates(matmul_flops=1e30)
FREE_ELEMENTWISE = rates(elementwise_s=1e-30, op_s=0.0)
SLOW_OPS = rates(matmul_flops=1e30, elementwise_s=1e-30, op_s=1.0)


@pytest.mark.parametrize("m,n", [(1, 1), (3, 1), (3, 8), (16, 1)])
def test_columns(m, n):
    assert _cost.columns("forward", m, n, 3) == comb(m + 3, 3)
    assert _cost.columns("fwdrev", m, n, 3) == (1 + n) * comb(m + 2, 2)
    assert _cost.columns("nested", m, n, 3) == (1 + n) * (1 + m) ** 2
    assert _cost.columns("forward", m, n, 2) == comb(m + 2, 2)
    with pytest.raises(ValueError, match="unknown algorithm"):
        _cost.columns("magic", m, n, 3)


def test_only_nested_multiplies_through_the_first_layer():
    layers = [(3, 64), (64, 64), (64, 1)]
    work = _cost.work(layers, 3, 1, 3)
    assert [d for d, _ in work["forward"].matmuls] == [64, 64]
    assert [d for d, _ in work["nested"].matmuls] == [3, 64, 64]
    # flops scale with the columns each algorithm pushes: forward's and fwdrev's are 20 here
    ratio = work["nested"].matmuls[1][1] / work["forward"].matmuls[0][1]
    assert ratio == pytest.approx(_cost.columns("nested", 3, 1, 3) / _cost.columns("forward", 3, 1, 3))


def test_free_matmuls_pick_the_fewest_elementwise_elements():
    for m, n in [(3, 1), (8, 1), (3, 8), (1, 1)]:
        layers = [(m, 64), (64, 64), (64, n)]
        work = _cost.work(layers, m, n, 3)
        fewest = min(work, key=lambda a: work[a].elements)
        assert _cost.choose(layers, m, n, 3, "float64", 1024, FREE_MATMULS) == fewest


def test_free_elementwise_picks_the_fewest_flops():
    for m, n in [(3, 1), (12, 1), (3, 8), (2, 4)]:
        layers = [(m, 128), (128, 128), (128, n)]
        work = _cost.work(layers, m, n, 3)
        fewest = min(work, key=lambda a: work[a].flops)
        assert _cost.choose(layers, m, n, 3, "float64", 1024, FREE_ELEMENTWISE) == fewest


def test_many_outputs_favour_forward_and_many_inputs_fwdrev_when_matmuls_dominate():
    # forward's columns do not grow with n; fwdrev's (1 + n) C(m+2, 2) < C(m+3, 3) for m >= 6 at n = 1
    wide = [(3, 256), (256, 256), (256, 8)]
    assert _cost.choose(wide, 3, 8, 3, "float64", 1024, FREE_ELEMENTWISE) == "forward"
    many_inputs = [(16, 256), (256, 256), (256, 1)]
    assert _cost.choose(many_inputs, 16, 1, 3, "float64", 1024, FREE_ELEMENTWISE) == "fwdrev"


def test_expensive_ops_pick_the_program_with_fewest_ops_at_batch_one():
    layers = [(3, 64), (64, 64), (64, 1)]
    work = _cost.work(layers, 3, 1, 3)
    fewest = min(work, key=lambda a: work[a].ops)
    assert _cost.choose(layers, 3, 1, 3, "float64", 1, SLOW_OPS) == fewest
    # per point, the op cost is spread over the batch
    per_point = _cost.predicted_seconds(layers, 3, 1, 3, "float64", 1000, SLOW_OPS)
    assert per_point[fewest] == pytest.approx(work[fewest].ops / 1000)


def test_a_shallow_contraction_runs_at_its_own_rate():
    shallow_slow = rates(slope=4.0)  # 8-deep products 1/1000th of the 256-deep rate
    assert shallow_slow.matmul_rate(8) < shallow_slow.matmul_rate(64) < shallow_slow.matmul_rate(256)
    assert shallow_slow.matmul_rate(1000) == pytest.approx(shallow_slow.matmul_rate(256))  # clamped
    narrow = _cost.predicted_seconds([(2, 16), (16, 16), (16, 1)], 2, 1, 3, "float64", 64, shallow_slow)
    flat = _cost.predicted_seconds([(2, 16), (16, 16), (16, 1)], 2, 1, 3, "float64", 64, rates())
    assert all(narrow[a] > flat[a] for a in narrow)


def test_restricting_the_candidates_and_order_zero():
    layers = [(3, 64), (64, 1)]
    for r in (FREE_MATMULS, FREE_ELEMENTWISE):
        assert _cost.choose(layers, 3, 1, 3, "float64", 64, r, among=_cost.ANALYTIC) in _cost.ANALYTIC
    assert _cost.choose(layers, 3, 1, 0, "float64", 64, FREE_MATMULS) == "forward"


def test_auto_runs_what_choose_says():
    case = linen_mlp(3, (16, 16), 2, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    x = points(3, (5,), seed=1)
    picked = choose(net, 3, jnp.float64, 3, batch=5)
    assert picked in _cost.ALGORITHMS
    auto = nnderiv.derivatives(net, x, method="auto")
    chosen = nnderiv.derivatives(net, x, method=picked)
    for a, b in zip(auto, chosen):
        np.testing.assert_array_equal(a, b)  # auto *is* the chosen method


def test_order_zero_is_a_forward_pass_and_non_mlps_use_the_engine_or_nested():
    assert _cost.choose([(3, 16), (16, 1)], 3, 1, 0, "float64") == "forward"
    # Not an MLP, but made of supported primitives: one of the engine's algorithms.
    net = nnderiv.from_function(lambda p, x: jnp.sin(p * x).sum(keepdims=True), 2.0, input_dim=3)
    assert choose(net, 3, jnp.float64, 3) in _cost.ANALYTIC
    # A primitive the engine refuses (sort): nested AD.
    net = nnderiv.from_function(lambda p, x: jnp.sort(jnp.sin(p * x))[:1], 2.0, input_dim=3)
    assert choose(net, 3, jnp.float64, 3) == "nested"


# --------------------------------------------------------------------------------------
# The calibration: measured once per machine, never an error.


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(_calibration.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(_calibration.ENV_MODE, "auto")
    fake = rates(matmul_flops=123e9)
    calls = []

    def fake_probe(dtype="float64", target_s=0.01):
        calls.append(_calibration.dtype_name(dtype))
        return fake

    monkeypatch.setattr(_calibration, "probe", fake_probe)
    return tmp_path, calls, fake


def test_missing_cache_is_measured_once_and_written(cache_dir):
    path, calls, fake = cache_dir
    first = _calibration.calibrate("float64")
    assert first.source == "probe" and first.rates == fake and calls == ["float64"]
    assert (path / "calibration.json").exists() and "no calibration" in first.note
    second = _calibration.calibrate("float64")
    assert second.source == "cache" and second.rates == fake and calls == ["float64"]  # not measured again
    third = _calibration.calibrate(jnp.float32)  # the other dtype is added beside it
    assert third.source == "probe" and calls == ["float64", "float32"]
    data = json.loads((path / "calibration.json").read_text())
    assert set(data["rates"]) == {"float64", "float32"}


def test_stale_cache_is_measured_again(cache_dir, monkeypatch):
    path, calls, _ = cache_dir
    _calibration.calibrate("float64")
    real = _calibration.fingerprint()
    monkeypatch.setattr(_calibration, "fingerprint", lambda: {**real, "cpu": "another CPU", "jax": "9.9"})
    again = _calibration.calibrate("float64")
    assert again.source == "probe" and "stale" in again.note and "cpu" in again.note and "jax" in again.note
    assert calls == ["float64", "float64"]


def test_cpu_identity_tells_generations_apart():
    # Two KVM guests that both call themselves "AMD EPYC": a Zen 3 (AVX2) and a Zen 5
    # (AVX-512, twice the FMA width). Their calibrations must not be shared.
    from nnderiv import _cpu

    def cpuinfo(family, model, flags):
        block = f"processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        return block + f"stepping\t: 1\nflags\t\t: fpu sse4_2 {flags}\n\nprocessor\t: 1\nmodel\t\t: 99\n"

    zen3 = _cpu.identity_from_cpuinfo(cpuinfo(25, 1, "avx avx2 fma"))
    zen5 = _cpu.identity_from_cpuinfo(cpuinfo(26, 2, "avx avx2 fma avx512f avx512dq avx512vl avx512bw"))
    assert zen3 == {"cpu family": "25", "model": "1", "stepping": "1", "vector": "sse4_2,avx,avx2,fma"}
    assert zen5["vector"].endswith("avx512f,avx512dq,avx512vl,avx512bw") and zen5["model"] == "2"
    assert _cpu.identity_from_cpuinfo("") == {"vector": ""}
    assert _calibration.fingerprint()["cpu_id"] == _cpu.identity()


def test_a_calibration_from_another_cpu_generation_is_stale(cache_dir, monkeypatch):
    path, calls, _ = cache_dir
    _calibration.calibrate("float64")
    real = _calibration.fingerprint()
    other = {**real, "cpu_id": {**real["cpu_id"], "vector": "sse4_2,avx,avx2,fma", "model": "1"}}
    monkeypatch.setattr(_calibration, "fingerprint", lambda: other)
    again = _calibration.calibrate("float64")
    assert again.source == "probe" and "cpu_id" in again.note
    assert calls == ["float64", "float64"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": "nnderiv-calibration/1"}', ""])
def test_unreadable_cache_is_measured_again(cache_dir, content):
    path, calls, fake = cache_dir
    (path / "calibration.json").write_text(content)
    cal = _calibration.calibrate("float64")
    assert cal.source == "probe" and cal.rates == fake and calls == ["float64"]


def test_corrupt_rates_in_a_current_cache_are_measured_again(cache_dir):
    path, calls, _ = cache_dir
    _calibration.calibrate("float64")
    data = json.loads((path / "calibration.json").read_text())
    data["rates"]["float64"]["matmul"] = [[8, -1.0]]
    (path / "calibration.json").write_text(json.dumps(data))
    cal = _calibration.calibrate("float64")
    assert cal.source == "probe" and "unreadable" in cal.note


def test_a_failing_probe_or_unwritable_cache_falls_back_without_error(cache_dir, monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("no timer")

    monkeypatch.setattr(_calibration, "probe", broken)
    cal = _calibration.calibrate("float64")
    assert cal.source == "default" and cal.rates == _calibration.DEFAULT_RATES["float64"] and "no timer" in cal.note
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(_calibration, "probe", lambda *a, **k: rates())
    monkeypatch.setenv(_calibration.ENV_DIR, str(blocker / "sub"))  # a directory under a file
    cal = _calibration.calibrate("float64")
    assert cal.source == "probe" and "not cached" in cal.note


def test_off_uses_the_defaults_and_reads_nothing(cache_dir, monkeypatch):
    path, calls, _ = cache_dir
    (path / "calibration.json").write_text("{broken")
    for value in ("off", "0", "OFF"):
        monkeypatch.setenv(_calibration.ENV_MODE, value)
        cal = _calibration.calibrate("float64")
        assert cal.source == "default" and calls == []
    forced = _calibration.calibrate("float64", force=True)  # bench --calibrate measures anyway
    assert forced.source == "probe" and calls == ["float64"]


def test_probe_mode_measures_every_time(cache_dir, monkeypatch):
    _, calls, _ = cache_dir
    monkeypatch.setenv(_calibration.ENV_MODE, "probe")
    _calibration.calibrate("float64")
    _calibration.calibrate("float64")
    assert calls == ["float64", "float64"]


def test_the_real_probe_measures_plausible_rates():
    measured = _calibration.probe("float32", target_s=0.001)
    assert [d for d, _ in measured.matmul] == list(_calibration.DEPTHS)
    assert all(1e6 < r < 1e15 for _, r in measured.matmul)
    assert 1e-13 < measured.elementwise_s < 1e-6 and 0 <= measured.op_s < 1e-2
    assert _calibration.Rates.from_json(json.loads(json.dumps(measured.to_json()))) == measured


def test_the_process_keeps_one_calibration_per_dtype(cache_dir):
    _, calls, _ = cache_dir
    _calibration.reset()
    try:
        a = _calibration.current("float64")
        b = _calibration.current(np.float64)
        assert a is b and calls == ["float64"]
    finally:
        _calibration.reset()


def test_bench_calibrate_says_what_was_in_use_and_writes_the_cache(cache_dir, capsys):
    from nnderiv import bench as _bench

    path, calls, fake = cache_dir
    assert _calibration.calibrate("float64", measure=False).source == "default"  # a look measures nothing
    assert calls == []
    assert _bench.main(["--calibrate", "--dtype", "float64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["dtypes"]["float64"]
    assert entry["before"]["source"] == "default" and "no calibration" in entry["before"]["note"]
    assert entry["after"]["source"] == "probe" and calls == ["float64"]
    assert _calibration.calibrate("float64").rates == fake  # now cached
    assert _bench.main(["--calibrate", "--dtype", "float64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtypes"]["float64"]["before"]["source"] == "cache"


# --------------------------------------------------------------------------------------
# Method objects: an analysis per model, a compute per batch, one place that decides.


def test_a_method_is_an_init_and_a_compute_step():
    from nnderiv.methods import ALGORITHMS, METHODS, Plan

    case = linen_mlp(3, (16, 16), 2, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    x = points(3, (6,), seed=2).reshape(-1, 3)
    for name, method in METHODS.items():
        plan = method.init(net, 3, x.dtype, 3, x.shape[0])
        assert isinstance(plan, Plan) and plan.algorithm in ALGORITHMS and plan.analysis.n == 2
        if name in ("forward", "fwdrev", "jet", "nested"):
            assert plan.algorithm == name and plan.how == "asked"
        got = method.compute(plan, net, x)
        want = METHODS[plan.algorithm](net, x, 3)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    # analytic decides among the Taylor algorithms only
    assert METHODS["analytic"].init(net, 3, x.dtype, 3, 6).algorithm in _cost.ANALYTIC


def test_the_model_is_analysed_once_per_compilation(monkeypatch):
    from nnderiv import _network

    case = linen_mlp(3, (8,), 1, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    calls = []
    real = _network._analyse
    monkeypatch.setattr(_network, "_analyse", lambda program: calls.append(1) or real(program))
    derivs = nnderiv.derivs_fn(net, order=3)
    derivs(points(3, (4,)))
    derivs(points(3, (4,), seed=3))
    assert len(calls) <= 1  # none if an earlier test analysed this model already


def test_the_network_carries_no_analysis_state():
    case = linen_mlp(3, (8,), 1, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    before = dict(vars(net.spec))
    nnderiv.derivatives(net, points(3, (2,)), method="auto")
    assert dict(vars(net.spec)) == before and not hasattr(net.spec, "cache")


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """Measured choices with fake timings: ``fake[algorithm]`` seconds per call."""
    from nnderiv.methods import _measured, _plan

    monkeypatch.setenv(_calibration.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(_calibration.ENV_MODE, "auto")
    monkeypatch.setattr(_calibration, "probe", lambda *a, **k: rates())
    _calibration.reset()
    _measured.reset()
    fake, timed, dtypes = {}, [], []

    class Run:
        def __init__(self, algorithm):
            self.algorithm = algorithm

        def __call__(self, x):
            timed.append(self.algorithm)
            dtypes.append(x.dtype)
            if fake.get(self.algorithm) is None:
                raise RuntimeError("this candidate fails")
            return x

    monkeypatch.setattr(
        _plan,
        "_timed_run",
        lambda net, analysis, order, algorithm, *setting, chunk=None: Run(
            algorithm if chunk is None else f"{algorithm}@{chunk}"
        ),
    )
    # small batches are timed in a loop that wraps the candidate
    monkeypatch.setattr(_measured, "_seconds_per_call", lambda fn, x, target_s: fake[inspect.unwrap(fn).algorithm])
    yield tmp_path, fake, timed, dtypes
    _calibration.reset()
    _measured.reset()


def _equal_rates_net():
    # Synthetic rates where every algorithm is predicted close: all three are timed.
    case = linen_mlp(3, (16, 16), 1, "tanh")
    return nnderiv.from_flax(case.module, case.variables)


def test_close_candidates_are_timed_and_the_fastest_is_kept(measuring):
    from nnderiv.methods import _measured

    path, fake, timed, _ = measuring
    net = _equal_rates_net()
    x = points(3, (8,))
    model_pick = choose(net, 3, x.dtype, 3, 8)
    slowest_predicted = "nested" if model_pick != "nested" else "forward"
    fake.update({"forward": 3.0, "fwdrev": 3.0, "fwdadj": 3.0, "nested": 3.0, slowest_predicted: 1.0})
    derivs = nnderiv.derivs_fn(net, order=3)
    got = derivs(x)
    if slowest_predicted not in set(timed):
        pytest.skip("the cost model did not find the candidates close on this machine's rates")
    assert choose(net, 3, x.dtype, 3, 8) == slowest_predicted  # choose() reports the measured choice
    want = nnderiv.derivatives(net, x, method=slowest_predicted)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)  # auto ran the measured winner
    saved = json.loads((path / "choices.json").read_text())
    assert [v["algorithm"] for v in saved["choices"].values()] == [slowest_predicted]
    # A new process (memory forgotten) reads the disk; nothing is timed again.
    _measured.reset()
    timed.clear()
    nnderiv.derivs_fn(net, order=3)(x)
    assert timed == [] and choose(net, 3, x.dtype, 3, 8) == slowest_predicted
    # Another machine's cache is not used, nor one measured on other code (the kernels changed).
    for field, value in (("cpu", "another CPU"), ("code", "0" * 16)):
        stale = json.loads(json.dumps(saved))
        stale["fingerprint"][field] = value
        (path / "choices.json").write_text(json.dumps(stale))
        _measured.reset()
        assert _measured.lookup(next(iter(saved["choices"]))) is None, field


def test_measuring_is_off_for_one_off_calls_traced_parameters_and_mode_off(measuring, monkeypatch):
    import jax

    from nnderiv.methods import _measured

    _, fake, timed, _ = measuring
    fake.update({"forward": 1.0, "fwdrev": 1.0, "fwdadj": 1.0, "nested": 1.0})
    net = _equal_rates_net()
    x = points(3, (8,))
    nnderiv.derivatives(net, x)  # one call: the cost model decides
    assert timed == []
    jax.jit(lambda net, x: nnderiv.derivs_fn(net, 3)(x).value)(net, x)  # parameters are tracers
    assert timed == []
    monkeypatch.setenv(_calibration.ENV_MODE, "off")
    _measured.reset()
    nnderiv.derivs_fn(net, 3)(x)
    assert timed == []


def test_a_failing_candidate_leaves_the_cost_models_choice(measuring):
    _, fake, timed, _ = measuring
    net = _equal_rates_net()
    x = points(3, (8,))
    model_pick = choose(net, 3, x.dtype, 3, 8)
    fake.update({"forward": 1.0, "fwdrev": 1.0, "fwdadj": 1.0, "nested": None})  # nested raises
    nnderiv.derivs_fn(net, 3)(x)
    assert choose(net, 3, x.dtype, 3, 8) == model_pick


def test_bench_calibrate_forgets_the_measured_choices(measuring, capsys):
    from nnderiv import bench as _bench

    path, fake, _, _ = measuring
    (path / "choices.json").write_text("{}")
    assert _bench.main(["--calibrate", "--dtype", "float64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "removed" in report["measured_choices"] and not (path / "choices.json").exists()


def test_candidates_are_timed_in_the_callers_precision(measuring):
    import jax

    _, fake, timed, dtypes = measuring
    fake.update({"forward": 1.0, "fwdrev": 2.0, "fwdadj": 2.5, "nested": 3.0})
    net = _equal_rates_net()
    was = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", False)
    try:
        with jax.enable_x64(True):  # x64 by a thread-local context only, as the CLI sets it
            x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 3)), jnp.float64)
            nnderiv.derivs_fn(net, 3)(x)
    finally:
        jax.config.update("jax_enable_x64", was)
    if timed:
        assert set(dtypes) == {jnp.dtype(jnp.float64)}


def test_candidates_are_timed_computing_the_callers_layout():
    # The native kernel writes the full layout itself and the XLA kernels expand it after:
    # timing packed results would rank them on work the caller does not ask for (measured:
    # m=16 softplus at 8192 points, packed timings picked fwdrev, 1.29x slower in full).
    from nnderiv.methods import _plan

    case = linen_mlp(3, (8,), 1, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    x = points(3, (4,))
    analysis = _plan.analyse(net, 3, x.dtype)
    for algorithm in ("forward", "fwdrev", "nested"):
        for native in (True, False):
            full = _plan._timed_run(net, analysis, 3, algorithm, "full", native)(x)
            packed = _plan._timed_run(net, analysis, 3, algorithm, "packed", native)(x)
            assert [f.shape for f in full] == [(4, 1), (4, 1, 3), (4, 1, 3, 3), (4, 1, 3, 3, 3)]
            assert [f.shape for f in packed] == [(4, 1), (4, 1, 3), (4, 1, 6), (4, 1, 10)]


def test_a_choice_measured_for_one_layout_is_not_used_for_the_other(measuring):
    _, fake, timed, _ = measuring
    fake.update({"forward": 1.0, "fwdrev": 1.0, "fwdadj": 1.0, "nested": 1.0})
    net = _equal_rates_net()
    x = points(3, (8,))
    nnderiv.derivs_fn(net, 3, layout="full")(x)
    if not timed:
        pytest.skip("the cost model did not find the candidates close on this machine's rates")
    timed.clear()
    nnderiv.derivs_fn(net, 3, layout="packed")(x)
    assert timed  # timed again: another layout is another computation
    timed.clear()
    nnderiv.derivs_fn(net, 3, layout="full")(x)
    assert timed == []  # the full layout's choice is remembered


def test_the_engines_chunk_is_measured_among_the_rule_and_larger(measuring, monkeypatch):
    # The rule sizes chunks to the L2 caches; 2x and 4x it are timed too (XLA:CPU splits
    # only large fusions over the cores), and the fastest is kept, cached like a choice.
    from nnderiv import _cpu
    from nnderiv.bench import _suite
    from nnderiv.methods import _measured

    _, fake, timed, _ = measuring
    monkeypatch.setattr(_cpu, "l2_bytes", lambda: 1)  # the rule's smallest chunk, 16 points
    module = _suite.MODEL_NETS["layernorm"](8, 2, 1)  # not a layered form: the engine runs it
    net = nnderiv.from_flax(module, module.init(jax.random.PRNGKey(0), jnp.ones(3)))
    x = points(3, (64,))
    # Algorithm and chunk are timed together (each algorithm at each of its chunks).
    fake.update({"forward@16": 3.0, "forward@32": 1.0, "forward@64": 2.0})
    fake.update({"fwdrev@16": 1.5, "fwdrev@32": 4.0, "fwdrev@64": 4.0})
    plan = nnderiv.METHODS["analytic"].init(net, 3, x.dtype, 3, 64, measure=True)
    assert (plan.algorithm, plan.chunk, plan.how) == ("forward", 32, "measured")
    assert set(timed) == {"forward@16", "forward@32", "forward@64", "fwdrev@16", "fwdrev@32", "fwdrev@64"}
    timed.clear()
    _measured.reset()  # a new process: the disk cache answers, nothing is timed again
    again = nnderiv.METHODS["analytic"].init(net, 3, x.dtype, 3, 64, measure=True)
    assert (again.algorithm, again.chunk) == ("forward", 32) and timed == []
    # An explicit method times its own chunks.
    assert nnderiv.METHODS["fwdrev"].init(net, 3, x.dtype, 3, 64, measure=True).chunk == 16
    assert set(timed) == {"fwdrev@16", "fwdrev@32", "fwdrev@64"}
    got = nnderiv.METHODS["analytic"].compute(plan, net, x)
    want = nnderiv.METHODS["nested"](net, x, 3)
    for a, b in zip(nnderiv.Derivatives(*got, layout="packed", m=3), nnderiv.Derivatives(*want, layout="packed", m=3)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # A batch that fits one chunk has nothing to measure.
    assert nnderiv.METHODS["analytic"].init(net, 3, x.dtype, 3, 16, measure=True).chunk is None


def test_small_batches_are_timed_in_a_loop_of_dependent_calls(monkeypatch):
    """One point is timed as a simulation runs it, many calls inside one compiled loop: each
    call is evaluated (its input depends on the last one's outputs), the total is theirs."""
    from nnderiv.methods import _measured

    def fn(x):
        return (2.0 * x, jnp.sin(x))

    x = jnp.asarray([[0.25, -0.5, 1.0]])
    looped = _measured._in_loop(jax.jit(fn), 5)
    want = 5 * float(jnp.sum(2.0 * x) + jnp.sum(jnp.sin(x)))
    np.testing.assert_allclose(float(looped(x)), want, rtol=1e-14)
    assert inspect.unwrap(looped) is not looped
    # measure() loops the candidates of a small batch, not those of a large one
    seen = {}
    monkeypatch.setattr(_measured, "_write", lambda key, entry: None)
    monkeypatch.setattr(_measured, "_seconds_per_call", lambda f, x, target_s: seen.setdefault(x.shape[0], f) and 1.0)
    analysis = type("A", (), {"m": 3, "dtype": np.float64})()
    candidates = {"a": jax.jit(fn), "b": jax.jit(fn)}
    for batch in (1, _measured.LOOP_BATCH, 4 * _measured.LOOP_BATCH):
        _measured.measure(f"test-{batch}", candidates, analysis, batch, rounds=1)
    for small in (1, _measured.LOOP_BATCH):
        assert seen[small] not in candidates.values() and seen[small].__wrapped__ in candidates.values()
    assert seen[4 * _measured.LOOP_BATCH] in candidates.values()
    _measured.reset()


def test_a_large_batch_of_cheap_calls_is_timed_again_at_its_own_size(monkeypatch):
    """Beyond MAX_POINTS, candidates fast at MAX_POINTS points are timed again on the whole
    batch, whose timings decide (XLA parallelises a large batch, a small one not); slow ones
    keep the first timing, and batches within MAX_POINTS are timed once."""
    from nnderiv.methods import _measured

    def fn(x):
        return (2.0 * x,)

    monkeypatch.setattr(_measured, "_write", lambda key, entry: None)
    analysis = type("A", (), {"m": 2, "dtype": np.float64})()
    candidates = {"a": jax.jit(fn), "b": jax.jit(fn)}

    def run(batch, per_call):
        sizes = []

        def fake(f, x, target_s):
            sizes.append(x.shape[0])
            # "a" is faster on the first size, "b" on every larger one
            first = x.shape[0] == min(batch, _measured.MAX_POINTS)
            return per_call * (1.0 if (f is candidates["a"]) == first else 2.0)

        monkeypatch.setattr(_measured, "_seconds_per_call", fake)
        choice = _measured.measure(f"test-{batch}-{per_call}", candidates, analysis, batch, rounds=1)
        return choice, sorted(set(sizes))

    big = 2 * _measured.MAX_POINTS
    short, long = _measured.SHORT_CALL_S / 10, _measured.SHORT_CALL_S * 10
    assert run(big, short) == ("b", [_measured.MAX_POINTS, big])
    assert run(big, long) == ("a", [_measured.MAX_POINTS])
    assert run(_measured.MAX_POINTS, short) == ("a", [_measured.MAX_POINTS])
    huge = 4 * _measured.FULL_POINTS
    assert run(huge, short) == ("b", [_measured.MAX_POINTS, _measured.FULL_POINTS])
    _measured.reset()
