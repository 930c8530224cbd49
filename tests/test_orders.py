"""Any order: every method against mpmath at orders 4 and 5, the model zoo against nested
AD up to order 6, the result type at high orders, and the memory refusal."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv

from . import _models, _reference, _zoo
from .helpers import relative_error

RTOL = 1e-10
WORST: dict[str, float] = {}


def _compare(got, expected, label: str, rtol: float = RTOL) -> float:
    worst = 0.0
    for k, e in enumerate(expected):
        if e is None:
            continue
        g = got.derivative(k) if isinstance(got, nnderiv.Derivatives) else got[k]
        assert g.shape == np.shape(e), f"{label}: order {k} has shape {g.shape}, expected {np.shape(e)}"
        err = relative_error(g, e)
        assert err <= rtol, f"{label}: order {k} differs by {err:.2e} relative"
        worst = max(worst, err)
    WORST[label.split(" ")[-1]] = max(WORST.get(label.split(" ")[-1], 0.0), worst)
    return worst


@pytest.mark.parametrize(("activation", "order"), [(["tanh", "softplus"], 4), ("gelu_erf", 5)])
def test_every_method_against_mpmath(activation, order):
    case = _models.linen_mlp(2, [4, 3] if order == 4 else [4], 1, activation, seed=5)
    x = np.asarray(_models.points(2, (), seed=11))
    expected = _reference.reference_derivatives(case.layers, case.activations, x, order=order, dps=40)
    net = case.net()
    for method in ("forward", "fwdrev", "jet", "nested"):
        got = nnderiv.derivs_fn(net, order=order, method=method)(x)
        assert got.order == order
        _compare(got, expected[: order + 1], f"order{order} {method}")


# Compiling nested AD at order 6 costs seconds per model: the zoo runs at order 4, and three
# of its models at order 6 (LayerNorm at order 6 passes too, in 45 s: too slow for CI).
ZOO_CASES = [(name, 4) for name in _zoo.ZOO] + [("fourier", 6), ("product", 6), ("deepxde_style", 6)]
# Both engine algorithms where the jacrev program is least like an MLP's; elsewhere the one
# "analytic" picks.
BOTH = {"residual", "layernorm", "product", "hard_constraint"}


@pytest.mark.parametrize(("name", "order"), ZOO_CASES, ids=[f"{n}-order{o}" for n, o in ZOO_CASES])
def test_model_zoo_against_nested(name, order):
    net = _zoo.ZOO[name]()
    x = 0.7 * jax.random.normal(jax.random.PRNGKey(3), (3, 2), jnp.float64)
    expected = nnderiv.derivs_fn(net, order=order, method="nested", layout="packed")(x)
    methods = ("forward", "fwdrev") if name in BOTH and order <= 4 else ("analytic",)
    for method in methods:
        got = nnderiv.derivs_fn(net, order=order, method=method, layout="packed")(x)
        assert got.layout == "packed"
        for k in range(order + 1):
            err = relative_error(got[k], expected[k])
            assert err <= RTOL, f"{name} {method}: order {k} differs by {err:.2e}"
            WORST[f"zoo order{k}"] = max(WORST.get(f"zoo order{k}", 0.0), err)


def test_auto_on_fourier_features():
    """It used to crash (a literal has no .shape) while checking for an MLP."""
    net = _zoo.fourier()
    assert nnderiv.METHODS is not None
    from nnderiv.methods import choose

    assert choose(net, 2, jnp.float64, 3) in ("forward", "fwdrev", "fwdadj")
    x = jnp.array([[0.1, 0.2]])
    d = nnderiv.derivs_fn(net, order=3, method="auto")(x)
    np.testing.assert_allclose(d.third, nnderiv.derivs_fn(net, order=3, method="nested")(x).third, rtol=1e-12)


def test_high_order_result_type():
    net = _models.linen_mlp(2, [5], 2, "tanh", seed=1).net()
    x = _models.points(2, (3,))
    d = nnderiv.derivs_fn(net, order=5, method="forward")(x)
    assert d.order == 5 and len(d) == 6 and d.layout == "full"
    value, jac, hess, third, fourth, fifth = d  # tuple-like unpacking, one entry per order
    assert fourth.shape == (3, 2, 2, 2, 2, 2) and fifth.shape == (3, 2) + (2,) * 5
    for k in range(6):
        assert d.derivative(k).shape == (3, 2) + (2,) * k
    for k in range(1, 6):
        assert d.packed(k).shape == (3, 2, math.comb(2 + k - 1, k))
    assert d.packed(6) is None
    with pytest.raises(ValueError, match="order 6 was not computed"):
        d.derivative(6)
    with pytest.raises(ValueError, match="integer >= 0"):
        d.derivative(-1)
    # Symmetric in every pair of input axes.
    np.testing.assert_array_equal(fifth, np.swapaxes(fifth, 2, 6))
    packed = nnderiv.derivs_fn(net, order=5, method="forward", layout="packed")(x)
    assert packed[5].shape == (3, 2, 6)
    np.testing.assert_array_equal(packed.derivative(5), fifth)
    np.testing.assert_array_equal(packed.as_layout("full")[4], fourth)


def test_high_order_result_is_a_pytree_through_transformations():
    net = _models.linen_mlp(2, [4], 1, "sin", seed=2).net()
    derivs = nnderiv.derivs_fn(net, order=4, method="fwdrev", layout="packed")
    x = _models.points(2, (4,))

    @jax.jit
    def loss(u):
        d = derivs(u)
        return jnp.sum(d.packed(4) ** 2) + jnp.sum(d.derivative(3))

    g = jax.grad(loss)(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    mapped = jax.vmap(derivs)(x[:, None, :])
    assert mapped.layout == "packed" and mapped[4].shape == (4, 1, 1, 5)
    _, stacked = jax.lax.scan(lambda c, u: (c, derivs(u[None])), 0.0, x)
    assert stacked.derivative(4).shape == (4, 1, 1, 2, 2, 2, 2)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, derivs(x))
    assert doubled.layout == "packed" and doubled.order == 4


def test_memory_refusal_before_tracing():
    net = _models.linen_mlp(8, [16], 1, "tanh", seed=0).net()
    derivs = nnderiv.derivs_fn(net, order=10, method="forward")
    with pytest.raises(ValueError, match=r"order 10 for 100000 points .* would need about .* GiB.*batch_size="):
        derivs(jnp.zeros((100_000, 8)))
    # The check's arithmetic, with a stated amount of memory.
    from nnderiv._api import check_memory

    check_memory(net, 10, 8, jnp.float64, 6, "packed", available=1 << 30)  # fits
    with pytest.raises(ValueError, match="batch_size="):
        check_memory(net, 10**6, 8, jnp.float64, 6, "full", available=1 << 30)


def test_report_worst_disagreement(record_property):
    assert WORST
    for label, err in sorted(WORST.items()):
        record_property(label, err)
    print("largest relative disagreements:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})
