"""The public entry points: :func:`derivatives` and :func:`derivs_fn`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _network
from ._derivatives import Derivatives, expand_fields
from .methods import METHODS

ORDERS = (0, 1, 2, 3)
LAYOUTS = ("full", "packed")


def _check_options(order, method, layout="full") -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {sorted(METHODS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are {LAYOUTS}")


def _check_network(net) -> None:
    if not isinstance(net, _network.Network):
        raise TypeError(
            f"expected an nnderiv.Network (from nnderiv.from_flax or nnderiv.from_function), got {type(net).__name__}"
        )


def _as_input(net: _network.Network, x) -> jax.Array:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        try:
            x = np.asarray(x)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"x must be an array of shape (m,) or (*batch, m), got {type(x).__name__}") from err
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"x has complex dtype {dtype}; derivatives are defined for real inputs: pass x.real")
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"x has dtype {dtype}; pass a floating-point array (e.g. x.astype(float))")
    if not jnp.issubdtype(dtype, jnp.floating):
        x = jnp.asarray(x, dtype=jnp.result_type(float))  # integers: the default float type
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x is a scalar; pass shape (m,) for one point or (*batch, m) for many (e.g. x.reshape(1))")
    m = x.shape[-1]
    if net.input_dim is not None and m != net.input_dim:
        raise ValueError(
            f"x has {m} features in its last axis but the model takes {net.input_dim}; "
            f"pass x of shape (*batch, {net.input_dim})"
        )
    if m == 0:
        raise ValueError("x has 0 features in its last axis; the model needs at least one input")
    return x


def _check_output(net: _network.Network, m: int, dtype) -> None:
    try:
        out = jax.eval_shape(lambda p, u: net.spec.apply(p, u), net.params, jax.ShapeDtypeStruct((m,), dtype))
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(
            f"the model {net.spec.name} could not be evaluated on one point of shape ({m},): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) > 1:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"the model must map one point (m,) to an array of shape (n,) or (); got {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"the model's output has dtype {out.dtype}; derivatives need a floating-point output")


def derivatives(net: _network.Network, x, order: int = 3, method: str = "auto", layout: str = "full") -> Derivatives:
    r"""Value and all input derivatives of ``net`` up to ``order`` at the points ``x``.

    For ``f: R^m -> R^n``:

    .. math::
        \mathrm{jacobian}_{ij} = \partial_j f_i,\quad
        \mathrm{hessian}_{ijk} = \partial_j \partial_k f_i,\quad
        \mathrm{third}_{ijkl} = \partial_j \partial_k \partial_l f_i .

    Traceable: works inside the caller's ``jit``, ``vmap``, ``lax.scan`` and ``grad``
    (also with respect to the network's parameters). For repeated calls prefer the
    jitted :func:`derivs_fn`.

    Args:
      net: a :class:`Network` from :func:`from_flax` or :func:`from_function`.
      x: shape ``(m,)`` or ``(*batch, m)``; integer inputs are promoted to float.
      order: highest order, 0 to 3.
      method: ``"analytic"`` (the hand-written kernels on packed Taylor coefficients,
        MLPs only: ``"forward"`` or ``"fwdrev"``, whichever the cost model predicts to be
        faster; both names can be asked for directly), ``"jet"``
        (``jax.experimental.jet``), ``"nested"`` (nested ``jacfwd``/``jacrev``) or
        ``"auto"`` (the fastest that applies).
      layout: ``"full"`` (default) or ``"packed"``: the Hessian and third tensor hold
        only their unique entries, shapes ``(*batch, n, C(m+1,2))`` and
        ``(*batch, n, C(m+2,3))``, in the order of :func:`nnderiv.packed_indices`
        (sorted index tuples, lexicographic). Memory then grows with the number of
        unique entries instead of ``m**3``.

    Returns:
      :class:`Derivatives` with fields of shapes ``(*batch, n)``, ``(*batch, n, m)``,
      ``(*batch, n, m, m)``, ``(*batch, n, m, m, m)``; fields above ``order`` are None.

    Example:
      >>> import jax.numpy as jnp, nnderiv
      >>> net = nnderiv.from_function(lambda p, x: p * x[0] ** 3, 2.0, input_dim=1)
      >>> d = nnderiv.derivatives(net, jnp.array([1.0]))
      >>> float(d.value[0]), float(d.jacobian[0, 0]), float(d.hessian[0, 0, 0]), float(d.third[0, 0, 0, 0])
      (2.0, 6.0, 12.0, 12.0)
    """
    _check_options(order, method, layout)
    _check_network(net)
    x = _as_input(net, x)
    batch_shape, m = x.shape[:-1], x.shape[-1]
    _check_output(net, m, x.dtype)
    flat = x.reshape(-1, m)
    result = METHODS[method](net, flat, int(order))
    if layout == "full":
        result = expand_fields(result, m)
    return Derivatives(*(None if f is None else f.reshape(*batch_shape, *f.shape[1:]) for f in result))


class DerivsFn:
    """A jitted ``x -> Derivatives`` for one network, order and method (see :func:`derivs_fn`)."""

    def __init__(self, net: _network.Network, order: int, method: str, layout: str = "full"):
        self.net, self.order, self.method, self.layout = net, order, method, layout
        self.trace_count = 0

        def impl(net, x):
            self.trace_count += 1  # runs only while tracing: counts compilations
            return derivatives(net, x, order, method, layout)

        # The parameters of a derivs_fn are fixed: baking them in as constants lets XLA
        # fold everything that depends on them alone (transposes, casts, products of
        # first-layer weights), which is most of the op count of a single-point call.
        # Traced parameters (derivs_fn built inside a transformation) cannot be baked.
        leaves = jax.tree_util.tree_leaves(net)
        self._bake = not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
        self._jitted = jax.jit(functools.partial(impl, net)) if self._bake else jax.jit(impl)

    def __call__(self, x) -> Derivatives:
        if not isinstance(x, (jax.Array, np.ndarray)):
            x = _as_input(self.net, x)
        return self._jitted(x) if self._bake else self._jitted(self.net, x)

    def lower(self, x):
        """Lower for ``x`` (for inspecting the compiled program)."""
        return self._jitted.lower(x) if self._bake else self._jitted.lower(self.net, x)

    def __repr__(self) -> str:
        return f"DerivsFn({self.net!r}, order={self.order}, method={self.method!r}, layout={self.layout!r})"


def derivs_fn(net: _network.Network, order: int = 3, method: str = "auto", layout: str = "full") -> DerivsFn:
    """A jitted function ``x -> Derivatives`` (see :func:`derivatives` for the math).

    Compiled once per input shape and dtype; repeated calls with the same shapes do not
    retrace (``derivs.trace_count`` counts traces). Call it from inside your own jitted
    simulation code as well.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(2)])
      >>> net = nnderiv.from_flax(model, model.init(jax.random.PRNGKey(0), jnp.ones(3)))
      >>> derivs = nnderiv.derivs_fn(net, order=3)
      >>> d = derivs(jnp.ones((5, 3)))
      >>> d.third.shape
      (5, 2, 3, 3, 3)
    """
    _check_options(order, method, layout)
    _check_network(net)
    return DerivsFn(net, int(order), method, layout)
