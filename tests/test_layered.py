"""Layered forms beyond a chain: skip connections and concatenated activations.

A residual block (``h + f(h)``) is a skip stage, ``[sin z, cos z]`` a concatenation stage;
the hand-written kernels (XLA and native) run both. Every model here is checked, for
every kernel that applies, against nested AD in float64 at 1e-12 relative to each
field's largest entry (the kernels differ from nested AD only in the order of their
sums: observed <= 1e-14), and the native kernel against the XLA kernel at the same
tolerance.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv
from nnderiv import _native, _network
from nnderiv.methods import _plan

from . import _models
from .helpers import assert_derivatives_close

RTOL = 1e-12


def _dense(key, fan_in, fan_out, scale=1.3):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (fan_in, fan_out), jnp.float64) * scale / np.sqrt(fan_in)
    return w, jax.random.normal(k2, (fan_out,), jnp.float64) * 0.3


def _params(seed, shapes):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return [_dense(k, a, b) for k, (a, b) in zip(keys, shapes)]


# Each model: (function of (params, x), layer shapes, m, the stage kinds it must analyse to).
def _residual(p, x):
    h = jnp.tanh(x @ p[0][0] + p[0][1])
    h = h + jnp.tanh(h @ p[1][0] + p[1][1])
    h = h + jax.nn.silu(h @ p[2][0] + p[2][1])
    return h @ p[3][0] + p[3][1]


def _long_skip(p, x):
    # One kept value added back twice, and a skip inside a skip.
    h0 = jnp.tanh(x @ p[0][0] + p[0][1])
    h1 = jax.nn.softplus(h0 @ p[1][0] + p[1][1]) + h0
    h2 = jnp.tanh(h1 @ p[2][0] + p[2][1]) + h0
    return (h2 + h1) @ p[3][0] + p[3][1]


def _skip_from_input(p, x):
    # The input itself is added back (width m): before any activation.
    h = x + jnp.tanh(x @ p[0][0] + p[0][1])
    return jnp.sin(h @ p[1][0] + p[1][1]) @ p[2][0]


def _skip_from_affine(p, x):
    # A pre-activation value is added back.
    z = jnp.tanh(x @ p[0][0] + p[0][1]) @ p[1][0] + p[1][1]
    h = z + jnp.tanh(jnp.tanh(z) @ p[2][0] + p[2][1])
    return h @ p[3][0]


def _fourier(p, x):
    z = x @ p[0][0]
    h = jnp.concatenate([jnp.sin(z), jnp.cos(z)])
    h = jnp.tanh(h @ p[1][0] + p[1][1])
    return h @ p[2][0] + p[2][1]


def _concat_after_skip(p, x):
    # Not after an affine layer: the kernels repeat the value by an identity layer; one
    # part is the value itself.
    h = jnp.tanh(x @ p[0][0] + p[0][1])
    h = h + jnp.tanh(h @ p[1][0] + p[1][1])
    h = jnp.concatenate([jnp.sin(h), h, jax.nn.gelu(h, approximate=True)])
    return jnp.tanh(h @ p[2][0] + p[2][1]) @ p[3][0]


def _fourier_residual(p, x):
    z = x @ p[0][0] + p[0][1]
    h = jnp.concatenate([jnp.cos(z), jnp.sin(z)])
    h = h + jnp.tanh(h @ p[1][0] + p[1][1])
    return h @ p[2][0] + p[2][1]


MODELS = {
    "residual": (_residual, [(3, 8), (8, 8), (8, 8), (8, 2)], 3, ["A", "E", "A", "E", "K", "A", "E", "K", "A"]),
    "long_skip": (_long_skip, [(2, 6), (6, 6), (6, 6), (6, 1)], 2, ["A", "E", "A", "E", "K", "A", "E", "K", "K", "A"]),
    "skip_from_input": (_skip_from_input, [(3, 3), (3, 5), (5, 2)], 3, ["A", "E", "K", "A", "E", "A"]),
    "skip_from_affine": (
        _skip_from_affine,
        [(2, 5), (5, 5), (5, 5), (5, 1)],
        2,
        ["A", "E", "A", "E", "A", "E", "K", "A"],
    ),
    "fourier": (_fourier, [(3, 4), (8, 7), (7, 1)], 3, ["A", "C", "A", "E", "A"]),
    "concat_after_skip": (
        _concat_after_skip,
        [(2, 4), (4, 4), (12, 5), (5, 2)],
        2,
        ["A", "E", "A", "E", "K", "C", "A", "E", "A"],
    ),
    "fourier_residual": (_fourier_residual, [(2, 3), (6, 6), (6, 1)], 2, ["A", "C", "A", "E", "K", "A"]),
}
# Where the native kernel runs forward (it keeps stacks, not the values before the first
# activation, and its reverse sweep has no fan-out).
NATIVE_FORWARD = {"residual", "long_skip", "skip_from_affine", "fourier", "concat_after_skip", "fourier_residual"}
NATIVE_FWDREV = {"fourier"}
KIND = {
    _network.AffineStage: "A",
    _network.ElementwiseStage: "E",
    _network.SkipStage: "K",
    _network.ConcatStage: "C",
}


def _net(name, seed=3):
    fn, shapes, m, _ = MODELS[name]
    return nnderiv.from_function(fn, _params(seed, shapes), input_dim=m, name=name), m


@pytest.mark.parametrize("name", sorted(MODELS))
def test_analysed_as_layers(name):
    net, m = _net(name)
    structure = _network.mlp_structure(net, m, jnp.float64)
    assert not isinstance(structure, str), structure
    assert [KIND[type(s)] for s in structure.stages] == MODELS[name][3]
    assert not structure.plain
    text = net.describe(m, jnp.float64)
    assert ("skip connection" in text) == ("K" in MODELS[name][3])
    assert ("concatenate" in text) == ("C" in MODELS[name][3])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernels_match_nested(name):
    net, m = _net(name)
    x = _models.points(m, (6,), scale=0.8)
    want = nnderiv.derivatives(net, x, 3, method="nested")
    analysis = _plan.analyse(net, m, jnp.float64)
    native = _plan.native_applies(net, analysis, 3, 6)
    assert ("forward" in native) == (name in NATIVE_FORWARD)
    assert ("fwdrev" in native) == (name in NATIVE_FWDREV)
    assert ("fwdadj" in native) == (name in NATIVE_FWDREV)  # both adjoint sweeps take no skip stage
    # analytic is one of the three; auto is checked where it decides, with the native kernel.
    runs = [(a, native) for a in _plan.TAYLOR for native in (True, False)] + [("auto", True)]
    for method, use_native in runs:
        context = contextlib.nullcontext() if use_native else _native.disabled()
        with context:
            got = jax.jit(lambda x: nnderiv._api._derivatives(net, x, 3, method, "full"))(x)
        assert_derivatives_close(got, want, RTOL, f"{name} {method} native={use_native}")
    # Order 0 is the fused path's plain evaluation (skips added back as in the model).
    value = nnderiv.derivatives(net, x, 0, method="forward").value
    np.testing.assert_allclose(value, want.value, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(NATIVE_FORWARD))
@pytest.mark.parametrize("order", [1, 3])  # the order-2 tables are the plain nets' (test_native.py)
def test_native_matches_xla(name, order):
    net, m = _net(name, seed=5)
    analysis = _plan.analyse(net, m, jnp.float64)
    stages = analysis.stages(net)
    x = _models.points(m, (37,), scale=0.8)  # several tiles, a partial last one
    for algorithm in _plan.TAYLOR:
        for layout in ("packed", "full"):
            got = _native.native_derivatives(stages, x, order, layout, algorithm)
            if algorithm in ("fwdrev", "fwdadj") and name not in NATIVE_FWDREV:
                assert got is None
                continue
            want = _native._xla_fields(stages, x, order, layout == "full", algorithm)
            assert_derivatives_close(got, want, RTOL, f"{name} {algorithm} {layout}")


def test_native_one_call_and_threads():
    # A batch large enough for the thread pool; the program is one custom call.
    net, m = _net("residual")
    x = _models.points(m, (1003,))
    f = nnderiv.derivs_fn(net, 3, "forward")
    hlo = f.lower(x).as_text()
    assert hlo.count(_native.TARGET) == 1 and "dot_general" not in hlo
    with _native.disabled():
        want = jax.jit(lambda x: nnderiv._api._derivatives(net, x, 3, "forward", "full"))(x)
    assert_derivatives_close(f(x), want, RTOL, "threads")


@pytest.mark.parametrize("name", ["residual", "fourier"])
def test_parameter_gradients_through_native(name):
    # The custom call's JVP is the XLA kernel's, which takes the same layered form.
    fn, shapes, m, _ = MODELS[name]
    _check_gradients(fn, _params(4, shapes), _models.points(m, (5,)))


def _check_gradients(fn, params, x):
    """Gradients of a PINN-style loss through the native kernel equal those through XLA's."""
    m = x.shape[-1]

    def loss(params, x):
        d = nnderiv.derivatives(nnderiv.from_function(fn, params, input_dim=m, name="g"), x, 3, method="forward")
        return jnp.sum(d.value**2) + jnp.sum(d.jacobian) + jnp.sum(d.hessian) + 0.1 * jnp.sum(d.third**2)

    assert _native.TARGET in jax.jit(loss).lower(params, x).as_text()
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    with _native.disabled():
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


def test_flax_residual_and_fourier_models():
    from nnderiv.bench import _suite

    for kind in ("residual", "fourier"):
        module = _suite.MODEL_NETS[kind](8, 3, 2)
        net = nnderiv.from_flax(module, module.init(jax.random.PRNGKey(1), jnp.ones(3)))
        structure = _network.mlp_structure(net, 3, jnp.float32)
        assert not isinstance(structure, str), structure
        x = _models.points(3, (4,))
        want = nnderiv.derivatives(net, x, 3, method="nested")
        assert_derivatives_close(nnderiv.derivatives(net, x, 3, method="analytic"), want, label=kind, dtype="float32")


def _two_layers_multiplied(p, x):
    h = jnp.tanh(x @ p[0][0])
    return h * jnp.tanh(h @ p[1][0])


def _dense_connection(p, x):
    h = jnp.tanh(x @ p[0][0])
    return jnp.concatenate([jnp.tanh(h @ p[1][0]), h])


def _difference_with_earlier(p, x):
    h = jnp.tanh(x @ p[0][0])
    return h - h @ p[1][0]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_two_layers_multiplied, "combines values from different layers"),
        (_dense_connection, "only of elementwise functions of one layer's output"),
        (_difference_with_earlier, "combines values from different layers"),
    ],
)
def test_not_layered_names_why(fn, message):
    net = nnderiv.from_function(fn, _params(0, [(2, 3), (3, 3)]), input_dim=2)
    structure = _network.mlp_structure(net, 2, jnp.float64)
    assert isinstance(structure, str) and message in structure
    # The engine still takes them.
    x = _models.points(2, (3,))
    want = nnderiv.derivatives(net, x, 3, method="nested")
    assert_derivatives_close(nnderiv.derivatives(net, x, 3, method="analytic"), want, RTOL, "engine")


def test_kernel_rejects_inconsistent_stages():
    # The kernel checks what the Python side guarantees, and says what is wrong.
    if not _native.load():
        pytest.skip(f"native kernel unavailable: {_native.status()}")
    x = jnp.ones((2, 2))
    w = jnp.ones((2, 3))
    call = jax.ffi.ffi_call(_native.TARGET, [jax.ShapeDtypeStruct((2, 3), jnp.float64)] * 2)
    base = dict(
        slopes=np.zeros(3),
        links=np.asarray([0, 0, 0], np.int64),
        parts=np.asarray([-1, 0, 0], np.int64),
        part_slopes=np.zeros(1),
        order=np.int64(1),
        full=np.int64(0),
        weights_token=np.int64(0),
    )
    with pytest.raises(Exception, match="skip stage must add a value after the first activation"):
        jax.block_until_ready(call(x, w, kinds=np.asarray([-1, 0, -3], np.int64), algorithm=np.int64(0), **base))
    ok = dict(base, links=np.asarray([0, 0, 2], np.int64))
    with pytest.raises(Exception, match="no skip stage"):
        jax.block_until_ready(call(x, w, kinds=np.asarray([-1, 0, -3], np.int64), algorithm=np.int64(1), **ok))


# Elementwise affine maps at either end (input standardisation, output de-scaling, a
# feature transform): the XLA kernels treat them as activations; the native kernel runs
# the stages between, with the maps applied around it and the derivatives rescaled.


def _standardised(p, x):
    h = (x - p[3][1][:2]) / (1.0 + p[3][0][0, :2] ** 2)
    h = jnp.tanh(h @ p[0][0] + p[0][1])
    h = jax.nn.softplus(h @ p[1][0] + p[1][1])
    return (h @ p[2][0] + p[2][1]) * jnp.array([2.0, -0.5]) + p[3][1][2:4]


def _feature_transform(p, x):
    h = jnp.tanh((2.0 * x - 1.0) @ p[0][0] + p[0][1])
    return h @ p[1][0]


def _scaling_between_layers(p, x):
    # An affine map between layers (after a skip stage, so not part of an activation) is
    # not at either end: the XLA kernels run it.
    h = jnp.tanh(x @ p[0][0] + p[0][1])
    h = 3.0 * (h + jnp.tanh(h @ p[1][0] + p[1][1])) - 1.0
    return jnp.tanh(h @ p[2][0] + p[2][1]) @ p[3][0]


LINEAR_MODELS = {
    "standardised": (_standardised, [(2, 6), (6, 6), (6, 2), (4, 4)], 2, True),
    "feature_transform": (_feature_transform, [(3, 7), (7, 1)], 3, True),
    "scaling_between_layers": (_scaling_between_layers, [(2, 5), (5, 5), (5, 5), (5, 1)], 2, False),
}


@pytest.mark.parametrize("name", sorted(LINEAR_MODELS))
def test_elementwise_affine_maps(name):
    fn, shapes, m, native = LINEAR_MODELS[name]
    net = nnderiv.from_function(fn, _params(6, shapes), input_dim=m, name=name)
    assert "elementwise affine map" in net.describe(m, jnp.float64)
    analysis = _plan.analyse(net, m, jnp.float64)
    assert _plan.native_applies(net, analysis, 3, 5) == (_plan.TAYLOR if native else ())
    x = _models.points(m, (9,), scale=0.8)
    want = nnderiv.derivatives(net, x, 3, method="nested")
    stages = analysis.stages(net)
    for method in _plan.TAYLOR:
        for layout in ("full", "packed"):
            got = jax.jit(lambda x: nnderiv._api._derivatives(net, x, 3, method, layout))(x)
            assert_derivatives_close(got.as_layout("full"), want, RTOL, f"{name} {method} {layout}")
            if native:  # order 3 (the lower orders' tables: test_native_matches_xla)
                a = _native.native_derivatives(stages, x, 3, layout, method)
                b = _native._xla_fields(stages, x, 3, layout == "full", method)
                assert_derivatives_close(a, b, RTOL, f"{name} {method} {layout}")


def test_gradients_through_elementwise_affine_maps():
    # The maps' parameters (here the standardisation's) get their gradients through the
    # ops around the custom call.
    fn, shapes, m, _ = LINEAR_MODELS["standardised"]
    _check_gradients(fn, _params(6, shapes), _models.points(m, (4,)))


# The Taylor engine on models that are not layered forms: a layered part that only the
# rest of the model reads (the MLP inside an output transform, each of two sub-networks)
# runs as one native call, the interpreter does the rest.


def _escaping_hidden_layer(p, x):
    # The hidden layer is read outside the would-be prefix: the output's chain is not one;
    # the first layer alone (one affine layer) is too short for the kernel.
    h = jnp.tanh(x @ p[0][0] + p[0][1])
    y = jnp.tanh(h @ p[1][0] + p[1][1]) @ p[2][0]
    return y * jnp.sum(h[:1])


@pytest.mark.parametrize(("name", "calls"), [("hard_constraint", 1), ("product", 2), ("escaping", 0)])
def test_engine_runs_a_layered_prefix_natively(name, calls):
    from nnderiv import _taylor

    from . import _zoo

    net = _zoo.ZOO[name]() if name in _zoo.ZOO else None
    if net is None:
        net = nnderiv.from_function(_escaping_hidden_layer, _params(7, [(2, 5), (5, 5), (5, 1)]), input_dim=2)
    x = _models.points(2, (7,), scale=0.8)
    want = nnderiv.derivatives(net, x, 3, method="nested")
    engine = jax.jit(lambda x: tuple(_taylor.forward(net, x, 3)))
    assert engine.lower(x).as_text().count(_native.TARGET) == calls
    # What auto's timed choices run with: the native kernel allowed.
    assert _plan.native_applies(net, _plan.analyse(net, 2, jnp.float64), 3, 7) == (("forward",) if calls else ())
    got = engine(x)
    with _native.disabled():
        plain = jax.jit(lambda x: tuple(_taylor.forward(net, x, 3)))
        assert _native.TARGET not in plain.lower(x).as_text()
        reference = plain(x)
    got_d = nnderiv.Derivatives(*got, layout="packed", m=2).as_layout("full")
    assert_derivatives_close(got_d, want, RTOL, name)
    assert_derivatives_close(got, reference, RTOL, f"{name} vs the interpreter alone")
    # The cost model sees the prefix's products.
    work = _taylor.work(net, 2, jnp.float64, 3)
    with _native.disabled():
        assert work["forward"] == pytest.approx(_taylor.work(net, 2, jnp.float64, 3)["forward"], rel=0.5)


def test_under_the_callers_vmap():
    # The analysis evaluates activations on probe points while the caller's vmap traces
    # (jax.nn.relu, a custom_jvp, came back batched); the prefix's native call runs on
    # the batch, whichever of points or parameters the caller maps over.
    from . import _zoo

    params = _zoo._mlp_params(jax.random.PRNGKey(0), [2, 6, 6, 1])
    x = _models.points(2, (3, 4), scale=0.5)
    # relu: the custom_jvp the analysis met; the output transform: the engine's prefix.
    for act, transform in ((jax.nn.relu, True), (jax.nn.relu, False), (jnp.tanh, True)):

        def f(p, u, act=act, transform=transform):
            y = _zoo._mlp(p, u, act)
            return u[0] * (1 - u[0]) * y if transform else y

        net = nnderiv.from_function(f, params, input_dim=2)
        over_points = jax.vmap(lambda xs, net=net: nnderiv.derivatives(net, xs, 3, method="forward").third)(x)
        want = nnderiv.derivatives(net, x, 3, method="nested").third
        np.testing.assert_allclose(over_points, want, rtol=1e-12, atol=1e-13)
        ensemble = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params)
        over_params = jax.vmap(
            lambda p, f=f: nnderiv.derivatives(nnderiv.from_function(f, p, input_dim=2), x[0], 3, "forward").third
        )(ensemble)
        for i in range(2):
            member = nnderiv.from_function(f, jax.tree_util.tree_map(lambda a: a[i], ensemble), input_dim=2)
            want = nnderiv.derivatives(member, x[0], 3, method="nested").third
            np.testing.assert_allclose(over_params[i], want, rtol=1e-12, atol=1e-13)
