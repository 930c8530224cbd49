"""Wrapping Flax models (linen and nnx) and plain functions as a :class:`Network`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._network import ModelSpec, Network

_PARAM_ERRORS = (
    "ScopeParamShapeError",
    "ScopeParamNotFoundError",
    "ScopeCollectionNotFound",
    "ApplyScopeInvalidVariablesTypeError",
    "ApplyScopeInvalidVariablesStructureError",
    "ScopeVariableNotFoundError",
)


def from_flax(module, variables: Mapping | None = None, *, input_dim: int | None = None) -> Network:
    """Wrap a trained Flax model for :func:`nnderiv.derivatives`.

    The layers are discovered by tracing the model, so any module works: ``@nn.compact``
    loops over ``nn.Dense``, ``nn.Sequential``, nnx modules with ``nnx.Linear`` attributes,
    one activation per layer. Models that are not MLPs wrap too; only the analytic
    method needs an MLP.

    Args:
      module: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      variables: for linen, the variables from ``module.init`` (``{"params": ...}``);
        may be traced (inside ``jax.grad``). Must be omitted for nnx.
      input_dim: the number of inputs ``m``; inferred from the parameters when omitted.

    Returns:
      A :class:`Network`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(1)])
      >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones(3))
      >>> net = nnderiv.from_flax(model, variables)
      >>> net.input_dim
      3
    """
    from flax import linen, nnx

    if isinstance(module, nnx.Module):
        if variables is not None:
            raise TypeError(
                "from_flax(module): an nnx module carries its own parameters; call "
                "nnderiv.from_flax(module) without variables."
            )
        graphdef, state = nnx.split(module)

        def apply_nnx(state, x):
            return nnx.merge(graphdef, state)(x)

        return _wrap(apply_nnx, state, type(module).__name__, input_dim, key=("nnx", graphdef))
    if isinstance(module, linen.Module):
        if variables is None:
            raise TypeError(
                "from_flax(module, variables): a linen module needs its variables, e.g. "
                "variables = module.init(jax.random.PRNGKey(0), x)."
            )
        if not isinstance(variables, Mapping):
            raise TypeError(f"variables must be a mapping such as {{'params': ...}}, got {type(variables).__name__}")
        if "params" not in variables:
            hint = (
                " It looks like the parameters themselves: pass {'params': params}."
                if variables and all(isinstance(v, Mapping) for v in variables.values())
                else ""
            )
            raise ValueError(f"variables has no 'params' collection (keys: {sorted(variables)}).{hint}")

        def apply_linen(variables, x):
            return module.apply(variables, x)

        return _wrap(apply_linen, variables, type(module).__name__, input_dim, key=("linen", module))
    raise TypeError(
        f"from_flax expects a flax.linen.Module or flax.nnx.Module, got {type(module).__name__}. "
        "For a plain function f(params, x) use nnderiv.from_function(f, params)."
    )


def from_function(
    fn: Callable[[Any, jax.Array], jax.Array],
    params: Any = None,
    *,
    input_dim: int | None = None,
    name: str | None = None,
) -> Network:
    """Wrap a function ``fn(params, x) -> y`` of one point ``x`` (m,) with outputs (n,) or ().

    Example:
      >>> import jax.numpy as jnp, nnderiv
      >>> net = nnderiv.from_function(lambda p, x: jnp.sin(p * x), 2.0, input_dim=1)
      >>> float(nnderiv.derivatives(net, jnp.array([0.0]), method="nested").third[0, 0, 0, 0])
      -8.0
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(params, x), got {type(fn).__name__}")
    return _wrap(fn, params, name or getattr(fn, "__name__", "function"), input_dim, key=("function", fn))


def _wrap(apply, params, name: str, input_dim: int | None, key=None) -> Network:
    if input_dim is None:
        input_dim = _infer_input_dim(apply, params, name)
    elif not isinstance(input_dim, (int, np.integer)) or input_dim < 1:
        raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
    return Network(params, ModelSpec(apply, name, None if input_dim is None else int(input_dim), key=key))


def _infer_input_dim(apply, params, name: str) -> int | None:
    """Find the input size by trying the sizes the parameter matrices suggest."""
    matrices = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(params) if np.ndim(leaf) == 2]
    # Dense kernels are (in, out); hand-written layers may store (out, in).
    candidates = list(dict.fromkeys([int(s[0]) for s in matrices] + [int(s[1]) for s in matrices]))
    dtype = jnp.result_type(float)
    param_errors = []
    for m in candidates or [1]:
        try:
            out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((m,), dtype))
        except Exception as err:  # noqa: BLE001 - any failure means "not this size"
            if type(err).__name__ in _PARAM_ERRORS:
                param_errors.append(err)
            continue
        if isinstance(out, jax.ShapeDtypeStruct) and len(out.shape) <= 1:
            return m
    if candidates and len(param_errors) == len(candidates):
        # Every plausible input size hits a parameter mismatch: the variables are wrong.
        first = str(param_errors[0]).splitlines()[0]
        raise ValueError(
            f"the variables do not fit the module {name}: {first} Pass the variables returned by "
            "this module's init (or a checkpoint saved from the same architecture)."
        )
    return None
