"""Every method against every other, and against the extended-precision reference.

float64 throughout; the tolerances are the package's table (``nnderiv._tolerance.RTOL``),
relative to each tensor's largest entry, tighter for the lower orders.
"""

from __future__ import annotations

import numpy as np
import pytest

import nnderiv

from . import _models, _reference
from .helpers import assert_derivatives_close

# "analytic" and "auto" compile to the same program as the kernel they pick; they run on a
# subset of cases (the mixed model and test_orders_and_batch_shapes) to keep compile time
# in check.
METHODS = ("forward", "fwdrev", "jet", "nested")


def _all_methods(case, x, order=3, auto=False):
    net = case.net()
    methods = METHODS + ("analytic", "auto") if auto else METHODS
    return {method: nnderiv.derivs_fn(net, order=order, method=method)(x) for method in methods}


def _cross_check(results, label, rtol=None):
    ref = results["nested"]
    for method, result in results.items():
        assert_derivatives_close(result, ref, rtol, label=f"{label} {method} vs nested")
    for a, b in (("forward", "fwdrev"), ("forward", "jet"), ("fwdrev", "jet")):
        assert_derivatives_close(results[a], results[b], rtol, label=f"{label} {a} vs {b}")


ACTIVATION_CASES = sorted(_models.JAX_ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATION_CASES)
def test_each_activation(activation):
    case = _models.linen_mlp(3, [8, 8], 2, activation, seed=1)
    # exp of exp: the second layer's pre-activations reach z ~ 350 (outputs ~1e151), where
    # exp turns one ulp of z (a different summation order: the native kernel's FMA
    # micro-kernel against XLA's dot) into 350 ulps of the value: 8e-14 relative per ulp.
    # Every order is then held to 1e-11 (measured 2.8e-13), elsewhere to the table.
    rtol = 1e-11 if activation == "exp" else None
    _cross_check(_all_methods(case, _models.points(3, (4,))), activation, rtol)


@pytest.mark.parametrize("m", range(1, 9))
def test_input_dims(m):
    case = _models.linen_mlp(m, [6, 6], 2, ["tanh", "silu"], seed=m)
    _cross_check(_all_methods(case, _models.points(m, (3,))), f"m={m}")


@pytest.mark.parametrize("depth", range(0, 5))
def test_depths(depth):
    case = _models.linen_mlp(3, [7] * depth, 1, "softplus", seed=depth)
    _cross_check(_all_methods(case, _models.points(3, (3,))), f"depth={depth}")


@pytest.mark.parametrize("n", range(1, 5))
def test_output_dims(n):
    case = _models.linen_mlp(2, [9, 9], n, "gelu_tanh", seed=10 + n)
    _cross_check(_all_methods(case, _models.points(2, (3,))), f"n={n}")


def test_mixed_activations_and_widths():
    case = _models.linen_mlp(4, [5, 11, 3, 6], 3, ["tanh", "gelu_erf", "softplus", "sin"], seed=3)
    _cross_check(_all_methods(case, _models.points(4, (6,)), auto=True), "mixed")


ORDER_BATCH_CASES = [(o, b) for o in (0, 1, 2, 3) for b in ((), (5,))] + [(3, (2, 3))]


@pytest.mark.parametrize(
    "order,batch",
    ORDER_BATCH_CASES,
    ids=[f"order{o}-batch{'x'.join(map(str, b)) or 'none'}" for o, b in ORDER_BATCH_CASES],
)
def test_orders_and_batch_shapes(order, batch):
    case = _models.linen_mlp(3, [6, 6], 2, ["sigmoid", "silu"], seed=4)
    x = _models.points(3, batch)
    results = _all_methods(case, x, order=order, auto=order == 3)
    _cross_check(results, f"order={order} batch={batch}")
    d = results["nested"]
    assert d.value.shape == (*batch, 2)
    expected_shapes = [(*batch, 2, *(3,) * k) for k in range(4)]
    for k, field in enumerate(d):
        if k <= order:
            assert field.shape == expected_shapes[k]
        else:
            assert field is None


REFERENCE_CASES = [
    ("tanh", 3, [5, 5], 2),
    ("sigmoid", 2, [6], 1),
    ("softplus", 3, [4, 4], 2),
    ("silu", 3, [5, 5], 1),
    ("gelu_tanh", 2, [5, 5], 2),
    ("gelu_erf", 3, [5], 2),
    ("sin", 2, [4, 4], 1),
    ("cos", 3, [4], 2),
    ("exp", 2, [4, 4], 1),
    ("identity", 3, [4], 2),
    ("relu", 3, [6, 6], 2),
    ("leaky_relu", 2, [6], 1),
    ("elu", 2, [5, 5], 1),
    ("softsign", 3, [5], 2),
    (["tanh", "gelu_erf", "softplus"], 4, [4, 5, 4], 3),
]


@pytest.mark.parametrize(
    "activation,m,widths,n",
    REFERENCE_CASES,
    ids=[str(c[0]) if isinstance(c[0], str) else "mixed" for c in REFERENCE_CASES],
)
def test_against_extended_precision_reference(activation, m, widths, n):
    case = _models.linen_mlp(m, widths, n, activation, seed=5)
    x = np.asarray(_models.points(m, (), seed=11))
    expected = _reference.reference_derivatives(case.layers, case.activations, x, order=3, dps=40)
    for method, result in _all_methods(case, x).items():
        assert_derivatives_close(result, expected, label=f"{activation} {method} vs mpmath")
