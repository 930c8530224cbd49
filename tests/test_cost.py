"""The cost model behind ``method="auto"`` (``nnderiv/methods/_cost.py``)."""

from __future__ import annotations

from math import comb

import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv
from nnderiv.methods import _cost, choose

from ._models import linen_mlp, points


@pytest.mark.parametrize("m,n", [(1, 1), (3, 1), (3, 8), (16, 1)])
def test_columns(m, n):
    assert _cost.columns("forward", m, n, 3) == comb(m + 3, 3)
    assert _cost.columns("fwdrev", m, n, 3) == (1 + n) * comb(m + 2, 2)
    assert _cost.columns("nested", m, n, 3) == (1 + n) * (1 + m) ** 2
    assert _cost.columns("forward", m, n, 2) == comb(m + 2, 2)
    with pytest.raises(ValueError, match="unknown algorithm"):
        _cost.columns("magic", m, n, 3)


def test_work_counts_the_first_layer_only_for_nested():
    layers = [(3, 64), (64, 64), (64, 1)]
    work = _cost.work(layers, 3, 1, 3)
    assert work["forward"] == (2.0 * 20 * (64 * 64 + 64), 20.0 * 128)
    assert work["fwdrev"] == (2.0 * 20 * (64 * 64 + 64), 2 * 20.0 * 128)
    assert work["nested"] == (2.0 * 32 * (3 * 64 + 64 * 64 + 64), 32.0 * 128)


@pytest.mark.parametrize(
    "m,widths,n,expected",
    [
        # per-element overheads of the kernels dominate a 16-unit layer (measured 0.06 vs 0.10 µs/pt)
        ((1, (16,), 1, "nested")),
        ((3, (64, 64, 64), 8, "forward")),  # many outputs: forward's columns do not grow with n
        ((16, (64, 64, 64), 1, "fwdrev")),  # many inputs, one output: 2 C(18,2) = 306 < C(19,3) = 969
        ((3, (64, 64, 64), 1, "forward")),
    ],
)
def test_auto_picks_the_cheapest_algorithm(m, widths, n, expected):
    case = linen_mlp(m, widths, n, "tanh")
    net = nnderiv.from_flax(case.module, case.variables)
    assert choose(net, m, jnp.float64, 3) == expected
    x = points(m, (5,), seed=1)
    auto = nnderiv.derivatives(net, x, method="auto")
    chosen = nnderiv.derivatives(net, x, method=expected)
    for a, b in zip(auto, chosen):
        np.testing.assert_array_equal(a, b)  # auto *is* the chosen method


def test_order_zero_is_a_forward_pass_and_non_mlps_use_the_engine_or_nested():
    assert _cost.choose([(3, 16), (16, 1)], 3, 1, 0, "float64") == "forward"
    # Not an MLP, but made of supported primitives: one of the engine's algorithms.
    net = nnderiv.from_function(lambda p, x: jnp.sin(p * x).sum(keepdims=True), 2.0, input_dim=3)
    assert choose(net, 3, jnp.float64, 3) in ("forward", "fwdrev")
    # A primitive the engine refuses (sort): nested AD.
    net = nnderiv.from_function(lambda p, x: jnp.sort(jnp.sin(p * x))[:1], 2.0, input_dim=3)
    assert choose(net, 3, jnp.float64, 3) == "nested"


def test_predictions_are_positive_and_grow_with_the_work():
    small = _cost.predicted_seconds([(3, 32), (32, 1)], 3, 1, 3, "float64")
    large = _cost.predicted_seconds([(3, 256), (256, 256), (256, 1)], 3, 1, 3, "float64")
    for algorithm in _cost.ALGORITHMS:
        assert 0 < small[algorithm] < large[algorithm]
    assert _cost.predicted_seconds([(3, 32), (32, 1)], 3, 1, 3, "float32")["forward"] < small["forward"]
