"""Large batches: ``derivs_fn(..., batch_size=)`` chunking and sharding over devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv

from . import _models
from .helpers import FIELDS, relative_error

# Chunks run the same per-point program on fewer points; XLA may block a GEMM
# differently for another row count, so the last bit can differ (observed: 0 to 2 ulp,
# relative to each tensor's largest entry): 4.5 eps is 1e-15 in float64.
RTOL_SAME = 4.5 * np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def net():
    return _models.linen_mlp(3, [8, 8], 2, "tanh", seed=4).net()


def assert_same(got, expected, label):
    for name, g, e in zip(FIELDS, got, expected):
        assert (g is None) == (e is None), f"{label}: {name}"
        if e is None:
            continue
        assert g.shape == e.shape and g.dtype == e.dtype, f"{label}: {name} {g.shape} {g.dtype} vs {e.shape} {e.dtype}"
        err = relative_error(g, e)
        assert err <= 4.5 * np.finfo(e.dtype).eps, f"{label}: {name} differs by {err:.2e} relative"


@pytest.mark.parametrize(("method", "layout"), [("auto", "full"), ("fwdrev", "packed"), ("jet", "full")])
def test_chunked_equals_unchunked(net, method, layout):
    x = _models.points(3, (2, 3, 7), seed=1)  # 42 points: not a multiple of 5
    expected = nnderiv.derivs_fn(net, method=method, layout=layout)(x)
    chunked = nnderiv.derivs_fn(net, method=method, layout=layout, batch_size=5)
    assert_same(chunked(x), expected, f"{method} {layout} (2,3,7)")
    # Other totals: fewer points than one chunk, another batch shape, a single point (m,).
    for index in (np.s_[0, 0, :3], np.s_[1], np.s_[0, 0, 0]):
        ref = type(expected)(*(None if f is None else f[index] for f in expected))
        assert_same(chunked(x[index]), ref, f"{method} {layout} {x[index].shape}")
    assert chunked.trace_count == 1  # one (5, 3) chunk program for every total size


def test_no_retrace_for_a_new_total_size(net):
    derivs = nnderiv.derivs_fn(net, order=3, batch_size=8)
    for size in (20, 33, 8, 1, 64):
        d = derivs(_models.points(3, (size,), seed=size))
        assert d.third.shape == (size, 2, 3, 3, 3)
    assert derivs.trace_count == 1  # (without batch_size every new shape compiles: test_api.py)


def test_empty_batch_and_orders(net):
    for order in (0, 2):
        derivs = nnderiv.derivs_fn(net, order=order, batch_size=4)
        d = derivs(jnp.zeros((0, 3)))
        assert d.value.shape == (0, 2) and d.order == order
        x = _models.points(3, (9,))
        assert_same(derivs(x), nnderiv.derivs_fn(net, order=order)(x), f"order {order}")


def test_chunked_inside_user_jit_and_grad(net):
    """Under the caller's jit the chunks become a lax.map; same values and gradients."""
    x = _models.points(3, (11,))
    chunked = nnderiv.derivs_fn(net, order=1, method="forward", batch_size=4)
    expected = nnderiv.derivs_fn(net, order=1, method="forward")(x)
    assert_same(jax.jit(chunked)(x), expected, "jit")
    grad = jax.grad(lambda x: jnp.sum(chunked(x).jacobian ** 2))(x)
    grad_ref = jax.grad(lambda x: jnp.sum(nnderiv.derivatives(net, x, order=1, method="forward").jacobian ** 2))(x)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-13)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", np.float64(4.0)])
def test_bad_batch_size(net, bad):
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        nnderiv.derivs_fn(net, batch_size=bad)


def test_bad_mesh(net):
    with pytest.raises(TypeError, match=r"mesh must be None, 'all' or a jax.sharding.Mesh"):
        nnderiv.derivs_fn(net, mesh="gpu")
    assert "batch_size=16" in repr(nnderiv.derivs_fn(net, batch_size=np.int64(16)))


def test_single_device_mesh_is_the_plain_result(net):
    x = _models.points(3, (6,))
    d = nnderiv.sharded_derivs_fn(net, batch_size=4)(x)
    assert_same(d, nnderiv.derivs_fn(net)(x), "mesh over one device")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    import nnderiv
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tests import _models
    from tests.helpers import relative_error

    assert jax.config.jax_enable_x64 and jax.device_count() == 4, jax.devices()
    net = _models.linen_mlp(3, [8, 8], 2, "tanh", seed=4).net()
    x = np.asarray(_models.points(3, (12,), seed=3))
    report = {}
    mesh2d = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    for label, kwargs, method, layout in [
        ("all", {}, "auto", "full"),
        ("all-chunked", {"batch_size": 2}, "fwdrev", "packed"),
        ("mesh2d-jet", {"mesh": mesh2d}, "jet", "full"),
    ]:
        one = nnderiv.derivs_fn(net, method=method, layout=layout)(x)
        sharded = nnderiv.sharded_derivs_fn(net, method=method, layout=layout, **kwargs)
        many = sharded(x)
        uneven = sharded(x[:10])  # padded to 12 on the devices, 10 rows returned
        report[label] = {
            "err": max(relative_error(a, b) for a, b in zip(many, one)),
            "err_uneven": max(relative_error(a, b[:10]) for a, b in zip(uneven, one)),
            "devices": sorted(len(f.sharding.device_set) for f in many),
            "shards": sorted({s.data.shape[0] for f in many for s in f.addressable_shards}),
            "replicated": any(f.sharding.is_fully_replicated for f in many),
            "shape": list(many.third.shape),
            "uneven_shape": list(uneven.value.shape),
        }
    # Multi-host style: a global array assembled from each process's rows (here one process).
    derivs = nnderiv.sharded_derivs_fn(net)
    xg = jax.make_array_from_process_local_data(NamedSharding(derivs.mesh, PartitionSpec("batch")), x)
    one, many = nnderiv.derivs_fn(net)(x), derivs(xg)
    global_input = {
        "err": max(relative_error(a, b) for a, b in zip(many, one)),
        "shards": sorted({s.data.shape[0] for f in many for s in f.addressable_shards}),
        "replicated": any(f.sharding.is_fully_replicated for f in many),
    }
    print(json.dumps([report, global_input]))
    """
)


def test_sharded_over_four_devices_matches_one_device():
    """In a subprocess: the host platform split into 4 devices (XLA flag read at start-up)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report, global_input = json.loads(done.stdout.strip().splitlines()[-1])
    for label, r in report.items():
        assert r["err"] <= RTOL_SAME and r["err_uneven"] <= RTOL_SAME, (label, r)
        assert r["devices"] == [4, 4, 4, 4], (label, r)  # every field lives on all 4 devices
        assert r["shards"] == [3] and not r["replicated"], (label, r)  # 12 points: 3 per device
        assert r["uneven_shape"] == [10, 2], (label, r)
    assert report["all-chunked"]["shape"] == [12, 2, 10]  # packed third tensor
    assert global_input["err"] <= RTOL_SAME and global_input["shards"] == [3] and not global_input["replicated"]
