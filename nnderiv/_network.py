"""The wrapped model, and the analysis that reads an MLP's layers off its trace.

A :class:`Network` is a pytree holding the model's parameters (its leaves, so that it
can be traced, differentiated and passed through ``jit``) and a static specification
(the apply function). Every method works from ``net.apply_point(x)``; the analytic
kernels additionally need the *layered* form

    a_0 = x,  stage_1, stage_2, ..., stage_L,   stage = affine  |  elementwise,

which :func:`mlp_structure` reads off the jaxpr of one forward pass:

* variables depending on the input are *live*; the rest depend only on the parameters
  (*param*) or on nothing (*pure*) and are evaluated once per call, before the kernel;
* a live ``dot_general`` against a parameter matrix, followed by ``add`` of a parameter
  vector, is an affine stage;
* a maximal run of elementwise live equations between affine stages is an elementwise
  stage, identified as a known activation by its values (see ``_activations``) or
  differentiated generically;
* ``h + g`` with ``h`` the value after an earlier stage and ``g`` the current one is a
  skip stage (a residual block);
* ``concatenate`` of elementwise functions of one value (``[sin z, cos z]``, Fourier
  features) is a concatenation stage; the kernels run it as the affine layer before it
  with its columns repeated, then one activation per block of columns.

Anything else on the live path (a reduction, a convolution, a product of two layers)
means the model is not an MLP; the reason is kept so that ``method="analytic"`` can name
it (the Taylor engine, ``nnderiv._taylor``, takes such models).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _activations, _jaxpr

_LIVE, _PARAM, _PURE = "live", "param", "pure"

# Primitives that act elementwise on same-shaped operands (scalars broadcast).
_ELEMENTWISE = frozenset(
    """neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh
    acosh atanh sqrt rsqrt cbrt abs sign floor ceil round erf erfc erf_inv lgamma digamma
    integer_pow square reciprocal is_finite not convert_element_type copy
    stop_gradient add sub mul div max min pow atan2 rem nextafter eq ne lt le gt ge and or
    select_n clamp""".split()
)
_RESHAPES = frozenset({"reshape", "squeeze", "expand_dims"})
# Elementwise primitives affine in each live operand (mul and div: in one of them).
_LINEAR_ELEMENTWISE = frozenset({"add", "sub", "neg", "convert_element_type", "copy"})


def _float_to_float(eqn) -> bool:
    return all(jnp.issubdtype(v.dtype, jnp.floating) for v in (*eqn.inputs, *eqn.outputs) if hasattr(v, "dtype"))


class UnsupportedModelError(ValueError):
    """Raised by the analytic methods for a model they cannot differentiate.

    The message names the primitive and the module it came from.
    """


#: The former name, kept importable.
NotAnMLPError = UnsupportedModelError


@dataclasses.dataclass(eq=False)
class ModelSpec:
    """The static part of a :class:`Network`.

    Compared and hashed by ``key`` when there is one (a hashable description of the
    model's code, e.g. the linen module, which compares by its fields), else by identity.
    Equal specs let ``jit`` reuse one compiled program for two wrappings of the same
    model, e.g. ``from_flax(module, variables)`` called anew for every set of variables.
    """

    apply: Callable[[Any, jax.Array], jax.Array]
    name: str
    input_dim: int | None
    key: Any = None

    def _identity(self):
        return self if self.key is None else (self.key, self.name, self.input_dim)

    def __eq__(self, other):
        if not isinstance(other, ModelSpec):
            return NotImplemented
        if self.key is None or other.key is None:
            return self is other
        try:
            return bool(self._identity() == other._identity())
        except Exception:  # noqa: BLE001 - keys that cannot be compared are different models
            return False

    def __hash__(self):
        return id(self) if self.key is None else hash(self._identity())

    def __post_init__(self):
        try:
            hash(self.key)
        except TypeError:  # e.g. a module with a list field: identity it is
            self.key = None


@jax.tree_util.register_pytree_node_class
class Network:
    """A trained model wrapped for :func:`nnderiv.derivatives`.

    Build one with :func:`nnderiv.from_flax` or :func:`nnderiv.from_function`. It is a
    pytree whose leaves are the model's parameters, so it passes through ``jit``,
    ``vmap`` and ``grad`` like any other argument.
    """

    def __init__(self, params: Any, spec: ModelSpec):
        self.params = params
        self.spec = spec

    def tree_flatten(self):
        return (self.params,), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(children[0], spec)

    @property
    def input_dim(self) -> int | None:
        """The number of inputs ``m``, where known from the parameters."""
        return self.spec.input_dim

    def apply_point(self, x: jax.Array) -> jax.Array:
        """The model at one point ``x`` of shape ``(m,)``, as a vector of shape ``(n,)``."""
        y = self.spec.apply(self.params, x)
        return jnp.reshape(y, (-1,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The model on ``x`` of shape ``(*batch, m)``: outputs of shape ``(*batch, n)``."""
        x = jnp.asarray(x)
        flat = x.reshape(-1, x.shape[-1])
        return jax.vmap(self.apply_point)(flat).reshape(*x.shape[:-1], -1)

    def describe(self, input_dim: int | None = None, dtype=None) -> str:
        """A one-line-per-stage description of the layers the analytic kernel sees."""
        m = input_dim or self.input_dim
        if m is None:
            raise ValueError("describe() needs input_dim: the model's input size is not known")
        dtype = dtype or jnp.result_type(float)
        structure = mlp_structure(self, m, dtype)
        # The parameters' dtype: float32 Flax weights (Flax's default param_dtype, even under
        # x64) give float64 results for float64 inputs, computed from float32 values.
        params = ", ".join(sorted({str(jnp.result_type(p)) for p in jax.tree_util.tree_leaves(self.params)}))
        header = f"{self.spec.name} (m={m}, parameters {params or 'none'})"
        if isinstance(structure, str):
            return f"{header}: not an MLP ({structure})"
        return "\n".join([header] + [f"  {s.describe()}" for s in structure.stages])

    def __repr__(self) -> str:
        return f"Network({self.spec.name}, input_dim={self.input_dim})"


# --------------------------------------------------------------------------------------
# The layered form.


@dataclasses.dataclass(frozen=True)
class AffineStage:
    weight: _jaxpr.Operand
    transpose: bool  # weight is stored (out, in)
    biases: tuple[tuple[_jaxpr.Operand, float], ...]  # (operand, sign)
    fan_in: int
    fan_out: int

    def describe(self) -> str:
        return f"affine {self.fan_in} -> {self.fan_out}" + (" + bias" if self.biases else "")


@dataclasses.dataclass(frozen=True)
class ElementwiseStage:
    source: _jaxpr.FlatVar
    result: _jaxpr.FlatVar
    eqns: tuple[_jaxpr.FlatEqn, ...]
    width: int
    activation: _activations.Activation | None  # None: generic, depends on parameters

    @property
    def linear(self) -> bool:
        """Whether the segment is affine in its input, by its operations (an input scaling)."""
        live = {self.source}
        for eqn in self.eqns:
            ins = [isinstance(i, _jaxpr.FlatVar) and i in live for i in eqn.inputs]
            if eqn.name in ("mul", "div"):
                ok = sum(ins) == 1 and (eqn.name == "mul" or ins[0])
            else:
                ok = eqn.name in _LINEAR_ELEMENTWISE and (eqn.name != "convert_element_type" or _float_to_float(eqn))
            if not ok:
                return False
            live.update(eqn.outputs)
        return bool(self.eqns)

    def describe(self) -> str:
        if self.linear and (self.activation is None or not self.activation.closed_form):
            return f"elementwise affine map ({len(self.eqns)} ops)"
        if self.activation is None:
            return f"elementwise ({len(self.eqns)} ops, parameter-dependent, generic derivatives)"
        kind = "closed form" if self.activation.closed_form else "generic derivatives"
        return f"{self.activation.name} ({kind})"

    def function(self, env: dict) -> Callable[[jax.Array], jax.Array]:
        program = _jaxpr.FlatProgram((self.source,), (self.result,), self.eqns)

        def one_point(z):
            return _jaxpr.evaluate(program, (z,), dict(env))[0]

        def segment(z):
            # The traced equations have the shapes of one point baked in: map over the rest.
            flat = z.reshape(-1, self.width)
            return jax.vmap(one_point)(flat).reshape(z.shape)

        return segment


@dataclasses.dataclass(frozen=True)
class SkipStage:
    """``h + v_source``: the value after the first ``source`` stages (0: the input) is added."""

    source: int
    width: int

    def describe(self) -> str:
        what = "the input" if self.source == 0 else f"the output of stage {self.source}"
        return f"+ {what} (skip connection)"


@dataclasses.dataclass(frozen=True)
class ConcatStage:
    """``concatenate([f_1(z), ..., f_k(z)])`` of elementwise functions of one ``z`` (width ``width``)."""

    parts: tuple[ElementwiseStage, ...]
    width: int

    def describe(self) -> str:
        names = ", ".join(p.describe() for p in self.parts)
        return f"concatenate [{names}] ({self.width} -> {self.width * len(self.parts)})"


@dataclasses.dataclass(frozen=True)
class MLPStructure:
    program: _jaxpr.FlatProgram
    prologue: tuple[_jaxpr.FlatEqn, ...]  # parameter-only equations the stages need
    stages: tuple[AffineStage | ElementwiseStage | SkipStage | ConcatStage, ...]
    output_dim: int
    dtype: Any

    @property
    def plain(self) -> bool:
        """Only affine layers and elementwise activations (no skip or concatenation stage)."""
        return all(isinstance(s, (AffineStage, ElementwiseStage)) for s in self.stages)

    @property
    def affine_shapes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each affine layer the kernels run (:func:`runtime_stages`)."""
        shapes: list[tuple[int, int]] = []
        for step, stage, extra in _lowering(self):
            if step == "affine":
                shapes.append((stage.fan_in, stage.fan_out * extra))
            elif step == "repeat":
                shapes.append((stage.width, stage.width * extra))
        return shapes


@dataclasses.dataclass(frozen=True)
class RuntimeAffine:
    weight: jax.Array  # (in, out)
    bias: jax.Array | None  # (out,)


@dataclasses.dataclass(frozen=True)
class RuntimeSkip:
    """Add the value after the first ``source`` runtime stages (0: the input)."""

    source: int


# Traced programs and their analyses, most recently used last. Bounded, and kept here
# rather than on the model's (static, hashed) pytree data: one program per model, input
# size, dtype and transform, shared by every method's analysis and by the engine, whose
# per-program tables (``_taylor``) are keyed by the program's identity.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEPT = 64
_PROGRAMS_LOCK = threading.Lock()


def _remember(key, make):
    with _PROGRAMS_LOCK:
        if key in _PROGRAMS:
            _PROGRAMS.move_to_end(key)
            return _PROGRAMS[key]
    value = make()
    with _PROGRAMS_LOCK:
        value = _PROGRAMS.setdefault(key, value)
        _PROGRAMS.move_to_end(key)
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    return value


def trace_program(net: Network, m: int, dtype, tag: str = "program", transform=None) -> _jaxpr.FlatProgram:
    """The flat program of ``(*param_leaves, x) -> y`` for one point ``x`` of shape (m,).

    ``transform`` (remembered under ``tag``): trace ``transform(f)(x)`` instead, with ``f``
    the model at one point as a vector (e.g. the engine's ``jax.jacrev`` program).
    """
    leaves, treedef = jax.tree_util.tree_flatten(net.params)
    shapes = tuple((np.shape(l), jnp.result_type(l)) for l in leaves)
    key = (net.spec, tag, m, jnp.dtype(dtype).name, treedef, shapes)

    def flat_apply(*args):
        params = jax.tree_util.tree_unflatten(treedef, args[:-1])

        def point(u):
            return jnp.reshape(net.spec.apply(params, u), (-1,))

        return (point if transform is None else transform(point))(args[-1])

    def trace():
        specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
        return _jaxpr.trace_flat(flat_apply, *specs, jax.ShapeDtypeStruct((m,), dtype))

    return _remember(key, trace)


def analyse_program(program: _jaxpr.FlatProgram) -> MLPStructure | str:
    """The layered form of a flat program ``(*params, x) -> y``, or why it has none."""
    return _analyse(program)


def mlp_structure(net: Network, m: int, dtype) -> MLPStructure | str:
    """The layered form of ``net`` for inputs of size ``m``, or why it has none."""
    program = trace_program(net, m, dtype)
    kept, structure = _remember(("mlp", id(program)), lambda: (program, _analyse(program)))
    # An id is reused once its program is gone: the pair keeps the program it was made for.
    return structure if kept is program else _analyse(program)


def _analyse(program: _jaxpr.FlatProgram) -> MLPStructure | str:
    *param_vars, x_var = program.inputs
    kind: dict[Any, str] = {v: _PARAM for v in param_vars}
    kind[x_var] = _LIVE

    def kind_of(op) -> str:
        return _PURE if isinstance(op, _jaxpr.FlatLiteral) else kind[op]

    for eqn in program.eqns:
        kinds = {kind_of(i) for i in eqn.inputs}
        k = _LIVE if _LIVE in kinds else _PARAM if _PARAM in kinds else _PURE
        for out in eqn.outputs:
            kind[out] = k

    if len(program.outputs) != 1 or kind_of(program.outputs[0]) != _LIVE:
        return "the output does not depend on the input"

    stages: list = []
    head = x_var  # the live value the next stage consumes
    seg_source, seg_eqns, seg_vars = x_var, [], {x_var}
    affine_open = False
    finished = False
    # The values a later stage may add back (skip connections): variable -> the number
    # of stages that produced it.
    boundary: dict[Any, int] = {x_var: 0}

    def close_segment(result):
        if seg_eqns:
            stages.append(ElementwiseStage(seg_source, result, tuple(seg_eqns), result.shape[0], None))
            boundary[result] = len(stages)

    def segment_result(var) -> bool:
        """Whether ``var`` is what the open segment computes (its last value, or its source)."""
        return var is (seg_eqns[-1].outputs[0] if seg_eqns else seg_source)

    def where(eqn) -> str:
        return f"`{eqn.name}`" + (f" in {eqn.where}" if eqn.where else "")

    for eqn in program.eqns:
        live_in = [i for i in eqn.inputs if kind_of(i) == _LIVE]
        if not live_in:
            continue
        if finished and not (eqn.name in _RESHAPES and len(live_in) == 1 and live_in[0] is head):
            return f"operation {where(eqn)} follows the output reshape"
        out = eqn.outputs[0]
        if not finished and eqn.name == "add" and len(live_in) == 2:
            a, b = eqn.inputs
            current, earlier = (a, b) if a in seg_vars else (b, a)
            if (
                current in seg_vars
                and earlier not in seg_vars
                and earlier in boundary
                and segment_result(current)
                and len(out.shape) == 1
                and _shape_of(current) == _shape_of(earlier) == out.shape
            ):
                close_segment(current)
                stages.append(SkipStage(boundary[earlier], out.shape[0]))
                head = out
                seg_source, seg_eqns, seg_vars = out, [], {out}
                boundary[out] = len(stages)
                affine_open = False
                continue
        if not finished and eqn.name == "concatenate" and len(live_in) == len(eqn.inputs) >= 2:
            parts = _concat_parts(eqn, seg_source, seg_eqns, seg_vars)
            if isinstance(parts, str):
                return f"operation {where(eqn)}: {parts}"
            stages.append(ConcatStage(parts, seg_source.shape[0]))
            head = out
            seg_source, seg_eqns, seg_vars = out, [], {out}
            boundary[out] = len(stages)
            affine_open = False
            continue
        if any(i not in seg_vars for i in live_in):
            return (
                f"operation {where(eqn)} combines values from different layers "
                "(only a sum with an earlier layer's output, a skip connection, is a layered form)"
            )
        if eqn.name == "dot_general":
            affine = _as_affine(eqn, kind_of)
            if isinstance(affine, str):
                return f"{where(eqn)}: {affine}"
            result_of_segment = live_in[0]
            close_segment(result_of_segment)
            stages.append(affine)
            head = out
            seg_source, seg_eqns, seg_vars = out, [], {out}
            boundary[out] = len(stages)
            affine_open = True
        elif (
            affine_open
            and eqn.name in ("add", "sub")
            and len(live_in) == 1
            and eqn.inputs[0] is head
            and _shape_of(eqn.inputs[1]) in ((), head.shape)
        ) or (
            affine_open
            and eqn.name == "add"
            and len(live_in) == 1
            and eqn.inputs[1] is head
            and _shape_of(eqn.inputs[0]) in ((), head.shape)
        ):
            bias = eqn.inputs[1] if eqn.inputs[0] is head else eqn.inputs[0]
            sign = -1.0 if eqn.name == "sub" else 1.0
            last = stages[-1]
            stages[-1] = dataclasses.replace(last, biases=last.biases + ((bias, sign),))
            boundary.pop(head, None)  # the value without its bias is no stage's output
            head = out
            seg_source, seg_vars = out, {out}
            boundary[out] = len(stages)
        elif (
            eqn.name in _ELEMENTWISE
            and all(o.shape == head.shape for o in eqn.outputs)
            and all(i.shape in ((), head.shape) for i in eqn.inputs if not isinstance(i, _jaxpr.FlatLiteral))
        ):
            affine_open = False
            seg_eqns.append(eqn)
            seg_vars.update(eqn.outputs)
        elif eqn.name in _RESHAPES and int(np.prod(out.shape)) == int(np.prod(live_in[0].shape)):
            if not finished:
                close_segment(live_in[0])
            seg_eqns, seg_vars = [], {out}
            head = out
            finished = True
        else:
            return f"operation {where(eqn)} is not an affine layer or an elementwise activation"

    result = program.outputs[0]
    if result not in seg_vars:
        return "the output is not the last layer's value"
    if not finished:
        close_segment(result)
    if not stages:
        return "no layers found"

    stages = [_identified(s, program, kind) for s in stages]
    prologue = _prologue(program, stages, kind)
    return MLPStructure(program, prologue, tuple(stages), int(np.prod(result.shape)), result.dtype)


def _identified(stage, program, kind):
    if isinstance(stage, ElementwiseStage):
        return _identify(stage, program, kind)
    if isinstance(stage, ConcatStage):
        return dataclasses.replace(stage, parts=tuple(_identify(p, program, kind) for p in stage.parts))
    return stage


def _concat_parts(eqn, source, seg_eqns, seg_vars) -> tuple[ElementwiseStage, ...] | str:
    """The elementwise functions of the open segment's ``source`` that ``eqn`` concatenates."""
    if eqn.params.get("dimension") != 0 or len(source.shape) != 1:
        return "only a concatenation of vectors is a layered form"
    if any(i not in seg_vars or _shape_of(i) != source.shape for i in eqn.inputs):
        return (
            "a concatenation is a layered form only of elementwise functions of one layer's output "
            "(as [sin(z), cos(z)])"
        )
    producer = {o: e for e in seg_eqns for o in e.outputs}
    parts, used = [], set()
    for operand in eqn.inputs:
        needed, members = {operand}, []
        for e in reversed(seg_eqns):
            if any(o in needed for o in e.outputs):
                members.append(e)
                needed.update(i for i in e.inputs if i in producer)
        members.reverse()
        used.update(id(e) for e in members)
        parts.append(ElementwiseStage(source, operand, tuple(members), source.shape[0], None))
    if len(used) != len(seg_eqns):
        return "a value computed beside the concatenated ones is used elsewhere"
    return tuple(parts)


def _shape_of(op) -> tuple[int, ...]:
    """The shape of a variable or of a literal (a literal has no ``.shape`` attribute)."""
    return tuple(op.shape) if isinstance(op, _jaxpr.FlatVar) else tuple(np.shape(op.value))


def _as_affine(eqn, kind_of) -> AffineStage | str:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.inputs
    if lhs_b or rhs_b:
        return "batched matrix products are not affine layers"
    live_first = kind_of(lhs) == _LIVE
    if kind_of(lhs) == _LIVE and kind_of(rhs) == _LIVE:
        return "a product of two input-dependent values is not an affine layer"
    vec, mat = (lhs, rhs) if live_first else (rhs, lhs)
    vec_c, mat_c = (lhs_c, rhs_c) if live_first else (rhs_c, lhs_c)
    vec_shape, mat_shape = _shape_of(vec), _shape_of(mat)
    if len(vec_shape) != 1 or tuple(vec_c) != (0,) or len(mat_shape) != 2 or len(mat_c) != 1:
        return f"expected a vector times a matrix, got shapes {vec_shape} and {mat_shape}"
    transpose = tuple(mat_c) == (1,)
    fan_in, fan_out = (mat_shape[1], mat_shape[0]) if transpose else mat_shape
    return AffineStage(mat, transpose, (), int(fan_in), int(fan_out))


def _identify(stage: ElementwiseStage, program, kind) -> ElementwiseStage:
    """Attach an activation to a segment whose constants do not depend on parameters."""
    internal = set()
    for eqn in stage.eqns:
        internal.update(eqn.outputs)
    external = [
        i
        for eqn in stage.eqns
        for i in eqn.inputs
        if not isinstance(i, _jaxpr.FlatLiteral) and i is not stage.source and i not in internal
    ]
    if any(kind[i] == _PARAM for i in external):
        return stage  # parameter-dependent: generic derivatives, built per call
    with _activations.eager():
        env = _evaluate_pure(program, kind, external)
        segment = stage.function(env)
        probes = jnp.asarray(_activations.PROBE_POINTS, dtype=stage.source.dtype)
        values = np.asarray(segment(jnp.broadcast_to(probes[:, None], (len(probes), stage.width))))
    activation = None
    if np.all(values == values[:, :1]):
        activation = _activations.recognize(values[:, 0], stage.source.dtype)
    if activation is None:
        activation = _activations.generic(segment)
    return dataclasses.replace(stage, activation=activation)


def _evaluate_pure(program, kind, wanted) -> dict:
    """Concrete values of the pure (parameter- and input-free) variables in ``wanted``."""
    needed = set(wanted)
    eqns = []
    for eqn in reversed(program.eqns):
        if any(o in needed for o in eqn.outputs):
            eqns.append(eqn)
            needed.update(i for i in eqn.inputs if not isinstance(i, _jaxpr.FlatLiteral))
    env: dict = {}
    for eqn in reversed(eqns):
        values = [i.value if isinstance(i, _jaxpr.FlatLiteral) else env[i] for i in eqn.inputs]
        env.update(zip(eqn.outputs, _jaxpr.bind(eqn, values)))
    return env


def _prologue(program, stages, kind) -> tuple[_jaxpr.FlatEqn, ...]:
    """The non-live equations that compute the stages' weights, biases and constants."""
    needed = set()
    for stage in stages:
        if isinstance(stage, AffineStage):
            needed.add(stage.weight)
            needed.update(b for b, _ in stage.biases)
        for part in _elementwise_parts(stage):
            if part.activation is None or part.linear:
                for eqn in part.eqns:
                    needed.update(i for i in eqn.inputs if not isinstance(i, _jaxpr.FlatLiteral))
    needed = {n for n in needed if not isinstance(n, _jaxpr.FlatLiteral)}
    eqns = []
    for eqn in reversed(program.eqns):
        if kind[eqn.outputs[0]] != _LIVE and any(o in needed for o in eqn.outputs):
            eqns.append(eqn)
            needed.update(i for i in eqn.inputs if not isinstance(i, _jaxpr.FlatLiteral))
    return tuple(reversed(eqns))


def runtime_stages(net: Network, structure: MLPStructure, dtype, leaves=None) -> list:
    """Evaluate the prologue with the network's (possibly traced) parameters.

    Returns a list of :class:`RuntimeAffine` and :class:`~nnderiv._activations.Activation`,
    with weights cast to the computation ``dtype``. ``leaves``: the parameters as the
    program's inputs (default: those of ``net``).
    """
    leaves = jax.tree_util.tree_leaves(net.params) if leaves is None else leaves
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        # Concrete parameters (a derivs_fn bakes them in): evaluated now, even while a jit
        # traces, so the stages hold concrete weights: XLA gets them as constants and the
        # native kernel can key what it packs from them by their values (weights_token).
        # Staged, every cast or transpose would make them tracers and the kernel would
        # repack them on every call.
        with jax.ensure_compile_time_eval():
            return _runtime_stages(structure, leaves, dtype)
    return _runtime_stages(structure, leaves, dtype)


def _runtime_stages(structure: MLPStructure, leaves, dtype) -> list:
    env = dict(zip(structure.program.inputs[:-1], leaves))
    for eqn in structure.prologue:
        values = [i.value if isinstance(i, _jaxpr.FlatLiteral) else env[i] for i in eqn.inputs]
        env.update(zip(eqn.outputs, _jaxpr.bind(eqn, values)))

    def read(op):
        return jnp.asarray(op.value if isinstance(op, _jaxpr.FlatLiteral) else env[op], dtype)

    def activation(part: ElementwiseStage):
        if part.linear and (part.activation is None or not part.activation.closed_form):
            return _activations.linear(part.function(env))
        if part.activation is not None:
            return part.activation
        return _activations.generic(part.function(env), "parametrised")

    out = []
    for step, stage, extra in _lowering(structure):
        if step == "affine":
            weight = read(stage.weight)
            weight = weight.T if stage.transpose else weight
            bias = None
            for operand, sign in stage.biases:
                term = jnp.broadcast_to(read(operand) * sign, (stage.fan_out,))
                bias = term if bias is None else bias + term
            if extra > 1:  # repeated for the concatenation after it
                weight = jnp.concatenate([weight] * extra, axis=1)
                bias = None if bias is None else jnp.concatenate([bias] * extra)
            out.append(RuntimeAffine(weight, bias))
        elif step == "repeat":
            out.append(RuntimeAffine(jnp.tile(jnp.eye(stage.width, dtype=dtype), (1, extra)), None))
        elif step == "columns":
            out.append(_activations.columns([(activation(p), stage.width) for p in stage.parts]))
        elif step == "skip":
            out.append(RuntimeSkip(extra))
        else:
            out.append(activation(stage))
    return out


def _elementwise_parts(stage) -> tuple[ElementwiseStage, ...]:
    if isinstance(stage, ElementwiseStage):
        return (stage,)
    return stage.parts if isinstance(stage, ConcatStage) else ()


def _lowering(structure: MLPStructure):
    """The runtime stages of ``structure`` as ``(step, stage, extra)``, in order.

    ``("affine", stage, copies)``: an affine layer, its columns repeated ``copies`` times
    when a concatenation follows it; ``("repeat", concat, copies)``: the identity repeated
    (a concatenation after anything else); ``("columns", concat, None)``: the
    concatenation's activations side by side; ``("skip", stage, source)`` with ``source``
    counted in runtime stages; ``("activation", stage, None)``.
    """
    stages = structure.stages
    skipped_to = {s.source for s in stages if isinstance(s, SkipStage)}
    steps: list = []
    position = [0]  # runtime stages after each structure stage
    for i, stage in enumerate(stages):
        if isinstance(stage, AffineStage):
            after = i + 1  # the structure count whose value this layer produces
            nxt = stages[i + 1] if after < len(stages) else None
            copies = len(nxt.parts) if isinstance(nxt, ConcatStage) and after not in skipped_to else 1
            steps.append(["affine", stage, copies])
        elif isinstance(stage, ConcatStage):
            prev = steps[-1] if steps else None
            if not (prev and prev[0] == "affine" and prev[2] == len(stage.parts)):
                steps.append(["repeat", stage, len(stage.parts)])
            steps.append(["columns", stage, None])
        elif isinstance(stage, SkipStage):
            steps.append(["skip", stage, position[stage.source]])
        else:
            steps.append(["activation", stage, None])
        position.append(len(steps))
    return [tuple(s) for s in steps]


def output_dim(net: Network, m: int, dtype) -> int:
    """The number of outputs ``n`` of ``net`` for inputs of size ``m``."""
    program = trace_program(net, m, dtype)
    return int(np.prod(program.outputs[0].shape))
