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
# Run as a script (``python examples/quickstart.py``, about 30 s on a 2-core CPU) or
# cell by cell in an editor that understands ``# %%``. For a quick smoke test shrink the
# training: ``python examples/quickstart.py --steps 200`` or ``QUICKSTART_STEPS=200``.

# %%
import argparse
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
parser.add_argument("--steps", type=int, default=int(os.environ.get("QUICKSTART_STEPS", 5000)),
                    help="Adam steps (default 5000, or $QUICKSTART_STEPS)")
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
    """Value, Jacobian, Hessian and third derivatives of f, shaped like nnderiv's (n = 1)."""
    m = p.shape[-1]
    value = f(p)
    jac = jnp.stack([exact_derivative(p, (j,)) for j in range(m)], -1)[:, None]
    hess = jnp.stack([jnp.stack([exact_derivative(p, (j, k)) for k in range(m)], -1) for j in range(m)], -2)
    third = jnp.stack(
        [jnp.stack([jnp.stack([exact_derivative(p, (j, k, l)) for l in range(m)], -1) for k in range(m)], -2)
         for j in range(m)],
        -3,
    )
    return nnderiv.Derivatives(value, jac, hess[:, None], third[:, None])


# %% [markdown]
# ## Train an MLP with optax (value only: no derivative data)


# %%
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (64, 64):
            x = jnp.tanh(nn.Dense(width, param_dtype=jnp.float64)(x))
        return nn.Dense(1, param_dtype=jnp.float64)(x)


key_data, key_init = jax.random.split(jax.random.PRNGKey(0))
x_train = jax.random.uniform(key_data, (2048, 2), jnp.float64, -2.0, 2.0)
y_train = f(x_train)

model = MLP()
variables = model.init(key_init, jnp.zeros(2))
optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, STEPS, alpha=1e-3))
opt_state = optimizer.init(variables)


@jax.jit
def train_step(variables, opt_state):
    def loss_fn(v):
        return jnp.mean((model.apply(v, x_train) - y_train) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss


start = time.perf_counter()
for step in range(1, STEPS + 1):
    variables, opt_state, loss = train_step(variables, opt_state)
    if step % max(STEPS // 10, 1) == 0 or step == 1:
        print(f"step {step:5d}  mse {float(loss):.3e}")
print(f"trained {STEPS} steps in {time.perf_counter() - start:.1f} s")

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
print("\nat (x, y) = (0.3, -0.7):")
print("  d3f/dx3     network", float(derivs(x0).third[0, 0, 0, 0]), " exact", float(exact_derivative(x0[None], (0, 0, 0))[0]))
print("  d3f/dx dy2  network", float(derivs(x0).third[0, 0, 1, 1]), " exact", float(exact_derivative(x0[None], (0, 1, 1))[0]))

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

if STEPS >= 5000:  # the full run: the fit is good enough for these bounds
    assert errors["third (order 3)"] < 0.2, errors
