r"""Saving trained Flax models and loading them back for :func:`nnderiv.derivatives`.

Two formats, chosen by the path:

* ``*.msgpack``: one file, ``flax.serialization.to_bytes`` of the variables (small
  models, no extra dependency, the format of the bundled model);
* any other path: an `orbax <https://orbax.readthedocs.io>`_ checkpoint directory
  (``orbax.checkpoint.StandardCheckpointer``), the format of Flax training loops.

Optional metadata (architecture, input names, domain, training details) is written as
JSON *beside* the checkpoint, at :func:`metadata_path`: ``model.msgpack`` ->
``model.json``, directory ``ckpt`` -> ``ckpt.json``; it is plain text, readable
without orbax, and ``nnderiv check`` reads the domain and architecture from it.

The metadata schema: any JSON object; these keys have a meaning for nnderiv (all optional):

``"input_dim"`` (int)
    the number of inputs ``m``: the size :func:`load_checkpoint` builds a linen
    module's template with when no ``input_dim`` is passed.
``"widths"`` (list of int), ``"output_dim"`` (int), ``"activation"`` (a name, or one
name per hidden layer, of :data:`nnderiv.MLP_ACTIVATIONS`; default ``"tanh"``)
    the architecture of a plain MLP, ``Dense -> activation`` per width then a linear
    ``Dense(output_dim)``: :func:`module_from_metadata` builds it as an
    :class:`nnderiv.MLP`, so ``nnderiv check --checkpoint PATH`` needs no ``--module``.
    Any ``@nn.compact`` loop over ``nn.Dense`` has the same parameter tree, so a
    checkpoint of such a model loads into it. ``"architecture": "mlp"`` may name the
    kind; no other kind is known.
``"domain"`` (``[lo, hi]``, or one ``[lo, hi]`` per input)
    where ``nnderiv check`` draws its points (else from a standard normal).

Loading restores against the module itself: the parameter tree and every shape come
from ``module.init`` (linen, evaluated abstractly with :func:`jax.eval_shape`, so no
parameters are drawn) or from the nnx module's own state. A checkpoint that does not fit
raises a :class:`ValueError` naming each offending parameter with both shapes before
anything is read into memory beyond the checkpoint's own metadata (orbax) or bytes
(msgpack). The values keep the dtype they were saved with (a model trained in float64
comes back in float64, bit for bit) unless ``dtype=`` asks for another.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, nnderiv
  >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(1)])
  >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones(3))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...     path = nnderiv.save_checkpoint(f"{tmp}/model.msgpack", variables, metadata={"domain": [-1, 1]})
  ...     net = nnderiv.from_checkpoint(model, path)
  ...     meta = nnderiv.checkpoint_metadata(path)
  >>> net.input_dim, meta
  (3, {'domain': [-1, 1]})
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MSGPACK_SUFFIX = ".msgpack"
_FIX = "build the module with the same architecture (widths, depth, input size) as at save time"
_MAX_LISTED = 6  # mismatching parameters listed in an error; the rest are counted


def metadata_path(path: str | os.PathLike) -> Path:
    """Where the JSON metadata of the checkpoint at ``path`` lives.

    ``model.msgpack`` -> ``model.json`` (the bundled model's convention, so ``nnderiv
    compare --model model.json`` finds the parameters beside it); any other path (an orbax
    directory) gets ``.json`` appended: ``runs/ckpt`` -> ``runs/ckpt.json``.

    Example:
      >>> from nnderiv import metadata_path
      >>> metadata_path("runs/model.msgpack").name, metadata_path("runs/step_100").name
      ('model.json', 'step_100.json')
    """
    path = Path(path)
    if path.suffix == MSGPACK_SUFFIX:
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


#: The metadata keys :func:`module_from_metadata` reads (see the module docstring).
ARCHITECTURE_KEYS = ("widths", "output_dim", "activation")


def module_from_metadata(metadata: Mapping[str, Any]):
    """The :class:`nnderiv.MLP` a checkpoint's metadata describes (the schema in this module's docstring).

    Raises:
      ValueError: the metadata holds no architecture (no ``widths`` and ``output_dim``),
        or one that is not valid; the message names the key.

    Example:
      >>> import nnderiv
      >>> nnderiv.module_from_metadata({"widths": [16, 16], "output_dim": 1, "activation": "softplus"})
      MLP(
          # attributes
          widths = (16, 16)
          output_dim = 1
          activation = 'softplus'
      )
    """
    from ._mlp import MLP, activation_function

    if not isinstance(metadata, Mapping):
        raise ValueError(f"the metadata must be a JSON object, got {type(metadata).__name__}")
    kind = metadata.get("architecture", "mlp")
    if kind != "mlp":
        raise ValueError(f"unknown architecture {kind!r} in the metadata; the only one known is 'mlp'")
    missing = [k for k in ("widths", "output_dim") if k not in metadata]
    if missing:
        raise ValueError(
            f"the metadata describes no architecture: no {' or '.join(repr(k) for k in missing)} "
            f"(an MLP needs widths, output_dim and optionally activation)"
        )
    widths, output_dim = metadata["widths"], metadata["output_dim"]
    if not isinstance(widths, list | tuple) or not all(_positive(w) for w in widths):
        raise ValueError(f"'widths' must be a list of positive integers, got {widths!r}")
    if not _positive(output_dim):
        raise ValueError(f"'output_dim' must be a positive integer, got {output_dim!r}")
    activation = metadata.get("activation", "tanh")
    names = [activation] if isinstance(activation, str) else activation
    if not isinstance(names, list | tuple) or (not isinstance(activation, str) and len(names) != len(widths)):
        raise ValueError(f"'activation' must be a name or one name per width ({len(widths)}), got {activation!r}")
    for name in names:
        activation_function(name)  # raises ValueError naming the known ones
    return MLP(
        widths=tuple(int(w) for w in widths),
        output_dim=int(output_dim),
        activation=activation if isinstance(activation, str) else tuple(activation),
    )


def _positive(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


def save_checkpoint(
    path: str | os.PathLike,
    variables,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model's variables (and optional JSON metadata) for :func:`load_checkpoint`.

    Args:
      path: ``*.msgpack`` for a single ``flax.serialization`` file; anything else is an
        orbax checkpoint directory. Missing parent folders are created.
      variables: linen variables (``{"params": ...}``, as from ``module.init`` or a
        training loop), an ``nnx.Module`` (its state except RNG streams is saved) or an
        ``nnx.State``. Arrays only; saved with their dtype.
      metadata: a JSON-serialisable dict written to :func:`metadata_path` (for example
        the architecture, input names and the training domain as ``"domain": [lo, hi]``
        or one ``[lo, hi]`` per input). Checked before anything is written.
      overwrite: replace an existing checkpoint at ``path`` (and its metadata file, which
        is removed when no new ``metadata`` is given, so it never describes another
        model). Default ``False``: an existing ``path`` raises :class:`FileExistsError`.

    Returns:
      The checkpoint's path (absolute). The save is complete when this returns (orbax's
      asynchronous write is awaited), so the files can be copied or loaded at once.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> model = nn.Dense(2)
      >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones(3))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = nnderiv.save_checkpoint(os.path.join(tmp, "ckpt"), variables, metadata={"step": 10})
      ...     print(path.is_dir(), sorted(os.listdir(tmp)))
      ...     try:
      ...         nnderiv.save_checkpoint(path, variables)
      ...     except FileExistsError:
      ...         print("refused: exists")
      True ['ckpt', 'ckpt.json']
      refused: exists
    """
    path = Path(path).expanduser().absolute()
    tree = _savable_tree(variables)
    meta_text = None
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            meta_text = json.dumps(dict(metadata), indent=2, allow_nan=True) + "\n"
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata must be JSON-serialisable: {err}") from err
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"a checkpoint already exists at {path}; pass overwrite=True to replace it or choose another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == MSGPACK_SUFFIX:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; a .msgpack checkpoint is a single file")
        from flax import serialization

        # Write then rename: an interrupted save never leaves a truncated checkpoint.
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(serialization.to_bytes(tree))
        os.replace(partial, path)
    else:
        if path.is_file():
            raise FileExistsError(f"{path} is a file; an orbax checkpoint is a directory (or use a .msgpack path)")
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, tree, force=overwrite)
            checkpointer.wait_until_finished()
    meta_file = metadata_path(path)
    if meta_text is not None:
        meta_file.write_text(meta_text, encoding="utf-8")
    elif meta_file.is_file():
        meta_file.unlink()  # stale: it described whatever was overwritten
    return path


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata dict saved with the checkpoint at ``path``, or ``None`` if none was saved.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> variables = nn.Dense(1).init(jax.random.PRNGKey(0), jnp.ones(2))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = nnderiv.save_checkpoint(f"{tmp}/m.msgpack", variables, metadata={"input_names": ["x", "y"]})
      ...     nnderiv.checkpoint_metadata(path)
      {'input_names': ['x', 'y']}
    """
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"the checkpoint metadata {meta_file} is not valid JSON: {err}") from err


def load_checkpoint(
    path: str | os.PathLike,
    module,
    *,
    input_dim: int | None = None,
    sample_input=None,
    dtype=None,
):
    """Load the variables saved at ``path`` into the structure ``module`` expects.

    Args:
      path: a checkpoint written by :func:`save_checkpoint` (or any
        ``flax.serialization`` msgpack file / orbax ``StandardCheckpointer`` directory of
        the same tree).
      module: the model, built with the same architecture as at save time: a
        ``flax.linen.Module`` (its variables are returned) or a ``flax.nnx.Module`` (the
        saved state is written into it, in place, and the module is returned).
      input_dim: linen only: the number of inputs ``m`` used to build the template with
        ``module.init``. When omitted (and no ``sample_input``), the ``"input_dim"`` of
        the metadata is used, else the size is inferred from the checkpoint's shapes.
      sample_input: linen only: an example input instead of ``input_dim`` (its shape is
        used, for modules whose input is not a flat vector).
      dtype: cast every floating-point leaf to this dtype; default: keep the saved dtypes.

    Returns:
      linen: the variables ``{"params": ...}`` (JAX arrays); nnx: ``module``.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: the file is not a checkpoint, or it does not fit the module: the
        message lists each parameter path that is missing, extra or of another shape,
        with the shape in the checkpoint and the shape the module expects.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> variables = nn.Dense(4).init(jax.random.PRNGKey(0), jnp.ones(3))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = nnderiv.save_checkpoint(f"{tmp}/ckpt", variables)
      ...     restored = nnderiv.load_checkpoint(path, nn.Dense(4))
      ...     try:
      ...         nnderiv.load_checkpoint(path, nn.Dense(5))
      ...     except ValueError as err:
      ...         for line in str(err).splitlines()[1:]:
      ...             print(line)
        params/bias: shape (4,) in the checkpoint, the module expects (5,)
        params/kernel: shape (3, 4) in the checkpoint, the module expects (3, 5)
      To fix: build the module with the same architecture (widths, depth, input size) as at save time.
      >>> bool(jnp.all(restored["params"]["kernel"] == variables["params"]["kernel"]))
      True
    """
    from flax import linen, nnx

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    reader = _OrbaxReader(path) if path.is_dir() else _MsgpackReader(path)
    stored = reader.shapes()  # {key path: (shape, dtype)}, read without the array data

    if isinstance(module, nnx.Module):
        if input_dim is not None or sample_input is not None:
            raise TypeError("input_dim and sample_input are for linen modules; an nnx module knows its shapes")
        state = nnx.state(module, nnx.Not(nnx.RngState))
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
        expected = {_key(kp): tuple(np.shape(leaf)) for kp, leaf in leaves_with_paths}
        _check_fit(stored, expected, path, type(module).__name__, extra_hint="")
        arrays = reader.arrays({k: stored[k] for k in expected}, dtype)
        pure = jax.tree_util.tree_unflatten(treedef, [arrays[_key(kp)] for kp, _ in leaves_with_paths])
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(module, state)
        return module

    if not isinstance(module, linen.Module):
        raise TypeError(f"module must be a flax.linen.Module or flax.nnx.Module, got {type(module).__name__}")
    if input_dim is None and sample_input is None:
        meta = checkpoint_metadata(path) or {}
        input_dim = meta.get("input_dim")
    treedef, keys, source = _linen_template(module, stored, input_dim, sample_input, path)
    arrays = reader.arrays({source(k): stored[source(k)] for k in keys}, dtype)
    return jax.tree_util.tree_unflatten(treedef, [arrays[source(k)] for k in keys])


def from_checkpoint(module, path: str | os.PathLike, *, input_dim: int | None = None, sample_input=None, dtype=None):
    """Load a checkpoint into ``module`` and wrap it: :func:`load_checkpoint` + :func:`nnderiv.from_flax`.

    Args:
      module: the ``flax.linen`` or ``flax.nnx`` module, built as at save time.
      path: the checkpoint (``*.msgpack`` file or orbax directory).
      input_dim, sample_input, dtype: as for :func:`load_checkpoint`.

    Returns:
      A :class:`nnderiv.Network` whose derivatives equal those of the saved model bit for
      bit (same parameters, same dtype).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> model = nn.Sequential([nn.Dense(16), nn.softplus, nn.Dense(1)])
      >>> variables = model.init(jax.random.PRNGKey(1), jnp.ones(2))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     net = nnderiv.from_checkpoint(model, nnderiv.save_checkpoint(f"{tmp}/ckpt", variables))
      >>> x = jnp.array([0.3, -0.2])
      >>> loaded, original = nnderiv.derivs_fn(net)(x), nnderiv.derivs_fn(nnderiv.from_flax(model, variables))(x)
      >>> all(bool(jnp.all(a == b)) for a, b in zip(loaded, original))  # bit for bit
      True
    """
    from flax import nnx

    from ._flax import from_flax

    if isinstance(module, nnx.Module):
        return from_flax(load_checkpoint(path, module, dtype=dtype), input_dim=input_dim)
    variables = load_checkpoint(path, module, input_dim=input_dim, sample_input=sample_input, dtype=dtype)
    m = input_dim if input_dim is not None else (None if sample_input is None else int(np.shape(sample_input)[-1]))
    return from_flax(module, variables, input_dim=m)


# --------------------------------------------------------------------------------------
# internals


def _key(key_path) -> tuple[str, ...]:
    """A pytree key path as a tuple of strings: nnx's integer keys (list items) become "0", ..."""
    parts = []
    for entry in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def _show(key: tuple[str, ...]) -> str:
    return "/".join(key) or "(root)"


def _savable_tree(variables) -> dict:
    """A nested dict with string keys and array leaves: the tree both formats store."""
    from flax import nnx

    if isinstance(variables, nnx.Module):
        variables = nnx.to_pure_dict(nnx.state(variables, nnx.Not(nnx.RngState)))
    elif isinstance(variables, nnx.State):
        variables = nnx.to_pure_dict(variables)
    elif not isinstance(variables, Mapping):
        raise TypeError(
            "variables must be linen variables ({'params': ...}), an nnx.Module or an nnx.State, "
            f"got {type(variables).__name__}"
        )
    tree: dict = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        key = _key(key_path)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"cannot save {_show(key)}: only numeric arrays are stored, got {type(leaf).__name__} "
                f"{'' if dtype is None else dtype}"
            )
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = leaf
    if not tree:
        raise ValueError("variables holds no arrays: nothing to save")
    return tree


def _restore_dtype(stored, wanted) -> np.dtype:
    """The dtype a leaf is restored in: ``wanted`` for floats if given, else the stored one.

    Without x64, JAX has no 64-bit types: ask for the 32-bit ones it would give anyway,
    rather than have every leaf warn about a silent truncation.
    """
    dtype = np.dtype(stored)
    if wanted is not None and np.issubdtype(dtype, np.floating):
        dtype = np.dtype(wanted)
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


class _MsgpackReader:
    """A ``flax.serialization`` msgpack file: the whole (small) file is decoded once."""

    def __init__(self, path: Path):
        from flax import serialization

        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - any decoding failure means "not a checkpoint"
            raise ValueError(
                f"{path} is not a flax msgpack checkpoint (could not decode it: {type(err).__name__}). "
                "Pass a file written by nnderiv.save_checkpoint / flax.serialization.to_bytes, "
                "or an orbax checkpoint directory."
            ) from None
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0] if isinstance(tree, Mapping) else []
        if not leaves or not all(isinstance(leaf, np.ndarray | np.generic) for _, leaf in leaves):
            raise ValueError(f"{path} decodes as msgpack but holds no tree of arrays: it is not a flax checkpoint")
        self._arrays = {_key(kp): np.asarray(leaf) for kp, leaf in leaves}

    def shapes(self) -> dict:
        return {k: (a.shape, a.dtype) for k, a in self._arrays.items()}

    def arrays(self, wanted: dict, dtype) -> dict:
        return {k: jnp.asarray(self._arrays[k], dtype=_restore_dtype(d, dtype)) for k, (_, d) in wanted.items()}


class _OrbaxReader:
    """An orbax ``StandardCheckpointer`` directory: shapes from its metadata, arrays on demand."""

    def __init__(self, path: Path):
        self.path = path
        # Checked here because orbax itself only logs a warning and returns None for a
        # folder that is not a checkpoint.
        if not (path / "_METADATA").is_file():
            raise ValueError(
                f"{path} is a directory but not an orbax checkpoint (no _METADATA file). Pass the folder "
                "written by nnderiv.save_checkpoint (or orbax's StandardCheckpointer), or a .msgpack file."
            )
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
        tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
        if tree is None:
            raise ValueError(f"{path}: could not read the orbax checkpoint's metadata")
        self._meta = {
            _key(kp): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    def shapes(self) -> dict:
        return dict(self._meta)

    def arrays(self, wanted: dict, dtype) -> dict:
        import orbax.checkpoint as ocp

        # The restore target has the stored tree (orbax matches by structure) with only
        # the wanted leaves' shapes; every stored leaf must appear in it, and _check_fit
        # has made sure the checkpoint holds exactly the wanted leaves.
        target: dict = {}
        for key, (shape, stored_dtype) in self._meta.items():
            node = target
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = jax.ShapeDtypeStruct(shape, _restore_dtype(stored_dtype, None))
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(self.path, target)
        flat = {_key(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
        return {k: jnp.asarray(flat[k], dtype=_restore_dtype(d, dtype)) for k, (_, d) in wanted.items()}


def _mismatches(stored: dict, expected: dict) -> tuple[list[str], set]:
    lines = []
    for key in sorted(set(expected) | set(stored)):
        if key not in stored:
            lines.append(f"{_show(key)}: missing from the checkpoint, the module expects shape {expected[key]}")
        elif key not in expected:
            lines.append(f"{_show(key)}: shape {stored[key][0]} in the checkpoint, not in the module")
        elif tuple(stored[key][0]) != tuple(expected[key]):
            lines.append(
                f"{_show(key)}: shape {tuple(stored[key][0])} in the checkpoint, the module expects {expected[key]}"
            )
    return lines, {k for k in expected if k in stored and tuple(stored[k][0]) != tuple(expected[k])}


def _check_fit(stored: dict, expected: dict, path: Path, name: str, extra_hint: str) -> None:
    lines, _ = _mismatches(stored, expected)
    if not lines:
        return
    shown = lines[:_MAX_LISTED]
    if len(lines) > _MAX_LISTED:
        shown.append(f"... and {len(lines) - _MAX_LISTED} more")
    raise ValueError(
        f"the checkpoint {path} does not fit the module {name} ({len(lines)} mismatching parameter"
        f"{'s' if len(lines) > 1 else ''}):\n  " + "\n  ".join(shown) + f"\nTo fix: {_FIX}.{extra_hint}"
    )


def _linen_template(module, stored: dict, input_dim, sample_input, path: Path):
    """(treedef, keys in tree order, template key -> stored key) of ``module.init``'s variables.

    ``module.init`` runs under :func:`jax.eval_shape`: shapes only, no parameters drawn.
    Without an input size, each size the checkpoint's matrices suggest is tried and the
    one whose template matches is taken (the first layer's kernel is ``(m, width)``).
    """
    name = type(module).__name__

    def template(shape):
        x = jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(float))
        abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        keys = [_key(kp) for kp, _ in leaves]
        return {k: tuple(leaf.shape) for k, (_, leaf) in zip(keys, leaves)}, treedef, keys

    def attempt(shape):
        try:
            return template(shape)
        except Exception as err:  # noqa: BLE001 - reported with the shape that was tried
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    if sample_input is not None:
        shapes = [tuple(np.shape(sample_input))]
    elif input_dim is not None:
        if isinstance(input_dim, bool) or not isinstance(input_dim, int | np.integer) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        shapes = [(int(input_dim),)]
    else:
        dims = [s for shape, _ in stored.values() if len(shape) == 2 for s in shape]
        shapes = [(m,) for m in dict.fromkeys(dims)] or [(1,)]

    best = None  # (number of mismatches, template, shape) of the closest candidate
    failures = []
    for shape in shapes:
        result = attempt(shape)
        if isinstance(result, str):
            failures.append(f"input shape {shape}: {result}")
            continue
        expected, treedef, keys = result
        if set(expected) == {("params", *k) for k in stored}:
            # Saved as the bare parameter tree (without the {"params": ...} wrapper): accepted.
            bare = {("params", *k): v for k, v in stored.items()}
            if not _mismatches(bare, expected)[0]:
                return treedef, keys, lambda k: k[1:]
        lines, _ = _mismatches(stored, expected)
        if not lines:
            return treedef, keys, lambda k: k
        if best is None or len(lines) < best[0]:
            best = (len(lines), result, shape)
    if best is None:
        raise ValueError(
            f"could not build the template of {name} to load {path} into: module.init failed for "
            + "; ".join(failures)
            + ". Pass input_dim (or sample_input) with the input size the model was trained on."
        )
    _, (expected, _, _), _ = best
    hint = ""
    if (sample_input is not None or input_dim is not None) and _only_first_kernel_differs(stored, expected):
        hint = f" Only the input layer differs: was the model trained on {_stored_inputs(stored, expected)} inputs?"
    missing_collections = sorted({k[0] for k in expected} - {k[0] for k in stored})
    if missing_collections:
        hint += (
            f" The checkpoint has no {', '.join(repr(c) for c in missing_collections)} collection: save all of the "
            "model's variables (e.g. {'params': ..., 'batch_stats': ...}), not only the parameters."
        )
    _check_fit(stored, expected, path, name, hint)
    raise AssertionError("unreachable: _check_fit raises on a mismatch")


def _only_first_kernel_differs(stored: dict, expected: dict) -> bool:
    _, differing = _mismatches(stored, expected)
    if set(stored) != set(expected) or len(differing) != 1:
        return False
    (key,) = differing
    (s_shape, _), e_shape = stored[key], expected[key]
    return len(e_shape) == 2 and s_shape[1:] == e_shape[1:]


def _stored_inputs(stored: dict, expected: dict) -> int:
    (key,) = _mismatches(stored, expected)[1]
    return int(stored[key][0][0])
