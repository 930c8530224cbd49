"""The model a command runs on, from its options, through the public API only.

Sources (the options of ``compare`` and ``check`` alike):

* ``--model bundled`` (the default): :func:`nnderiv.bundled_network`;
* ``--model FILE.json``: a metadata file with its ``.msgpack`` parameters beside it (the
  layout :func:`nnderiv.save_checkpoint` writes for ``FILE.msgpack``);
* ``--checkpoint PATH``: a checkpoint saved with :func:`nnderiv.save_checkpoint`, the
  module built by ``--module pkg.module:Factory`` (with ``--module-kwargs``) or else from
  the architecture in its metadata (:func:`nnderiv.module_from_metadata`).

Every failure that is the user's (a missing file, a module that does not import, a
checkpoint that does not fit) raises :class:`CommandError` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import nnderiv


class CommandError(Exception):
    """A user error (bad option value, missing file): reported by ``main``, exit status 2."""


def load(
    *,
    model: str = "bundled",
    checkpoint: str | None = None,
    module: str | None = None,
    module_kwargs: dict | None = None,
    input_dim: int | None = None,
    dtype,
) -> tuple[nnderiv.Network, dict[str, Any]]:
    """``(network, metadata)`` for the options; the metadata gains ``"source"``."""
    if checkpoint is None and (module is not None or input_dim is not None):
        raise CommandError("--module and --input-dim describe the model of a --checkpoint; pass --checkpoint PATH")
    if checkpoint is not None and model != "bundled":
        raise CommandError("pass either --checkpoint or --model, not both")
    if checkpoint is None and model == "bundled":
        meta = nnderiv.checkpoint_metadata(_bundled_params()) or {}
        return nnderiv.bundled_network(dtype), {**meta, "source": "bundled"}
    if checkpoint is None:
        path = Path(model)
        if path.suffix != ".json" or not path.is_file():
            raise CommandError(f"--model {model!r} is neither 'bundled' nor a JSON file")
        checkpoint = str(path.with_suffix(".msgpack"))
        if not Path(checkpoint).is_file():
            raise CommandError(f"no parameters at {checkpoint} (expected beside --model {model})")
        label = model
    else:
        label = checkpoint
    return _from_checkpoint(Path(checkpoint), module, module_kwargs or {}, input_dim, dtype, label)


def _bundled_params():
    from importlib import resources

    return resources.files("nnderiv").joinpath("data/bundled_mlp.msgpack")


def _from_checkpoint(path: Path, module_spec, module_kwargs: dict, input_dim, dtype, label: str):
    from flax import linen, nnx

    if not path.exists():
        raise CommandError(f"--checkpoint: no checkpoint at {path}")
    try:
        meta = nnderiv.checkpoint_metadata(path) or {}
    except ValueError as err:
        raise CommandError(str(err)) from None
    if module_spec is not None:
        factory = _import_factory(module_spec)
        try:
            module = factory(**module_kwargs)
        except Exception as err:  # noqa: BLE001 - the user's factory, reported with its arguments
            raise CommandError(
                f"--module {module_spec}: calling it with {module_kwargs} failed: {type(err).__name__}: {err}"
            ) from None
        if not isinstance(module, linen.Module | nnx.Module):
            raise CommandError(
                f"--module {module_spec} returned {type(module).__name__}, not a flax.linen or flax.nnx module"
            )
    elif {"widths", "output_dim"} & set(meta):
        try:
            module = nnderiv.module_from_metadata(meta)
        except ValueError as err:
            raise CommandError(f"the architecture in {nnderiv.metadata_path(path)} is not usable: {err}") from None
    else:
        raise CommandError(
            f"no architecture for {path}: pass --module pkg.module:Factory (and --module-kwargs) to build the "
            f"Flax module, or save the checkpoint with metadata holding widths, output_dim and activation "
            f"(the schema of nnderiv.module_from_metadata)"
        )
    if isinstance(module, nnx.Module) and input_dim is not None:
        raise CommandError("--input-dim is for linen modules; an nnx module knows its input size")
    try:
        net = nnderiv.from_checkpoint(module, path, input_dim=input_dim, dtype=dtype)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise CommandError(str(err)) from None
    return net, {**meta, "source": label}


def _import_factory(spec: str):
    """The callable named by ``pkg.module:Name`` or ``path/file.py:Name``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CommandError(f"--module must look like pkg.module:Factory or file.py:Factory, got {spec!r}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CommandError(f"--module: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # The console script does not put the working directory on the path; a user
            # running `nnderiv check` next to their models.py expects it to be found.
            added = str(Path.cwd()) not in sys.path
            if added:
                sys.path.append(str(Path.cwd()))
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except CommandError:
        raise
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module
        raise CommandError(f"--module {spec}: could not import {target}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CommandError(f"--module {spec}: {target} has no callable {name!r}")
    return factory


def domain_points(meta: dict, m: int, count: int, seed: int, dtype):
    """``(points, description)``: ``count`` points uniform in the metadata's domain, else standard normal."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    domain = meta.get("domain")
    if domain is None:
        return jnp.asarray(rng.standard_normal((count, m)), dtype=dtype), "standard normal"
    bounds = np.asarray(domain, dtype=np.float64)
    if bounds.shape == (2,):
        bounds = np.broadcast_to(bounds, (m, 2))
    if bounds.shape != (m, 2) or not np.all(bounds[:, 0] < bounds[:, 1]):
        raise CommandError(f"the metadata's domain {domain!r} is neither [lo, hi] nor one [lo, hi] per input (m={m})")
    x = rng.uniform(bounds[:, 0], bounds[:, 1], size=(count, m))
    boxes = [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in bounds]
    box = f"{boxes[0]}^{m}" if len(set(boxes)) == 1 else " x ".join(boxes)
    return jnp.asarray(x, dtype=dtype), f"uniform in {box}"
