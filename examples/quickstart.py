# %% [markdown]
# # nnderiv quickstart
#
# Fit a small MLP to a known function, then ask nnderiv for every input derivative of
# the *network* up to third order and compare with the function's exact derivatives.
#
# The function is ``f(x, y) = sin(x) cos(y)`` on ``[-2, 2]^2``, whose derivatives are
# known in closed form: ``d^a/dx^a d^b/dy^b f = sin(x + a pi/2) cos(y + b pi/2)``.
# The network never sees a derivative during training, yet, being a smooth fit of a
# smooth function, its derivatives approach the true ones (less closely at each order).
#
# Run as a script (``python examples/quickstart.py``, about 15 s on a 2-core CPU) or
# cell by cell in an editor that understands ``# %%``. For a quick smoke test shrink the
# training: ``python examples/quickstart.py --steps 200`` or ``QUICKSTART_STEPS=200``.

# %%
import argparse
import itertools
import os
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 throughout

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import nnderiv  # noqa: E402

parser = argparse.ArgumentParser(description="nnderiv quickstart")
parser.add_argument(
    "--steps",
    type=int,
    default=int(os.environ.get("QUICKSTART_STEPS", 9000)),
    help="training steps, 1/9 Adam then L-BFGS (default 9000, or $QUICKSTART_STEPS)",
)
args, _ = parser.parse_known_args()  # known args only: tolerate a notebook kernel's own
STEPS = args.steps

# %% [markdown]
# ## The known function and its exact derivatives


# %%
def f(p):
    """f(x, y) = sin(x) cos(y) at one point p = (x, y); returns shape (1,)."""
    return jnp.sin(p[..., :1]) * jnp.cos(p[..., 1:])


def exact_derivative(p, indices):
    """d^k f / dp_{i1} ... dp_{ik} at the points p (B, 2), from the closed form."""
    a = sum(1 for i in indices if i == 0)  # derivatives in x
    b = len(indices) - a  # derivatives in y
    return jnp.sin(p[:, 0] + a * jnp.pi / 2) * jnp.cos(p[:, 1] + b * jnp.pi / 2)


def exact_derivatives(p):
    """Value, Jacobian, Hessian and third derivatives of f at p (B, 2), shaped like nnderiv's (n = 1)."""
    batch, m = p.shape

    def tensor(order):  # entries in row-major order of (i1, ..., ik), then reshaped
        entries = [exact_derivative(p, idx) for idx in itertools.product(range(m), repeat=order)]
        return jnp.stack(entries, -1).reshape(batch, 1, *(m,) * order)

    return nnderiv.Derivatives(f(p), tensor(1), tensor(2), tensor(3))


# %% [markdown]
# ## Train an MLP with optax (value only: no derivative data)
#
# A few hundred Adam steps to get close, then L-BFGS (``optax.lbfgs``), which in float64
# drives the error much lower than Adam alone; that is what the higher derivatives need.


# %%
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (32, 32):
            x = jnp.tanh(nn.Dense(width, param_dtype=jnp.float64)(x))
        return nn.Dense(1, param_dtype=jnp.float64)(x)


key_data, key_init = jax.random.split(jax.random.PRNGKey(0))
x_train = jax.random.uniform(key_data, (1024, 2), jnp.float64, -2.0, 2.0)
y_train = f(x_train)

model = MLP()
variables = model.init(key_init, jnp.zeros(2))


def loss_fn(v):
    return jnp.mean((model.apply(v, x_train) - y_train) ** 2)


ADAM_STEPS = max(STEPS // 9, 1)
adam = optax.adam(optax.cosine_decay_schedule(1e-2, ADAM_STEPS, alpha=1e-2))
lbfgs = optax.lbfgs()
value_and_grad = optax.value_and_grad_from_state(loss_fn)  # reuses the line search's value


@jax.jit
def adam_step(variables, state):
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, state = adam.update(grads, state, variables)
    return optax.apply_updates(variables, updates), state, loss


@jax.jit
def lbfgs_step(variables, state):
    loss, grads = value_and_grad(variables, state=state)
    updates, state = lbfgs.update(grads, state, variables, value=loss, grad=grads, value_fn=loss_fn)
    return optax.apply_updates(variables, updates), state, loss


start = time.perf_counter()
state = adam.init(variables)
for step in range(1, STEPS + 1):
    if step == ADAM_STEPS + 1:
        state = lbfgs.init(variables)
    step_fn = adam_step if step <= ADAM_STEPS else lbfgs_step
    variables, state, loss = step_fn(variables, state)
    if step % max(STEPS // 10, 1) == 0 or step in (1, ADAM_STEPS):
        print(f"step {step:5d} ({'adam' if step <= ADAM_STEPS else 'lbfgs'})  mse {float(loss):.3e}")
print(f"trained {STEPS} steps in {time.perf_counter() - start:.1f} s, final mse {float(loss_fn(variables)):.3e}")

# %% [markdown]
# ## All derivatives of the network, up to order 3
#
# ``nnderiv.from_flax`` wraps the trained model; ``nnderiv.derivs_fn`` returns a jitted
# ``x -> Derivatives`` (value, jacobian, hessian, third) for a batch of points.

# %%
net = nnderiv.from_flax(model, variables)
print(net.describe())
derivs = nnderiv.derivs_fn(net, order=3)  # method="auto": the analytic kernel for an MLP

# Interior points (a derivative fit is worst near the edges of the training domain).
g = jnp.linspace(-1.5, 1.5, 25)
points = jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
d = derivs(points)
print("shapes:", d.value.shape, d.jacobian.shape, d.hessian.shape, d.third.shape)

# %% [markdown]
# ## Compare with the exact derivatives
#
# Relative error per order: ``||network - exact|| / ||exact||`` over all points and entries.

# %%
exact = exact_derivatives(points)
# The closed form agrees with nested AD on f itself (a check of exact_derivatives).
f_net = nnderiv.from_function(lambda _, p: f(p), None, input_dim=2, name="sin(x)cos(y)")
f_ad = nnderiv.derivatives(f_net, points, order=3, method="nested")
assert all(np.allclose(a, b, atol=1e-13) for a, b in zip(exact, f_ad))

names = ("value", "jacobian (order 1)", "hessian (order 2)", "third (order 3)")
errors = {}
for name, got, want in zip(names, d, exact):
    errors[name] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    print(f"{name:20s} relative error {errors[name]:.2e}   max |error| {float(jnp.max(jnp.abs(got - want))):.2e}")

x0 = jnp.array([0.3, -0.7])
d0 = derivs(x0)  # one point: shape (m,) in, fields without a batch axis out
print("\nat (x, y) = (0.3, -0.7):")
for label, idx in (("d3f/dx3   ", (0, 0, 0)), ("d3f/dxdy2 ", (0, 1, 1))):
    want = float(exact_derivative(x0[None], idx)[0])
    print(f"  {label} network {float(d0.third[(0, *idx)]):+.5f}   exact {want:+.5f}")

# %% [markdown]
# ## All methods agree
#
# ``analytic`` (packed Faà di Bruno kernel), ``jet`` (Taylor mode), ``nested``
# (``jacfwd`` of ``jacrev``) and ``auto`` compute the same numbers, up to rounding.

# %%
reference = nnderiv.derivs_fn(net, 3, "nested")(points)
for method in ("analytic", "jet", "nested", "auto"):
    got = nnderiv.derivs_fn(net, 3, method)(points)
    dev = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, reference))
    print(f"{method:9s} max relative deviation from nested: {dev:.1e}")
    assert dev < 1e-12, (method, dev)

if STEPS >= 9000:  # the full run: the fit is good enough for these bounds
    assert errors["third (order 3)"] < 0.2, errors
