"""Closed-form activation derivatives against mpmath, including extreme arguments."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import nnderiv

from . import _models, _reference
from .helpers import assert_derivatives_close

# Moderate and extreme pre-activations (|z| up to 1e3), avoiding derivative roots where
# a relative comparison is meaningless.
POINTS = [-1000.0, -300.0, -50.0, -20.0, -7.5, -2.2, -0.6, -0.05, 0.0, 0.05, 0.6, 2.2, 7.5, 20.0, 50.0, 300.0, 1000.0]
SATURATING = ["tanh", "sigmoid", "softplus", "silu", "gelu_tanh", "gelu_erf"]


def _mp_derivatives(name: str, z: float) -> list[float]:
    """Derivatives by mpmath finite differences, at a precision that resolves values far
    below float64's range (tanh'(-300) ~ 1e-260): the float64 rounding of the result is
    exact, or 0 where the true value underflows."""
    fn = _reference.activation_mp(name)
    digits = 1200 if abs(z) >= 20 else 100
    if name == "gelu_erf":
        digits = min(digits, 700)  # enough for pdf(50) ~ 1e-543; erfc is slow at more
    with mpmath.workdps(digits):
        return [float(mpmath.diff(fn, mpmath.mpf(z), k)) for k in range(4)]


@pytest.mark.parametrize("name", SATURATING + ["sin", "cos", "exp", "identity"])
def test_closed_forms_match_mpmath(name):
    taylor = nnderiv.ACTIVATIONS[name].taylor
    for z in POINTS:
        if name == "exp" and z > 700:
            continue  # exp(z) overflows float64 there; nothing to compare
        if name in ("sin", "cos") and abs(z) > 100:
            continue  # argument reduction, not our formulas, sets the accuracy there
        got = [float(v) for v in taylor(np.float64(z))]
        expected = _mp_derivatives(name, z)
        for k, (g, e) in enumerate(zip(got, expected)):
            assert np.isfinite(g), f"{name}^({k})({z}) = {g}"
            # A few ulps of the true value. Absolute floor: the reference's own error at its
            # precision (1e-100 at 100 digits), or denormal rounding (1e-300).
            floor = 1e-90 if abs(z) < 20 else 1e-300
            assert abs(g - e) <= 1e-13 * abs(e) + floor, f"{name}^({k})({z}): {g!r} vs {e!r}"


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_piecewise_linear(name):
    act = nnderiv.ACTIVATIONS["relu"] if name == "relu" else None
    slope = 0.0 if name == "relu" else 0.01
    if act is None:
        from nnderiv._activations import leaky_relu

        act = leaky_relu(slope)
    for z in POINTS:
        s, s1, s2, s3 = (float(v) for v in act.taylor(np.float64(z)))
        assert s == (z if z >= 0 else slope * z)
        assert s1 == (1.0 if z > 0 else (1.0 if z == 0 and slope else slope))
        assert s2 == 0.0 and s3 == 0.0


@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu", "gelu_erf", "exp", "relu"])
def test_single_neuron_closed_form(activation):
    """y = v s(w.x + b): derivatives v s^(k)(z) w_j w_k w_l, from mpmath."""
    case = _models.linen_mlp(3, [1], 1, activation, seed=21)
    (w1, b1), (w2, b2) = case.layers
    x = np.array([0.3, -0.7, 0.2])
    expected = list(_reference.closed_form_single_neuron(w1[:, 0], b1[0], w2[0, 0], activation, x))
    expected[0] = expected[0] + b2  # the output bias shifts the value only
    net = case.net()
    for method in ("forward", "fwdrev", "jet", "nested"):
        got = nnderiv.derivatives(net, x, method=method)
        assert_derivatives_close(got, expected, 1e-12, f"{activation} {method}")


def test_linear_network_has_zero_higher_derivatives():
    case = _models.linen_mlp(3, [4, 4], 2, "identity", seed=2)
    w = case.layers[0][0] @ case.layers[1][0] @ case.layers[2][0]
    for method in ("forward", "fwdrev"):
        d = nnderiv.derivatives(case.net(), _models.points(3, (2,)), method=method)
        np.testing.assert_allclose(d.jacobian, np.broadcast_to(w.T, (2, 2, 3)), rtol=1e-13)
        assert np.all(np.asarray(d.hessian) == 0) and np.all(np.asarray(d.third) == 0)


def test_recognition_by_value():
    """x * sigmoid(x) is SiLU; 2 tanh(x) is not tanh; leaky slopes are read off."""
    import jax
    import jax.numpy as jnp
    import numpy as np_

    from nnderiv._activations import PROBE_POINTS, recognize

    z = np_.asarray(PROBE_POINTS)
    with jax.ensure_compile_time_eval():
        assert recognize(np_.asarray(z * jax.nn.sigmoid(z)), jnp.float64).name == "silu"
        assert recognize(np_.asarray(2 * np_.tanh(z)), jnp.float64) is None
        assert recognize(np_.asarray(jax.nn.leaky_relu(z, 0.2)), jnp.float64).name == "leaky_relu(0.2)"
        assert recognize(np_.asarray(jax.nn.gelu(z, approximate=False)), jnp.float64).name == "gelu_erf"
