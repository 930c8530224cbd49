"""A plain Flax MLP built from JSON-friendly arguments, and the one table of activation names.

:class:`MLP` is the architecture the checkpoint metadata schema describes (see
:func:`nnderiv.module_from_metadata`): the bundled model, ``nnderiv check --checkpoint``
without ``--module``, the test suite's models. Its parameter tree (``Dense_0`` ...
``Dense_L``, each ``{"kernel": (in, out), "bias": (out,)}``) is that of any
``@nn.compact`` loop over ``nn.Dense``, so a checkpoint of such a user model loads into it.

:data:`ACTIVATION_FUNCTIONS` maps each activation name a metadata file (or a test) may
use to the function as a user writes it in a Flax model. The names are those of
:data:`nnderiv.ACTIVATIONS` (the closed-form derivatives the analytic kernels recognise),
plus activations that only the generic fallback handles, plus ``"gelu"``, Flax's own
spelling of ``gelu_tanh`` (``flax.linen.gelu`` defaults to the tanh approximation).

Example:
  >>> import jax, jax.numpy as jnp, nnderiv
  >>> model = nnderiv.MLP(widths=(8, 8), output_dim=2, activation="silu")
  >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones(3))
  >>> sorted(variables["params"]), model.apply(variables, jnp.ones(3)).shape
  (['Dense_0', 'Dense_1', 'Dense_2'], (2,))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _identity(z):
    return z


#: Activation name -> the function, as written in a Flax model.
ACTIVATION_FUNCTIONS = {
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "softplus": nn.softplus,
    "silu": nn.silu,
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_erf": functools.partial(nn.gelu, approximate=False),
    "gelu": nn.gelu,  # Flax's default: the tanh approximation, i.e. gelu_tanh
    "sin": jnp.sin,
    "cos": jnp.cos,
    "exp": jnp.exp,
    "identity": _identity,
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "softsign": nn.soft_sign,
}

#: Names in :data:`ACTIVATION_FUNCTIONS` that only spell another entry differently.
ALIASES = {"gelu": "gelu_tanh"}


def activation_function(name: str):
    """The function of the activation ``name``; an unknown name lists the known ones."""
    try:
        return ACTIVATION_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATION_FUNCTIONS)}") from None


class MLP(nn.Module):
    """``Dense -> activation`` per hidden width, then a linear ``Dense(output_dim)``.

    Maps one point ``(m,)`` (or a batch ``(*batch, m)``) to ``(output_dim,)`` (or
    ``(*batch, output_dim)``); ``m`` is fixed by the variables (``init``'s input).

    Attributes:
      widths: the hidden layers' widths (none: an affine model).
      output_dim: the number of outputs ``n``.
      activation: one name from :data:`ACTIVATION_FUNCTIONS` for every hidden layer, or
        one name per hidden layer.
    """

    widths: Sequence[int] = (32, 32)
    output_dim: int = 1
    activation: str | Sequence[str] = "tanh"

    @nn.compact
    def __call__(self, x):
        names = (self.activation,) * len(self.widths) if isinstance(self.activation, str) else self.activation
        if len(names) != len(self.widths):
            raise ValueError(f"{len(names)} activations for {len(self.widths)} hidden layers: {list(names)}")
        for width, name in zip(self.widths, names):
            x = activation_function(name)(nn.Dense(width)(x))
        return nn.Dense(self.output_dim)(x)
