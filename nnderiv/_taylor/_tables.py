"""Index tables for packed multivariate Taylor polynomials, built once per ``(m, k)``.

A polynomial in ``m`` variables truncated at order ``k`` is stored in blocks by order:
block ``j`` holds one coefficient per multi-index ``alpha`` with ``|alpha| = j``, in the
order of :func:`nnderiv.packed_indices` (sorted index tuples, lexicographic), i.e.
``C(m+j-1, j)`` coefficients. All tables are NumPy arrays used as static indices at trace
time; they cost nothing at run time.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import _symmetric


def block_size(m: int, j: int) -> int:
    return _symmetric.num_unique(m, j)


@functools.cache
def exponents(m: int, j: int) -> np.ndarray:
    """The multi-indices of block ``j`` as exponent vectors, shape ``(C(m+j-1, j), m)``."""
    tuples = _symmetric.sorted_tuples(m, j)
    out = np.zeros((len(tuples), m), dtype=np.int64)
    for row, tup in enumerate(tuples):
        for t in tup:
            out[row, t] += 1
    return out


@functools.cache
def slots(m: int, j: int) -> dict[tuple[int, ...], int]:
    """Exponent vector -> slot in block ``j``."""
    return {tuple(int(a) for a in alpha): s for s, alpha in enumerate(exponents(m, j))}


@functools.cache
def factorials(m: int, j: int) -> np.ndarray:
    """``alpha!`` for every slot of block ``j``: derivative = ``alpha!`` x Taylor coefficient."""
    return np.array([math.prod(math.factorial(int(a)) for a in alpha) for alpha in exponents(m, j)], dtype=np.float64)


@functools.cache
def product_table(m: int, i: int, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs feeding the block ``i + l`` of a product from blocks ``i`` and ``l``.

    Returns ``(a, b, mask)`` of shape ``(C(m+i+l-1, i+l), c)``: target slot ``g`` receives
    ``sum_c mask[g, c] * u_i[a[g, c]] * v_l[b[g, c]]`` (rows padded to the longest with
    ``mask = 0``), i.e. ``sum_{alpha + beta = gamma} u_alpha v_beta``.
    """
    j = i + l
    target = slots(m, j)
    pairs: list[list[tuple[int, int]]] = [[] for _ in range(block_size(m, j))]
    for a, alpha in enumerate(exponents(m, i)):
        for b, beta in enumerate(exponents(m, l)):
            pairs[target[tuple(int(x) for x in alpha + beta)]].append((a, b))
    width = max(len(p) for p in pairs)
    ia = np.zeros((len(pairs), width), dtype=np.int32)
    ib = np.zeros((len(pairs), width), dtype=np.int32)
    mask = np.zeros((len(pairs), width), dtype=np.float64)
    for g, p in enumerate(pairs):
        for c, (a, b) in enumerate(p):
            ia[g, c], ib[g, c], mask[g, c] = a, b, 1.0
    return ia, ib, mask


@functools.cache
def fwdrev_table(m: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reading order-``k`` partials off the order-``k-1`` block of a Jacobian's polynomial.

    For each packed tuple ``(p, t_1, ..., t_{k-1})`` (sorted, so ``p`` is the smallest index)
    returns the slot of ``(t_1..t_{k-1})`` in block ``k-1``, the column ``p``, and
    ``alpha!`` of that multi-index: ``d^k f_i = alpha! * c_alpha(J[i, p])``.
    """
    tuples = _symmetric.sorted_tuples(m, k)
    lower = slots(m, k - 1)
    slot = np.zeros(len(tuples), dtype=np.int32)
    col = np.asarray(tuples[:, 0], dtype=np.int32)
    fact = np.zeros(len(tuples), dtype=np.float64)
    for row, tup in enumerate(tuples):
        alpha = [0] * m
        for t in tup[1:]:
            alpha[int(t)] += 1
        slot[row] = lower[tuple(alpha)]
        fact[row] = math.prod(math.factorial(a) for a in alpha)
    return slot, col, fact


def _partitions(j: int, p: int, largest: int) -> list[tuple[int, ...]]:
    """The partitions of ``j`` into ``p`` parts of at most ``largest``, parts nonincreasing."""
    if p == 0:
        return [()] if j == 0 else []
    out = []
    for first in range(min(j - (p - 1), largest), 0, -1):
        for rest in _partitions(j - first, p - 1, first):
            out.append((first, *rest))
    return out


@functools.cache
def power_table(m: int, p: int, j: int) -> list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """Block ``j`` of ``delta^p`` directly from the blocks of ``delta`` (no intermediate power).

    ``(delta^p)_gamma`` is the sum over ordered ``p``-tuples of coefficients ``delta_alpha_r``
    with ``sum alpha_r = gamma``. Grouped by the multiset of factors, each distinct product
    appears once, times its number of orderings ``p! / prod(mult!)``. Returns one entry per
    partition ``parts`` of ``j`` into ``p`` block orders: ``(parts, index, coef)`` with
    ``index`` (P_j, c, p) and ``coef`` (P_j, c): target slot ``g`` receives ``sum_c coef[g, c]
    * prod_r delta_{parts[r]}[index[g, c, r]]`` (rows padded to the longest with ``coef = 0``).
    """
    import itertools

    target = slots(m, j)
    out = []
    for parts in _partitions(j, p, j):
        groups: list[tuple[int, int]] = []  # (block order, multiplicity), parts nonincreasing
        for part in parts:
            if groups and groups[-1][0] == part:
                groups[-1] = (part, groups[-1][1] + 1)
            else:
                groups.append((part, 1))
        terms: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(block_size(m, j))]
        choices = [itertools.combinations_with_replacement(range(block_size(m, i)), mu) for i, mu in groups]
        for pick in itertools.product(*[list(c) for c in choices]):
            gamma = np.zeros(m, dtype=np.int64)
            orderings = math.factorial(p)
            index = []
            for (i, _), chosen in zip(groups, pick):
                for s in chosen:
                    gamma += exponents(m, i)[s]
                    index.append(s)
                for s in set(chosen):
                    orderings //= math.factorial(chosen.count(s))
            terms[target[tuple(int(a) for a in gamma)]].append((tuple(index), float(orderings)))
        width = max(len(t) for t in terms)
        index = np.zeros((len(terms), width, p), dtype=np.int32)
        coef = np.zeros((len(terms), width), dtype=np.float64)
        for g, row in enumerate(terms):
            for c, (idx, k) in enumerate(row):
                index[g, c], coef[g, c] = idx, k
        out.append((parts, index, coef))
    return out
