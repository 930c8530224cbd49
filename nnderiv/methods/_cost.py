"""The cost model: which algorithm ``auto`` runs, and the chunk size of the kernels.

Every algorithm pushes a number of *columns* per point through each layer:

    forward  C(m+k, k)                (value, gradient, packed orders 2..k)
    fwdrev   (1 + n) C(m+k-1, k-1)    (forward to order k-1, n reverse sweeps)
    nested   (1 + n) (1 + m)^(k-1)    (jacrev, then jacfwd k-1 times; no symmetry)

for order ``k``. The analytic kernels skip the first layer's matmul (its Taylor
coefficients are the weight's columns); nested AD does not. Per point, an algorithm with
``P`` columns does ``2 P sum(in*out)`` matmul flops and touches ``P * sum(widths)``
coefficient elements in its elementwise rules (``fwdrev`` twice: forward stacks and
reverse products). The predicted time is

    t = flops / R + E * c_elem + t_point,

with a matmul rate ``R``, a time per elementwise element ``c_elem`` and a fixed time
per point ``t_point``, per algorithm and dtype. The constants below were fitted (least
squares on relative error) to the 41-config float64 and float32 grids of
``benchmarks/results/bench-cpu-2core-amd-epyc-2026-11-22.json``; the fit's geometric
standard deviation is 1.3-1.5x, about the run-to-run noise of that machine. Only the
*ratios* between algorithms decide anything, and those carry over between machines
better than the absolute rates: on that grid the choice costs 1.4% over an oracle
(geometric mean) and picks nested AD where it wins (one hidden layer of 16 units).
The benchmark reports the predicted and measured times side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from math import comb

ALGORITHMS = ("forward", "fwdrev", "nested")


@dataclasses.dataclass(frozen=True)
class Rates:
    matmul_flops_per_s: float
    elementwise_s: float  # per coefficient element touched
    per_point_s: float


_RATES = {
    "float64": {
        "nested": Rates(62.6e9, 0.328e-9, 0.005e-6),
        "forward": Rates(86.1e9, 0.587e-9, 0.063e-6),
        "fwdrev": Rates(92.3e9, 0.428e-9, 0.024e-6),
    },
    "float32": {
        "nested": Rates(165e9, 0.262e-9, 0.013e-6),
        "forward": Rates(207e9, 0.357e-9, 0.028e-6),
        "fwdrev": Rates(205e9, 0.235e-9, 0.010e-6),
    },
}

# A chunk's coefficient stack (chunk x K x width) is sized to a few MB: small enough to
# stay in the last-level cache across a layer's matmul and elementwise pass, large enough
# for XLA to split each op over the CPU's threads. Measured on the 2-core CI machine
# (benchmarks/): 16-point chunks ran single-threaded and unchunked batches of 1024+
# spilled the cache; both were up to 2x slower than this.
_CHUNK_BYTES = 4 << 20
_MIN_CHUNK, _MAX_CHUNK = 16, 512


@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str
    chunk: int
    cost: dict


def columns(algorithm: str, m: int, n: int, order: int) -> int:
    """Columns per point that ``algorithm`` pushes through each layer at ``order`` >= 1."""
    order = max(order, 1)
    if algorithm == "forward":
        return comb(m + order, order)
    if algorithm == "fwdrev":
        return (1 + n) * comb(m + order - 1, order - 1)
    if algorithm == "nested":
        return (1 + n) * (1 + m) ** (order - 1)
    raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")


def work(layers: Sequence[tuple[int, int]], m: int, n: int, order: int) -> dict[str, tuple[float, float]]:
    """Per point and algorithm: (matmul flops, elementwise coefficient elements).

    ``layers`` lists the affine layers as (fan_in, fan_out), input layer first.
    """
    all_layers = sum(i * o for i, o in layers)
    after_first = sum(i * o for i, o in layers[1:])
    hidden = sum(o for _, o in layers[:-1])
    out = {}
    for algorithm in ALGORITHMS:
        p = columns(algorithm, m, n, order)
        matmul = all_layers if algorithm == "nested" else after_first
        elementwise = p * hidden * (2 if algorithm == "fwdrev" else 1)
        out[algorithm] = (2.0 * p * matmul, float(elementwise))
    return out


def predicted_seconds(layers: Sequence[tuple[int, int]], m: int, n: int, order: int, dtype) -> dict[str, float]:
    """Predicted seconds per point of each algorithm (see the module docstring)."""
    rates = _RATES["float32" if "32" in str(dtype) or "16" in str(dtype) else "float64"]
    return {
        algorithm: flops / rates[algorithm].matmul_flops_per_s
        + elements * rates[algorithm].elementwise_s
        + rates[algorithm].per_point_s
        for algorithm, (flops, elements) in work(layers, m, n, order).items()
    }


def choose(layers: Sequence[tuple[int, int]], m: int, n: int, order: int, dtype) -> str:
    """The algorithm with the lowest predicted time: ``"forward"``, ``"fwdrev"`` or ``"nested"``."""
    if order == 0:
        return "forward"  # a plain forward pass, whatever the method
    costs = predicted_seconds(layers, m, n, order, dtype)
    return min(costs, key=costs.get)


def _layers_of(stages) -> list[tuple[int, int]]:
    from .. import _network

    return [tuple(s.weight.shape) for s in stages if isinstance(s, _network.RuntimeAffine)]


def plan(stages, batch: int, m: int, n: int, order: int, dtype, kernel: str | None) -> Plan:
    """The kernel (``kernel``, or the cheaper analytic one) and its chunk size for ``batch`` points."""
    layers = _layers_of(stages)
    costs = predicted_seconds(layers, m, n, order, dtype)
    if kernel is None:
        kernel = min(("forward", "fwdrev"), key=costs.get)
    k = columns(kernel, m, n, order)
    widest = max([1] + [max(shape) for shape in layers])
    itemsize = 8 if "64" in str(dtype) else 4
    per_point = k * widest * itemsize
    if batch * per_point <= 2 * _CHUNK_BYTES:
        # The whole batch fits: a loop would only add per-iteration overhead (measured 5x
        # slower than nested AD on a 1x16 tanh net at batch 8192 when chunked by 512).
        return Plan(kernel, batch, costs)
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, _CHUNK_BYTES // per_point))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two
    return Plan(kernel, chunk if batch > 2 * chunk else batch, costs)
