"""from_flax on user-written models: linen, nn.Sequential, nnx, non-MLPs, odd activations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnderiv

from . import _models
from .helpers import assert_derivatives_close


def _check_all_methods(net, x, label, methods=("forward", "fwdrev", "jet", "auto")):
    expected = nnderiv.derivs_fn(net, method="nested")(x)
    for method in methods:
        assert_derivatives_close(nnderiv.derivs_fn(net, method=method)(x), expected, label=f"{label} {method}")
    return expected


def test_sequential_matches_compact():
    seq = _models.sequential_mlp(3, [7, 5], 2, ["silu", "gelu_erf"])
    x = _models.points(3, (4,))
    expected = _check_all_methods(seq.net(), x, "sequential")
    # The same weights in the compact module give the same derivatives.
    compact = _models.CompactMLP((7, 5), ("silu", "gelu_erf"), 2)
    params = {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(seq.layers)}
    got = nnderiv.derivatives(nnderiv.from_flax(compact, {"params": params}), x)
    assert_derivatives_close(got, expected, 1e-13, "compact vs sequential")


@pytest.mark.parametrize(
    "activations", [["tanh", "softplus"], ["sin", "relu", "sigmoid"]], ids=["tanh-softplus", "sin-relu-sigmoid"]
)
def test_nnx_module(activations):
    case = _models.nnx_mlp(3, [6] * len(activations), 2, activations)
    net = case.net()
    assert net.input_dim == 3
    structure = net.describe()
    for act in activations:
        assert act in structure
    _check_all_methods(net, _models.points(3, (3,)), "nnx")


def test_nnx_parameter_gradients():
    case = _models.nnx_mlp(2, [5], 1, ["tanh"])
    xs = _models.points(2, (3,))

    def loss(model, method):
        return jnp.sum(nnderiv.derivatives(nnderiv.from_flax(model), xs, method=method).third ** 2)

    expected = nnx.grad(lambda m: loss(m, "nested"))(case.module)
    got = nnx.grad(lambda m: loss(m, "analytic"))(case.module)
    for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


class _TransposedDense(nn.Module):
    """A user layer storing its weight as (out, in) and subtracting a bias."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (self.features, x.shape[-1]), jnp.float64)
        b = self.param("b", nn.initializers.normal(1.0), (self.features,), jnp.float64)
        return w @ x - b


class _OddMLP(nn.Module):
    """Hand-written layers, a scaled activation, a learnable per-unit slope, a scalar output."""

    @nn.compact
    def __call__(self, x):
        x = 2.0 * jnp.tanh(_TransposedDense(6)(x))  # an activation that is not in the table
        slope = self.param("slope", nn.initializers.constant(0.7), (6,), jnp.float64)
        x = _TransposedDense(5)(x)
        x = jnp.where(x > 0, x, slope[: x.shape[-1] - 1].sum() * jnp.sin(x))  # parameter-dependent
        x = nn.Dense(4, param_dtype=jnp.float64)(x)
        x = x * jax.nn.sigmoid(x)  # SiLU written out by hand
        return nn.Dense(1, param_dtype=jnp.float64)(x)[0]


def test_user_layers_generic_activations_and_scalar_output():
    module = _OddMLP()
    variables = module.init(jax.random.PRNGKey(3), jnp.ones(3))
    net = nnderiv.from_flax(module, variables)
    text = net.describe()
    assert "generic" in text and "parameter-dependent" in text and "silu (closed form)" in text, text
    x = _models.points(3, (5,))
    d = _check_all_methods(net, x, "odd")
    assert d.value.shape == (5, 1) and d.third.shape == (5, 1, 3, 3, 3)

    def loss(v, method):
        return jnp.sum(nnderiv.derivatives(nnderiv.from_flax(module, v), x, method=method).third)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    expected, got = grad(variables, "nested"), grad(variables, "analytic")
    for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)


def test_input_preprocessing_before_first_layer():
    """Elementwise work on x itself (e.g. a fixed scaling) is a stage like any other."""

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.sinh(x / 3.0)
            return nn.Dense(2, param_dtype=jnp.float64)(nn.tanh(nn.Dense(5, param_dtype=jnp.float64)(x)))

    module = Scaled()
    net = nnderiv.from_flax(module, module.init(jax.random.PRNGKey(0), jnp.ones(2)))
    _check_all_methods(net, _models.points(2, (3,)), "preprocessed")


@pytest.mark.parametrize("model_cls", [_models.NormMLP, _models.ResidualMLP], ids=["layernorm", "residual"])
def test_non_mlp_models(model_cls):
    module = model_cls()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    net = nnderiv.from_flax(module, variables)
    x = _models.points(3, (3,))
    expected = nnderiv.derivs_fn(net, method="nested")(x)
    # Not MLPs, but made of supported primitives: the analytic methods run the Taylor engine.
    for method in ("jet", "auto", "analytic", "forward", "fwdrev"):
        assert_derivatives_close(nnderiv.derivs_fn(net, method=method)(x), expected, label=method)


def test_from_function_and_known_closed_form():
    """f(x) = sin(x0) exp(x1): every third partial has a closed form."""

    def f(params, x):
        return jnp.stack([jnp.sin(x[0]) * jnp.exp(params * x[1])])

    net = nnderiv.from_function(f, 1.0, input_dim=2)
    x = jnp.array([0.4, -0.3])
    s, c, e = np.sin(0.4), np.cos(0.4), np.exp(-0.3)
    third = np.array([[[-c * e, -s * e], [-s * e, c * e]], [[-s * e, c * e], [c * e, s * e]]])
    for method in ("nested", "jet", "auto"):
        d = nnderiv.derivatives(net, x, method=method)
        np.testing.assert_allclose(d.value, [s * e], rtol=1e-15)
        np.testing.assert_allclose(d.jacobian, [[c * e, s * e]], rtol=1e-15)
        np.testing.assert_allclose(d.hessian, [[[-s * e, c * e], [c * e, s * e]]], rtol=1e-14)
        np.testing.assert_allclose(d.third[0], third, rtol=1e-14)


def test_wrapping_errors():
    module = _models.CompactMLP((4,), ("tanh",), 1)
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    with pytest.raises(TypeError, match="needs its variables"):
        nnderiv.from_flax(module)
    with pytest.raises(ValueError, match=r"no 'params'.*pass \{'params': params\}"):
        nnderiv.from_flax(module, variables["params"])
    with pytest.raises(TypeError, match="linen.Module or flax.nnx.Module"):
        nnderiv.from_flax(lambda x: x, variables)
    other = _models.CompactMLP((5,), ("tanh",), 1).init(jax.random.PRNGKey(0), jnp.ones(3))
    with pytest.raises(ValueError, match="do not fit the module"):
        nnderiv.from_flax(module, other)
    nnx_model = _models.nnx_mlp(2, [3], 1, "tanh").module
    with pytest.raises(TypeError, match="without variables"):
        nnderiv.from_flax(nnx_model, variables)


def test_multiple_outputs_rejected():
    net = nnderiv.from_function(lambda p, x: (x, x), None, input_dim=2)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(\)"):
        nnderiv.derivatives(net, jnp.ones(2))
