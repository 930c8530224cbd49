"""Train the MLP bundled with nnderiv (``nnderiv/data/bundled_mlp.{msgpack,json}``).

The target is :func:`nnderiv._bundled.bundled_target`: a bent triatomic (water-like)
molecule in three dimensionless internal coordinates ``q = (q1, q2, q3)`` on
``[-1, 1]^3`` (two bond stretches and the bend) with two outputs, the potential energy
``V`` (Morse stretches, cosine bend, stretch-stretch and stretch-bend couplings) and the
dipole moment ``mu`` (a bond-dipole model). So m = 3 inputs, n = 2 outputs.

The architecture is an :class:`nnderiv.MLP`: ``3 -> 32 -> 32 -> 2`` with
``tanh``, fitted in float64 with Adam (cosine-decayed learning rate, full batch) to the
mean squared error, each output scaled by its spread, on 4096 uniformly drawn points; a fixed seed makes the run
deterministic on a given platform. It takes about 10 s on a 2-core CPU.

Usage::

    python examples/train_bundled.py                    # writes nnderiv/data/bundled_mlp.*
    python examples/train_bundled.py --steps 500 --out-dir /tmp/bundled   # a quick try

The parameters are written with :func:`nnderiv.save_checkpoint` (a ``flax.serialization``
msgpack file), next to a JSON file with the architecture and training metadata that
:func:`nnderiv.load_bundled` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import flax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

import nnderiv  # noqa: E402
from nnderiv._bundled import (  # noqa: E402
    DOMAIN,
    INPUT_NAMES,
    OUTPUT_NAMES,
    TARGET_NAME,
    bundled_target,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nnderiv" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000, help="Adam steps (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for data and initialisation (default 0)")
    p.add_argument("--num-train", type=int, default=4096, help="training points (default 4096)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    p.add_argument("--log-every", type=int, default=500, help="print the loss every N steps (default 500)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    console = Console()
    widths, activation, input_dim, output_dim = (32, 32), "tanh", 3, 2

    key_data, key_test, key_init = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    lo, hi = DOMAIN
    x_train = jax.random.uniform(key_data, (args.num_train, input_dim), jnp.float64, lo, hi)
    y_train = bundled_target(x_train)
    x_test = jax.random.uniform(key_test, (4096, input_dim), jnp.float64, lo, hi)
    y_test = bundled_target(x_test)

    model = nnderiv.MLP(widths=widths, output_dim=output_dim, activation=activation)
    variables = model.init(key_init, jnp.zeros(input_dim, jnp.float64))
    # flax.linen.Dense creates float32 parameters by default (param_dtype): train in float64.
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables["params"])
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=1e-3)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    # Each output's error is measured in units of its spread over the training set, so the
    # small dipole is fitted as well as the larger energy.
    scale = jnp.std(y_train, axis=0)

    def loss_fn(params, x, y):
        return jnp.mean(((model.apply({"params": params}, x) - y) / scale) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_train, y_train)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    console.print(
        f"[bold]Training[/bold] MLP {input_dim} -> {' -> '.join(map(str, widths))} -> {output_dim} "
        f"({activation}) on {TARGET_NAME}: {args.num_train} points, {args.steps} Adam steps, seed {args.seed}"
    )
    start = time.perf_counter()
    loss = float("nan")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]:.3e}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.steps, loss=float("nan"))
        for i in range(1, args.steps + 1):
            params, opt_state, loss_arr = step(params, opt_state)
            if i % 50 == 0 or i == args.steps:
                loss = float(loss_arr)
                progress.update(task, completed=i, loss=loss)
            if i % args.log_every == 0 or i == 1 or i == args.steps:
                loss = float(loss_arr)
                progress.console.print(f"step {i:6d}  loss {loss:.3e}  lr {float(schedule(i - 1)):.2e}")
    elapsed = time.perf_counter() - start

    variables = {"params": params}
    final_loss = float(loss_fn(params, x_train, y_train))
    test_loss = float(loss_fn(params, x_test, y_test))
    test_max = jnp.max(jnp.abs(model.apply(variables, x_test) - y_test), axis=0)

    meta = {
        "format": "flax.serialization msgpack of {'params': ...} for nnderiv.MLP (see nnderiv.module_from_metadata)",
        "input_dim": input_dim,
        "output_dim": output_dim,
        "widths": list(widths),
        "activation": activation,
        "dtype": "float64",
        "target": TARGET_NAME,
        "target_function": "nnderiv._bundled.bundled_target",
        "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES),
        "domain": list(DOMAIN),
        "num_train": args.num_train,
        "steps": args.steps,
        "optimizer": f"adam, cosine decay from {args.lr:g} (alpha 1e-3), full batch",
        "seed": args.seed,
        "loss": "mean squared error, each output divided by its standard deviation on the training set",
        "output_scale": [float(s) for s in scale],
        "final_train_loss": final_loss,
        "test_loss": test_loss,
        "test_max_abs_error": [float(e) for e in test_max],
        "num_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }
    # A checkpoint like any user's: the parameters, and the metadata (architecture in the
    # schema of nnderiv.module_from_metadata) beside them as bundled_mlp.json.
    params_path = nnderiv.save_checkpoint(
        args.out_dir / "bundled_mlp.msgpack", variables, metadata=meta, overwrite=True
    )
    meta_path = nnderiv.metadata_path(params_path)

    console.print(
        f"done in {elapsed:.1f} s: train loss {final_loss:.3e}, test loss {test_loss:.3e}, "
        f"test max |error| V {float(test_max[0]):.2e}, mu {float(test_max[1]):.2e}"
    )
    console.print(f"wrote {params_path} ({params_path.stat().st_size / 1024:.1f} KiB) and {meta_path}")


if __name__ == "__main__":
    main()
