"""nnderiv: every input derivative, to any order, of a trained neural network.

>>> import jax, jax.numpy as jnp, flax.linen as nn, nnderiv
>>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
>>> net = nnderiv.from_flax(model, model.init(jax.random.PRNGKey(0), jnp.ones(2)))
>>> d = nnderiv.derivs_fn(net, order=3)(jnp.zeros((4, 2)))
>>> d.hessian.shape
(4, 1, 2, 2)
"""

from importlib.metadata import PackageNotFoundError, version

from ._activations import ACTIVATIONS as ACTIVATIONS
from ._api import ORDERS as ORDERS
from ._api import DerivsFn as DerivsFn
from ._api import derivatives as derivatives
from ._api import derivs_fn as derivs_fn
from ._api import sharded_derivs_fn as sharded_derivs_fn
from ._bundled import bundled_network as bundled_network
from ._bundled import bundled_target as bundled_target
from ._bundled import load_bundled as load_bundled
from ._checkpoint import checkpoint_metadata as checkpoint_metadata
from ._checkpoint import from_checkpoint as from_checkpoint
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import metadata_path as metadata_path
from ._checkpoint import module_from_metadata as module_from_metadata
from ._checkpoint import save_checkpoint as save_checkpoint
from ._derivatives import Derivatives as Derivatives
from ._flax import from_flax as from_flax
from ._flax import from_function as from_function
from ._mlp import ACTIVATION_FUNCTIONS as MLP_ACTIVATIONS
from ._mlp import MLP as MLP
from ._network import Network as Network
from ._network import NotAnMLPError as NotAnMLPError
from ._network import UnsupportedModelError as UnsupportedModelError
from ._symmetric import sorted_tuples as packed_indices
from .methods import METHODS as METHODS

try:
    __version__ = version("nnderiv")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ACTIVATIONS",
    "METHODS",
    "MLP",
    "MLP_ACTIVATIONS",
    "ORDERS",
    "Derivatives",
    "DerivsFn",
    "Network",
    "NotAnMLPError",
    "UnsupportedModelError",
    "bundled_network",
    "bundled_target",
    "checkpoint_metadata",
    "derivatives",
    "derivs_fn",
    "from_checkpoint",
    "from_flax",
    "from_function",
    "load_bundled",
    "load_checkpoint",
    "metadata_path",
    "module_from_metadata",
    "packed_indices",
    "save_checkpoint",
    "sharded_derivs_fn",
]
