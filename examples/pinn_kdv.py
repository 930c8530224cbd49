"""A physics-informed neural network (PINN) for the Korteweg–de Vries equation, derivatives from nnderiv.

Train a Flax MLP ``u_theta(x, t)`` so that it solves the KdV equation

    u_t + 6 u u_x + u_xxx = 0,    (x, t) in [-L, L] x [0, T],

given only the initial profile ``u(x, 0)`` and the boundary values ``u(+-L, t)``. The
data come from the one-soliton solution

    u(x, t) = (c / 2) sech^2( sqrt(c) / 2 * (x - c t - x0) ),

a hump of height ``c/2`` moving right at speed ``c`` without changing shape; inside the
box the network never sees it. The loss is

    mean_r (u_t + 6 u u_x + u_xxx)^2 + w * mean_d (u - u_exact)^2

over collocation points ``r`` inside the box and data points ``d`` on the initial line
and the two sides, all drawn afresh each step. Everything the residual needs (``u``,
``u_t``, ``u_x`` and the third derivative ``u_xxx``) comes from ONE call
``nnderiv.derivatives(nnderiv.from_flax(model, variables), X, order=3, method="analytic")``;
``jax.value_and_grad`` differentiates the loss with respect to ``variables``, through the
analytic kernel, and optax's Adam (warm-up, then cosine decay) takes the step, all
under ``jit``.

Two checks frame the training: before it, the analytic ``u_xxx`` of the untrained
network must equal nested AD's (``jacfwd(jacfwd(jacrev))``) at the collocation points
to 1e-10; after it, the same residual code applied to the exact soliton (a plain
function wrapped with ``nnderiv.from_function``) must vanish to rounding, which checks
the residual code itself. The result is the relative L2 error of the network against
the exact soliton on a 101 x 41 grid over the box.

Run: ``python examples/pinn_kdv.py`` (float64; one to two minutes on a 2-core CPU) or
cell by cell in an editor that understands ``# %%``. Smaller and faster:
``python examples/pinn_kdv.py --steps 50 --points 128``. ``--json`` prints a
machine-readable summary on stdout (the log then goes to stderr); ``--quiet`` hides the log.
"""

# %%
import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64: the 1e-10 checks need it

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

import nnderiv  # noqa: E402


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


parser = argparse.ArgumentParser(description="A PINN for the KdV equation, derivatives from nnderiv")
parser.add_argument("--steps", type=positive_int, default=2000, help="Adam steps (default 2000)")
parser.add_argument("--points", type=positive_int, default=512, help="collocation points per step (default 512)")
parser.add_argument("--width", type=positive_int, default=32, help="hidden width (default 32)")
parser.add_argument("--depth", type=positive_int, default=3, help="hidden layers (default 3)")
parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
parser.add_argument("--quiet", action="store_true", help="no log, only the --json summary if asked")
parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout (log on stderr)")
args, _ = parser.parse_known_args()  # known args only: tolerate a notebook kernel's own

console = Console(stderr=args.json, quiet=args.quiet)

# %% [markdown]
# ## The problem: box, soliton, data

# %%
X_MIN, X_MAX = -6.0, 6.0  # the box in x
T_MAX = 2.0  # and in t: [0, T_MAX]
SPEED = 1.0  # c: height c/2, width ~ 2/sqrt(c)
X0 = -1.0  # the crest at t = 0; it ends at X0 + c T = 1
BOUNDARY_WEIGHT = 10.0  # w: the data terms pin the solution down, so weigh them up


def soliton(X, c):
    """The one-soliton solution at points X (..., 2) = (x, t), for speed c."""
    x, t = X[..., 0], X[..., 1]
    return 0.5 * c / jnp.cosh(0.5 * jnp.sqrt(c) * (x - c * t - X0)) ** 2


def kdv_residual(d):
    """u_t + 6 u u_x + u_xxx from a Derivatives of one output at points (B, 2) = (x, t)."""
    u = d.value[:, 0]
    u_x, u_t = d.jacobian[:, 0, 0], d.jacobian[:, 0, 1]
    u_xxx = d.third[:, 0, 0, 0, 0]
    return u_t + 6.0 * u * u_x + u_xxx


def sample_points(key, n):
    """Collocation points inside the box, initial points at t = 0 and boundary points at x = +-L."""
    k_in, k_ic, k_bc, k_side = jax.random.split(key, 4)
    interior = jax.random.uniform(k_in, (n, 2), minval=jnp.array([X_MIN, 0.0]), maxval=jnp.array([X_MAX, T_MAX]))
    x_ic = jax.random.uniform(k_ic, (n // 4,), minval=X_MIN, maxval=X_MAX)
    initial = jnp.stack([x_ic, jnp.zeros_like(x_ic)], -1)
    t_bc = jax.random.uniform(k_bc, (n // 8,), maxval=T_MAX)
    side = jnp.where(jax.random.bernoulli(k_side, shape=t_bc.shape), X_MAX, X_MIN)
    boundary = jnp.stack([side, t_bc], -1)
    return interior, jnp.concatenate([initial, boundary])


# %% [markdown]
# ## The network
#
# A plain tanh MLP of ``(x, t)``. The inputs are first mapped to ``[-1, 1]^2``: nnderiv
# sees that affine map as an elementwise segment before the first layer and
# differentiates it too (``net.describe()`` lists it), so every derivative is with
# respect to the physical ``x`` and ``t``.


# %%
class MLP(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, X):
        lo, hi = jnp.array([X_MIN, 0.0]), jnp.array([X_MAX, T_MAX])
        h = 2.0 * (X - lo) / (hi - lo) - 1.0
        for _ in range(self.depth):
            h = jnp.tanh(nn.Dense(self.width, param_dtype=jnp.float64)(h))
        return nn.Dense(1, param_dtype=jnp.float64)(h)


key = jax.random.PRNGKey(args.seed)
key_init, key_check, key_train = jax.random.split(key, 3)
model = MLP(args.width, args.depth)
variables = model.init(key_init, jnp.zeros(2))
console.print(nnderiv.from_flax(model, variables).describe())

# %% [markdown]
# ## Check first: analytic ``u_xxx`` equals nested AD's
#
# Same network, same points, two independent methods.

# %%
check_points, _ = sample_points(key_check, args.points)
net0 = nnderiv.from_flax(model, variables)
# derivs_fn: jitted (nnderiv.derivatives outside jit would dispatch op by op, slowly).
u_xxx_analytic = nnderiv.derivs_fn(net0, order=3, method="analytic")(check_points).third[:, 0, 0, 0, 0]
u_xxx_nested = nnderiv.derivs_fn(net0, order=3, method="nested")(check_points).third[:, 0, 0, 0, 0]
u_xxx_dev = float(jnp.max(jnp.abs(u_xxx_analytic - u_xxx_nested)) / jnp.max(jnp.abs(u_xxx_nested)))
console.print(f"u_xxx, analytic vs nested AD at {args.points} points: max relative deviation {u_xxx_dev:.1e}")
assert u_xxx_dev < 1e-10, u_xxx_dev

# %% [markdown]
# ## The loss and the training step
#
# ``nnderiv.from_flax(model, variables)`` is rebuilt inside the loss from the traced
# ``variables``: that is what lets ``jax.grad`` reach the parameters through the
# derivative kernel.


# %%
def loss_fn(variables, interior, data_points):
    """PDE residual plus weighted data misfit; returns (loss, (pde, data))."""
    net = nnderiv.from_flax(model, variables)
    d = nnderiv.derivatives(net, interior, order=3, method="analytic")  # u, u_x, u_t, ..., u_xxx at once
    pde = jnp.mean(kdv_residual(d) ** 2)
    data = jnp.mean((model.apply(variables, data_points)[:, 0] - soliton(data_points, SPEED)) ** 2)
    return pde + BOUNDARY_WEIGHT * data, (pde, data)


optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps))


@jax.jit
def train_step(variables, opt_state, key):
    interior, data_points = sample_points(key, args.points)
    (loss, (pde, data)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables, interior, data_points)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss, pde, data


# A fixed test grid: 101 x 41 points over the whole box.
grid_x, grid_t = jnp.meshgrid(jnp.linspace(X_MIN, X_MAX, 101), jnp.linspace(0.0, T_MAX, 41), indexing="ij")
test_points = jnp.stack([grid_x.ravel(), grid_t.ravel()], -1)
u_exact = soliton(test_points, SPEED)


@jax.jit
def relative_l2(variables):
    u = model.apply(variables, test_points)[:, 0]
    return jnp.linalg.norm(u - u_exact) / jnp.linalg.norm(u_exact)


# %% [markdown]
# ## Train

# %%
opt_state = optimizer.init(variables)
log_every = max(args.steps // 10, 1)
history = []
start = time.perf_counter()
with Progress(
    TextColumn("training"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("loss {task.fields[loss]}"),
    TimeElapsedColumn(),
    console=console,
    disable=args.quiet,
) as progress:
    task = progress.add_task("train", total=args.steps, loss="-")
    for step, step_key in enumerate(jax.random.split(key_train, args.steps), start=1):
        variables, opt_state, loss, pde, data = train_step(variables, opt_state, step_key)
        if step % log_every == 0 or step == 1:
            entry = {"step": step, "loss": float(loss), "pde": float(pde), "data": float(data)}
            entry["rel_l2"] = float(relative_l2(variables))
            history.append(entry)
            progress.console.print(
                f"step {step:6d}  loss {entry['loss']:.3e}  (pde {entry['pde']:.3e}, data {entry['data']:.3e})"
                f"  rel L2 {entry['rel_l2']:.3e}"
            )
            progress.update(task, loss=f"{entry['loss']:.2e}")
        if step == 1:  # float(loss) above waited for it: this is compilation plus one step
            first_step_seconds = time.perf_counter() - start
        progress.advance(task)
train_seconds = time.perf_counter() - start
ms_per_step = 1e3 * (train_seconds - first_step_seconds) / max(args.steps - 1, 1)
rel_l2 = float(relative_l2(variables))

# %% [markdown]
# ## Check last: the residual code on the exact solution
#
# The soliton written as a plain JAX function, wrapped with ``nnderiv.from_function``
# (``c`` as its "parameters"), differentiated by the same call and put through the same
# ``kdv_residual``: it must vanish to rounding on the test grid.


# %%
@jax.jit
def exact_residual_at(c, X):
    exact_net = nnderiv.from_function(lambda c, X: soliton(X, c), c, input_dim=2, name="soliton")
    return kdv_residual(nnderiv.derivatives(exact_net, X, order=3))  # method "auto": nested AD here


exact_residual = float(jnp.max(jnp.abs(exact_residual_at(jnp.float64(SPEED), test_points))))
trained = nnderiv.derivs_fn(nnderiv.from_flax(model, variables), order=3)
network_residual = float(jnp.sqrt(jnp.mean(kdv_residual(trained(test_points)) ** 2)))

# %% [markdown]
# ## Summary

# %%
table = Table(title=f"KdV PINN: {args.depth} x {args.width} tanh, {args.steps} Adam steps, {args.points} points")
table.add_column("quantity")
table.add_column("value", justify="right")
table.add_row("u_xxx analytic vs nested, rel. dev.", f"{u_xxx_dev:.1e}")
table.add_row("loss (one batch): first / last", f"{history[0]['loss']:.3e} / {history[-1]['loss']:.3e}")
table.add_row("rel. L2 error vs exact soliton", f"{rel_l2:.3e}")
table.add_row("network's RMS residual (test grid)", f"{network_residual:.3e}")
table.add_row("exact soliton's max |residual|", f"{exact_residual:.1e}")
table.add_row(
    "training time", f"{train_seconds:.0f} s ({first_step_seconds:.0f} s compiling, {ms_per_step:.1f} ms/step)"
)
console.print(table)
assert exact_residual < 1e-10, exact_residual

if args.json:
    summary = {
        "steps": args.steps,
        "points": args.points,
        "width": args.width,
        "depth": args.depth,
        "u_xxx_max_rel_dev": u_xxx_dev,
        "history": history,
        "initial_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "rel_l2": rel_l2,
        "network_rms_residual": network_residual,
        "exact_max_residual": exact_residual,
        "train_seconds": train_seconds,
        "ms_per_step": ms_per_step,
    }
    print(json.dumps(summary, indent=2))
