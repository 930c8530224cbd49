"""Index tables for packed symmetric derivative tensors.

A symmetric tensor of order k over m inputs has C(m+k-1, k) unique entries. We store
them in *packed* form, in lexicographic order of the sorted index tuple:

* order 2: pairs ``(j, k)`` with ``j <= k``: (0,0), (0,1), ..., (0,m-1), (1,1), ...
* order 3: triples ``(j, k, l)`` with ``j <= k <= l``, lexicographically.

All tables are plain NumPy arrays built once per ``m`` (cached) and used as static
indices at trace time, so they cost nothing at run time.
"""

from __future__ import annotations

import functools
import itertools
from math import comb

import numpy as np


def num_unique(m: int, order: int) -> int:
    """Number of unique entries of a symmetric order-``order`` tensor over ``m`` inputs."""
    return comb(m + order - 1, order)


@functools.cache
def sorted_tuples(m: int, order: int) -> np.ndarray:
    """The packed index order: all ``j1 <= ... <= jk``, shape ``(C(m+k-1, k), k)``."""
    tuples = list(itertools.combinations_with_replacement(range(m), order))
    return np.asarray(tuples, dtype=np.int32).reshape(len(tuples), order)


@functools.cache
def packed_position(m: int, order: int) -> np.ndarray:
    """Full-to-packed map: ``packed_position(m, k)[j1, ..., jk]`` is the packed slot.

    Shape ``(m,) * order``; symmetric, so any permutation of an index gives the same slot.
    """
    position = np.zeros((m,) * order, dtype=np.int32)
    for slot, tup in enumerate(sorted_tuples(m, order)):
        for perm in set(itertools.permutations(tuple(int(t) for t in tup))):
            position[perm] = slot
    return position


@functools.cache
def third_order_tables(m: int) -> tuple[np.ndarray, ...]:
    """Gather tables for the order-3 Faà di Bruno rule.

    For each packed triple ``(j, k, l)`` returns the first-order indices ``j, k, l`` and
    the packed pair slots of ``(j, k)``, ``(j, l)``, ``(k, l)``.
    """
    triples = sorted_tuples(m, 3)
    pair_slot = packed_position(m, 2)
    j, k, l = triples[:, 0], triples[:, 1], triples[:, 2]
    return j, k, l, pair_slot[j, k], pair_slot[j, l], pair_slot[k, l]
