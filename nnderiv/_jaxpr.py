"""A flat view of a traced model: every call, custom-derivative wrapper and jit inlined.

Both the network analysis (which reads off affine layers and elementwise segments) and
the ``"jet"`` method need the model as one flat list of primitive applications:

* the analysis must see through ``jit``/``custom_jvp`` boundaries that Flax and
  ``jax.nn`` put around activations;
* ``jax.experimental.jet`` ignores ``custom_jvp`` rules and fails on functions such as
  ``jax.nn.softplus``; evaluating the primal bodies instead gives it only primitives
  with Taylor rules.

Inlining a ``custom_jvp`` body keeps the function's values and its derivatives wherever
the function is smooth, which is everywhere a derivative tensor is well defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

# Primitives whose bodies are inlined. Control flow (scan, while, cond) is deliberately
# absent: it is kept as one opaque equation.
_INLINED = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
        "custom_lin",
    }
)
_BODY_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class FlatVar:
    """A variable of a :class:`FlatProgram`; hashed by identity, so inlined copies differ."""

    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def dtype(self):
        return self.aval.dtype

    def __repr__(self) -> str:
        return f"FlatVar({self.aval.str_short()})"


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: values may be arrays
class FlatLiteral:
    """A constant operand (a jaxpr literal or a closed-over constant)."""

    value: Any


Operand = FlatVar | FlatLiteral


@dataclasses.dataclass(frozen=True)
class FlatEqn:
    primitive: Any
    inputs: tuple[Operand, ...]
    outputs: tuple[FlatVar, ...]
    params: dict
    where: str  # the module path it came from (Flax name stack), for error messages

    @property
    def name(self) -> str:
        return self.primitive.name


@dataclasses.dataclass(frozen=True)
class FlatProgram:
    inputs: tuple[FlatVar, ...]
    outputs: tuple[Operand, ...]
    eqns: tuple[FlatEqn, ...]


def _body_of(eqn) -> tuple[Any, Sequence[Any]] | None:
    if eqn.primitive.name not in _INLINED:
        return None
    for key in _BODY_KEYS:
        body = eqn.params.get(key)
        if body is None:
            continue
        if isinstance(body, jex_core.ClosedJaxpr):
            return body.jaxpr, body.consts
        if isinstance(body, jex_core.Jaxpr):
            return body, ()
    return None


def flatten_jaxpr(closed: jex_core.ClosedJaxpr) -> FlatProgram:
    """Inline every call-like equation of ``closed`` into one flat program."""
    eqns: list[FlatEqn] = []

    def inline(jaxpr, consts, args: Sequence[Operand], where: str) -> list[Operand]:
        env: dict[Any, Operand] = {}
        for var, const in zip(jaxpr.constvars, consts):
            env[var] = FlatLiteral(const)
        for var, arg in zip(jaxpr.invars, args):
            env[var] = arg

        def read(atom) -> Operand:
            if isinstance(atom, jex_core.Literal):
                return FlatLiteral(atom.val)
            return env[atom]

        for eqn in jaxpr.eqns:
            inputs = [read(a) for a in eqn.invars]
            stack = str(eqn.source_info.name_stack)
            here = "/".join(p for p in (where, stack) if p)
            body = _body_of(eqn)
            if body is not None:
                sub_jaxpr, sub_consts = body
                # custom_jvp_call passes its num_consts constants first, like any call.
                outs = inline(sub_jaxpr, sub_consts, inputs, here)
            else:
                outs = [FlatVar(v.aval) for v in eqn.outvars]
                eqns.append(FlatEqn(eqn.primitive, tuple(inputs), tuple(outs), dict(eqn.params), here))
            for var, out in zip(eqn.outvars, outs):
                if not isinstance(var, jex_core.DropVar):
                    env[var] = out
        return [read(v) for v in jaxpr.outvars]

    inputs = tuple(FlatVar(v.aval) for v in closed.jaxpr.invars)
    outputs = inline(closed.jaxpr, closed.consts, inputs, "")
    return FlatProgram(inputs, tuple(outputs), tuple(eqns))


def bind(eqn: FlatEqn, values: Sequence[Any]) -> list[Any]:
    """Apply one equation's primitive to concrete or traced values."""
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(program: FlatProgram, args: Sequence[Any], env: dict | None = None) -> list[Any]:
    """Evaluate ``program`` on ``args`` (under any JAX transformation)."""
    env = {} if env is None else env
    for var, arg in zip(program.inputs, args):
        env[var] = arg

    def read(op: Operand):
        return op.value if isinstance(op, FlatLiteral) else env[op]

    for eqn in program.eqns:
        for var, out in zip(eqn.outputs, bind(eqn, [read(i) for i in eqn.inputs])):
            env[var] = out
    return [read(o) for o in program.outputs]


def trace_flat(fn: Callable, *example_args) -> FlatProgram:
    """Trace ``fn`` at the shapes of ``example_args`` and flatten the result."""
    return flatten_jaxpr(jax.make_jaxpr(fn)(*example_args))
