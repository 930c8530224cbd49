"""The cost model that picks a kernel and a chunk size.

Both analytic kernels push stacks of Taylor coefficients through the layers: per hidden
matmul, ``K`` columns of the batch, with

    K_forward = C(m+3, 3)                 (value, gradient, packed 2nd and 3rd order)
    K_fwdrev  = (1 + n) C(m+2, 2)         (forward to 2nd order, n reverse sweeps)

at order 3 (one order less throughout for order 2). Time is modelled as matmul flops
plus elementwise traffic, ``t = 2 K sum(in*out) + c_elem * E``, where ``E`` counts the
coefficient-stack elements the elementwise rules touch (they dominate at small widths).
"""

from __future__ import annotations

import dataclasses
from math import comb

from .. import _network

# A chunk's coefficient stack (chunk x K x width) is sized to a few MB: small enough to
# stay in the last-level cache across a layer's matmul and elementwise pass, large enough
# for XLA to split each op over the CPU's threads. Measured on the 2-core CI machine
# (benchmarks/): 16-point chunks ran single-threaded and unchunked batches of 1024+
# spilled the cache; both were up to 2x slower than this.
_CHUNK_BYTES = 4 << 20
_MIN_CHUNK, _MAX_CHUNK = 16, 512
_ELEMENTWISE_WEIGHT = 8.0  # one stack element of elementwise work ~ this many matmul flops


@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str
    chunk: int
    cost: dict


def _columns(kernel: str, m: int, n: int, order: int) -> int:
    if kernel == "forward":
        return comb(m + order, order)
    return (1 + n) * comb(m + order - 1, order - 1)


def kernel_costs(stages, m: int, n: int, order: int) -> dict[str, float]:
    """Modelled work per point of each kernel (matmul-flop equivalents)."""
    widths = [s.weight.shape for s in stages if isinstance(s, _network.RuntimeAffine)]
    matmul = sum(i * o for i, o in widths[1:])  # the first layer costs no stack matmul
    hidden = sum(o for _, o in widths[:-1])
    costs = {}
    for kernel in ("forward", "fwdrev"):
        k = _columns(kernel, m, n, max(order, 1))
        # fwdrev's elementwise work: the forward stacks (a and g) plus the reverse products.
        elementwise = k * hidden * (2 if kernel == "fwdrev" else 1)
        costs[kernel] = 2.0 * k * matmul + _ELEMENTWISE_WEIGHT * elementwise
    return costs


def plan(stages, batch: int, m: int, n: int, order: int, dtype, kernel: str | None) -> Plan:
    costs = kernel_costs(stages, m, n, order)
    if kernel is None:
        kernel = min(costs, key=costs.get)
    k = _columns(kernel, m, n, max(order, 1))
    widest = max([1] + [max(s.weight.shape) for s in stages if isinstance(s, _network.RuntimeAffine)])
    itemsize = 8 if "64" in str(dtype) else 4
    per_point = k * widest * itemsize
    if batch * per_point <= 2 * _CHUNK_BYTES:
        # The whole batch fits: a loop would only add per-iteration overhead (measured 5x
        # slower than nested AD on a 1x16 tanh net at batch 8192 when chunked by 512).
        return Plan(kernel, batch, costs)
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, _CHUNK_BYTES // per_point))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two
    return Plan(kernel, chunk if batch > 2 * chunk else batch, costs)
