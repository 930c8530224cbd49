"""A neural surrogate of a hyperelastic material: train, save, reload, check its derivatives.

What it does, end to end:

1. defines the strain-energy density ``W`` of a compressible Mooney–Rivlin solid as a
   function of the three principal logarithmic (Hencky) strains ``e_i = ln l_i``
   (``l_i``: the principal stretches), exactly, in JAX;
2. trains a Flax linen MLP on values of ``W`` only (Adam, then L-BFGS, with optax),
   showing a rich progress bar and logging the loss every ``--log-every`` steps to the
   terminal and to ``OUT/loss_log.csv``;
3. saves the trained model with ``nnderiv.save_checkpoint`` (an orbax directory
   ``OUT/checkpoint``, with the architecture, input names and domain as metadata in
   ``OUT/checkpoint.json``);
4. reloads it into a fresh module with ``nnderiv.from_checkpoint``, checks the
   reloaded surrogate gives bit-identical derivatives, and compares its stresses
   (order 1), tangent moduli (order 2) and their derivatives (order 3) with the exact
   ones, obtained by nested automatic differentiation of ``W`` itself.

With Hencky strains as inputs, the first derivatives ``tau_i = dW/de_i`` are the
principal Kirchhoff stresses (work-conjugate to the logarithmic strains), the second
derivatives the tangent moduli a Newton solver of a finite-element code needs, and the
third derivatives enter stability and acoustoelastic (stress-dependent wave speed)
analyses and the consistent linearisation of the tangent.

Run::

    python examples/train_surrogate.py                       # about 30 s on 2 CPU cores
    python examples/train_surrogate.py --steps 200 --quiet   # a smoke run
    nnderiv check --checkpoint runs/surrogate/checkpoint     # all methods agree on it

Options: ``--steps`` (training steps, default 3000), ``--width``/``--depth`` (hidden
layers), ``--out DIR`` (default ``runs/surrogate``), ``--seed``, ``--log-every N``,
``--quiet`` (no progress bar or per-step lines; the CSV log is still written). Cell by cell in an
editor that understands ``# %%`` works too.
"""

# %%
import argparse
import csv
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # float64: the third derivatives need it

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

import nnderiv  # noqa: E402

parser = argparse.ArgumentParser(description="Train, save, reload and check a hyperelastic strain-energy surrogate.")
parser.add_argument("--steps", type=int, default=3000, help="training steps: 1/10 Adam, then L-BFGS (default 3000)")
parser.add_argument("--width", type=int, default=32, help="units per hidden layer (default 32)")
parser.add_argument("--depth", type=int, default=2, help="number of hidden layers (default 2)")
parser.add_argument("--out", type=Path, default=Path("runs/surrogate"), help="output folder (default runs/surrogate)")
parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default 0)")
parser.add_argument("--log-every", type=int, default=None, help="log the loss every N steps (default steps/10)")
parser.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
args, _ = parser.parse_known_args()  # known args only: tolerate a notebook kernel's own
console = Console()
if not console.is_terminal:  # a log file or a pipe: wide enough for the comparison lines
    console = Console(width=120)
log_every = args.log_every or max(args.steps // 10, 1)

# %% [markdown]
# ## The material: compressible Mooney–Rivlin in principal strains
#
# With the principal stretches ``l_i = exp(e_i)`` and the invariants
# ``I1 = l1² + l2² + l3²``, ``I2 = l1² l2² + l2² l3² + l3² l1²``, ``J = l1 l2 l3``,
#
#     W = c1 (I1 - 3) + c2 (I2 - 3) - 2 (c1 + 2 c2) ln J + (kappa / 2) (J - 1)²
#
# The ``ln J`` coefficient makes the undeformed state ``e = 0`` stress free
# (``dW/dl_i = 2 c1 + 4 c2 - 2 (c1 + 2 c2) = 0`` at ``l = 1``); the initial shear modulus
# is ``mu = 2 (c1 + c2)``. Units: MPa (energy per unit reference volume). The training
# domain, stretches from 0.8 to 1.25 along each axis, is the cube ``|e_i| <= ln 1.25``.

# %%
C1, C2, KAPPA = 0.4, 0.1, 2.0  # MPa: a soft rubber-like solid, mu = 1.0 MPa
STRAIN_RANGE = (-float(np.log(1.25)), float(np.log(1.25)))  # each principal Hencky strain: stretches 0.8..1.25
INPUT_NAMES = ["e_1 = ln lambda_1", "e_2 = ln lambda_2", "e_3 = ln lambda_3"]


def strain_energy(strains):
    """W of principal Hencky strains ``(..., 3) -> (...)`` (MPa)."""
    stretches = jnp.exp(strains)
    l1, l2, l3 = stretches[..., 0], stretches[..., 1], stretches[..., 2]
    i1 = l1**2 + l2**2 + l3**2
    i2 = (l1 * l2) ** 2 + (l2 * l3) ** 2 + (l3 * l1) ** 2
    j = l1 * l2 * l3
    return C1 * (i1 - 3) + C2 * (i2 - 3) - 2 * (C1 + 2 * C2) * jnp.log(j) + 0.5 * KAPPA * (j - 1) ** 2


# %% [markdown]
# ## The surrogate: a plain MLP, trained on energy values only
#
# ``Dense -> tanh`` per hidden layer, then a linear output. The parameter tree
# (``Dense_0`` ... ``Dense_depth``) is that of nnderiv's bundled model, so the metadata
# keys ``widths``/``activation``/``output_dim`` are enough for ``nnderiv check`` to
# rebuild it. The loss is the mean squared error divided by the variance of ``W`` on the
# training set (a dimensionless number: 1 is "predicts the mean").


# %%
class SurrogateMLP(nn.Module):
    widths: tuple = (32, 32)

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = jnp.tanh(nn.Dense(width, param_dtype=jnp.float64)(x))
        return nn.Dense(1, param_dtype=jnp.float64)(x)


widths = (args.width,) * args.depth
model = SurrogateMLP(widths)
key_train, key_test, key_init = jax.random.split(jax.random.PRNGKey(args.seed), 3)
lo, hi = STRAIN_RANGE
x_train = jax.random.uniform(key_train, (2048, 3), jnp.float64, lo, hi)
y_train = strain_energy(x_train)[:, None]
variables = model.init(key_init, jnp.ones(3))
scale = jnp.var(y_train)


def loss_fn(variables):
    return jnp.mean((model.apply(variables, x_train) - y_train) ** 2) / scale


adam_steps = max(args.steps // 10, 1)
adam = optax.adam(optax.cosine_decay_schedule(3e-2, adam_steps, alpha=1e-2))
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


# %% [markdown]
# ## Training, with a progress bar and a loss log

# %%
args.out.mkdir(parents=True, exist_ok=True)
log_path = args.out / "loss_log.csv"
log_rows = []
start = time.perf_counter()
state = adam.init(variables)
columns = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TextColumn("loss {task.fields[loss]:.2e}"),
)
console.print(
    f"[bold]training[/bold] 3 -> {' -> '.join(map(str, widths))} -> 1 (tanh) on W(e1, e2, e3), "
    f"strains in [{lo:.3f}, {hi:.3f}]: {args.steps} steps ({adam_steps} Adam, then L-BFGS)"
)
with Progress(*columns, console=console, transient=True, disable=args.quiet) as progress:
    task = progress.add_task("training", total=args.steps, loss=float("nan"))
    for step in range(1, args.steps + 1):
        if step == adam_steps + 1:
            state = lbfgs.init(variables)
        phase = "adam" if step <= adam_steps else "lbfgs"
        variables, state, loss = (adam_step if phase == "adam" else lbfgs_step)(variables, state)
        if step % log_every == 0 or step in (1, args.steps):
            loss = float(loss)  # a device sync: only at logging steps
            log_rows.append({"step": step, "phase": phase, "loss": loss, "elapsed_s": time.perf_counter() - start})
            progress.update(task, completed=step, loss=loss)
            if not args.quiet:
                progress.console.print(f"step {step:6d} ({phase:5s})  loss {loss:.3e}")
        elif step % 25 == 0:
            progress.update(task, completed=step)
train_seconds = time.perf_counter() - start
final_loss = float(loss_fn(variables))
with log_path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["step", "phase", "loss", "elapsed_s"])
    writer.writeheader()
    writer.writerows(log_rows)
console.print(f"trained in {train_seconds:.1f} s, final loss {final_loss:.3e}; loss log: {log_path}")

# %% [markdown]
# ## Save the checkpoint, with its metadata
#
# ``checkpoint`` is an orbax directory (a path ending in ``.msgpack`` would give a single
# flax file instead). The metadata lands in ``checkpoint.json``.

# %%
checkpoint = nnderiv.save_checkpoint(
    args.out / "checkpoint",
    variables,
    overwrite=True,  # re-running the script replaces the previous run's checkpoint
    metadata={
        "description": "surrogate of a compressible Mooney-Rivlin strain-energy density W(e_1..3), MPa, "
        "of the principal Hencky strains e_i = ln(lambda_i)",
        "module": "SurrogateMLP in examples/train_surrogate.py",
        "input_dim": 3,
        "output_dim": 1,
        "widths": list(widths),
        "activation": "tanh",
        "input_names": INPUT_NAMES,
        "output_names": ["W (MPa)"],
        "domain": [list(STRAIN_RANGE)] * 3,
        "material": {"model": "compressible Mooney-Rivlin", "c1": C1, "c2": C2, "kappa": KAPPA},
        "steps": args.steps,
        "seed": args.seed,
        "final_loss": final_loss,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "nnderiv": nnderiv.__version__},
    },
)
console.print(f"saved {checkpoint} (+ {nnderiv.metadata_path(checkpoint).name})")

# %% [markdown]
# ## Reload into a fresh module and check
#
# The reloaded network is the trained one bit for bit: identical derivatives.

# %%
net = nnderiv.from_checkpoint(SurrogateMLP(widths), checkpoint)
derivs = nnderiv.derivs_fn(net, order=3)

# Test points inside the domain (a fit is least accurate at its edges).
margin = 0.05 * (hi - lo)
x_test = jax.random.uniform(key_test, (512, 3), jnp.float64, lo + margin, hi - margin)
# One deformation to look at closely, roughly a uniaxial tension: stretches (1.15, 0.95, 0.95).
point = jnp.log(jnp.array([1.15, 0.95, 0.95]))
x_test = jnp.concatenate([x_test, point[None]])  # one batch: each function compiles once
surrogate = derivs(x_test)
in_memory = nnderiv.derivs_fn(nnderiv.from_flax(model, variables), order=3)(x_test)
identical = all(bool(jnp.all(a == b)) for a, b in zip(surrogate, in_memory))
console.print(f"reloaded checkpoint gives bit-identical derivatives: {identical}")
assert identical

# %% [markdown]
# ## Surrogate vs the exact material, order by order
#
# The exact derivatives come from nested AD (``jacfwd(jacfwd(jacrev))``) of
# ``strain_energy``, wrapped with :func:`nnderiv.from_function`. Error per order:
# ``||surrogate - exact|| / ||exact||`` over all test points and tensor entries.

# %%
exact_net = nnderiv.from_function(lambda _, e: strain_energy(e)[None], None, input_dim=3, name="W")
exact = nnderiv.derivs_fn(exact_net, order=3, method="nested")(x_test)
labels = ("W (order 0)", "stresses dW/de (1)", "tangent d2W/de2 (2)", "d3W/de3 (3)")
errors = {}
for order, (label, got, want) in enumerate(zip(labels, surrogate, exact)):
    errors[order] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    console.print(f"{label:22s} relative error {errors[order]:.2e}")

d, e = (jax.tree_util.tree_map(lambda a: a[-1], r) for r in (surrogate, exact))  # the last point
console.print(f"\nat stretches (1.15, 0.95, 0.95), strains {np.asarray(point).round(4)}:")
for label, got, want in (
    ("Kirchhoff stresses tau_i (MPa)", d.jacobian[0], e.jacobian[0]),
    ("tangent d2W/de1^2 (MPa)", d.hessian[0, 0, 0], e.hessian[0, 0, 0]),
    ("d3W/de1^3 (MPa)", d.third[0, 0, 0, 0], e.third[0, 0, 0, 0]),
):
    values = [" ".join(f"{v:+.4f}" for v in np.atleast_1d(np.asarray(a))) for a in (got, want)]
    console.print(f"  {label:31s} surrogate {values[0]}   exact {values[1]}", highlight=False)

results = {"final_loss": final_loss, "train_seconds": train_seconds, "relative_error_by_order": errors}
(args.out / "errors.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
if args.steps >= 3000 and args.width >= 32 and args.depth >= 2:  # the default run fits this well
    assert errors[1] < 0.02 and errors[2] < 0.2, errors
