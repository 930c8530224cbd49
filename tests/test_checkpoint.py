"""save_checkpoint / load_checkpoint / from_checkpoint: round trips and the errors of a misfit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import nnderiv

from . import _models

M, WIDTHS, N = 3, (12, 12), 2
FORMATS = ["ckpt", "model.msgpack"]  # an orbax directory, a flax msgpack file


def _train_linen(root, save_at: int = 3, steps: int = 6):
    """A few Adam steps on a CompactMLP, saving in both formats after step ``save_at``.

    Returns the module, the variables at the save and their derivatives at ``X``.
    """
    case = _models.linen_mlp(M, WIDTHS, N, "tanh", seed=4)
    module, variables = case.module, case.variables
    x = _models.points(M, (32,), seed=1)
    y = jnp.stack([jnp.sin(x[:, 0]) * x[:, 1], jnp.cos(x[:, 2])], -1)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(variables)

    @jax.jit
    def step(variables, state):
        grads = jax.grad(lambda v: jnp.mean((module.apply(v, x) - y) ** 2))(variables)
        updates, state = optimizer.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state

    saved = None
    for i in range(1, steps + 1):
        variables, state = step(variables, state)
        if i == save_at:
            for name in FORMATS:
                nnderiv.save_checkpoint(root / name, variables, metadata={"step": i, "input_dim": M})
            saved = variables
    # Training went on after the save: the in-memory model has moved away from it.
    assert not np.array_equal(saved["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"])
    return module, saved, nnderiv.derivs_fn(nnderiv.from_flax(module, saved))(X)


X = _models.points(M, (5,), seed=3)


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("linen")
    return root, *_train_linen(root)


def _assert_identical(got, expected):
    for field, a, b in zip(nnderiv.Derivatives._fields, got, expected):
        assert a.dtype == b.dtype == jnp.float64, field
        # Same parameters, same dtype, same program: the results are bit-identical.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)


@pytest.mark.parametrize("name", FORMATS)
def test_linen_round_trip_is_exact(linen_run, name):
    root, module, saved, expected = linen_run
    path = root / name
    assert path.is_dir() if name == "ckpt" else path.is_file()
    # A fresh module object with the same architecture, as in a new process.
    fresh = _models.CompactMLP(WIDTHS, ("tanh", "tanh"), N)
    variables = nnderiv.load_checkpoint(path, fresh)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(saved)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(saved)):
        assert a.dtype == b.dtype == jnp.float64  # the module's param_dtype is float32: kept as saved
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    net = nnderiv.from_checkpoint(fresh, path)
    assert net.input_dim == M
    _assert_identical(nnderiv.derivs_fn(net)(X), expected)
    assert nnderiv.checkpoint_metadata(path) == {"step": 3, "input_dim": M}


def test_input_dim_inferred_dtype_cast_bare_params(tmp_path):
    case = _models.linen_mlp(5, [4], 1, "sin", seed=2)
    path = nnderiv.save_checkpoint(tmp_path / "m.msgpack", case.variables)  # no metadata
    assert nnderiv.checkpoint_metadata(path) is None
    assert nnderiv.from_checkpoint(case.module, path).input_dim == 5  # from the first kernel's shape
    # The parameter tree itself, without {"params": ...}: accepted; dtype= casts.
    path = nnderiv.save_checkpoint(tmp_path / "ckpt", case.variables["params"])
    variables = nnderiv.load_checkpoint(path, case.module, input_dim=5, dtype=jnp.float32)
    assert set(variables) == {"params"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    np.testing.assert_array_equal(
        variables["params"]["Dense_1"]["kernel"], case.variables["params"]["Dense_1"]["kernel"].astype(jnp.float32)
    )


def _nnx_train(model, steps: int):
    """Functional optax steps on the nnx model's parameters (written back into it)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _models.points(M, (16,), seed=5)
    y = jnp.sum(x**2, axis=-1, keepdims=True) * jnp.ones(N)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    nnx.update(model, params)


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnx")
    model = _models.nnx_mlp(M, WIDTHS, N, "softplus", seed=1).module
    _nnx_train(model, 3)
    for name in FORMATS:
        nnderiv.save_checkpoint(root / name, model)
    saved_kernel = np.array(model.readout.kernel[...])  # a copy: the module's arrays move on
    expected = nnderiv.derivs_fn(nnderiv.from_flax(model))(X)
    _nnx_train(model, 2)  # training goes on after the save
    assert not np.array_equal(model.readout.kernel[...], saved_kernel)
    return root, saved_kernel, expected


@pytest.mark.parametrize("name", FORMATS)
def test_nnx_round_trip_is_exact(nnx_run, name):
    root, saved_kernel, expected = nnx_run
    fresh = _models.NnxMLP(M, WIDTHS, N, ["softplus"] * 2, nnx.Rngs(99))  # other random weights
    assert not np.array_equal(fresh.readout.kernel[...], saved_kernel)
    loaded = nnderiv.load_checkpoint(root / name, fresh)
    assert loaded is fresh  # the state went into the module, in place
    np.testing.assert_array_equal(fresh.readout.kernel[...], saved_kernel)
    _assert_identical(nnderiv.derivs_fn(nnderiv.from_checkpoint(fresh, root / name))(X), expected)


def test_nnx_mismatch(tmp_path):
    model = _models.nnx_mlp(M, WIDTHS, N, "tanh").module
    path = nnderiv.save_checkpoint(tmp_path / "n.msgpack", model)
    wider = _models.NnxMLP(M, (12, 16), N, ["tanh"] * 2, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"hidden_stack/1/kernel: shape \(12, 12\) in the checkpoint.*\(12, 16\)"):
        nnderiv.load_checkpoint(path, wider)


# --------------------------------------------------------------------------------------
# misfits: each raises a ValueError naming the parameter, both shapes and the fix


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    case = _models.linen_mlp(M, [6, 6], 1, "tanh")
    return {name: nnderiv.save_checkpoint(root / name, case.variables) for name in FORMATS}


MISFITS = [
    # (module, input_dim, expected message pattern)
    (
        _models.CompactMLP((6, 8), ("tanh", "tanh"), 1),
        None,
        r"params/Dense_1/kernel: shape \(6, 6\) in the checkpoint, the module expects \(6, 8\)",
    ),
    (
        _models.CompactMLP((6,), ("tanh",), 1),
        None,
        r"params/Dense_2/kernel: shape \(6, 1\) in the checkpoint, not in the module",
    ),
    (
        _models.CompactMLP((6, 6, 6), ("tanh",) * 3, 1),
        None,
        r"params/Dense_3/kernel: missing from the checkpoint, the module expects shape \(6, 1\)",
    ),
    (
        _models.CompactMLP((6, 6), ("tanh", "tanh"), 1),
        4,
        r"params/Dense_0/kernel: shape \(3, 6\) in the checkpoint, the module expects \(4, 6\)(.|\n)*"
        r"trained on 3 inputs",
    ),
]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("module,input_dim,pattern", MISFITS, ids=["width", "fewer-layers", "more-layers", "inputs"])
def test_misfit_names_parameter_and_shapes(small_checkpoints, monkeypatch, name, module, input_dim, pattern):
    def no_restore(*args, **kwargs):
        raise AssertionError("the arrays were read before the shapes were checked")

    # The shapes are checked against the checkpoint's metadata, before any array is restored.
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", no_restore)
    with pytest.raises(ValueError, match=pattern) as info:
        nnderiv.load_checkpoint(small_checkpoints[name], module, input_dim=input_dim)
    message = str(info.value)
    assert str(small_checkpoints[name]) in message
    assert "same architecture" in message
    with pytest.raises(ValueError, match="does not fit the module MLP "):
        nnderiv.from_checkpoint(module, small_checkpoints[name], input_dim=input_dim)


def test_not_a_checkpoint(tmp_path):
    module = _models.CompactMLP((6,), ("tanh",), 1)
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(ValueError, match="is not a flax msgpack checkpoint"):
        nnderiv.load_checkpoint(garbage, module)
    text = tmp_path / "notes.msgpack"
    text.write_text("7")  # valid msgpack (an integer), not a tree of arrays
    with pytest.raises(ValueError, match="holds no tree of arrays"):
        nnderiv.load_checkpoint(text, module)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not an orbax checkpoint"):
        nnderiv.load_checkpoint(folder, module)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing"):
        nnderiv.from_checkpoint(module, tmp_path / "missing")


def test_overwrite_and_metadata(tmp_path):
    a = _models.linen_mlp(2, [3], 1, "tanh", seed=0)
    b = _models.linen_mlp(2, [3], 1, "tanh", seed=1)
    for name in ("ckpt", "m.msgpack"):
        path = nnderiv.save_checkpoint(tmp_path / "sub" / name, a.variables, metadata={"domain": [-1, 1]})
        assert nnderiv.metadata_path(path).is_file()
        assert json.loads(nnderiv.metadata_path(path).read_text()) == {"domain": [-1, 1]}
        with pytest.raises(FileExistsError, match="overwrite=True"):
            nnderiv.save_checkpoint(path, b.variables)
        np.testing.assert_array_equal(  # the refused save left the checkpoint as it was
            nnderiv.load_checkpoint(path, a.module)["params"]["Dense_0"]["kernel"],
            a.variables["params"]["Dense_0"]["kernel"],
        )
        nnderiv.save_checkpoint(path, b.variables, overwrite=True)
        np.testing.assert_array_equal(
            nnderiv.load_checkpoint(path, a.module)["params"]["Dense_0"]["kernel"],
            b.variables["params"]["Dense_0"]["kernel"],
        )
        assert nnderiv.checkpoint_metadata(path) is None  # the old metadata described a
    with pytest.raises(TypeError, match="JSON-serialisable"):
        nnderiv.save_checkpoint(tmp_path / "x.msgpack", a.variables, metadata={"bad": object()})
    assert not (tmp_path / "x.msgpack").exists()  # checked before writing anything
    with pytest.raises(TypeError, match="only numeric arrays"):
        nnderiv.save_checkpoint(tmp_path / "k.msgpack", {"params": {"key": jax.random.key(0)}})


def test_all_collections_are_saved_and_required(tmp_path):
    import flax.linen as nn

    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
            return nn.Dense(1)(nn.tanh(x))

    module = WithBatchNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    variables["batch_stats"]["BatchNorm_0"]["mean"] = jnp.arange(4.0)  # as if trained
    path = nnderiv.save_checkpoint(tmp_path / "bn.msgpack", variables)
    restored = nnderiv.load_checkpoint(path, module)
    np.testing.assert_array_equal(restored["batch_stats"]["BatchNorm_0"]["mean"], jnp.arange(4.0))
    params_only = nnderiv.save_checkpoint(tmp_path / "params.msgpack", {"params": variables["params"]})
    with pytest.raises(ValueError, match=r"batch_stats/BatchNorm_0/mean: missing(.|\n)*no 'batch_stats' collection"):
        nnderiv.load_checkpoint(params_only, module)
