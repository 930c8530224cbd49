"""The native CPU kernel (``nnderiv._native``) against the XLA kernels and nested AD.

Tolerances. Both kernels compute the same Taylor recursion; they differ only in the
order of the sums in the matmuls (register blocking vs XLA's dot) and in the
transcendentals (expm1-based closed forms vs XLA's tanh/exp/logistic). In float64 that
is a few ulps per coefficient, amplified by at most the depth and the conditioning of the
third-order sums: 1e-12 relative to each field's largest entry leaves two to three
orders of magnitude of margin over what we observe (<= 2e-13), and is still ten orders
below any real error (a wrong index or coefficient is O(1)). In float32 (eps 1.2e-7) the
same few-ulp differences give ~1e-6 for the third tensor; 2e-5 relative is ~170 ulps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv
from nnderiv import _activations, _native, _network

from . import _models
from .helpers import assert_derivatives_close, relative_error

RTOL = {"float64": 1e-12, "float32": 2e-5}
ALGORITHMS = tuple(_native.ALGORITHM_CODES)
# The kernel's algorithms that are also methods of the API ("fwdadj" is the kernel's alone
# until the cost model and auto know it).
METHODS = tuple(a for a in ALGORITHMS if a in nnderiv.methods.METHODS)
ALL = [*_activations.ACTIVATIONS, "leaky_relu"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not _native.load(), reason=f"native kernel unavailable: {_native.status()}")


def _activation(name: str):
    return _activations.leaky_relu(0.037) if name == "leaky_relu" else _activations.ACTIVATIONS[name]


def _stages(m: int, widths, n: int, activation: str, dtype, seed: int = 0, bias: bool = True):
    """Runtime stages of a random MLP: weights ~ N(0, 1.5^2 / fan_in), pre-activations O(1)."""
    rng = np.random.default_rng(seed)
    sizes = [m, *widths, n]
    stages = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jnp.asarray(rng.standard_normal((a, b)) * 1.5 / np.sqrt(a), dtype)
        bvec = jnp.asarray(rng.standard_normal(b) * 0.3, dtype) if bias else None
        stages.append(_network.RuntimeAffine(w, bvec))
        if i < len(widths):
            stages.append(_activation(activation))
    return stages


def _apply(stages, x):
    for stage in stages:
        if isinstance(stage, _network.RuntimeAffine):
            x = x @ stage.weight + (0 if stage.bias is None else stage.bias)
        else:
            x = stage(x)
    return x


def _nested(stages, x, order):
    """value, jacobian, ... by nested AD of the plain forward pass, full layout."""
    f = lambda p: _apply(stages, p)  # noqa: E731
    fns = [f, jax.jacrev(f), jax.jacfwd(jax.jacrev(f)), jax.jacfwd(jax.jacfwd(jax.jacrev(f)))]
    return [jax.vmap(g)(x) for g in fns[: order + 1]]


def _check(stages, x, order, layout, dtype="float64", label="", algorithm="forward"):
    """The native kernel running ``algorithm`` against the XLA forward kernel."""
    got = _native.native_derivatives(stages, x, order, layout, algorithm)
    assert got is not None, f"{label}: the native kernel did not apply"
    want = _native._xla_fields(stages, x, order, layout == "full")
    assert len(got) == order + 1
    try:
        return assert_derivatives_close(got, want, RTOL[dtype], label)
    except AssertionError:
        if dtype != "float64":
            raise
    # An ill-conditioned point (deep gelu nets, m = 6: both kernels differ from nested AD
    # by ~1e-11 there): the native kernel must then be as close to nested AD as XLA is.
    full = [
        nnderiv._derivatives.expand_packed(f, x.shape[-1], k, -1) if layout == "packed" and k >= 2 else f
        for k, f in enumerate(got)
    ]
    full_want = [
        nnderiv._derivatives.expand_packed(f, x.shape[-1], k, -1) if layout == "packed" and k >= 2 else f
        for k, f in enumerate(want)
    ]
    nested = _nested(stages, x, order)
    for k, (a, b, c) in enumerate(zip(full, full_want, nested)):
        err_native, err_xla = relative_error(a, c), relative_error(b, c)
        assert err_native <= 2 * err_xla + RTOL[dtype], f"{label}: order {k}: {err_native:.2e} vs XLA {err_xla:.2e}"
    return 0.0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("activation", ALL)
def test_kernel_matches_xla_every_activation(activation, algorithm):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 3)) * 1.3)
    for order in (1, 2, 3):
        for layout in ("packed", "full"):
            stages = _stages(3, (17, 9), 2, activation, jnp.float64, seed=order)
            _check(stages, x, order, layout, label=f"{activation} order {order} {layout}", algorithm=algorithm)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_kernel_matches_xla_shapes(m):
    # Depths 0..3 (0: an affine map), n = 1..3, widths off the micro-kernel's block, with
    # and without biases, orders 1..3 and both layouts spread over the grid.
    rng = np.random.default_rng(m)
    for depth in (0, 1, 2, 3):
        n = 1 + (m + depth) % 3
        widths = [int(w) for w in rng.choice([5, 8, 16, 19, 33], size=depth)]
        activation = ALL[(m * 7 + depth * 3 + n) % len(ALL)]
        activation = "sigmoid" if activation == "exp" and depth > 1 else activation  # exp(exp(.)) overflows
        stages = _stages(m, widths, n, activation, jnp.float64, seed=depth + 10 * n, bias=(depth + m) % 2 == 0)
        batch = (1, 37)[(m + depth) % 2]
        x = jnp.asarray(rng.standard_normal((batch, m)))
        order = 1 + (m + depth) % 3 if depth < 3 else 3
        layout = ("packed", "full")[(depth + m // 2) % 2]
        for algorithm in ALGORITHMS:
            label = f"{algorithm} m{m} {widths} n{n} {activation} b{batch} o{order} {layout}"
            _check(stages, x, order, layout, label=label, algorithm=algorithm)


def test_kernel_wide_layers_and_threads():
    # Widths that are not multiples of the micro-kernel's columns, an output layer wide
    # enough for the GEMM path, and a batch large enough for the thread pool.
    stages = _stages(4, (70, 64, 13), 9, "tanh", jnp.float64, seed=5)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1003, 4)))
    for algorithm in ALGORITHMS:
        _check(stages, x, 3, "full", label=f"wide {algorithm}", algorithm=algorithm)
        _check(stages, x, 2, "packed", label=f"wide order 2 {algorithm}", algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["fwdrev", "fwdadj"])
def test_adjoint_algorithms_many_inputs_and_unusual_stages(algorithm):
    # Where the adjoint algorithms are the cheaper ones (m >= 6, one output), and stage
    # sequences off the usual pattern: two activations in a row, a network that ends in an
    # activation (the adjoints start as the identity), two leading affine layers, a narrow
    # hidden layer (width 3: the reverse matmul contracts over 3 columns).
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((300, 8)))
    wide = _stages(8, (64, 40), 1, "softplus", jnp.float64, seed=1)
    tanh = _activations.ACTIVATIONS["tanh"]
    odd = [
        _network.RuntimeAffine(jnp.asarray(rng.standard_normal((8, 12)) * 0.4), None),
        _network.RuntimeAffine(jnp.asarray(rng.standard_normal((12, 24)) * 0.3), jnp.asarray(rng.standard_normal(24))),
        tanh,
        _activations.ACTIVATIONS["sigmoid"],
        _network.RuntimeAffine(jnp.asarray(rng.standard_normal((24, 3)) * 0.4), None),
        tanh,
        _network.RuntimeAffine(jnp.asarray(rng.standard_normal((3, 5)) * 0.8), jnp.asarray(rng.standard_normal(5))),
        _activations.ACTIVATIONS["silu"],
    ]
    # Two affine layers in a row between activations; the last activation straight after
    # another (fwdadj hands whole stacks to the last activation).
    affine = lambda a, b, bias: _network.RuntimeAffine(  # noqa: E731
        jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a)), jnp.asarray(rng.standard_normal(b)) if bias else None
    )
    softplus, sigmoid = _activations.ACTIVATIONS["softplus"], _activations.ACTIVATIONS["sigmoid"]
    odd2 = [affine(8, 16, True), tanh, affine(16, 12, False), affine(12, 20, True), softplus, affine(20, 10, True)]
    odd2 += [tanh, sigmoid]
    for order in (1, 2, 3):
        _check(wide, x, order, "full", label=f"m8 64x40 order {order}", algorithm=algorithm)
        _check(odd, x, order, ("packed", "full")[order % 2], label=f"odd stages order {order}", algorithm=algorithm)
        _check(odd2, x, order, ("full", "packed")[order % 2], label=f"odd stages 2 order {order}", algorithm=algorithm)


def test_kernel_float32():
    for activation in ("tanh", "softplus", "gelu_tanh", "sin"):
        stages = _stages(3, (32, 24), 2, activation, jnp.float32, seed=3)
        x = jnp.asarray(np.random.default_rng(3).standard_normal((50, 3)), jnp.float32)
        for algorithm in ALGORITHMS:
            got = _native.native_derivatives(stages, x, 3, "packed", algorithm)
            assert all(f.dtype == jnp.float32 for f in got)
            _check(stages, x, 3, "packed", "float32", label=f"float32 {activation} {algorithm}", algorithm=algorithm)


def test_kernel_does_not_apply():
    stages = _stages(2, (8,), 1, "tanh", jnp.float64)
    x = jnp.ones((3, 2))
    assert _native.native_derivatives(stages, x, 0, "packed") is None  # order 0
    assert _native.native_derivatives(stages, x, 4, "packed") is None
    generic = [stages[0], _activations.generic(lambda z: z + 0.1 * z**3), stages[2]]
    assert _native.native_derivatives(generic, x, 3, "packed") is None
    assert _native.native_derivatives(stages, x.astype(jnp.float32), 3, "packed") is None  # mixed dtypes
    with _native.disabled():
        assert _native.native_derivatives(stages, x, 3, "packed") is None
    with pytest.raises(ValueError, match="unknown algorithm"):
        _native.native_derivatives(stages, x, 3, "packed", "nested")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_finite_rows_stay_isolated(algorithm):
    stages = _stages(3, (16, 16), 2, "softplus", jnp.float64, seed=4)
    x = np.random.default_rng(4).standard_normal((40, 3))
    x[3, 1] = np.nan
    x[17, 0] = np.inf
    x[18, 2] = -np.inf
    x = jnp.asarray(x)
    got = _native.native_derivatives(stages, x, 3, "full", algorithm)
    want = _native._xla_fields(stages, x, 3, True, algorithm)
    bad = np.array([3, 17, 18])
    good = np.setdiff1d(np.arange(40), bad)
    assert_derivatives_close([f[good] for f in got], [f[good] for f in want], RTOL["float64"], "finite rows")
    assert np.all(np.isnan(np.asarray(got[3][3])))
    for f, g in zip(got, want):  # the same IEEE arithmetic on the bad rows as the XLA kernel
        np.testing.assert_array_equal(np.isnan(np.asarray(f[bad])), np.isnan(np.asarray(g[bad])))


# --------------------------------------------------------------------------------------
# Through the public API.


def _case(activation="tanh", m=3, widths=(16, 12), n=2):
    return _models.linen_mlp(m, list(widths), n, activation, seed=2)


def _xla_derivs(net, x, order=3, layout="full"):
    with _native.disabled():  # a fresh jit, traced with the native kernel off
        return jax.jit(lambda net, x: nnderiv._api._derivatives(net, x, order, "forward", layout))(net, x)


@pytest.mark.parametrize("batch", [(), (1,), (7,), (1000,)])
def test_api_matches_xla_and_nested(batch):
    net = _case("silu").net()
    x = _models.points(3, batch)
    for layout in ("full", "packed"):
        got = nnderiv.derivs_fn(net, 3, "forward", layout)(x)
        assert got.value.shape == (*batch, 2)
        want = _xla_derivs(net, x.reshape(-1, 3), 3, layout)
        want = [f.reshape(*batch, *f.shape[1:]) for f in want]
        assert_derivatives_close(got, want, RTOL["float64"], f"api {batch} {layout}")
    nested = nnderiv.derivatives(net, x, 3, method="nested")
    assert_derivatives_close(nnderiv.derivatives(net, x, 3, method="forward"), nested, 1e-11, "vs nested")


@pytest.mark.parametrize("method", METHODS)
def test_api_program_is_one_custom_call(method):
    net = _case("tanh").net()
    hlo = nnderiv.derivs_fn(net, 3, method).lower(jnp.ones(3)).as_text()
    assert hlo.count(_native.TARGET) == 1
    assert "dot_general" not in hlo and "gather" not in hlo
    assert f"algorithm = {_native.ALGORITHM_CODES[method]} : i64" in hlo


@pytest.mark.parametrize("order", [1, 2, 3])
def test_api_orders(order):
    net = _case("gelu_erf", m=2, widths=(9,), n=1).net()
    x = _models.points(2, (5,))
    got = nnderiv.derivatives(net, x, order, method="forward")
    assert got.order == order
    assert_derivatives_close(got, _xla_derivs(net, x, order), RTOL["float64"], f"order {order}")


@pytest.mark.parametrize("method", METHODS)
def test_parameter_gradients_match_xla(method):
    # PINN training: gradients of a loss of the derivatives with respect to the parameters
    # (through the custom call's JVP, which is the XLA kernel's), and with respect to x.
    case = _models.linen_mlp(2, [8, 8], 1, "softplus", seed=2)
    x = _models.points(2, (6,))

    def loss(variables, x):
        d = nnderiv.derivatives(nnderiv.from_flax(case.module, variables), x, 3, method=method)
        return jnp.sum(d.value**2) + jnp.sum(d.hessian) + 0.1 * jnp.sum(d.third**2)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(case.variables, x)
    with _native.disabled():
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(case.variables, x)
        hlo = jax.jit(jax.grad(loss)).lower(case.variables, x).as_text()
    assert _native.TARGET not in hlo
    assert _native.TARGET in jax.jit(loss).lower(case.variables, x).as_text()
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_jit_vmap_scan(method):
    net = _case("tanh").net()
    derivs = nnderiv.derivs_fn(net, 3, method)
    x = _models.points(3, (8,))
    whole = derivs(x)
    assert_derivatives_close(jax.vmap(derivs)(x), whole, RTOL["float64"], "vmap over points")
    assert_derivatives_close(jax.jit(jax.vmap(derivs))(x), whole, RTOL["float64"], "jit vmap")
    nested_batch = x.reshape(2, 4, 3)
    assert_derivatives_close(
        [f.reshape(8, *f.shape[2:]) for f in jax.vmap(derivs)(nested_batch)], whole, RTOL["float64"], "vmap of batches"
    )

    def body(c, xi):
        d = derivs(xi)
        return c + jnp.sum(d.third), d.third

    total, thirds = jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs))(x)
    np.testing.assert_allclose(np.asarray(thirds), np.asarray(whole.third), rtol=1e-12, atol=1e-14)
    # vmap over an ensemble of parameters: the kernel runs one slice per parameter set.
    case = _case("tanh")
    ensemble = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.9 * a, 1.1 * a]), case.variables)

    def one(variables, x):
        return nnderiv.derivatives(nnderiv.from_flax(case.module, variables), x, 3, method=method)

    got = jax.vmap(one, in_axes=(0, None))(ensemble, x)
    for i in range(3):
        member = jax.tree_util.tree_map(lambda a: a[i], ensemble)
        with _native.disabled():
            want = jax.jit(one)(member, x)
        assert_derivatives_close([f[i] for f in got], want, RTOL["float64"], f"ensemble member {i}")
    got = jax.vmap(one, in_axes=(0, 0))(ensemble, jnp.stack([x, x + 1, x - 1]))
    with _native.disabled():
        want = jax.jit(one)(jax.tree_util.tree_map(lambda a: a[2], ensemble), x - 1)
    assert_derivatives_close([f[2] for f in got], want, RTOL["float64"], "ensemble and points")
    # Nested vmaps batch x and the parameters along different dims (the custom call sees
    # x as (1, P, 1, m) against results (E, P, 1, n)): each operand is sliced per dim.
    thirds = {}
    for label, fn in (
        ("ensemble of point vmaps", jax.vmap(lambda v: jax.vmap(lambda u: one(v, u).third)(x))),
        (
            "point vmap of ensembles",
            lambda v: jnp.swapaxes(jax.vmap(lambda u: jax.vmap(lambda w: one(w, u).third)(v))(x), 0, 1),
        ),
    ):
        thirds[label] = jax.jit(fn)(ensemble)
        for i in range(3):
            member = jax.tree_util.tree_map(lambda a: a[i], ensemble)
            with _native.disabled():
                want = jax.jit(one)(member, x).third
            np.testing.assert_allclose(thirds[label][i], want, rtol=1e-12, atol=1e-14, err_msg=f"{label}, member {i}")


# --------------------------------------------------------------------------------------
# Build, fallback and status.


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet (restored afterwards), with an empty cache."""
    saved = _native._state
    _native._reset_for_tests()
    monkeypatch.setenv("NNDERIV_CACHE_DIR", str(tmp_path))
    yield tmp_path
    _native._state = saved


def _small_net():
    return _models.linen_mlp(3, [8], 2, "tanh", seed=1).net()


def _fallback_results(net, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [jax.jit(lambda x: nnderiv._api._derivatives(net, x, 3, "forward", "full"))(x) for _ in range(2)]
    return got, [w for w in caught if "native CPU kernel is unavailable" in str(w.message)]


@pytest.mark.parametrize("compiler", ["/bin/false", "fake", "/nonexistent/c++"])
def test_broken_compiler_falls_back_with_one_warning(fresh_state, monkeypatch, compiler):
    if compiler == "fake":  # answers --version, fails to compile
        fake = fresh_state / "fake-c++"
        script = '#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\necho "error: nope" >&2\nexit 1\n'
        fake.write_text(script)
        fake.chmod(0o755)
        compiler = str(fake)
    monkeypatch.setenv("CXX", compiler)
    net, x = _small_net(), _models.points(3, (4,))
    got, caught = _fallback_results(net, x)
    assert len(caught) == 1, [str(w.message) for w in caught]
    info = _native.status()
    assert info["state"] == "failed" and info["reason"]
    assert not list(fresh_state.glob("native/*.so"))  # nothing half-written left behind
    _native._state = _native._State(checked=True, available=True)  # the real kernel again
    want = _xla_derivs(net, x)
    for g in got:
        assert_derivatives_close(g, want, 0.0, "fallback is the XLA kernel")


def test_disabled_by_environment(fresh_state, monkeypatch):
    monkeypatch.setenv("NNDERIV_NATIVE", "0")
    net, x = _small_net(), _models.points(3, (4,))
    got, caught = _fallback_results(net, x)
    assert not caught
    assert _native.status()["state"] == "disabled"
    assert (
        _native.TARGET
        not in jax.jit(lambda x: nnderiv._api._derivatives(net, x, 3, "forward", "full")).lower(x).as_text()
    )


def test_build_in_a_fresh_process(tmp_path):
    # End to end in a new interpreter: first use builds into an empty cache, the program
    # is one custom call, no warning; the result equals this process's XLA kernel.
    script = textwrap.dedent(
        f"""
        import warnings
        warnings.simplefilter("error")
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import flax.linen as nn
        import nnderiv
        from nnderiv import _native
        model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
        net = nnderiv.from_flax(model, model.init(jax.random.PRNGKey(0), jnp.ones(3)))
        x = jnp.linspace(-1, 1, 12).reshape(4, 3)
        d = nnderiv.derivatives(net, x, method="forward")
        calls = nnderiv.derivs_fn(net, 3, "forward").lower(x).as_text().count(_native.TARGET)
        print("STATE", _native.status()["state"], calls)
        np.save({str(tmp_path / "third.npy")!r}, np.asarray(d.third))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NNDERIV_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATE available 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert len(list(tmp_path.glob("native/mlp_taylor-*.so"))) == 1
    assert not list(tmp_path.glob("native/*.tmp*"))
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
    net = nnderiv.from_flax(model, model.init(jax.random.PRNGKey(0), jnp.ones(3)))
    want = _xla_derivs(net, jnp.linspace(-1, 1, 12).reshape(4, 3))
    np.testing.assert_allclose(np.load(tmp_path / "third.npy"), np.asarray(want.third), rtol=1e-12, atol=1e-13)


def test_status_and_cache_key(tmp_path, monkeypatch):
    info = _native.status()
    assert info["state"] == "available" and Path(info["path"]).exists()
    assert info["isa"] in _native.ISAS
    monkeypatch.setenv("NNDERIV_CACHE_DIR", str(tmp_path))
    cxx = _native._compiler()
    path = _native.library_path(cxx)
    assert path.parent == tmp_path / "native" and path.name.startswith("mlp_taylor-")
    monkeypatch.delenv("NNDERIV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native.cache_dir() == tmp_path / "xdg" / "nnderiv"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("isa", sorted(_native.ISAS))
def test_every_compute_copy_matches_xla(isa, algorithm):
    # Each compute copy this CPU runs against the XLA kernels: AVX-512 packs weights in
    # panels of 16 float64 (32 float32) columns, AVX2 and the baseline in 8 (16), so the
    # widths fall below, between and above both; layers of 8..15 units take the padded
    # GEMM on AVX-512 and an exact panel on AVX2. One point and a batch for the thread pool.
    with _native._using_isa(isa) as running:
        if running != isa:
            pytest.skip(f"this CPU does not run the {isa} copy (runs {running})")
        rng = np.random.default_rng(5)
        cases = [
            (3, (64, 64, 64), 1, "tanh"),
            (2, (12, 33), 3, "softplus"),
            (4, (16, 8, 24), 2, "silu"),
            (5, (40, 17), 1, "gelu_tanh"),
            (1, (9,), 12, "sigmoid"),
        ]
        for m, widths, n, activation in cases:
            stages = _stages(m, widths, n, activation, jnp.float64, seed=m)
            for batch in (1, 300):
                x = jnp.asarray(rng.standard_normal((batch, m)))
                label = f"{isa} {algorithm} m{m} {widths} n{n} {activation} b{batch}"
                _check(stages, x, 3, "packed", label=label, algorithm=algorithm)
        stages = _stages(3, (48, 20), 2, "tanh", jnp.float32, seed=9)
        x = jnp.asarray(rng.standard_normal((50, 3)), jnp.float32)
        _check(stages, x, 3, "full", dtype="float32", label=f"{isa} {algorithm} float32", algorithm=algorithm)
    assert _native.status()["isa"] == _native._isa_name(_native._state.lib.NnderivMlpTaylorIsa())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_kept_programs_follow_changing_weights(algorithm):
    # The kernel keeps what it packed from a network's baked-in weights for the next call
    # of the same network. It must see new values, also in a buffer at the same address
    # (W * s is a temporary of the caller's program, allocated alike on every call), and
    # keep more networks of one structure apart than it has room for (5 > 4 per thread).
    base = _stages(3, (24, 24), 2, "tanh", jnp.float64, seed=3)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 3)))

    def scaled(scale):
        return [
            _network.RuntimeAffine(st.weight * scale, st.bias) if isinstance(st, _network.RuntimeAffine) else st
            for st in base
        ]

    run = jax.jit(lambda scale, x: _native.native_derivatives(scaled(scale), x, 3, "packed", algorithm))
    _, reused = _native._program_counts()
    for scale in (1.0, 1.5, 1.5, 1.0, 0.5, 0.5, 1.0):
        want = _native._xla_fields(scaled(jnp.float64(scale)), x, 3, False)
        assert_derivatives_close(run(jnp.float64(scale), x), want, RTOL["float64"], f"scale {scale}")
    assert _native._program_counts()[1] == reused  # traced weights: packed anew every call
    nets = [_stages(3, (24, 24), 2, "tanh", jnp.float64, seed=s) for s in range(5)]
    baked = [jax.jit(lambda x, st=st: _native.native_derivatives(st, x, 3, "packed", algorithm)) for st in nets]
    wants = [_native._xla_fields(st, x, 3, False) for st in nets]
    for i in [0, 1, 0, 2, 3, 4, 0, 1, 4, 4, 2]:
        assert_derivatives_close(baked[i](x), wants[i], RTOL["float64"], f"net {i}")
    # ... and does reuse: a steady-state call of a baked network packs nothing (each
    # thread XLA runs it on keeps its own copy: warm them all first).
    for _ in range(20):
        jax.block_until_ready(baked[3](x))
    built, reused = _native._program_counts()
    for _ in range(10):
        jax.block_until_ready(baked[3](x))
    now_built, now_reused = _native._program_counts()
    assert now_built + now_reused == built + reused + 10 and now_reused - reused >= 8


@pytest.mark.parametrize("algorithm", METHODS)
def test_derivs_fn_keeps_its_program_with_float32_parameters(algorithm):
    # Flax keeps float32 parameters under x64 by default; evaluating in float64 casts them.
    # The cast must happen while tracing, on concrete values, so the kernel gets baked-in
    # weights it can key by value: a steady-state call (one point, as in a simulation
    # loop, also inside the caller's jit) packs nothing. Staged, the cast made the weights
    # tracers and every call repacked them.
    module = nnderiv.MLP((24, 24), 2, "tanh")
    variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.float32))
    assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32
    net = nnderiv.from_flax(module, variables)
    derivs = nnderiv.derivs_fn(net, 3, algorithm)
    x = jnp.asarray(np.random.default_rng(5).standard_normal(3))
    step = jax.jit(lambda p: p + 1e-3 * derivs(p).third.sum())
    for _ in range(20):  # warm every thread XLA runs the call on
        jax.block_until_ready(step(x))
        jax.block_until_ready(derivs(x))
    built, reused = _native._program_counts()
    for _ in range(10):
        jax.block_until_ready(step(x))
        jax.block_until_ready(derivs(x))
    now_built, now_reused = _native._program_counts()
    assert now_built + now_reused == built + reused + 20 and now_reused - reused >= 16
    want = nnderiv.derivatives(net, x[None], 3, "nested")
    assert_derivatives_close(derivs(x[None]), want, RTOL["float64"], f"float32 parameters, {algorithm}")


def test_weights_token_names_values_not_arrays():
    # The token keys what the kernel keeps: equal for equal values (another array, another
    # address), different for any other value, shape or dtype, and 0 while tracing.
    rng = np.random.default_rng(0)
    w = [np.asarray(rng.standard_normal((3, 8))), np.asarray(rng.standard_normal((8, 1)))]
    token = _native._weights_token(w)
    assert token > 0 and token == _native._weights_token([jnp.asarray(a.copy()) for a in w])
    nudged = [w[0].copy(), w[1]]
    nudged[0][2, 5] = np.nextafter(nudged[0][2, 5], np.inf)  # one ulp in one entry
    assert _native._weights_token(nudged) != token
    assert _native._weights_token([w[0].reshape(8, 3), w[1]]) != token
    assert _native._weights_token([w[0].astype(np.float32), w[1]]) != token
    seen = []
    jax.jit(lambda a: seen.append(_native._weights_token([a, w[1]])) or a)(w[0])
    assert seen == [0]
