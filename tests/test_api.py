"""The public surface: shapes, options, errors, retracing, and use inside transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv

from . import _models
from .helpers import assert_derivatives_close


@pytest.fixture(scope="module")
def case():
    return _models.linen_mlp(3, [8, 8], 2, "tanh", seed=2)


@pytest.fixture(scope="module")
def net(case):
    return case.net()


def test_public_names():
    for name in ["from_flax", "derivs_fn", "derivatives", "Derivatives", "METHODS"]:
        assert hasattr(nnderiv, name)
    assert {"analytic", "jet", "nested", "auto"} <= set(nnderiv.METHODS)
    assert set(nnderiv.METHODS) == {"analytic", "forward", "fwdrev", "fwdadj", "jet", "nested", "auto"}
    assert nnderiv.Derivatives._fields == ("value", "jacobian", "hessian", "third")


def test_unknown_method_lists_valid_ones(net):
    with pytest.raises(ValueError, match=r"unknown method 'fast'.*'analytic'.*'auto'.*'jet'.*'nested'"):
        nnderiv.derivs_fn(net, method="fast")
    with pytest.raises(ValueError, match="unknown method"):
        nnderiv.derivatives(net, jnp.ones(3), method="Nested")


@pytest.mark.parametrize("order", [-1, -4, 2.0, "3", True, None])
def test_bad_order_says_what_is_valid(net, order):
    with pytest.raises(ValueError, match=r"order must be an integer >= 0"):
        nnderiv.derivs_fn(net, order=order)


def test_wrong_input_size(net):
    with pytest.raises(ValueError, match=r"x has 4 features .* model takes 3; pass x of shape \(\*batch, 3\)"):
        nnderiv.derivatives(net, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="model takes 3"):
        nnderiv.derivs_fn(net)(jnp.ones(5))


def test_scalar_input(net):
    with pytest.raises(ValueError, match="scalar"):
        nnderiv.derivatives(net, 1.0)


@pytest.mark.parametrize("x", [jnp.ones(3, jnp.complex128), jnp.ones(3, bool)], ids=["complex", "bool"])
def test_bad_dtype(net, x):
    with pytest.raises(TypeError, match="dtype"):
        nnderiv.derivatives(net, x)
    with pytest.raises(TypeError, match="dtype"):
        nnderiv.derivs_fn(net)(x)


def test_integer_and_list_inputs_are_promoted(net):
    expected = nnderiv.derivatives(net, jnp.array([1.0, 2.0, 3.0]))
    for x in (jnp.array([1, 2, 3]), [1, 2, 3], np.array([1.0, 2.0, 3.0])):
        got = nnderiv.derivs_fn(net)(x)
        assert got.value.dtype == jnp.float64
        assert_derivatives_close(got, expected, 1e-14, "promoted")


def test_not_a_network():
    with pytest.raises(TypeError, match="from_flax"):
        nnderiv.derivatives(lambda x: x, jnp.ones(3))


def test_no_retrace_on_repeated_calls(net):
    derivs = nnderiv.derivs_fn(net, order=3)
    for i in range(5):
        derivs(jnp.full((4, 3), float(i)))
    assert derivs.trace_count == 1
    derivs(jnp.ones((7, 3)))  # a new shape compiles once more
    derivs(jnp.zeros((7, 3)))
    assert derivs.trace_count == 2


def test_derivatives_is_a_pytree(net):
    d = nnderiv.derivs_fn(net, order=2)(jnp.ones((2, 3)))
    assert d.third is None and d.order == 2
    leaves = jax.tree_util.tree_leaves(d)
    assert len(leaves) == 3
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, d)
    np.testing.assert_allclose(doubled.hessian, 2 * d.hessian)


def test_packed_layout(net):
    d = nnderiv.derivs_fn(net)(jnp.ones((2, 3)))
    packed = d.packed(3)
    idx = nnderiv.packed_indices(3, 3)
    assert packed.shape == (2, 2, len(idx))
    for slot, (j, k, l) in enumerate(idx):
        np.testing.assert_array_equal(packed[..., slot], d.third[..., j, k, l])
    with pytest.raises(ValueError, match="integer order >= 1"):
        d.packed(0)


@pytest.mark.parametrize("method", ["forward", "fwdrev", "jet"])
def test_tensors_are_symmetric(net, method):
    d = nnderiv.derivs_fn(net, method=method)(_models.points(3, (3,)))
    np.testing.assert_array_equal(d.hessian, np.swapaxes(d.hessian, -1, -2))
    for perm in [(0, 1, 2, 4, 3), (0, 1, 3, 2, 4), (0, 1, 4, 3, 2)]:
        np.testing.assert_array_equal(d.third, np.transpose(d.third, perm))


@pytest.mark.parametrize("method", ["forward", "fwdrev", "jet", "nested"])
def test_inside_user_jit_vmap_and_scan(net, method):
    xs = _models.points(3, (6,))
    expected = nnderiv.derivatives(net, xs, method="nested")

    @jax.jit
    def under_jit(x):
        return nnderiv.derivatives(net, x, method=method)

    assert_derivatives_close(under_jit(xs), expected, 1e-12, "jit")
    vmapped = jax.vmap(lambda x: nnderiv.derivatives(net, x, method=method))(xs)
    assert_derivatives_close(vmapped, expected, 1e-12, "vmap")

    def step(carry, x):
        d = nnderiv.derivatives(net, x, method=method)
        return carry + d.third.sum(), d

    total, scanned = jax.lax.scan(step, 0.0, xs)
    assert_derivatives_close(scanned, expected, 1e-12, "scan")
    np.testing.assert_allclose(total, expected.third.sum(), rtol=1e-12)


def _plain_derivatives(case, x):
    """Value, Jacobian, Hessian and third tensor at one point by plain nested JAX AD of the Flax model.

    Written without nnderiv: the reference the loop tests below compare with.
    """

    def f(variables, u):
        return case.module.apply(variables, u)

    def f_of_x(u):
        return f(case.variables, u)

    return (
        f_of_x(x),
        jax.jacfwd(f_of_x)(x),
        jax.jacfwd(jax.jacfwd(f_of_x))(x),
        jax.jacfwd(jax.jacfwd(jax.jacrev(f_of_x)))(x),
    )


def test_jitted_derivs_inside_simulation_loop(case, net):
    """The intended use: a jitted derivs called from jitted simulation code gives the plain-AD trajectory."""
    derivs = nnderiv.derivs_fn(net, order=3)

    def simulate(point_derivs):
        @jax.jit
        def run(x0):
            def step(x, _):
                value, jac, hess, third = point_derivs(x)
                # A damped Newton-like step that touches all four outputs.
                update = value[0] * jac[0] + 1e-3 * hess[0].sum(-1) + 1e-4 * third[0].sum((-1, -2))
                return x - 0.01 * update, value[0]

            return jax.lax.scan(step, x0, None, length=20)

        return run

    x0 = jnp.array([0.3, -0.2, 0.5])
    x_final, values = simulate(lambda x: tuple(derivs(x)))(x0)
    x_ref, values_ref = simulate(lambda x: _plain_derivatives(case, x))(x0)
    assert values.shape == (20,)
    assert not np.allclose(x_final, x0)  # the loop moved
    np.testing.assert_allclose(values, values_ref, rtol=1e-12)
    np.testing.assert_allclose(x_final, x_ref, rtol=1e-12)


@pytest.mark.parametrize("method", ["forward", "fwdrev", "jet"])
def test_parameter_gradients_match_nested(case, method):
    """d/dparams of a loss containing third derivatives, through each method."""
    xs = _models.points(3, (4,))

    def loss(variables, method):
        d = nnderiv.derivatives(nnderiv.from_flax(case.module, variables), xs, method=method)
        return jnp.sum(d.third**2) + jnp.sum(d.hessian * d.value[..., None, None]) + jnp.sum(d.jacobian)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # compiled: far faster than op-by-op
    expected = grad(case.variables, "nested")
    got = grad(case.variables, method)
    for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10 * float(np.max(np.abs(e))))


def test_pinn_training_step_through_analytic_kernel():
    """A KdV-style residual u_t + 6 u u_x + u_xxx trained with optax through the kernel.

    The same training run with the residual built by plain nested JAX AD of the Flax model
    (no nnderiv) is the reference: the losses and the parameters agree step for step.
    """
    import optax

    case = _models.linen_mlp(2, [12, 12], 1, "tanh", seed=9, scale=1.0)
    xs = _models.points(2, (16,))
    optimizer = optax.adam(1e-3)

    def residual_analytic(variables):
        d = nnderiv.derivatives(nnderiv.from_flax(case.module, variables), xs, method="analytic")
        return d.value[:, 0], d.jacobian[:, 0, 0], d.jacobian[:, 0, 1], d.third[:, 0, 0, 0, 0]

    def residual_plain(variables):
        def u(p):  # one point (x, t) -> u
            return case.module.apply(variables, p)[0]

        u_x = jax.grad(u)
        u_xxx = jax.grad(lambda p: jax.grad(lambda q: u_x(q)[0])(p)[0])
        return jax.vmap(u)(xs), jax.vmap(u_x)(xs)[:, 0], jax.vmap(u_x)(xs)[:, 1], jax.vmap(u_xxx)(xs)[:, 0]

    def train(residual, steps=8):
        def loss(variables):
            u, u_x, u_t, u_xxx = residual(variables)
            return jnp.mean((u_t + 6 * u * u_x + u_xxx) ** 2)

        @jax.jit
        def step(variables, state):
            value, grads = jax.value_and_grad(loss)(variables)
            updates, state = optimizer.update(grads, state)
            return optax.apply_updates(variables, updates), state, value

        variables, state, losses = case.variables, optimizer.init(case.variables), []
        for _ in range(steps):
            variables, state, value = step(variables, state)
            losses.append(float(value))
        return variables, np.array(losses)

    variables, losses = train(residual_analytic)
    reference, losses_ref = train(residual_plain)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-10)
    assert losses[-1] < losses[0]  # and it trains
    for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_network_call_and_describe(case, net):
    x = _models.points(3, (2, 4))
    np.testing.assert_allclose(net(x), case.module.apply(case.variables, x), rtol=1e-14)
    text = net.describe()
    assert "affine 3 -> 8" in text and "tanh (closed form)" in text
    assert text.splitlines()[0] == "MLP (m=3, parameters float64)"


def test_describe_names_float32_weights_under_x64():
    """Flax creates float32 parameters even under x64: describe() says so, and what that means holds:
    float64 inputs give float64 results, exact for the float32 weights (not for float64 ones)."""
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(1)])
    variables = model.init(jax.random.PRNGKey(0), jnp.ones(2))  # float32: Flax's default param_dtype
    net = nnderiv.from_flax(model, variables)
    assert net.describe().splitlines()[0] == "Sequential (m=2, parameters float32)"
    x = _models.points(2, (3,))
    d = nnderiv.derivatives(net, x)
    assert d.third.dtype == jnp.float64
    # The same weights held in float64 give the same derivatives to float64 rounding.
    widened = nnderiv.from_flax(model, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables))
    assert_derivatives_close(d, nnderiv.derivatives(widened, x), label="float32 weights in float64")


@pytest.mark.parametrize("method", ["forward", "fwdrev", "jet", "nested"])
def test_packed_layout_option(net, method):
    x = _models.points(3, (2, 2))
    full = nnderiv.derivs_fn(net, method=method)(x)
    packed = nnderiv.derivs_fn(net, method=method, layout="packed")(x)
    assert packed.hessian.shape == (2, 2, 2, 6) and packed.third.shape == (2, 2, 2, 10)
    np.testing.assert_array_equal(packed.hessian, full.packed(2))
    np.testing.assert_array_equal(packed.third, full.packed(3))
    # The result knows its layout: packed() of a packed result is the stored tensor, and
    # derivative() expands it.
    assert packed.layout == "packed" and full.layout == "full"
    np.testing.assert_array_equal(packed.packed(3), packed.third)
    np.testing.assert_array_equal(packed.packed(2), full.packed(2))
    np.testing.assert_array_equal(packed.derivative(3), full.third)
    np.testing.assert_array_equal(packed.jacobian, full.jacobian)
    with pytest.raises(ValueError, match="unknown layout 'dense'"):
        nnderiv.derivs_fn(net, layout="dense")


def test_eager_calls_reuse_one_compiled_program():
    """Outside jit, derivatives() compiles once per model structure, not once per wrapping."""
    from nnderiv import _api

    case = _models.linen_mlp(2, [8], 1, "tanh")
    x = _models.points(2, (3,))
    first = nnderiv.derivatives(nnderiv.from_flax(case.module, case.variables), x)
    size = _api._compiled_derivatives._cache_size()
    other = jax.tree_util.tree_map(lambda a: 2 * a, case.variables)
    second = nnderiv.derivatives(nnderiv.from_flax(case.module, other), x)  # same module, new variables
    assert _api._compiled_derivatives._cache_size() == size
    reference = nnderiv.derivatives(nnderiv.from_flax(case.module, other), x, method="nested")
    assert not np.allclose(first.third, second.third)
    assert_derivatives_close(second, reference, rtol=1e-12)
