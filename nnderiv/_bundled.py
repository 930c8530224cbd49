r"""A small trained MLP shipped with the package, and the function it was trained on.

The model, an :class:`nnderiv.MLP` (``3 -> 32 -> 32 -> 2``, ``tanh``), was fitted by
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

The model is a checkpoint like any user's: the parameters in
``nnderiv/data/bundled_mlp.msgpack`` (``flax.serialization``), its metadata (the
architecture, in the schema of :mod:`nnderiv._checkpoint`, and how it was trained) in
``nnderiv/data/bundled_mlp.json`` beside it. It is loaded with
:func:`nnderiv.module_from_metadata` and :func:`nnderiv.load_checkpoint`, found with
:mod:`importlib.resources`, so it works from an installed wheel.

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
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp

from ._checkpoint import load_checkpoint, module_from_metadata
from ._mlp import MLP

DATA_PACKAGE = "nnderiv"
PARAMS_FILE = "data/bundled_mlp.msgpack"
METADATA_FILE = "data/bundled_mlp.json"

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


def load_bundled(dtype=None) -> tuple[MLP, dict]:
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
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    with resources.as_file(resources.files(DATA_PACKAGE).joinpath(PARAMS_FILE)) as path:
        return module, load_checkpoint(path, module, input_dim=int(meta["input_dim"]), dtype=dtype)


def bundled_network(dtype=None):
    """The bundled model wrapped with :func:`nnderiv.from_flax`, ready for :func:`nnderiv.derivs_fn`.

    Example:
      >>> import nnderiv
      >>> from nnderiv._bundled import bundled_network
      >>> net = bundled_network()
      >>> net.input_dim
      3
      >>> print(net.describe())
      MLP (m=3, parameters float64)
        affine 3 -> 32 + bias
        tanh (closed form)
        affine 32 -> 32 + bias
        tanh (closed form)
        affine 32 -> 2 + bias
    """
    from ._flax import from_flax

    module, variables = load_bundled(dtype)
    return from_flax(module, variables, input_dim=int(bundled_metadata()["input_dim"]))
