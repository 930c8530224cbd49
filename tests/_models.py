"""Model builders shared by the tests and benchmarks.

Each builder returns the Flax model *and* plain NumPy weights plus activation names in
the form ``tests/_reference.py`` takes, so that every model can be checked against the
independent mpmath reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnderiv
from nnderiv._mlp import ALIASES

#: The activation names used in tests, with the JAX function a user would write: the
#: package's one table (``nnderiv.MLP_ACTIVATIONS``), without its alias "gelu" (= "gelu_tanh").
JAX_ACTIVATIONS = {k: v for k, v in nnderiv.MLP_ACTIVATIONS.items() if k not in ALIASES}
SMOOTH = ["tanh", "sigmoid", "softplus", "silu", "gelu_tanh", "gelu_erf", "sin", "cos", "exp"]


@dataclasses.dataclass
class Case:
    """A test model: the Flax module and variables, and its plain description."""

    module: object
    variables: object
    layers: list  # [(W (in, out), b (out,))] as float64 NumPy
    activations: list[str]
    m: int
    n: int

    def net(self):
        if self.variables is None:
            return nnderiv.from_flax(self.module)
        return nnderiv.from_flax(self.module, self.variables)


def CompactMLP(widths: Sequence[int], activations: Sequence[str], out: int) -> nnderiv.MLP:
    """A user-style MLP, an ``@nn.compact`` loop over ``nn.Dense``: the package's :class:`nnderiv.MLP`."""
    return nnderiv.MLP(widths=tuple(widths), output_dim=int(out), activation=tuple(activations))


def _scale_params(params, key, scale):
    """Re-draw the weights at a scale that keeps pre-activations O(1) but not tiny."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = []
    for leaf, k in zip(leaves, keys):
        fan_in = leaf.shape[0] if leaf.ndim == 2 else 4
        new.append(jax.random.normal(k, leaf.shape, jnp.float64) * scale / np.sqrt(fan_in))
    return jax.tree_util.tree_unflatten(treedef, new)


def _layers_from_dense(params) -> list:
    names = sorted(params, key=lambda s: int(s.split("_")[-1]))
    return [(np.asarray(params[k]["kernel"], np.float64), np.asarray(params[k]["bias"], np.float64)) for k in names]


def linen_mlp(m: int, widths: Sequence[int], n: int, activations, seed: int = 0, scale: float = 1.5) -> Case:
    """A ``CompactMLP``; ``activations`` is one name or one name per hidden layer."""
    if isinstance(activations, str):
        activations = [activations] * len(widths)
    module = CompactMLP(tuple(widths), tuple(activations), n)
    variables = module.init(jax.random.PRNGKey(seed), jnp.ones(m))
    params = _scale_params(variables["params"], jax.random.PRNGKey(seed + 1), scale)
    return Case(module, {"params": params}, _layers_from_dense(params), list(activations), m, n)


def sequential_mlp(m: int, widths: Sequence[int], n: int, activations, seed: int = 0) -> Case:
    """The same architecture written with ``nn.Sequential``."""
    if isinstance(activations, str):
        activations = [activations] * len(widths)
    parts = []
    for width, act in zip(widths, activations):
        parts += [nn.Dense(width), JAX_ACTIVATIONS[act]]
    module = nn.Sequential(parts + [nn.Dense(n)])
    variables = module.init(jax.random.PRNGKey(seed), jnp.ones(m))
    params = _scale_params(variables["params"], jax.random.PRNGKey(seed + 1), 1.5)
    names = sorted(params, key=lambda s: int(s.split("_")[-1]))
    layers = [(np.asarray(params[k]["kernel"]), np.asarray(params[k]["bias"])) for k in names]
    return Case(module, {"params": params}, layers, list(activations), m, n)


class NnxMLP(nnx.Module):
    """An nnx model with oddly named attributes and its own activation choices."""

    def __init__(self, m, widths, n, activations, rngs):
        sizes = [m, *widths]
        self.hidden_stack = nnx.List(
            [nnx.Linear(a, b, param_dtype=jnp.float64, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.readout = nnx.Linear(sizes[-1], n, param_dtype=jnp.float64, rngs=rngs)
        self.activation_names = tuple(activations)

    def __call__(self, x):
        for layer, act in zip(self.hidden_stack, self.activation_names):
            x = JAX_ACTIVATIONS[act](layer(x))
        return self.readout(x)


def nnx_mlp(m: int, widths: Sequence[int], n: int, activations, seed: int = 0) -> Case:
    if isinstance(activations, str):
        activations = [activations] * len(widths)
    model = NnxMLP(m, widths, n, activations, nnx.Rngs(seed))
    key = jax.random.PRNGKey(seed + 1)
    linears = list(model.hidden_stack) + [model.readout]
    for i, lin in enumerate(linears):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        fan_in = lin.kernel[...].shape[0]
        lin.kernel[...] = jax.random.normal(k1, lin.kernel[...].shape, jnp.float64) * 1.5 / np.sqrt(fan_in)
        lin.bias[...] = jax.random.normal(k2, lin.bias[...].shape, jnp.float64) * 0.5
    layers = [(np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])) for lin in linears]
    return Case(model, None, layers, list(activations), m, n)


class NormMLP(nn.Module):
    """Not an MLP: a LayerNorm between the layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(8)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(2)(nn.silu(nn.Dense(8)(x)))


class ResidualMLP(nn.Module):
    """A skip connection: a layered form the hand-written kernels take (``tests/test_layered.py``)."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(6)(x))
        h = h + nn.tanh(nn.Dense(6)(h))
        return nn.Dense(1)(h)


class CumprodMLP(nn.Module):
    """A model the Taylor engine refuses (jet takes it): a cumulative product on the input-dependent path."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.cumprod(nn.tanh(nn.Dense(6)(x))))


def points(m: int, batch: tuple = (5,), seed: int = 7, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.PRNGKey(seed), (*batch, m), jnp.float64)


def checkpoint_mlp(widths: Sequence[int] = (16, 16), activation: str = "tanh", out: int = 1) -> nnderiv.MLP:
    """A ``CompactMLP`` from JSON-friendly arguments: the factory ``nnderiv check --module`` is tested with."""
    return CompactMLP(tuple(int(w) for w in widths), (activation,) * len(widths), int(out))
