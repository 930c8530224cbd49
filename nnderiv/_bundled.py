r"""A small trained MLP shipped with the package, and the function it was trained on.

The model, :class:`BundledMLP` (``3 -> 32 -> 32 -> 2``, ``tanh``), was fitted by
``examples/train_bundled.py`` to :func:`bundled_target`, a smooth model of a bent
triatomic (water-like) molecule in three dimensionless internal coordinates
``q = (q1, q2, q3)`` on ``[-1, 1]^3`` (``q1``, ``q2``: the two bond stretches, ``q3``:
the bend), with two outputs:

* ``V(q)``, the potential energy: two Morse stretches, a cosine bend, a bilinear
  stretch-stretch coupling and a stretch-bend coupling,

  .. math::
      V = D\,[(1 - e^{-a q_1})^2 + (1 - e^{-a q_2})^2] + k_b (1 - \cos q_3)
          + c\, q_1 q_2 + g\, (q_1 + q_2)(1 - \cos q_3);

* ``mu(q)``, the dipole moment along the symmetry axis in a bond-dipole model: each
  bond carries ``mu_b(q) = (1 + q/2) e^{-0.3 q}``, projected on the bisector of the
  bond angle ``theta = theta_e + s q3``:

  .. math::
      \mu = [\mu_b(q_1) + \mu_b(q_2)] \cos(\theta / 2).

Both are analytic, so the network's derivatives can be compared with the exact ones
(the forces are ``-dV/dq``, the Hessian gives harmonic frequencies, the third
derivatives the cubic anharmonic force constants).

The parameters live in ``nnderiv/data/bundled_mlp.msgpack`` (``flax.serialization``)
with the architecture in ``nnderiv/data/bundled_mlp.json``; both are read with
:mod:`importlib.resources`, so they work from an installed wheel.

Example:
  >>> import jax.numpy as jnp, nnderiv
  >>> from nnderiv._bundled import bundled_network, bundled_target
  >>> net = bundled_network()
  >>> x = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
  >>> d = nnderiv.derivatives(net, x, order=3)
  >>> d.third.shape
  (2, 2, 3, 3, 3)
  >>> bool(jnp.max(jnp.abs(d.value - bundled_target(x))) < 0.05)
  True
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DATA_PACKAGE = "nnderiv"
PARAMS_FILE = "data/bundled_mlp.msgpack"
METADATA_FILE = "data/bundled_mlp.json"

#: Activations :class:`BundledMLP` can be built with (by name, as stored in the JSON).
ACTIVATION_FUNCTIONS = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "sin": jnp.sin,
}

# The target's constants (dimensionless).
MORSE_DEPTH = 1.0  # D
MORSE_RANGE = 0.7  # a
BEND_CONSTANT = 1.5  # k_b
STRETCH_COUPLING = 0.2  # c
STRETCH_BEND_COUPLING = 0.3  # g
EQUILIBRIUM_ANGLE = math.radians(104.5)  # theta_e
ANGLE_SCALE = 0.5  # s: q3 = 1 is a 0.5 rad (29 degree) bend

TARGET_NAME = "triatomic_pes_dipole"
INPUT_NAMES = ("q1 (stretch)", "q2 (stretch)", "q3 (bend)")
OUTPUT_NAMES = ("V (potential energy)", "mu (dipole moment)")
DOMAIN = (-1.0, 1.0)


class BundledMLP(nn.Module):
    """A plain MLP: ``Dense -> activation`` per hidden width, then a linear ``Dense(output_dim)``.

    Maps one point ``(input_dim,)`` (or a batch ``(*batch, input_dim)``) to
    ``(output_dim,)`` (or ``(*batch, output_dim)``).
    """

    widths: Sequence[int] = (32, 32)
    output_dim: int = 2
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATION_FUNCTIONS[self.activation]
        for width in self.widths:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.output_dim)(x)


def bundled_target(x) -> jax.Array:
    """The function the bundled model was trained on: ``(*batch, 3) -> (*batch, 2)``.

    Outputs ``[..., 0]`` the potential energy ``V`` and ``[..., 1]`` the dipole moment
    ``mu`` (see the module docstring). Pure JAX: differentiate it with ``jax.jacfwd`` or
    wrap it with :func:`nnderiv.from_function` for exact reference derivatives.

    Example:
      >>> import jax.numpy as jnp
      >>> from nnderiv._bundled import bundled_target
      >>> y = bundled_target(jnp.zeros(3))  # the equilibrium geometry: V = 0
      >>> y.shape, float(y[0])
      ((2,), 0.0)
    """
    x = jnp.asarray(x)
    q1, q2, q3 = x[..., 0], x[..., 1], x[..., 2]
    bend = 1.0 - jnp.cos(q3)
    v = (
        MORSE_DEPTH * ((1.0 - jnp.exp(-MORSE_RANGE * q1)) ** 2 + (1.0 - jnp.exp(-MORSE_RANGE * q2)) ** 2)
        + BEND_CONSTANT * bend
        + STRETCH_COUPLING * q1 * q2
        + STRETCH_BEND_COUPLING * (q1 + q2) * bend
    )

    def bond_dipole(q):
        return (1.0 + 0.5 * q) * jnp.exp(-0.3 * q)

    mu = (bond_dipole(q1) + bond_dipole(q2)) * jnp.cos(0.5 * (EQUILIBRIUM_ANGLE + ANGLE_SCALE * q3))
    return jnp.stack([v, mu], axis=-1)


def bundled_metadata() -> dict[str, Any]:
    """The JSON metadata stored with the bundled parameters (architecture, training info)."""
    text = resources.files(DATA_PACKAGE).joinpath(METADATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def module_from_metadata(meta: dict[str, Any]) -> BundledMLP:
    """The :class:`BundledMLP` described by a metadata dict (as in ``bundled_mlp.json``)."""
    activation = meta.get("activation", "tanh")
    if activation not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATION_FUNCTIONS)}")
    return BundledMLP(
        widths=tuple(int(w) for w in meta["widths"]), output_dim=int(meta["output_dim"]), activation=activation
    )


def restore_variables(module: BundledMLP, input_dim: int, data: bytes, dtype=None) -> dict:
    """Read ``flax.serialization`` msgpack bytes into variables for ``module``.

    The stored tree is checked against ``module``'s own parameter shapes, and every leaf
    is cast to ``dtype`` (default: JAX's default float, ``float64`` when x64 is enabled).
    """
    from flax import serialization

    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    stored = serialization.msgpack_restore(data)
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((input_dim,), dtype))
    expected = jax.tree_util.tree_map(lambda s: s.shape, expected)
    got = jax.tree_util.tree_map(np.shape, stored)
    if got != expected:
        raise ValueError(f"the stored parameters do not fit {module}: expected shapes {expected}, got {got}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), stored)


def load_bundled(dtype=None) -> tuple[BundledMLP, dict]:
    """The bundled Flax module and its trained variables ``{"params": ...}``.

    Args:
      dtype: the parameters' dtype; default JAX's default float (``float64`` with
        ``jax_enable_x64``, else ``float32``; the stored values are float64).

    Example:
      >>> import jax.numpy as jnp
      >>> from nnderiv._bundled import load_bundled
      >>> module, variables = load_bundled()
      >>> module.widths, variables["params"]["Dense_0"]["kernel"].shape
      ((32, 32), (3, 32))
      >>> module.apply(variables, jnp.zeros(3)).shape
      (2,)
    """
    meta = bundled_metadata()
    module = module_from_metadata(meta)
    data = resources.files(DATA_PACKAGE).joinpath(PARAMS_FILE).read_bytes()
    return module, restore_variables(module, int(meta["input_dim"]), data, dtype)


def bundled_network(dtype=None):
    """The bundled model wrapped with :func:`nnderiv.from_flax`, ready for :func:`nnderiv.derivs_fn`.

    Example:
      >>> import nnderiv
      >>> from nnderiv._bundled import bundled_network
      >>> net = bundled_network()
      >>> net.input_dim
      3
      >>> print(net.describe())
      BundledMLP (m=3)
        affine 3 -> 32 + bias
        tanh (closed form)
        affine 32 -> 32 + bias
        tanh (closed form)
        affine 32 -> 2 + bias
    """
    from ._flax import from_flax

    module, variables = load_bundled(dtype)
    return from_flax(module, variables, input_dim=int(variables["params"]["Dense_0"]["kernel"].shape[0]))
