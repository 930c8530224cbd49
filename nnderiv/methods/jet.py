"""Full derivative tensors from univariate Taylor series (``jax.experimental.jet``).

A jet of ``f`` along a direction ``v`` (``x(t) = x + t v``; jet's default
``factorial_scaled=True`` makes its terms derivatives) returns

    D f[v],  D^2 f[v, v],  D^3 f[v, v, v].

Griewank, Utke and Walther (Math. Comp. 2000): along the C(m+d-1, d) directions
``v = alpha`` (integer multi-indices with ``|alpha| = d``) the directional derivatives
determine every unique partial of order ``k <= d`` by a fixed linear map, since

    D^k f[alpha, ..., alpha] = sum_{|beta| = k} (k! / beta!) alpha^beta  d^beta f.

For a target ``beta`` only directions supported on the support of ``beta`` (at most
three variables) enter, so we solve that small system exactly in rational arithmetic,
once per ``m`` at trace time. One vmapped jet of degree ``d = order`` then gives the
value, Jacobian, Hessian and third tensor together.

jet ignores ``custom_jvp`` rules (``jax.nn.softplus``, ``jax.nn.relu`` are such
functions) and would fail on them; we evaluate the model's flattened jaxpr, in which
those calls are replaced by their primal bodies (see ``_jaxpr``).
"""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet as jax_jet

from .. import _jaxpr, _network, _symmetric
from .._derivatives import Derivatives


def _multi_indices(num_vars: int, degree: int) -> list[tuple[int, ...]]:
    """All multi-indices of ``num_vars`` variables with ``|alpha| = degree``, in packed order."""
    out = []
    for tup in itertools.combinations_with_replacement(range(num_vars), degree):
        alpha = [0] * num_vars
        for t in tup:
            alpha[t] += 1
        out.append(tuple(alpha))
    return out


def _solve_exact(matrix: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan elimination over the rationals (small, nonsingular systems)."""
    n = len(matrix)
    aug = [row[:] + [r] for row, r in zip(matrix, rhs)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [v / p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                factor = aug[r][col]
                aug[r] = [a - factor * b for a, b in zip(aug[r], aug[col])]
    return [aug[r][n] for r in range(n)]


@functools.cache
def _local_weights(num_vars: int, degree: int, target: tuple[int, ...]) -> dict[tuple[int, ...], Fraction]:
    """Weights ``c_alpha`` with ``sum_alpha c_alpha D^k f[alpha^k] = d^target f``.

    Over ``num_vars`` variables, directions ``|alpha| = degree``, ``k = |target|``.
    Minimum-norm solution of ``A^T c = e_target`` with
    ``A[alpha, gamma] = (k!/gamma!) alpha^gamma``.
    """
    k = sum(target)
    directions = _multi_indices(num_vars, degree)
    unknowns = _multi_indices(num_vars, k)

    def entry(alpha, gamma):
        coef = Fraction(math.factorial(k), math.prod(math.factorial(g) for g in gamma))
        return coef * math.prod(Fraction(a) ** g for a, g in zip(alpha, gamma))

    a = [[entry(alpha, gamma) for gamma in unknowns] for alpha in directions]
    # c = A y with (A^T A) y = e_target.
    gram = [
        [sum(a[r][i] * a[r][j] for r in range(len(directions))) for j in range(len(unknowns))]
        for i in range(len(unknowns))
    ]
    e = [Fraction(int(g == target)) for g in unknowns]
    y = _solve_exact(gram, e)
    weights = {}
    for r, alpha in enumerate(directions):
        c = sum(a[r][j] * y[j] for j in range(len(unknowns)))
        if c != 0:
            weights[alpha] = c
    return weights


@functools.cache
def recovery_matrix(m: int, degree: int, k: int) -> np.ndarray:
    """``R`` (C(m+k-1,k), C(m+d-1,d)): packed order-``k`` partials = ``R @ D^k f[alpha^k]``."""
    directions = {alpha: i for i, alpha in enumerate(_multi_indices(m, degree))}
    targets = _symmetric.sorted_tuples(m, k)
    matrix = np.zeros((len(targets), len(directions)))
    for row, tup in enumerate(targets):
        support = sorted(set(int(t) for t in tup))
        local_target = tuple(sum(1 for t in tup if t == v) for v in support)
        for local_alpha, weight in _local_weights(len(support), degree, local_target).items():
            alpha = [0] * m
            for v, a in zip(support, local_alpha):
                alpha[v] = a
            matrix[row, directions[tuple(alpha)]] = float(weight)
    return matrix


def _point_function(net, m: int, dtype):
    """``x -> f(x)`` evaluated from the flattened jaxpr (custom_jvp bodies inlined)."""
    program = _network.trace_program(net, m, dtype)
    leaves = jax.tree_util.tree_leaves(net.params)

    def f(x):
        return _jaxpr.evaluate(program, (*leaves, x))[0]

    return f


def jet_method(net, x: jax.Array, order: int) -> Derivatives:
    """Derivatives by jets along C(m+d-1, d) directions, for a batch ``x`` (B, m)."""
    batch, m = x.shape
    f = _point_function(net, m, x.dtype)
    if order == 0:
        return Derivatives(jax.vmap(f)(x))
    directions = jnp.asarray(np.array(_multi_indices(m, order)), dtype=x.dtype)  # (D, m)

    def along(point, v):
        series = (v,) + tuple(jnp.zeros_like(v) for _ in range(order - 1))
        return jax_jet.jet(f, (point,), (series,))

    def at_point(point):
        _, terms = jax.vmap(lambda v: along(point, v))(directions)
        return terms  # terms[k-1]: (D, n) = D^k f[v^k]

    try:
        terms = jax.vmap(at_point)(x)
    except KeyError as err:  # jet's rule table has no entry for some primitive
        raise ValueError(
            f"method='jet' cannot differentiate this model: jax.experimental.jet has no Taylor "
            f"rule for the primitive {err.args[0]}. Use method='nested' (or 'auto')."
        ) from None
    # The value from the plain function, not the jet's primal: jet's rule for ``max`` drops
    # a NaN operand, so relu(NaN) would come out 0 instead of NaN as the model gives.
    fields = [jax.vmap(f)(x)]
    for k in range(1, order + 1):
        r = jnp.asarray(recovery_matrix(m, order, k), dtype=x.dtype)
        packed = jnp.einsum("pd,bdn->bnp", r, terms[k - 1])
        fields.append(packed)
    return Derivatives(*fields)
