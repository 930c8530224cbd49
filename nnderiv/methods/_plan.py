"""Method objects: an analysis step per model, a compute step per batch, one place that decides.

Every method (``"forward"``, ``"fwdrev"``, ``"fwdadj"``, ``"analytic"``, ``"jet"``, ``"nested"``,
``"auto"``) is a :class:`Method` with two steps, as a linear solver has ``init`` and
``compute``:

* :meth:`Method.init` analyses the model once for an input size, dtype, order and batch
  size (the flat program, its layered form if it is an MLP, the output size, whether the
  native kernel applies) and decides which *algorithm* runs, returning a :class:`Plan`;
* :meth:`Method.compute` runs the plan's algorithm on a batch ``x`` of shape ``(B, m)``.

The decision is made in one function, :func:`select`, for ``auto`` (among every
algorithm) and ``analytic`` (among the two Taylor algorithms): the cost model's
prediction (``_cost`` for MLPs, the engine's flop counts for other models), refined on
request by timing the close candidates on this machine (``_measured``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .. import _native, _network, _taylor
from .._derivatives import Derivatives
from . import _cost, _measured
from .jet import jet_method
from .nested import nested

#: What :meth:`Method.compute` can run.
ALGORITHMS = ("forward", "fwdrev", "fwdadj", "jet", "nested")
TAYLOR = ("forward", "fwdrev", "fwdadj")


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
    """One model at one input size and dtype, analysed once.

    Attributes:
      m: inputs per point.
      dtype: the dtype of the points.
      n: outputs per point.
      structure: the layered form (affine layers and elementwise activations), or None.
      why_not_mlp: why there is no layered form (None for an MLP).
    """

    m: int
    dtype: Any
    n: int
    structure: _network.MLPStructure | None
    why_not_mlp: str | None

    @property
    def layers(self) -> list[tuple[int, int]]:
        """The affine layers as (fan_in, fan_out), input layer first (MLPs only)."""
        return self.structure.affine_shapes

    def stages(self, net):
        """The runtime stages (weights as arrays, activations as functions) of an MLP."""
        return _network.runtime_stages(net, self.structure, self.structure.dtype)


def analyse(net: _network.Network, m: int, dtype) -> Analysis:
    """Trace and analyse ``net`` for points of ``m`` inputs of ``dtype``."""
    structure = _network.mlp_structure(net, m, dtype)
    why = structure if isinstance(structure, str) else None
    return Analysis(m, jnp.dtype(dtype), _network.output_dim(net, m, dtype), None if why else structure, why)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What :meth:`Method.compute` runs for a batch.

    Attributes:
      algorithm: one of :data:`ALGORITHMS`.
      analysis: the model's :class:`Analysis`.
      order: the highest derivative order.
      batch: the number of points the plan was made for.
      how: how the algorithm was decided: ``"asked"``, ``"order 0"``, ``"only one applies"``,
        ``"cost model"`` or ``"measured"``.
      fallback: the engine may run the other Taylor algorithm when this one meets a
        primitive it has no rule for (``analytic`` and ``auto``, not an explicit ``forward``).
      chunk: points per chunk of the Taylor engine (None: its cache-size rule,
        ``_taylor.chunk_size``), measured where the rule's neighbours were timed.
    """

    algorithm: str
    analysis: Analysis
    order: int
    batch: int
    how: str
    fallback: bool = False
    chunk: int | None = None


# --------------------------------------------------------------------------------------
# The decision.


def _engine_work(net, analysis: Analysis, order: int) -> dict[str, float] | None:
    """Matrix-product flops per point of the engine's algorithms and of nested AD, or None."""
    try:
        work = _taylor.work(net, analysis.m, analysis.dtype, order)
    except _network.UnsupportedModelError:
        return None
    m, n = analysis.m, analysis.n
    # Nested AD: jacrev pushes 1 + n columns through the model's products, each jacfwd
    # multiplies them by 1 + m (the primal and m tangents).
    return {
        "forward": work["forward"],
        "fwdrev": work["fwdrev"],
        "nested": work["plain"] * (1 + n) * (1 + m) ** (order - 1),
    }


def native_applies(net, analysis: Analysis, order: int, batch: int) -> tuple[str, ...]:
    """Which analytic algorithms (forward, fwdrev, fwdadj) would run on the native kernel, or some of it.

    A layered model runs on it whole; the engine's forward algorithm runs a model's
    layered prefixes on it (``_taylor.layered_prefixes``).
    """
    if order > 3:
        return ()
    if analysis.structure is None:
        program = _network.trace_program(net, analysis.m, analysis.dtype)
        leaves = jax.tree_util.tree_leaves(net.params)
        shape = _cost._ShapeOnly((batch, analysis.m), analysis.dtype)  # noqa: SLF001
        for prefix in _taylor.layered_prefixes(program):
            stages = _network.runtime_stages(net, prefix.structure, analysis.dtype, leaves=leaves)
            if _native.applies(stages, shape, order):
                return ("forward",)
        return ()
    shape = _cost._ShapeOnly((batch, analysis.m), analysis.structure.dtype)  # noqa: SLF001
    stages = analysis.stages(net)
    return tuple(a for a in TAYLOR if _native.applies(stages, shape, order, a))


def predictions(net, analysis: Analysis, order: int, batch: int) -> dict[str, float]:
    """Predicted cost per point of each applicable algorithm (seconds for MLPs, flops otherwise).

    Only ratios within one model mean anything. Jet is never predicted (never ``auto``'s pick).
    """
    if analysis.structure is not None and order <= 3:
        native = native_applies(net, analysis, order, batch)
        layers, dtype = analysis.layers, analysis.structure.dtype
        costs = _cost.predicted_seconds(layers, analysis.m, analysis.n, order, dtype, batch, native=native)
        if "fwdadj" not in native:
            del costs["fwdadj"]  # it would run forward's recursion: not a candidate of its own
        return costs
    work = _engine_work(net, analysis, order)
    return {"nested": 1.0} if work is None else work


def select(net, analysis: Analysis, order: int, batch: int, among=ALGORITHMS, measure: bool = False):
    """What runs, and how it was decided: ``(algorithm, how, chunk)``.

    The cost model's cheapest algorithm in ``among``; with ``measure``, candidates
    predicted within a few times of it are timed on this machine instead (cached per
    machine; see ``_measured``), as a cost model fitted anywhere can be off by that much on
    another CPU. An algorithm that runs on the Taylor engine is timed at each of its chunk
    sizes (:func:`chunk_candidates`): the two choices depend on each other. ``chunk`` is
    None for the engine's rule (or a kernel that is not the engine).
    """
    if order == 0:
        return "forward", "order 0", None  # a plain forward pass, whatever the method
    costs = {a: c for a, c in predictions(net, analysis, order, batch).items() if a in among}
    if not costs:
        return among[0], "only one applies", None
    if len(costs) == 1:
        return next(iter(costs)), "only one applies", None
    best = min(costs, key=costs.get)
    chunks = {a: chunk_candidates(net, analysis, order, batch, a) for a in sorted(costs)}
    close = [a for a in costs if costs[a] <= _measured.CLOSE * costs[best]]
    variants = [(a, c) for a, cs in chunks.items() for c in cs]
    found = _measured_variant(net, analysis, order, batch, variants, [v for v in variants if v[0] in close], measure)
    if found is not None:
        return found[0], "measured", found[1]
    return best, "cost model", None


def _measured_variant(net, analysis: Analysis, order: int, batch: int, variants, timed, measure: bool):
    """The (algorithm, chunk) measured fastest among ``variants``, or None.

    Read from the cache; else, with ``measure``, the ``timed`` ones (the close candidates)
    are timed now, if there are two or more.
    """
    # What the caller will run, which the timing thread cannot see (context variables do
    # not follow a thread): the result's layout (the native kernel writes the full one
    # itself, the XLA recursions expand it after) and whether the native kernel is allowed.
    layout, native = _native.requested_layout(), native_applies(net, analysis, order, batch)
    names = {_choice_name(a, c): (a, c) for a, c in variants}
    key = _measured.signature(net, analysis, order, batch, list(names), f"{layout},native={'+'.join(native) or 'none'}")
    known = _measured.lookup(key)
    if known in names:
        return names[known]
    if not (measure and _measured.enabled(net)) or len(timed) < 2:
        return None
    runs = {_choice_name(a, c): _timed_run(net, analysis, order, a, layout, bool(native), chunk=c) for a, c in timed}
    return names.get(_measured.measure(key, runs, analysis, batch))


def _choice_name(algorithm: str, chunk: int | None) -> str:
    return algorithm if chunk is None else f"{algorithm}@{chunk}"


def _timed_run(net, analysis: Analysis, order: int, algorithm: str, layout: str, native: bool, chunk=None):
    """``x -> fields`` as a ``derivs_fn`` running ``algorithm`` computes them (``net`` baked in)."""
    plan = Plan(algorithm, analysis, order, 0, "asked", fallback=True, chunk=chunk)

    def run(x):
        with _native.layout_request(layout), contextlib.nullcontext() if native else _native.disabled():
            result = in_layout(_compute(plan, net, x), layout, analysis.m)
        return tuple(f for f in result if f is not None)

    return jax.jit(run)


def runs_interpreter(analysis: Analysis, algorithm: str, order: int) -> bool:
    """Whether ``algorithm`` runs on the engine's interpreter (chunked), not its fused path or AD.

    A layered model takes the fused path (``_taylor._layered``: one call of the native
    kernel, or the XLA recursions in their own cache-sized chunks) at orders up to 3.
    """
    return algorithm in TAYLOR and (analysis.structure is None or order > 3)


def chunk_candidates(net, analysis: Analysis, order: int, batch: int, algorithm: str) -> list[int | None]:
    """The chunk sizes worth timing for ``algorithm`` on ``batch`` points ([None]: nothing to choose).

    The engine's rule sizes a chunk's Taylor stacks to the cores' L2 caches; how far past
    that a larger chunk still pays (XLA:CPU splits only large fusions over the cores)
    depends on the machine and its load: measured 1.2-1.5x either way on a 2-core EPYC
    VM. So the rule's chunk, 2x and 4x it are the candidates.
    """
    if not runs_interpreter(analysis, algorithm, order):
        return [None]
    try:
        rule = _taylor.default_chunk(net, algorithm, analysis.m, analysis.dtype, order, batch)
    except _network.UnsupportedModelError:
        return [None]
    if rule >= batch:
        return [None]  # one chunk: nothing to choose
    return sorted({min(rule * f, batch) for f in (1, 2, 4)})


def select_chunk(net, analysis: Analysis, order: int, batch: int, algorithm: str, measure: bool = False):
    """Points per chunk for the engine running ``algorithm`` (an explicit method) on ``batch`` points.

    None: the engine's rule. Where choices are measured, :func:`chunk_candidates` are timed
    once per machine and model (cached like the algorithm choices) and the fastest is kept.
    """
    candidates = chunk_candidates(net, analysis, order, batch, algorithm)
    if candidates == [None]:
        return None
    variants = [(algorithm, c) for c in candidates]
    found = _measured_variant(net, analysis, order, batch, variants, variants, measure)
    return None if found is None else found[1]


def in_layout(result, layout: str, m: int) -> Derivatives:
    """A method's result (orders >= 2 packed, or full where the native kernel wrote them) in ``layout``."""
    result = Derivatives(*result, layout="full" if _native.is_full(result) else "packed", m=m)
    return result.as_layout(layout)


# --------------------------------------------------------------------------------------
# The compute.


def _engine(plan: Plan, net, x: jax.Array) -> Derivatives:
    algorithms = {"forward": _taylor.forward, "fwdrev": _taylor.fwdrev, "fwdadj": _taylor.fwdadj}
    try:
        return algorithms[plan.algorithm](net, x, plan.order, chunk=plan.chunk)
    except _network.UnsupportedModelError:
        if not plan.fallback:
            raise
        # The other program may have rules for everything (jacrev turns a cumprod into
        # sums and products); if neither has, its error names the primitive.
        other = "forward" if plan.algorithm == "fwdrev" else "fwdrev"
        return algorithms[other](net, x, plan.order)


def _compute(plan: Plan, net, x: jax.Array) -> Derivatives:
    if plan.algorithm == "jet":
        return jet_method(net, x, plan.order)
    if plan.algorithm == "nested":
        return nested(net, x, plan.order)
    return _engine(plan, net, x)


# --------------------------------------------------------------------------------------
# The methods.


class Method:
    """A way to compute derivatives: :meth:`init` once per model and shape, :meth:`compute` per batch.

    Calling a method, ``method(net, x, order)``, is ``compute(init(...), net, x)``.
    """

    name: str = ""
    #: the algorithms this method chooses among (one: it runs that one)
    among: tuple[str, ...] = ()

    def init(
        self, net, m: int, dtype, order: int, batch: int, analysis: Analysis | None = None, measure: bool = False
    ) -> Plan:
        """Analyse ``net`` (unless ``analysis`` is given) and decide what runs for ``batch`` points."""
        analysis = analysis or analyse(net, m, dtype)
        if len(self.among) == 1:
            algorithm = self.among[0]
            chunk = select_chunk(net, analysis, order, batch, algorithm, measure)
            return Plan(algorithm, analysis, order, batch, "asked", chunk=chunk)
        algorithm, how, chunk = select(net, analysis, order, batch, self.among, measure)
        return Plan(algorithm, analysis, order, batch, how, fallback=True, chunk=chunk)

    def compute(self, plan: Plan, net, x: jax.Array) -> Derivatives:
        """The derivatives of ``net`` at the points ``x`` (B, m), packed, as ``plan`` says."""
        return _compute(plan, net, x)

    def __call__(self, net, x: jax.Array, order: int) -> Derivatives:
        return self.compute(self.init(net, x.shape[-1], x.dtype, order, x.shape[0]), net, x)

    def __repr__(self) -> str:
        return f"<nnderiv method {self.name!r}>"


def _method(name: str, among: tuple[str, ...], doc: str) -> Method:
    cls = type(f"{name.capitalize()}Method", (Method,), {"name": name, "among": among, "__doc__": doc})
    return cls()


forward_method = _method("forward", ("forward",), "Packed forward Taylor arithmetic at order k.")
fwdrev_method = _method("fwdrev", ("fwdrev",), "Forward to order k - 1 over a reverse sweep.")
fwdadj_method = _method(
    "fwdadj", ("fwdadj",), "Forward to order k - 1, the top order by first-order adjoints (native kernel)."
)
analytic_method = _method("analytic", TAYLOR, "The fastest of forward, fwdrev and fwdadj for this model and batch.")
jet_method_obj = _method("jet", ("jet",), "jax.experimental.jet along C(m+k-1, k) directions.")
nested_method = _method("nested", ("nested",), "Nested jacfwd over jacrev.")
auto_method = _method("auto", ("forward", "fwdrev", "fwdadj", "nested"), "The fastest algorithm that applies.")
