"""The jaxtyping shapes of the public signatures hold on real results, and the checker bites.

The annotations live in ``nnderiv._shapes`` and on ``nnderiv.derivatives`` and
``DerivsFn.__call__``; here jaxtyping checks them with beartype, as a user running
``jaxtyping.jaxtyped(typechecker=beartype)`` (or jaxtyping's import hook) would.
"""

from __future__ import annotations

import typing

import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import nnderiv
from nnderiv import _shapes

from . import _models


@pytest.fixture(scope="module")
def net():
    return _models.linen_mlp(3, [6], 2, "tanh", seed=1).net()


@jaxtyped(typechecker=beartype)
def _full_result(x: _shapes.Points, value: _shapes.Value, jac: _shapes.Jacobian, hess: _shapes.Hessian,
                 third: _shapes.Third) -> None:  # fmt: skip
    """Checks one result against the input it came from: *batch, m and n must agree across all five."""


@jaxtyped(typechecker=beartype)
def _packed_result(x: _shapes.Points, value: _shapes.Value, jac: _shapes.Jacobian, hess: _shapes.PackedHessian,
                   third: _shapes.PackedThird) -> None:  # fmt: skip
    """As ``_full_result`` for ``layout="packed"``."""


def test_public_signatures_carry_the_shapes():
    assert typing.get_type_hints(nnderiv.derivatives)["x"] == _shapes.Points
    assert typing.get_type_hints(nnderiv.DerivsFn.__call__)["x"] == _shapes.Points
    assert typing.get_type_hints(nnderiv.derivatives)["return"] is nnderiv.Derivatives


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)], ids=["one-point", "batch", "batch-2d"])
def test_results_have_the_annotated_shapes(net, batch):
    x = _models.points(3, batch)
    checked = jaxtyped(typechecker=beartype)(nnderiv.derivatives)  # checks x against its annotation
    _full_result(x, *checked(net, x))
    _packed_result(x, *nnderiv.derivs_fn(net, layout="packed")(x))
    _full_result(np.asarray(x), *nnderiv.derivs_fn(net)(np.asarray(x)))  # NumPy in, JAX arrays out


def test_the_checker_rejects_wrong_shapes(net):
    x = _models.points(3, (4,))
    d = nnderiv.derivatives(net, x)
    with pytest.raises(TypeCheckError):  # m of the Jacobian does not match m of x
        _full_result(x, d.value, jnp.swapaxes(d.jacobian, -1, -2), d.hessian, d.third)
    with pytest.raises(TypeCheckError):  # the batch shapes differ
        _full_result(x[:2], *d)
    with pytest.raises(TypeCheckError):  # a scalar is not "*batch m"
        jaxtyped(typechecker=beartype)(nnderiv.derivatives)(net, jnp.float64(1.0))
