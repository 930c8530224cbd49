"""Tests run in float64 (x64 on) unless a test asks for float32 explicitly."""

import os

# Several tests compare against a second device count; keep the host platform default.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# auto's choices follow the built-in rates, not a probe of whatever machine runs the tests
# (tests/test_cost.py covers the calibration with its own cache directory).
os.environ.setdefault("NNDERIV_CALIBRATION", "off")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")
