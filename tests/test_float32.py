"""float32 runs: every method against the float64 reference.

float32 has eps = 1.2e-7. Each derivative order adds one layer of products of O(1)
coefficients accumulated over the width (sums of up to ~10-30 terms per unit per layer,
with partial cancellation), so the third tensor carries a few hundred ulps of relative
error at depth 2-3: we allow 2e-4 relative to each tensor's largest entry (about 1700 ulps),
and check that the error is also not suspiciously large compared to the float64 gap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnderiv

from . import _models
from .helpers import assert_derivatives_close

RTOL_F32 = 2e-4


@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu", "gelu_tanh"])
def test_float32_agrees_with_float64(activation):
    case = _models.linen_mlp(3, [16, 16], 2, activation, seed=3, scale=1.0)
    x64 = _models.points(3, (8,))
    expected = nnderiv.derivatives(case.net(), x64, method="nested")
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), case.variables)
    net32 = nnderiv.from_flax(case.module, params32)
    x32 = x64.astype(jnp.float32)
    for method in ("forward", "fwdrev", "jet", "nested"):
        got = nnderiv.derivs_fn(net32, method=method)(x32)
        assert all(f.dtype == jnp.float32 for f in got), f"{method} upcast float32 work"
        worst = assert_derivatives_close(got, expected, RTOL_F32, f"float32 {method}")
        assert worst > 0  # really computed in float32
    # Method against method in float32: the package's table (the tolerances of nnderiv check).
    a = nnderiv.derivs_fn(net32, method="analytic")(x32)
    n = nnderiv.derivs_fn(net32, method="nested")(x32)
    assert_derivatives_close(a, n, label="float32 analytic vs nested", dtype="float32")


def test_float32_input_with_float64_params_follows_promotion():
    """Flax promotes a float32 input against float64 parameters to float64."""
    case = _models.linen_mlp(2, [6], 1, "tanh", seed=1)
    x = np.ones((2, 2), np.float32)
    d = nnderiv.derivatives(case.net(), x, method="analytic")
    assert d.third.dtype == jnp.float64


# Nets like the benchmark ones (width 64, depth 3, m up to 8). Bound for the analytic
# kernels: every coefficient is a sum over the fan-in (64) of products of weights and
# closed-form activation derivatives, so each layer adds at most ~fan_in * u of relative
# error (u = 6e-8) per term in the worst case and ~sqrt(fan_in) * u = 5e-7 typically;
# three layers and the three-term order-3 product rule give a worst-case bound of about
# 3 * 3 * 64 * u = 3.5e-5, and we allow 2e-5 (observed: at most 8e-7). Nested AD and jet
# keep RTOL_F32: differentiating the tanh-form GELU by the chain rule subtracts nearly
# equal terms (observed up to 1.2e-4 for nested at m=8, weights at 1.5/sqrt(fan_in)).
RTOL_F32_ANALYTIC = 2e-5


@pytest.mark.parametrize(("activation", "m", "n"), [(["tanh", "softplus", "silu"], 8, 2), ("gelu_tanh", 8, 1)])
def test_float32_benchmark_sized_nets(activation, m, n):
    case = _models.linen_mlp(m, [64, 64, 64], n, activation, seed=3, scale=1.5)
    x64 = _models.points(m, (8,))
    expected = nnderiv.derivs_fn(case.net(), method="forward")(x64)  # float64
    net32 = nnderiv.from_flax(case.module, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), case.variables))
    x32 = x64.astype(jnp.float32)
    for method, rtol in (("forward", RTOL_F32_ANALYTIC), ("fwdrev", RTOL_F32_ANALYTIC), ("nested", RTOL_F32)):
        got = nnderiv.derivs_fn(net32, method=method)(x32)
        assert got.third.dtype == jnp.float32
        assert assert_derivatives_close(got, expected, rtol, f"float32 {method} {activation} m={m}") > 0
