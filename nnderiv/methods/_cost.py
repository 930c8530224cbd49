"""The cost model: which algorithm ``auto`` runs, and the chunk size of the kernels.

Every algorithm pushes a number of *columns* per point through each layer:

    forward  C(m+k, k)                (value, gradient, packed orders 2..k)
    fwdrev   (1 + n) C(m+k-1, k-1)    (forward to order k-1, n reverse sweeps)
    fwdadj   C(m+k-1, k-1) + 1 + n    (forward to order k-1, the top order by n first-order
                                       adjoints; C(m+k-1, k-1) after the last activation,
                                       forward's columns with a single activation; plus,
                                       per activation of w units, the contraction of the n
                                       adjoints with the C(m+k-1, k) top-order terms: 3 + n
                                       multiply-adds per term and unit at order 3, 3 if n = 1)
    nested   (1 + n) (1 + m)^(k-1)    (jacrev, then jacfwd k-1 times; no symmetry)

for order ``k``. The analytic kernels skip the first layer's matmul (its Taylor
coefficients are the weight's columns); nested AD does not. For a batch of ``B`` points
the predicted time of an algorithm is physics, not a fit:

    t = B * sum_l 2 P in_l out_l / R(in_l)       matmuls at the rate of their depth
      + B * passes * P * sum(hidden widths) * c   elementwise rules, in fused passes
      + ops * t_op                                fixed cost of each op of the program

with the machine's rates ``R(depth)``, ``c`` and ``t_op`` measured where the code runs
(``_calibration``: a sub-second probe, cached per machine; defaults if disabled) and
constants that describe each algorithm's *code*, not the machine: ``passes``, the cost
of its elementwise rules per coefficient element in units of one fused multiply-add
pass, and ``ops``, its op count per layer. The benchmark (``nnderiv bench``) prints the
predicted time next to the measured one for every config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from math import comb

from .. import _symmetric
from .._taylor import _layered
from . import _calibration

ALGORITHMS = ("forward", "fwdrev", "fwdadj", "nested")
ANALYTIC = ("forward", "fwdrev", "fwdadj")


# Elementwise cost per coefficient element, in fused multiply-add passes (constants of
# the code, not of the machine; only ratios between algorithms matter): the order-k
# forward rule reads about k operands per output coefficient, the Leibniz product of a
# reverse sweep about 1 + k/2; nested AD's tangent products fuse into its matmuls' neighbours.
def _rule_passes(order: int) -> float:
    return 1.0 + 0.8 * max(order - 1, 0)


def _leibniz_passes(order: int) -> float:
    return 1.0 + 0.5 * order


_NESTED_PASSES = 0.3
# The analytic kernels evaluate s, s', ..., s^(k) of every unit's activation: about as
# much as this many passes per unit (tanh: 4 ns per unit against 0.5 ns for a pass).
_ACTIVATION_PASSES = 8.0
# These three constants were chosen on 16 configs of the three algorithms timed against
# a probe of the same machine (m = 1..12, widths 16..128, n = 1..8, batch 64..8192):
# auto's pick then ran 2% slower than the fastest (geometric mean), 1.3x at worst, and
# the predicted ratios between algorithms were off by 16% (s.d.).
_MATMUL_EFFICIENCY = {"forward": 1.0, "fwdrev": 1.0, "fwdadj": 1.0, "nested": 1.0}
# XLA ops per affine layer in each algorithm's compiled program (counted in the
# optimised HLO of a 3x64 tanh net): fixed costs a single point or a scan step pays.
_OPS_PER_LAYER = {"forward": 4.0, "fwdrev": 8.0, "fwdadj": 4.0, "nested": 6.0}
# fwdadj's passes per unit besides forward's rules: the pre-pass's copies of the values
# and of the activation's derivatives (about 5), and per output the adjoint's product
# with s' and its copy (2).
_FWDADJ_PREPASS_PASSES = 5.0


@dataclasses.dataclass(frozen=True)
class Work:
    """What one algorithm does for one point.

    Attributes:
      matmuls: ``((depth, flops), ...)``, one per layer it multiplies through.
      elements: coefficient elements its elementwise rules touch.
      ops: XLA ops of its program (paid once per call, not per point).
    """

    matmuls: tuple[tuple[int, float], ...]
    elements: float
    ops: float

    @property
    def flops(self) -> float:
        return sum(f for _, f in self.matmuls)


def columns(algorithm: str, m: int, n: int, order: int) -> int:
    """Columns per point that ``algorithm`` pushes through each layer at ``order`` >= 1.

    ``"jet"`` (never auto's pick, here for the benchmark's estimates): ``C(m+k-1, k)``
    directions, each carrying ``k + 1`` series terms.
    """
    order = max(order, 1)
    if algorithm == "jet":
        return (order + 1) * comb(m + order - 1, order)
    if algorithm in ANALYTIC:
        return _layered.columns(algorithm, m, n, order)
    if algorithm == "nested":
        return (1 + n) * (1 + m) ** (order - 1)
    raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")


# The native kernel (``nnderiv._native``) runs forward and fwdrev as one op per call,
# each rule in the same pass over a cache-resident tile as the matmul: forward measured
# 1.2-1.4x faster than the XLA forward kernel on batches (benchmarks/native_ab.py), i.e.
# about half its elementwise cost; fwdrev 1.5-1.6x faster than XLA's on batches (m = 8
# and 12 with one output), where XLA's spends its extra time in elementwise passes and
# gathers outside the matmuls.
_NATIVE_ELEMENTWISE = 0.5


def _contraction_macs(order: int, n: int) -> int:
    r"""Multiply-adds per top-order slot and unit of fwdadj's contraction with n adjoints.

    The rule r takes 3 at order 3, r_jkl = z_l c0 + z_jl c1 + z_kl c2 with c0 = s3 z_j z_k +
    s2 z_jk, c1 = s2 z_k and c2 = s2 z_j formed once per pair (j, k) (s2, s3 the activation's
    second and third derivatives), and 1 at order 2, r_jk = z_k (s2 z_j); each output then
    takes one more, except a single output, folded into the c's.
    """
    rule = {2: 1, 3: 3}.get(order, 0)
    return rule + (n if n > 1 else 0)


def work(layers: Sequence[tuple[int, int]], m: int, n: int, order: int, native=False) -> dict[str, Work]:
    """Per algorithm: its :class:`Work` for one point.

    ``layers`` lists the affine layers as (fan_in, fan_out), input layer first;
    ``native``: which of forward, fwdrev and fwdadj run on the native kernel (True: all).
    fwdadj is the native kernel's alone: elsewhere it runs forward's recursion, and its
    work is forward's.
    """
    hidden = sum(o for _, o in layers[:-1])
    order = max(order, 1)
    inner = comb(m + order - 1, order - 1)  # fwdrev's forward columns
    elements = {
        "forward": (_rule_passes(order) * columns("forward", m, n, order) + _ACTIVATION_PASSES) * hidden,
        # value and slope stacks to order - 1, then n adjoint sweeps multiplied by the slopes
        "fwdrev": ((2 * _rule_passes(order - 1) + n * _leibniz_passes(order - 1)) * inner + _ACTIVATION_PASSES)
        * hidden,
        "nested": _NESTED_PASSES * columns("nested", m, n, order) * hidden,
    }
    elements["fwdadj"] = elements["forward"] + (_FWDADJ_PREPASS_PASSES + 2 * n) * hidden
    out = {}
    for name in ALGORITHMS:
        p = columns(name, m, n, order)
        multiplied = layers if name == "nested" else layers[1:]  # kernels skip the first layer
        # flops counted at the plain product's rate: divided by the algorithm's efficiency
        flops = 2.0 * p / _MATMUL_EFFICIENCY[name]
        matmuls = tuple((fan_in, flops * fan_in * fan_out) for fan_in, fan_out in multiplied)
        if name == "fwdadj" and matmuls:
            # After the last activation the stacks carry the rows below the top order
            # alone; with a single activation its constant rule yields every order, and
            # the output layer maps forward's columns.
            fan_in, fan_out = multiplied[-1]
            trailing = inner if len(multiplied) > 1 else columns("forward", m, n, order)
            matmuls = (*matmuls[:-1], (fan_in, 2.0 * trailing / _MATMUL_EFFICIENCY[name] * fan_in * fan_out))
            if len(multiplied) > 1 and order >= 2:  # at order 1 the top-order terms are zero
                # The top order's contraction with the adjoints at every activation,
                # sum_u A_l[i, u] r_l[slot, u], fused into the rule (r_l is never stored):
                # _contraction_macs multiply-adds per slot and unit.
                top = _symmetric.num_unique(m, order)
                contraction = 2.0 * _contraction_macs(order, n) * top / _MATMUL_EFFICIENCY[name]
                matmuls = (*matmuls, *((w, contraction * w) for _, w in layers[:-1]))
        out[name] = Work(matmuls, float(elements[name]), _OPS_PER_LAYER[name] * len(layers))
    if not (native is True or "fwdadj" in (native or ())):
        out["fwdadj"] = out["forward"]
    for name in ANALYTIC if native is True else native or ():
        f = out[name]
        out[name] = Work(f.matmuls, f.elements * _NATIVE_ELEMENTWISE, 1.0)
    return out


def predicted_seconds(
    layers: Sequence[tuple[int, int]],
    m: int,
    n: int,
    order: int,
    dtype,
    batch: int = 1024,
    rates: _calibration.Rates | None = None,
    native: bool = False,
) -> dict[str, float]:
    """Predicted seconds *per point* of each algorithm on a batch of ``batch`` points.

    ``rates``: the machine's (default: this machine's calibration, see ``_calibration``);
    ``native``: which of forward and fwdrev run on the native kernel (True: both).
    """
    rates = rates or _calibration.current(dtype).rates
    batch = max(int(batch), 1)
    out = {}
    for name, w in work(layers, m, n, order, native).items():
        matmul_s = sum(flops / rates.matmul_rate(depth) for depth, flops in w.matmuls)
        out[name] = matmul_s + w.elements * rates.elementwise_s + w.ops * rates.op_s / batch
    return out


def choose(layers, m: int, n: int, order: int, dtype, batch=1024, rates=None, among=ALGORITHMS, native=False) -> str:
    """The algorithm in ``among`` with the lowest predicted time (``"forward"`` at order 0).

    The other arguments are those of :func:`predicted_seconds`.
    """
    if order == 0:
        return "forward"  # a plain forward pass, whatever the method
    costs = predicted_seconds(layers, m, n, order, dtype, batch, rates, native)
    return min(among, key=costs.__getitem__)


@dataclasses.dataclass(frozen=True)
class _ShapeOnly:
    """The shape and dtype of a batch, for asking whether the native kernel applies."""

    shape: tuple[int, int]
    dtype: object

    @property
    def ndim(self) -> int:
        return len(self.shape)
