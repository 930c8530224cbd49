"""Models that are not plain MLPs, in the shapes real surrogates take.

Written in plain JAX (and Flax where the library's own layer is the point, LayerNorm), in
the style of the libraries they stand for; every one is made of primitives the Taylor
engine takes. Each builder returns an ``nnderiv.Network`` with input size ``m``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import nnderiv


def _dense(key, fan_in, fan_out, scale=1.3):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (fan_in, fan_out), jnp.float64) * scale / np.sqrt(fan_in)
    b = jax.random.normal(k2, (fan_out,), jnp.float64) * 0.3
    return {"w": w, "b": b}


def _mlp_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp(params, x, act=jnp.tanh):
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def residual(m=2, width=5, seed=0):
    """Two residual tanh blocks: h <- h + tanh(W h + b)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "inp": _dense(k[0], m, width),
        "b1": _dense(k[1], width, width),
        "b2": _dense(k[2], width, width),
        "out": _dense(k[3], width, 2),
    }

    def f(p, x):
        h = jnp.tanh(x @ p["inp"]["w"] + p["inp"]["b"])
        h = h + jnp.tanh(h @ p["b1"]["w"] + p["b1"]["b"])
        h = h + jax.nn.silu(h @ p["b2"]["w"] + p["b2"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    return nnderiv.from_function(f, params, input_dim=m, name="residual")


def fourier(m=2, features=3, width=5, seed=1):
    """Fourier features: [sin(Bx), cos(Bx)] concatenated, then a tanh MLP (the PINN input layer)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {
        "B": jax.random.normal(k[0], (m, features), jnp.float64),
        "mlp": _mlp_params(k[1], [2 * features, width, 1]),
    }

    def f(p, x):
        z = 2.0 * jnp.pi * x @ p["B"]
        return _mlp(p["mlp"], jnp.concatenate([jnp.sin(z), jnp.cos(z)]))

    return nnderiv.from_function(f, params, input_dim=m, name="fourier")


def normalised(m=2, width=6, seed=2):
    """Standardised inputs and de-scaled outputs around a softplus MLP."""
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {
        "mu": jnp.arange(m, dtype=jnp.float64) * 0.3,
        "sd": 1.0 + jnp.arange(m, dtype=jnp.float64),
        "mlp": _mlp_params(k[0], [m, width, width, 2]),
        "scale": jnp.array([2.0, 0.5]),
        "shift": jnp.array([1.0, -3.0]),
    }

    def f(p, x):
        return _mlp(p["mlp"], (x - p["mu"]) / p["sd"], jax.nn.softplus) * p["scale"] + p["shift"]

    return nnderiv.from_function(f, params, input_dim=m, name="normalised")


def hard_constraint(m=2, width=6, seed=3):
    """A hard boundary condition on the output, as DeepXDE's output transforms: x0 (1 - x0) net(x)."""
    params = _mlp_params(jax.random.PRNGKey(seed), [m, width, width, 1])

    def f(p, x):
        return x[0] * (1.0 - x[0]) * _mlp(p, x) + x[1] ** 2

    return nnderiv.from_function(f, params, input_dim=m, name="hard_constraint")


class _LayerNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(6, param_dtype=jnp.float64)(x))
        h = nn.LayerNorm(param_dtype=jnp.float64)(h)
        return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(nn.Dense(5, param_dtype=jnp.float64)(h)))


def layernorm(m=2, seed=4):
    module = _LayerNormMLP()
    return nnderiv.from_flax(module, module.init(jax.random.PRNGKey(seed), jnp.ones(m)))


def product(m=2, width=5, seed=5):
    """Two sub-networks multiplied (e.g. a DeepONet-style branch x trunk product)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {"a": _mlp_params(k[0], [m, width, 3]), "b": _mlp_params(k[1], [m, width, 3])}

    def f(p, x):
        return jnp.sum(_mlp(p["a"], x, jnp.tanh) * _mlp(p["b"], x, jnp.sin), keepdims=True)

    return nnderiv.from_function(f, params, input_dim=m, name="product")


class EqxStyleMLP:
    """An MLP written the way equinox's ``nn.MLP`` is: a list of Linear layers with weights
    stored (out, in), ``weight @ x + bias``, an activation between them, a final activation."""

    def __init__(self, key, in_size, width, out_size, depth):
        sizes = [in_size] + [width] * depth + [out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            {"weight": jax.random.normal(k, (b, a), jnp.float64) / np.sqrt(a), "bias": jnp.full((b,), 0.1)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])
        ]

    @staticmethod
    def apply(layers, x):
        for layer in layers[:-1]:
            x = jax.nn.softplus(layer["weight"] @ x + layer["bias"])
        layer = layers[-1]
        return layer["weight"] @ x + layer["bias"]


def equinox_style(m=2, seed=6):
    model = EqxStyleMLP(jax.random.PRNGKey(seed), m, 5, 2, 2)
    return nnderiv.from_function(EqxStyleMLP.apply, model.layers, input_dim=m, name="eqx_mlp")


def haiku_style(m=2, seed=7):
    """Haiku's ``hk.nets.MLP`` parameter layout: {"mlp/~/linear_i": {"w", "b"}}, gelu."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    sizes = [m, 5, 5, 1]
    params = {
        f"mlp/~/linear_{i}": {"w": jax.random.normal(k, (a, b), jnp.float64) / np.sqrt(a), "b": jnp.zeros(b) + 0.2}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }

    def f(p, x):
        n = len(p)
        for i in range(n):
            layer = p[f"mlp/~/linear_{i}"]
            x = jnp.dot(x, layer["w"]) + layer["b"]
            if i < n - 1:
                x = jax.nn.gelu(x)
        return x

    return nnderiv.from_function(f, params, input_dim=m, name="haiku_mlp")


def deepxde_style(m=2, seed=8):
    """DeepXDE's FNN with a feature transform ``2x - 1`` applied to the inputs first."""
    params = _mlp_params(jax.random.PRNGKey(seed), [m, 6, 6, 1])

    def f(p, x):
        x = 2.0 * x - 1.0
        for layer in p[:-1]:
            x = jnp.tanh(jnp.dot(x, layer["w"]) + layer["b"])
        return jnp.dot(x, p[-1]["w"]) + p[-1]["b"]

    return nnderiv.from_function(f, params, input_dim=m, name="deepxde_fnn")


ZOO = {
    "residual": residual,
    "fourier": fourier,
    "normalised": normalised,
    "hard_constraint": hard_constraint,
    "layernorm": layernorm,
    "product": product,
    "equinox_style": equinox_style,
    "haiku_style": haiku_style,
    "deepxde_style": deepxde_style,
}
