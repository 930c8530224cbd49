"""The result type, and expansion of packed symmetric tensors to full ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _symmetric

LAYOUTS = ("full", "packed")
_NAMES = ("value", "jacobian", "hessian", "third")


@jax.tree_util.register_pytree_node_class
class Derivatives:
    """Value and input derivatives of a model ``f: R^m -> R^n`` at a batch of points, any order.

    A pytree (the tensors are its leaves; the layout is static), so it passes through
    ``jit``, ``vmap``, ``lax.scan`` and ``grad``. It reads like the tuple
    ``(value, jacobian, hessian, third, ...)``: iteration, unpacking and indexing give
    the tensor of each order (at least four entries; orders above the one computed are
    ``None``).

    Attributes:
      value: ``(*batch, n)``; ``value[..., i] = f_i(x)``.
      jacobian: ``(*batch, n, m)``; ``jacobian[..., i, j] = df_i / dx_j``.
      hessian: ``(*batch, n, m, m)``; ``hessian[..., i, j, k] = d2 f_i / dx_j dx_k``.
      third: ``(*batch, n, m, m, m)``; ``third[..., i, j, k, l] = d3 f_i / dx_j dx_k dx_l``.
      layout: ``"full"`` (the shapes above) or ``"packed"`` (orders >= 2 hold only their
        unique entries, ``(*batch, n, C(m+k-1, k))``, in the order of
        :func:`nnderiv.packed_indices`).

    Use :meth:`derivative` for the full tensor of any order and :meth:`packed` for its
    unique entries, whatever the layout.
    """

    _fields = _NAMES  # the named orders (tuple-like access, as when this was a NamedTuple)

    def __init__(self, *tensors, layout: str = "full", m: int | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid layouts are {LAYOUTS}")
        tensors = list(tensors)
        while len(tensors) > 4 and tensors[-1] is None:
            tensors.pop()
        tensors += [None] * (4 - len(tensors))
        self._tensors = tuple(tensors)
        self._layout = layout
        self._m = m

    # -- pytree --------------------------------------------------------------------------
    def tree_flatten(self):
        return self._tensors, (self._layout, self._m)

    @classmethod
    def tree_unflatten(cls, aux, children):
        layout, m = aux
        return cls(*children, layout=layout, m=m)

    @classmethod
    def _of(cls, tensors: tuple, layout: str, m: int) -> Derivatives:
        """A result from the tensors of another one (``tuple(d)``), without checks.

        A jitted function returning a plain tuple dispatches about 4 µs faster than one
        returning this class (a custom pytree node costs the C++ dispatch path a call into
        Python per output), which is a tenth of a single-point call.
        """
        self = object.__new__(cls)
        self._tensors, self._layout, self._m = tensors, layout, m
        return self

    # -- tuple-like access ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, index):
        return self._tensors[index]

    def _replace(self, **fields) -> Derivatives:
        tensors = list(self._tensors)
        for name, value in fields.items():
            if name not in _NAMES:
                raise ValueError(f"unknown field {name!r}; the named fields are {_NAMES}")
            tensors[_NAMES.index(name)] = value
        return Derivatives(*tensors, layout=self._layout, m=self._m)

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> Derivatives:
        """``fn`` applied to every tensor present (e.g. a reshape of the batch axes)."""
        return jax.tree_util.tree_map(fn, self)

    value = property(lambda self: self._tensors[0], doc="``(*batch, n)``: the model's value.")
    jacobian = property(lambda self: self._tensors[1], doc="``(*batch, n, m)``: first derivatives.")
    hessian = property(lambda self: self._tensors[2], doc="``(*batch, n, m, m)``, or packed.")
    third = property(lambda self: self._tensors[3], doc="``(*batch, n, m, m, m)``, or packed.")

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def order(self) -> int:
        """The highest order present."""
        return max(k for k, t in enumerate(self._tensors) if t is not None) if self._tensors[0] is not None else -1

    @property
    def m(self) -> int | None:
        """The number of inputs, where known (from the Jacobian's last axis)."""
        if self._m is not None:
            return self._m
        return None if self._tensors[1] is None else int(self._tensors[1].shape[-1])

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{_NAMES[k] if k < 4 else f'order{k}'}={None if t is None else tuple(t.shape)}"
            for k, t in enumerate(self._tensors)
        )
        return f"Derivatives({shapes}, layout={self._layout!r})"

    # -- any order -----------------------------------------------------------------------
    @staticmethod
    def _check_order(order, lowest: int) -> int:
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < lowest:
            raise ValueError(f"order must be an integer >= {lowest}, got {order!r}")
        return int(order)

    def derivative(self, order: int) -> jax.Array:
        """The full order-``order`` tensor ``(*batch, n, m, ..., m)`` (``order = 0``: the value).

        Raises ValueError above the order computed.
        """
        order = self._check_order(order, 0)
        if order > self.order:
            raise ValueError(f"order {order} was not computed (this result goes to order {self.order})")
        tensor = self._tensors[order]
        if self._layout == "packed" and order >= 2:
            return expand_packed(tensor, self.m, order, axis=-1)
        return tensor

    def packed(self, order: int) -> jax.Array | None:
        """The unique entries of the order-``order`` tensor, shape ``(*batch, n, C(m+k-1, k))``.

        Entries come in lexicographic order of sorted index tuples: for order 2
        ``(0,0), (0,1), ..., (0,m-1), (1,1), ...``; for order 3 ``(j,k,l)`` with
        ``j <= k <= l``. ``nnderiv.packed_indices(m, order)`` lists them. None above the
        order computed.
        """
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"packed() takes an integer order >= 1, got {order!r}")
        order = int(order)
        if order >= len(self._tensors) or self._tensors[order] is None:
            return None
        tensor = self._tensors[order]
        if self._layout == "packed":
            return tensor
        return pack_full(tensor, order)

    def as_layout(self, layout: str) -> Derivatives:
        """The same derivatives in ``layout`` (``"full"`` or ``"packed"``)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid layouts are {LAYOUTS}")
        if layout == self._layout:
            return self
        if layout == "full":
            tensors = [t if k < 2 or t is None else expand_packed(t, self.m, k, axis=-1) for k, t in enumerate(self)]
        else:
            tensors = [t if k < 2 or t is None else pack_full(t, k) for k, t in enumerate(self)]
        return Derivatives(*tensors, layout=layout, m=self._m)


def expand_packed(packed: jax.Array, m: int, order: int, axis: int) -> jax.Array:
    """Expand ``packed`` (unique entries along ``axis``) to a full symmetric tensor.

    The packed axis is replaced by ``order`` axes of size ``m``.
    """
    axis = axis % packed.ndim
    position = _symmetric.packed_position(m, order)
    full = jnp.take(packed, position.reshape(-1), axis=axis)
    shape = full.shape[:axis] + (m,) * order + full.shape[axis + 1 :]
    return full.reshape(shape)


def pack_full(full: jax.Array | None, order: int) -> jax.Array | None:
    """The unique entries of a full symmetric tensor (last ``order`` axes of size m)."""
    if full is None or order < 2:
        return full
    idx = _symmetric.sorted_tuples(full.shape[-1], order)
    return full[(..., *(idx[:, c] for c in range(order)))]


def expand_fields(packed: Derivatives, m: int) -> Derivatives:
    """Full tensors from a result whose orders >= 2 are packed."""
    return Derivatives(*packed, layout="packed", m=m).as_layout("full")
