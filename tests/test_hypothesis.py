"""Property-based: random architectures, activations and points; all methods agree."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import nnderiv

from . import _models
from .helpers import assert_derivatives_close

ACTIVATIONS = sorted(_models.JAX_ACTIVATIONS)


@st.composite
def architectures(draw):
    m = draw(st.integers(1, 5))
    depth = draw(st.integers(0, 3))
    widths = draw(st.lists(st.integers(1, 9), min_size=depth, max_size=depth))
    n = draw(st.integers(1, 3))
    acts = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth, max_size=depth))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    order = draw(st.integers(0, 3))
    return m, widths, n, acts, seed, batch, order


@given(architectures())
def test_random_mlps_all_methods_agree(arch):
    m, widths, n, acts, seed, batch, order = arch
    case = _models.linen_mlp(m, widths, n, acts, seed=seed)
    x = _models.points(m, batch, seed=seed + 1)
    net = case.net()
    # Jitted: compiling each method once is far cheaper than running it op by op.
    expected = nnderiv.derivs_fn(net, order=order, method="nested")(x)
    for method in ("forward", "fwdrev", "jet"):
        got = nnderiv.derivs_fn(net, order=order, method=method)(x)
        assert_derivatives_close(got, expected, label=f"{arch} {method}")
        assert got.value.shape == (*batch, n)


def test_jet_recovery_is_exact_on_synthetic_directional_derivatives():
    """Feed the recovery map exact D^k f[a^k] of a known symmetric tensor: it returns it."""
    import math

    from nnderiv._symmetric import sorted_tuples
    from nnderiv.methods.jet import _multi_indices, recovery_matrix

    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 5):
        for degree in (1, 2, 3):
            directions = np.array(_multi_indices(m, degree), dtype=float)
            for k in range(1, degree + 1):
                tuples = sorted_tuples(m, k)
                packed = rng.normal(size=len(tuples))
                # D^k f[a^k] = sum over *all* index tuples of T[j1..jk] a_j1 ... a_jk.
                full = np.zeros((m,) * k)
                import itertools

                for value, tup in zip(packed, tuples):
                    for perm in set(itertools.permutations(tuple(tup))):
                        full[perm] = value
                directional = np.array(
                    [
                        np.einsum(full, list(range(k)), *sum(([a, [i]] for i in range(k)), [])) if k else 0
                        for a in directions
                    ]
                )
                recovered = recovery_matrix(m, degree, k) @ directional
                np.testing.assert_allclose(recovered, packed, rtol=1e-12, atol=1e-12 * math.factorial(k))
