"""The array shapes of the public signatures, as jaxtyping annotations.

``m`` inputs, ``n`` outputs, any leading batch shape ``*batch``. In the packed layout
the last axis of the Hessian holds the ``C(m+1, 2)`` unique entries (``m2``) and that of
the third tensor the ``C(m+2, 3)`` ones (``m3``), in the order of
:func:`nnderiv.packed_indices`. The annotations are checked at run time only where a
caller asks for it (``jaxtyping.jaxtyped`` with a type checker, or jaxtyping's import
hook); tests/test_shapes.py does so on real results.
"""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Float, Real

#: The points ``x``: one point ``(m,)`` or a batch ``(*batch, m)``; integers are promoted.
Points = Real[ArrayLike, "*batch m"]
#: ``value[..., i] = f_i(x)``.
Value = Float[Array, "*batch n"]
#: ``jacobian[..., i, j] = df_i / dx_j``.
Jacobian = Float[Array, "*batch n m"]
#: ``hessian[..., i, j, k] = d2 f_i / dx_j dx_k`` (``layout="full"``).
Hessian = Float[Array, "*batch n m m"]
#: ``third[..., i, j, k, l] = d3 f_i / dx_j dx_k dx_l`` (``layout="full"``).
Third = Float[Array, "*batch n m m m"]
#: The Hessian's unique entries (``layout="packed"``).
PackedHessian = Float[Array, "*batch n m2"]
#: The third tensor's unique entries (``layout="packed"``).
PackedThird = Float[Array, "*batch n m3"]

#: The fields of a result, by layout: value, Jacobian, Hessian, third.
FIELDS = {"full": (Value, Jacobian, Hessian, Third), "packed": (Value, Jacobian, PackedHessian, PackedThird)}
