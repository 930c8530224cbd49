"""The Taylor engine: closed-form activations to order 6, the engine against the order-3
kernels on the existing case tables, random programs against nested AD, and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnderiv
from nnderiv import _native, _taylor
from nnderiv._taylor import _tables

from . import _models, _reference
from .helpers import assert_derivatives_close, relative_error
from .test_activations import POINTS, SATURATING

ORDER = 6


def _mp_derivatives(name: str, z: float, k: int) -> list[float]:
    fn = _reference.activation_mp(name)
    digits = 700 if abs(z) >= 20 else 80
    with mpmath.workdps(digits):
        return [float(mpmath.diff(fn, mpmath.mpf(z), j)) for j in range(k + 1)]


@pytest.mark.parametrize("name", SATURATING + ["sin", "cos", "exp"])
def test_closed_forms_to_order_6_match_mpmath(name):
    act = nnderiv.ACTIVATIONS[name]
    assert act.closed_form
    points = [z for z in POINTS if abs(z) <= 300 or name in ("tanh", "sigmoid", "softplus", "silu")]
    if name == "gelu_erf":
        points = [z for z in points if abs(z) < 20]  # erfc at 700 digits is slow (order 3 covers the tails)
    for z in points:
        if name == "exp" and z > 700 or name in ("sin", "cos") and abs(z) > 100:
            continue
        got = [float(v) for v in act.derivatives(np.float64(z), ORDER)]
        expected = _mp_derivatives(name, z, ORDER)
        # gelu_tanh composes two series (sigmoid of a cubic): a few more ulps there.
        rtol = 1e-12 if name == "gelu_tanh" else 2e-13
        for k, (g, e) in enumerate(zip(got, expected)):
            assert np.isfinite(g), f"{name}^({k})({z}) = {g}"
            floor = 1e-60 if abs(z) < 20 else 1e-300
            assert abs(g - e) <= rtol * abs(e) + floor, f"{name}^({k})({z}): {g!r} vs {e!r}"


def test_closed_forms_at_order_3_agree_with_the_kernels_taylor():
    z = jnp.asarray(POINTS)
    for name, act in nnderiv.ACTIVATIONS.items():
        for a, b in zip(act.derivatives(z, 3), act.taylor(z)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-300, err_msg=name)


def test_generic_activation_derivatives_any_order():
    from nnderiv._activations import generic

    act = generic(lambda z: jnp.arctan(z) * jnp.exp(-0.5 * z))
    z = jnp.linspace(-2.0, 2.0, 7)
    got = act.derivatives(z, 4)
    f = lambda u: jnp.arctan(u) * jnp.exp(-0.5 * u)  # noqa: E731
    for k in range(5):
        np.testing.assert_allclose(got[k], jax.vmap(f)(z), rtol=1e-12)
        f = jax.grad(f) if k == 0 else (lambda g: jax.grad(lambda u: g(u)))(f)


def test_product_tables_are_cauchy_products():
    m = 3
    for i, l in ((1, 1), (1, 2), (2, 2), (1, 4)):
        ia, ib, mask = _tables.product_table(m, i, l)
        ea, eb, eg = _tables.exponents(m, i), _tables.exponents(m, l), _tables.exponents(m, i + l)
        for g in range(len(eg)):
            pairs = {(int(a), int(b)) for a, b, w in zip(ia[g], ib[g], mask[g]) if w}
            want = {(a, b) for a in range(len(ea)) for b in range(len(eb)) if (ea[a] + eb[b] == eg[g]).all()}
            assert pairs == want


def test_power_tables_are_repeated_cauchy_products():
    """``delta^p`` straight from the blocks of ``delta`` equals ``delta * delta^(p-1)``."""
    from nnderiv._taylor import _poly

    rng = np.random.default_rng(0)
    for m, order in ((1, 6), (2, 5), (3, 4), (4, 3)):
        delta = [None] + [jnp.asarray(rng.standard_normal((_tables.block_size(m, j), 2))) for j in range(1, order + 1)]
        chained = delta
        for p in range(2, order + 1):
            nxt = [None] * (order + 1)
            for j in range(p, order + 1):
                acc = 0.0
                for i in range(1, j - p + 2):
                    ia, ib, mask = _tables.product_table(m, i, j - i)
                    acc = acc + (delta[i][ia] * chained[j - i][ib] * mask[..., None]).sum(axis=1)
                nxt[j] = acc
            for j in range(p, order + 1):
                np.testing.assert_allclose(_poly.power_block(delta, m, p, j), nxt[j], rtol=1e-13, atol=1e-13)
            chained = nxt
    # A zero (None) block drops the terms that use it.
    m = 3
    sparse = [None, jnp.asarray(rng.standard_normal((3, 2))), None, jnp.asarray(rng.standard_normal((10, 2)))]
    ia, ib, mask = _tables.product_table(m, 1, 1)
    np.testing.assert_allclose(
        _poly.power_block(sparse, m, 2, 2), (sparse[1][ia] * sparse[1][ib] * mask[..., None]).sum(axis=1), rtol=1e-13
    )
    assert _poly.power_block(sparse, m, 2, 3) is None


# --- the interpreter against the fused path, on the case tables of test_methods ---


def _interpreted_and_fused(net, x, order):
    """The interpreter's forward and fwdrev, the fused XLA recursion and the native kernel's two."""

    @jax.jit
    def run(u):  # one compilation for all five
        interpreted = [tuple(f(net, u, order, fused=False)) for f in (_taylor.forward, _taylor.fwdrev)]
        with _native.disabled():
            fused = [tuple(_taylor.forward(net, u, order))]
        return interpreted + fused + [tuple(f(net, u, order)) for f in (_taylor.forward, _taylor.fwdrev)]

    return run(x)


# A subset of test_methods' activation table (closed forms, piecewise, generic), to keep
# CI time in check; every activation passes.
@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu", "gelu_erf", "relu", "elu"])
def test_interpreter_matches_the_fused_path(activation):
    case = _models.linen_mlp(3, [8, 8], 2, activation, seed=1)
    eng_f, eng_r, fused, nat_f, nat_r = _interpreted_and_fused(case.net(), _models.points(3, (4,)), 3)
    labels = ("interpreted forward", "interpreted fwdrev", "native forward", "native fwdrev")
    for label, got in zip(labels, (eng_f, eng_r, nat_f, nat_r)):
        assert_derivatives_close(got, fused, 1e-10, f"{activation} {label} vs the fused XLA recursion")


@pytest.mark.parametrize("m,depth,n", [(1, 0, 1), (5, 1, 3)])
def test_interpreter_matches_the_fused_path_on_shapes(m, depth, n):
    case = _models.linen_mlp(m, [6] * depth, n, ["tanh", "silu", "gelu_erf", "softplus"][:depth], seed=m + depth)
    eng_f, eng_r, fused, *_ = _interpreted_and_fused(case.net(), _models.points(m, (3,)), 3)
    assert_derivatives_close(eng_f, fused, 1e-10, "interpreted forward")
    assert_derivatives_close(eng_r, fused, 1e-10, "interpreted fwdrev")


def test_activation_segments_are_recognised():
    """silu written as x * sigmoid(x), and jax.nn.softplus (logaddexp): one closed-form step each."""
    net = _models.linen_mlp(2, [4, 4], 1, ["silu", "softplus"], seed=0).net()
    program = nnderiv._network.trace_program(net, 2, jnp.float64)
    found, _ = _taylor.segments(program)
    assert sorted(s.activation.name for s in found.values()) == ["silu", "softplus"]


def test_multi_output_segments_in_the_jacrev_program():
    """jacrev keeps an activation and its slope (softplus(z) and sigmoid(z)): one segment each.

    Both are univariate functions of the same pre-activation; the slope, unrecognised, is
    differentiated by nested jvp (a generic activation), so the reverse sweep's rules see
    one composition per value instead of a product per primitive.
    """

    def f(p, x):
        h = x @ p[0]
        h = (h - h.mean()) / jnp.sqrt(h.var() + 1e-3)  # not layered: the interpreter runs it
        return jax.nn.softplus(h) @ p[1]

    key = jax.random.split(jax.random.PRNGKey(5), 2)
    params = [jax.random.normal(key[0], (3, 6), jnp.float64), jax.random.normal(key[1], (6, 2), jnp.float64)]
    net = nnderiv.from_function(f, params, input_dim=3)
    program = _taylor.jacobian_program(net, 3, jnp.float64)
    found, _ = _taylor.segments(program)
    by_source = {}
    for seg in found.values():
        by_source.setdefault(seg.source, []).append(seg.activation)
    assert any(len(acts) >= 2 and any(not a.closed_form for a in acts) for acts in by_source.values()), found
    x = _models.points(3, (4,), scale=2.0)
    for order in (3, 4):
        want = nnderiv.derivatives(net, x, order, method="nested", layout="packed")
        got = nnderiv.derivatives(net, x, order, method="fwdrev", layout="packed")
        for k in range(order + 1):
            assert relative_error(got[k], want[k]) <= 1e-12, (order, k)


def test_live_scalars_broadcast_against_vectors():
    """``h * s``, ``h / s``, ``s / h``, ``h + s`` with ``s`` a live scalar (lax takes rank-0
    operands). With as many inputs as units, a product of coefficient blocks broadcast from
    the trailing axis pairs the coefficient axis with the units: a silent wrong answer
    before the fix (the third derivative off by 50% in a hand-written normalisation)."""

    def g(h):
        return h * h.sum() + h / (2 + h.var()) + h.sum() / (3 + h * h) + jnp.maximum(h, h.mean()) + (h.mean() - h)

    def f(p, x):
        return jnp.tanh(g(jnp.tanh(x @ p[0]))) @ p[1]

    key = jax.random.split(jax.random.PRNGKey(5), 2)
    params = [jax.random.normal(key[0], (3, 3), jnp.float64), jax.random.normal(key[1], (3, 2), jnp.float64)]
    net = nnderiv.from_function(f, params, input_dim=3)
    x = _models.points(3, (4,))
    want = nnderiv.derivatives(net, x, 3, method="nested", layout="packed")
    for method in ("forward", "fwdrev"):
        got = nnderiv.derivatives(net, x, 3, method=method, layout="packed")
        for k in range(4):
            assert relative_error(got[k], want[k]) <= 1e-12, (method, k)


# --- random programs of supported primitives, against nested AD ---

UNARY = {
    "tanh": jnp.tanh,
    "sin": jnp.sin,
    "exp_small": lambda u: jnp.exp(0.3 * u),
    "log1p_sq": lambda u: jnp.log1p(u * u),
    "sqrt": lambda u: jnp.sqrt(1.5 + jnp.sin(u)),
    "sigmoid": jax.nn.sigmoid,
    "erf": jax.lax.erf,
    "recip": lambda u: 1.0 / (2.0 + jnp.cos(u)),
    "pow": lambda u: (1.2 + jnp.tanh(u)) ** 1.7,
    "relu": jax.nn.relu,
    "abs": jnp.abs,
    "cube": lambda u: u**3,
    "softplus": jax.nn.softplus,
}
BINARY = {
    "add": jnp.add,
    "mul": jnp.multiply,
    "sub": jnp.subtract,
    "max": jnp.maximum,
    "where": lambda a, b: jnp.where(a > b, a * b, a - b),
    "div": lambda a, b: a / (1.5 + b * b),
}


@st.composite
def programs(draw):
    m = draw(st.integers(1, 3))
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY))),
                st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY))),
                st.tuples(st.just("dense"), st.integers(1, 4)),
                st.tuples(st.just("reduce"), st.just("")),
                st.tuples(st.just("concat"), st.just("")),
            ),
            min_size=1,
            max_size=5,
        )
    )
    order = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return m, steps, order, seed


def _build(m, steps, seed):
    rng = np.random.default_rng(seed)

    def f(params, x):
        values = [x]
        for i, (kind, what) in enumerate(steps):
            u = values[-1]
            if kind == "unary":
                values.append(UNARY[what](u))
            elif kind == "binary":
                other = values[rng_choice[i] % len(values)]
                size = min(u.shape[0], other.shape[0])
                values.append(BINARY[what](u[:size], other[-size:]))
            elif kind == "dense":
                values.append(u @ params[i] + 0.1)
            elif kind == "reduce":
                values.append(jnp.sum(u * u, keepdims=True) / u.shape[0] + u)
            else:
                values.append(jnp.concatenate([u, values[0][:1]]))
        return jnp.sum(values[-1]) * jnp.ones(2) + values[-1][:1]

    rng_choice = rng.integers(0, 100, size=len(steps))
    params, width = [], m
    shapes = []
    for kind, what in steps:
        if kind == "dense":
            params.append(jnp.asarray(rng.normal(size=(width, what)) / np.sqrt(width)))
            width = what
        else:
            params.append(jnp.zeros(()))
            width = width + 1 if kind == "concat" else width
        shapes.append(width)
    return nnderiv.from_function(f, params, input_dim=m)


@settings(max_examples=12, deadline=None)
@given(programs())
def test_random_programs_against_nested(prog):
    m, steps, order, seed = prog
    net = _build(m, steps, seed)
    x = 0.8 * jax.random.normal(jax.random.PRNGKey(seed), (2, m), jnp.float64)
    expected = nnderiv.derivs_fn(net, order=order, method="nested", layout="packed")(x)
    for algorithm in (_taylor.forward, _taylor.fwdrev):
        got = jax.jit(lambda u, a=algorithm: tuple(a(net, u, order)))(x)
        for k in range(order + 1):
            err = relative_error(got[k], expected[k])
            assert err <= 1e-9, f"{steps} {algorithm.__name__}: order {k} differs by {err:.2e}"


# --- refusals ---


def _refused(fn, match):
    net = nnderiv.from_function(fn, jnp.ones((2, 3)), input_dim=2)
    with pytest.raises(nnderiv.UnsupportedModelError, match=match):
        nnderiv.derivatives(net, jnp.ones((1, 2)), order=2, method="analytic")
    # auto falls back to nested AD on the same model
    d = nnderiv.derivatives(net, jnp.ones((1, 2)), order=2, method="auto")
    assert d.hessian.shape == (1, 3, 2, 2)


def test_live_loop_carry_is_refused():
    def f(p, x):
        h = jnp.tanh(x @ p)
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c), h)

    _refused(f, r"`(while|scan)`")


def test_live_index_is_refused():
    def f(p, x):
        h = jnp.tanh(x @ p)
        return h[jnp.argmax(h)] * h

    _refused(f, r"`argmax`")


def test_constant_control_flow_is_evaluated():
    """Loops and argmax that do not depend on the input are fine."""

    def f(p, x):
        w = jax.lax.fori_loop(0, 3, lambda i, c: c * 1.1, p)
        k = jnp.argmax(p[0])
        return jnp.tanh(x @ w) * p[1, k]

    net = nnderiv.from_function(f, jnp.arange(6.0).reshape(2, 3) / 6, input_dim=2)
    x = jnp.array([[0.3, -0.2]])
    got = nnderiv.derivatives(net, x, order=4, method="analytic")
    want = nnderiv.derivatives(net, x, order=4, method="nested")
    for k in range(5):
        np.testing.assert_allclose(got.derivative(k), want.derivative(k), rtol=1e-12, atol=1e-15)


# --- the engine on the benchmark's models that are not plain MLPs, against nested AD ---

MODEL_KINDS = ["residual", "fourier", "layernorm", "hard-constraint"]


@pytest.fixture(scope="module")
def bench_models():
    from nnderiv.bench import _suite

    nets = {}
    for kind in MODEL_KINDS:
        module = _suite.MODEL_NETS[kind](8, 2, 2)
        variables = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64), _suite._variables(module, 3, seed=4, scale=1.0)
        )
        nets[kind] = nnderiv.from_flax(module, variables)
    return nets


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("batch", [(), (5,)], ids=["point", "batch5"])
def test_engine_on_bench_models_against_nested(bench_models, kind, batch):
    net = bench_models[kind]
    x = 0.4 * jax.random.normal(jax.random.PRNGKey(1), (*batch, 3), jnp.float64)
    if kind == "hard-constraint":
        x = jnp.abs(x) / (1 + jnp.abs(x))
    # One point runs the batch's code after a reshape: order 3 there, orders 1-3 on the batch.
    # Order 4 on these kinds of model (a residual, Fourier-feature, LayerNorm and hard-
    # constraint net) is test_orders.py's model zoo; here it cost 80 s of CI (LayerNorm).
    for order in (1, 2, 3) if batch else (3,):
        expected = nnderiv.derivs_fn(net, order=order, method="nested", layout="packed")(x)
        for method in ("forward", "fwdrev"):
            got = nnderiv.derivs_fn(net, order=order, method=method, layout="packed")(x)
            for k in range(order + 1):
                assert got[k].shape == expected[k].shape
                err = relative_error(got[k], expected[k])
                assert err <= 1e-11, f"{kind} {method} order {order}: derivative {k} differs by {err:.2e}"


# --- the batch chunk rule and the cache size it reads ---


def _synthetic_program(width: int):
    """A flat program whose widest variable has ``width`` elements (``x -> tanh(W x)``)."""
    from nnderiv import _jaxpr

    w = jnp.ones((width, 3))
    return _jaxpr.trace_flat(lambda w, x: jnp.tanh(w @ x), w, jnp.ones(3))


@pytest.mark.parametrize(
    ("width", "cache", "expected"),
    [
        (64, 1 << 20, 128),  # 20 coefficients x 64 x 8 B = 10 KiB/point: 102 points -> 128
        (64, 2 << 20, 256),  # 205 -> 256
        (64, 3 << 19, 128),  # 154 (log2 7.26) -> 128
        (32, 1 << 20, 256),  # half as wide: twice the points
        (4096, 1 << 20, 16),  # clamped below
        (8, 1 << 30, 512),  # clamped above
    ],
)
def test_chunk_size_fills_the_cache_to_the_nearest_power_of_two(width, cache, expected):
    program = _synthetic_program(width)
    assert _taylor.chunk_size(program, 3, 3, 8, 1 << 16, cache_bytes=cache) == expected
    # a batch that fits one chunk runs whole
    assert _taylor.chunk_size(program, 3, 3, 8, expected, cache_bytes=cache) == expected
    assert _taylor.chunk_size(program, 3, 3, 8, 7, cache_bytes=cache) == 7


def test_l2_bytes_sums_distinct_caches(tmp_path):
    from nnderiv import _cpu

    def cache(cpu, index, level, kind, size, shared):
        d = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        d.mkdir(parents=True)
        for name, text in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(f"{text}\n")

    for cpu in range(4):  # two L2s of 1 MiB, each shared by two SMT siblings
        cache(cpu, 0, 1, "Data", "32K", str(cpu))
        cache(cpu, 1, 1, "Instruction", "32K", str(cpu))
        cache(cpu, 2, 2, "Unified", "1024K", "0-1" if cpu < 2 else "2-3")
        cache(cpu, 3, 3, "Unified", "32M", "0-3")
    assert _cpu.l2_bytes_from_sysfs(tmp_path, [0, 1, 2, 3]) == 2 << 20
    assert _cpu.l2_bytes_from_sysfs(tmp_path, [0, 1]) == 1 << 20
    assert _cpu.l2_bytes_from_sysfs(tmp_path / "missing", [0]) is None
    assert _cpu._size_bytes("512K") == 512 << 10
    assert _cpu._size_bytes("2M") == 2 << 20
    assert _cpu.l2_bytes() > 0


@pytest.mark.parametrize("kind", ["residual", "layernorm"])
def test_engine_chunks_equal_one_batch(bench_models, kind):
    """Chunks of 4 over 10 points (two full chunks in the loop, a remainder of 2 after it)."""
    net = bench_models[kind]
    x = 0.4 * jax.random.normal(jax.random.PRNGKey(2), (10, 3), jnp.float64)
    for algorithm in (_taylor.forward, _taylor.fwdrev):
        whole = jax.jit(lambda u, a=algorithm: tuple(a(net, u, 3, chunk=10)))(x)
        chunked = jax.jit(lambda u, a=algorithm: tuple(a(net, u, 3, chunk=4)))(x)
        for k in range(4):
            np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-13, atol=1e-15)


def test_default_chunk_rule_chunks_a_large_batch(bench_models, monkeypatch):
    """With a tiny cache every batch above the smallest chunk is chunked; results unchanged."""
    from nnderiv import _cpu

    net = bench_models["residual"]
    x = 0.4 * jax.random.normal(jax.random.PRNGKey(3), (40, 3), jnp.float64)
    whole = tuple(_taylor.forward(net, x, 2, chunk=40))
    monkeypatch.setattr(_cpu, "l2_bytes", lambda: 1024)
    program = nnderiv._network.trace_program(net, 3, jnp.float64)
    assert _taylor.chunk_size(program, 3, 2, 8, 40) == 16
    chunked = tuple(_taylor.forward(net, x, 2))
    for k in range(3):
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-13, atol=1e-15)
