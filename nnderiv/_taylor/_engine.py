"""The interpreter: the per-point program evaluated on Taylor polynomials.

Every variable that depends on the input (*live*) carries a :class:`~._poly.Poly`; the
others (parameters, constants and anything computed from them alone) are plain values,
computed once per call (``vmap`` over the batch leaves them unbatched). Each live equation
is dispatched to its rule in :data:`~._rules.RULES` by primitive object; an equation whose
live operands all have vanishing derivatives (a comparison's result, ``floor``) is just
evaluated.

Activation fast path: a maximal connected group of elementwise live equations whose only
live input is one variable and whose only value used outside is one variable is a
univariate function of that input. Identified by value as one of the known activations
(``_activations.recognize``), it is applied as one composition with the activation's
closed-form derivatives, whatever ops it was written with (``x * sigmoid(x)``,
``jax.nn.softplus``'s ``logaddexp``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _activations, _jaxpr, _network
from . import _poly, _rules, _tables
from ._poly import Poly

UnsupportedModelError = _network.UnsupportedModelError


@dataclasses.dataclass
class Counter:
    """Per-point multiply-add work of the matrix products, counted while interpreting."""

    flops: float = 0.0

    def count(self, eqn: _jaxpr.FlatEqn, *polys) -> None:
        if eqn.primitive is not jax.lax.dot_general_p:
            return
        (lhs_c, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.inputs[0]
        shape = lhs.shape if isinstance(lhs, _jaxpr.FlatVar) else np.shape(lhs.value)
        contracted = math.prod(shape[d] for d in lhs_c)
        out = math.prod(eqn.outputs[0].shape)
        rows = 0
        for p in polys:
            if isinstance(p, Poly):
                rows += 1 + sum(int(np.shape(b)[0]) for b in p.blocks[1:] if b is not None)
        self.flops += 2.0 * contracted * out * max(rows, 1)


@dataclasses.dataclass(frozen=True)
class Segment:
    source: _jaxpr.FlatVar
    result: _jaxpr.FlatVar
    eqns: tuple[int, ...]  # indices into program.eqns
    activation: _activations.Activation


def _kinds(program: _jaxpr.FlatProgram) -> dict:
    *params, x = program.inputs
    kind: dict[Any, str] = {v: "param" for v in params}
    kind[x] = "live"
    for eqn in program.eqns:
        ks = {kind_of(kind, i) for i in eqn.inputs}
        k = "live" if "live" in ks else "param" if "param" in ks else "pure"
        for o in eqn.outputs:
            kind[o] = k
    return kind


def kind_of(kind: dict, op) -> str:
    return "pure" if isinstance(op, _jaxpr.FlatLiteral) else kind[op]


def _shape(op) -> tuple[int, ...]:
    return tuple(op.shape) if isinstance(op, _jaxpr.FlatVar) else tuple(np.shape(op.value))


_SEGMENTS: dict[int, tuple[_jaxpr.FlatProgram, dict[int, Segment], frozenset[int]]] = {}


def segments(program: _jaxpr.FlatProgram) -> tuple[dict[int, Segment], frozenset[int]]:
    """The activation segments of ``program``: {index of the last eqn: segment}, skipped eqns."""
    cached = _SEGMENTS.get(id(program))
    if cached is not None and cached[0] is program:
        return cached[1], cached[2]
    found = _find_segments(program)
    _SEGMENTS[id(program)] = (program, *found)
    return found


def _find_segments(program):
    kind = _kinds(program)
    producer: dict[Any, int] = {}
    for idx, eqn in enumerate(program.eqns):
        for o in eqn.outputs:
            producer[o] = idx
    candidate = set()
    for idx, eqn in enumerate(program.eqns):
        if eqn.primitive not in _rules.ELEMENTWISE or len(eqn.outputs) != 1:
            continue
        ins = eqn.inputs
        if kind_of(kind, eqn.outputs[0]) != "live" or any(kind_of(kind, i) == "param" for i in ins):
            continue
        shape = eqn.outputs[0].shape
        if any(_shape(i) not in ((), shape) for i in ins):
            continue
        if any(kind_of(kind, i) == "live" and _shape(i) != shape for i in ins):
            continue
        candidate.add(idx)
    parent = {i: i for i in candidate}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for idx in sorted(candidate):
        for i in program.eqns[idx].inputs:
            p = producer.get(i) if isinstance(i, _jaxpr.FlatVar) else None
            if p is not None and p in candidate:
                parent[find(p)] = find(idx)
    groups: dict[int, list[int]] = {}
    for idx in sorted(candidate):
        groups.setdefault(find(idx), []).append(idx)
    uses: dict[Any, set] = {}
    for idx, eqn in enumerate(program.eqns):
        for i in eqn.inputs:
            if isinstance(i, _jaxpr.FlatVar):
                uses.setdefault(i, set()).add(idx)
    outputs = {o for o in program.outputs if isinstance(o, _jaxpr.FlatVar)}

    found: dict[int, Segment] = {}
    skipped: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue  # a single primitive: its own rule is the same closed form
        inside = set(members)
        produced = {o for i in members for o in program.eqns[i].outputs}
        sources = {
            i
            for idx in members
            for i in program.eqns[idx].inputs
            if isinstance(i, _jaxpr.FlatVar) and kind_of(kind, i) == "live" and i not in produced
        }
        escaping = sorted(
            (v for v in produced if v in outputs or uses.get(v, set()) - inside), key=lambda v: producer[v]
        )
        if len(sources) != 1 or not escaping:
            continue
        (source,) = sources
        if not jnp.issubdtype(source.dtype, jnp.floating):
            continue
        if any(not jnp.issubdtype(r.dtype, jnp.floating) or r.shape != source.shape for r in escaping):
            continue
        eqns = [program.eqns[i] for i in members]
        # Several escaping values are one univariate function family (an activation and
        # the slope jacrev keeps of it, tanh(z) and 1 - tanh(z)^2): each is a function of
        # the source, recognised or differentiated by nested jvp, so each costs one
        # composition instead of a product per primitive.
        several = len(escaping) > 1
        pieces = [(r, _identify(program, kind, eqns, source, r, generic=several)) for r in escaping]
        if any(a is None for _, a in pieces) or (not several and pieces[0][1].name == "identity"):
            continue
        for result, activation in pieces:
            found[producer[result]] = Segment(source, result, tuple(members), activation)
        skipped.update(members)
    return found, frozenset(skipped)


def _identify(program, kind, eqns, source, result, generic: bool = False) -> _activations.Activation | None:
    """The univariate function ``source -> result`` of ``eqns``: a known activation, or None.

    ``generic``: an unknown one is differentiated by nested ``jvp`` of the equations
    (any elementwise function, the same for every unit or not).
    """
    produced = {o for e in eqns for o in e.outputs}
    external = [
        i for e in eqns for i in e.inputs if isinstance(i, _jaxpr.FlatVar) and i is not source and i not in produced
    ]
    sub = _jaxpr.FlatProgram((source,), (result,), tuple(eqns))
    try:
        with _activations.eager():
            env = _network._evaluate_pure(program, kind, external)  # noqa: SLF001
            probes = jnp.asarray(_activations.PROBE_POINTS, dtype=source.dtype)
            values = jax.vmap(lambda p: _jaxpr.evaluate(sub, (jnp.full(source.shape, p, source.dtype),), dict(env))[0])(
                probes
            )
            values = np.asarray(values).reshape(len(probes), -1)
    except Exception:  # noqa: BLE001 - an unusual segment: fall back to its primitives' rules
        return None
    known = _activations.recognize(values[:, 0], source.dtype) if np.all(values == values[:, :1]) else None
    if known is not None or not generic:
        return known

    def function(z):
        return _jaxpr.evaluate(sub, (z,), dict(env))[0]

    return _activations.generic(function, "segment")


def _where(eqn: _jaxpr.FlatEqn) -> str:
    return f"`{eqn.name}`" + (f" in {eqn.where}" if eqn.where else "")


def unsupported(eqn: _jaxpr.FlatEqn, why: str = "") -> UnsupportedModelError:
    detail = f" ({why})" if why else ""
    return UnsupportedModelError(
        f"the Taylor engine has no rule for the primitive {_where(eqn)} on the input-dependent path{detail}. "
        f"Use method='nested' or method='jet', which work on any model, or method='auto', which picks one."
    )


_INDEX_OPERANDS = {
    jax.lax.gather_p: (1,),
    jax.lax.dynamic_slice_p: None,  # every operand after the first
    jax.lax.dynamic_update_slice_p: None,  # every operand after the second
}


def _check_indices(eqn, ins) -> None:
    prim = eqn.primitive
    if prim not in _INDEX_OPERANDS:
        return
    if prim is jax.lax.gather_p:
        positions = (1,)
    elif prim is jax.lax.dynamic_slice_p:
        positions = tuple(range(1, len(ins)))
    else:
        positions = tuple(range(2, len(ins)))
    if any(isinstance(ins[i], Poly) for i in positions):
        raise unsupported(eqn, "an index that depends on the input")


@dataclasses.dataclass(frozen=True)
class LayeredPrefix:
    """A variable the program computes from the input through a layered form alone.

    ``result`` (1-D) depends on the input only through ``eqns`` (indices into the
    program), which form an MLP (``structure``, see ``_network``) and whose
    input-dependent values nothing else reads: the native kernel (the fused path)
    computes its Taylor polynomial in one call, and the interpreter skips those equations.
    """

    result: _jaxpr.FlatVar
    eqns: frozenset[int]
    structure: Any


_PREFIXES: dict[int, tuple[_jaxpr.FlatProgram, tuple[LayeredPrefix, ...]]] = {}


def layered_prefixes(program: _jaxpr.FlatProgram) -> tuple[LayeredPrefix, ...]:
    """The program's disjoint :class:`LayeredPrefix` es, latest-defined first (cached per program).

    Candidates are the live values that meet another live value (``x0 (1 - x0) * mlp(x)``,
    a product or sum of sub-networks) and the outputs; each with at least two affine
    layers and an activation between them, since the kernel gains nothing on less, and no
    equation of an earlier-found one.
    """
    cached = _PREFIXES.get(id(program))
    if cached is not None and cached[0] is program:
        return cached[1]
    found = _find_prefixes(program)
    _PREFIXES[id(program)] = (program, found)
    return found


def layered_prefix(program: _jaxpr.FlatProgram) -> LayeredPrefix | None:
    """The latest-defined of :func:`layered_prefixes`, or None."""
    found = layered_prefixes(program)
    return found[0] if found else None


def _find_prefixes(program: _jaxpr.FlatProgram) -> tuple[LayeredPrefix, ...]:
    kind = _kinds(program)
    producer = {o: i for i, e in enumerate(program.eqns) for o in e.outputs}
    users: dict[Any, set[int]] = {}
    for i, e in enumerate(program.eqns):
        for v in e.inputs:
            if isinstance(v, _jaxpr.FlatVar):
                users.setdefault(v, set()).add(i)
    x = program.inputs[-1]
    outputs = {o for o in program.outputs if isinstance(o, _jaxpr.FlatVar)}
    candidates = set(outputs)
    for e in program.eqns:
        live = [v for v in e.inputs if isinstance(v, _jaxpr.FlatVar) and kind[v] == "live"]
        if len(live) >= 2:
            candidates.update(v for v in live if v is not x)
    found: list[LayeredPrefix] = []
    taken: set[int] = set()
    for v in sorted((c for c in candidates if c in producer), key=producer.get, reverse=True):
        if kind[v] != "live" or len(v.shape) != 1 or not jnp.issubdtype(v.dtype, jnp.floating):
            continue
        if producer[v] in taken:
            continue
        ancestors, stack = set(), [producer[v]]
        while stack:
            i = stack.pop()
            if i in ancestors:
                continue
            ancestors.add(i)
            stack.extend(producer[u] for u in program.eqns[i].inputs if u in producer)
        live_eqns = {i for i in ancestors if kind[program.eqns[i].outputs[0]] == "live"}
        if live_eqns & taken:
            continue
        # Their input-dependent values must not be read elsewhere (v itself is).
        escapes = any(
            (users.get(o, set()) - ancestors) or o in outputs
            for i in live_eqns
            for o in program.eqns[i].outputs
            if o is not v
        )
        if escapes:
            continue
        sub = _jaxpr.FlatProgram(program.inputs, (v,), tuple(program.eqns[i] for i in sorted(ancestors)))
        structure = _network.analyse_program(sub)
        if isinstance(structure, str):
            continue
        affine = sum(isinstance(s, _network.AffineStage) for s in structure.stages)
        if affine < 2 or structure.plain and len(structure.stages) < 3:
            continue
        found.append(LayeredPrefix(v, frozenset(live_eqns), structure))
        taken |= live_eqns
    return tuple(found)


def prefix_fields(prefixes, consts, x: jax.Array, order: int):
    """The native kernel's packed fields of each prefix's ``result`` at the points ``x`` (B, m).

    A list with one entry per prefix: its fields, or None where the kernel does not apply
    (the interpreter then runs that prefix's equations). Called on a batch, outside the
    interpreter's ``vmap`` over points: the custom call then sees one batch and shared
    weights, however the caller's own ``vmap`` batches the points or the parameters.
    """
    from .. import _native

    if not 1 <= order <= 3:
        return [None] * len(prefixes)
    out = []
    for prefix in prefixes:
        stages = _network.runtime_stages(None, prefix.structure, x.dtype, leaves=consts)
        out.append(_native.native_derivatives(stages, x, order, "packed", "forward"))
    return out


def _prefix_poly(prefix: LayeredPrefix, fields, m: int, order: int, counter: Counter) -> Poly:
    """The Taylor polynomial of ``prefix.result`` at one point from its packed fields."""
    for fan_in, fan_out in prefix.structure.affine_shapes[1:]:
        counter.flops += 2.0 * sum(_tables.block_size(m, j) for j in range(order + 1)) * fan_in * fan_out
    dtype = fields[0].dtype
    blocks = [fields[0]]
    for j in range(1, order + 1):  # (n, P_j) packed, in the engine's slot order
        blocks.append(fields[j].T / jnp.asarray(_tables.factorials(m, j), dtype)[:, None])
    return Poly(blocks, m)


def run(
    program: _jaxpr.FlatProgram,
    consts,
    x: jax.Array,
    order: int,
    counter: Counter | None = None,
    fast_path: bool = True,
    layered=None,
) -> list:
    """Evaluate ``program`` at one point ``x`` (m,) on Taylor polynomials of order ``order``.

    ``consts``: values of every input but the last (the parameters). Returns, per program
    output, a :class:`Poly` (live) or a plain value. ``layered``: the
    :func:`prefix_fields` of the program's :func:`layered_prefixes` at this point; the
    equations of those with fields are then skipped.
    """
    counter = counter or Counter()
    m = x.shape[0]
    env: dict[Any, Any] = dict(zip(program.inputs[:-1], consts))
    env[program.inputs[-1]] = _poly.variable(x, order)
    segs, skipped = segments(program) if fast_path else ({}, frozenset())
    prefixes = layered_prefixes(program) if layered is not None else ()
    for prefix, fields in zip(prefixes, layered or ()):
        if fields is None:
            continue
        env[prefix.result] = _prefix_poly(prefix, fields, m, order, counter)
        cut = {i: s for i, s in segs.items() if set(s.eqns) & prefix.eqns}
        segs = {i: s for i, s in segs.items() if i not in cut}
        # A segment the prefix cuts runs as its primitives (those outside the prefix).
        skipped = (skipped - {e for s in cut.values() for e in s.eqns}) | prefix.eqns

    def read(op):
        return op.value if isinstance(op, _jaxpr.FlatLiteral) else env[op]

    for idx, eqn in enumerate(program.eqns):
        if idx in skipped:
            seg = segs.get(idx)
            if seg is not None:
                u = env[seg.source]
                derivs = seg.activation.derivatives(u.value, order)
                if u.is_constant():
                    env[seg.result] = _poly.constant(derivs[0], m, order)
                else:
                    env[seg.result] = _poly.compose(u, _poly.derivative_coefficients(derivs))
            continue
        ins = [read(i) for i in eqn.inputs]
        live = [a for a in ins if isinstance(a, Poly)]
        if not live:
            outs = _jaxpr.bind(eqn, ins)
        elif all(p.is_constant() or not jnp.issubdtype(p.dtype, jnp.inexact) for p in live):
            # No live operand varies to first order: neither do the outputs.
            values = _jaxpr.bind(eqn, [a.value if isinstance(a, Poly) else a for a in ins])
            outs = [_poly.constant(v, m, order) for v in values]
        else:
            rule = _rules.RULES.get(eqn.primitive)
            if rule is None:
                raise unsupported(eqn)
            _check_indices(eqn, ins)
            outs = rule(eqn, ins, counter)
        for var, out in zip(eqn.outputs, outs):
            env[var] = out
    return [read(o) for o in program.outputs]
