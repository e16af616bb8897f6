"""Fused regions: the body language of a ``fused`` node, shared by rules, cost, lowering and reports.

A fused node computes one output from its real inputs in one kernel. Its body is a small
expression text, built by the `fusion` rule set with egglog string operations and read here:

- ``$i``: the i-th input of the region (``$0`` .. ``$9``)
- ``exp($0)``, ``add($0,$1)``: every unary and binary elementwise op of `ir`
- ``convert[float32](x)``, ``ipow[3](x)``, ``select(c,a,b)``
- ``T[0,2,1]($i)``: the region reads input i in another layout; ``W[0,2,1](x)``: the region
  writes its output in another layout (the same transpose, spelled W at a region's root)
- ``B[2,3,4;0,2](x)``: broadcast_in_dim to shape (2,3,4) with dimensions (0,2)
- ``L[0.5;float32]``: a rank-0 literal
- ``D[lc;rc;lb;rb;dtype;precision](a,b)``: a dot_general whose elementwise consumers are its epilogue
  (precision as `egraph.language.Term.dot`'s)

Bodies are compiled once (cached) to a list of steps; typing and evaluation reuse
`op_types.infer_type` and `lower.lower_node` per step (`lower.evaluate_region`), so a region computes
exactly what its unfused ops compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .op_types import BINARY_OPS, UNARY_OPS, TensorType, infer_type

ARG = "$"


@dataclass(frozen=True)
class BodyOp:
    """One op of a region body: its name, the text of its bracketed parameters, its operands."""

    name: str
    params: tuple[str, ...] = ()
    args: tuple[BodyOp, ...] = ()


class RegionSyntaxError(ValueError):
    """A fused node's body is not in the region body language (see the module docstring)."""


@functools.lru_cache(maxsize=65536)
def parse(body: str) -> BodyOp:
    """The syntax tree of a region body."""
    op, end = _parse(body, 0)
    if end != len(body):
        raise RegionSyntaxError(f"unexpected text at {end} in region body {body!r}")
    return op


def _parse(text: str, i: int) -> tuple[BodyOp, int]:
    if text.startswith(ARG, i):
        j = i + 1
        while j < len(text) and text[j].isdigit():
            j += 1
        if j == i + 1:
            raise RegionSyntaxError(f"'$' without an index at {i} in region body {text!r}")
        return BodyOp(text[i:j]), j
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    if j == i:
        raise RegionSyntaxError(f"expected an op name at {i} in region body {text!r}")
    name, params, args = text[i:j], (), []
    if j < len(text) and text[j] == "[":
        close = text.index("]", j)
        params = tuple(text[j + 1:close].split(";"))
        j = close + 1
    if j < len(text) and text[j] == "(":
        j += 1
        while True:
            arg, j = _parse(text, j)
            args.append(arg)
            if j < len(text) and text[j] == ",":
                j += 1
                continue
            if j < len(text) and text[j] == ")":
                j += 1
                break
            raise RegionSyntaxError(f"expected ',' or ')' at {j} in region body {text!r}")
    return BodyOp(name, params, tuple(args)), j


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v != "")


def _ir_op(op: BodyOp) -> tuple[str, dict[str, Any], TensorType | None]:
    """(IR op, params, output type when it is not inferred) of one body op."""
    n, p = op.name, op.params
    if n in UNARY_OPS or n in BINARY_OPS:
        return n, {}, None
    if n == "convert":
        return "convert_element_type", {"new_dtype": p[0]}, None
    if n == "ipow":
        return "integer_pow", {"y": int(p[0])}, None
    if n == "select":
        return "select_n", {}, None
    if n in ("T", "W"):
        return "transpose", {"perm": _ints(p[0])}, None
    if n == "B":
        return "broadcast_in_dim", {"broadcast_dimensions": _ints(p[1])}, None  # type: shape from p[0]
    if n == "D":
        return "dot_general", {
            "lhs_contract": _ints(p[0]), "rhs_contract": _ints(p[1]), "lhs_batch": _ints(p[2]),
            "rhs_batch": _ints(p[3]), "preferred_element_type": p[4] or None,
            **({"precision": p[5]} if len(p) > 5 and p[5] else {}),
        }, None
    raise RegionSyntaxError(f"unknown op {n!r} in a region body")


def literal_value(op: BodyOp) -> tuple[Any, str]:
    value, dtype = float(op.params[0]), op.params[1]
    py = bool(value) if dtype == "bool" else int(value) if "int" in dtype else value
    return py, dtype


@dataclass(frozen=True)
class Step:
    """One op of a compiled body: ``kind`` "arg" (input ``index``), "literal", or "op" (an IR op
    with ``params`` over earlier steps ``args``; ``shape`` is a broadcast's output shape)."""

    kind: str
    op: BodyOp
    ir_op: str = ""
    params: tuple[tuple[str, Any], ...] = ()
    args: tuple[int, ...] = ()
    index: int = -1
    shape: tuple[int, ...] | None = None


@functools.lru_cache(maxsize=65536)
def compile_body(body: str) -> tuple[Step, ...]:
    """The body's ops in evaluation order (operands first), shared subtrees once."""
    steps: list[Step] = []
    done: dict[int, int] = {}
    stack: list[tuple[BodyOp, bool]] = [(parse(body), False)]
    while stack:
        op, ready = stack.pop()
        if id(op) in done:
            continue
        if op.name.startswith(ARG):
            step = Step("arg", op, index=int(op.name[1:]))
        elif op.name == "L":
            step = Step("literal", op)
        elif not ready:
            stack.append((op, True))
            stack.extend((a, False) for a in op.args if id(a) not in done)
            continue
        else:
            name, params, _ = _ir_op(op)
            shape = _ints(op.params[0]) if op.name == "B" else None
            step = Step("op", op, name, tuple(params.items()), tuple(done[id(a)] for a in op.args), shape=shape)
        done[id(op)] = len(steps)
        steps.append(step)
    return tuple(steps)


def step_type(step: Step, types: list[TensorType]) -> TensorType:
    if step.shape is not None:
        return TensorType(step.shape, types[0].dtype)
    return infer_type(step.ir_op, dict(step.params), types)


@functools.lru_cache(maxsize=65536)
def analyse(body: str, inputs: tuple[TensorType, ...]) -> tuple[TensorType, tuple[tuple[BodyOp, TensorType, TensorType], ...], float]:
    """(output type, each dot_general with its operand types, bytes transposed with the minor
    axis moving) of a body over typed inputs."""
    types: list[TensorType] = []
    dots = []
    transposed = 0.0
    for step in compile_body(body):
        if step.kind == "arg":
            if step.index >= len(inputs):
                raise RegionSyntaxError(f"region body {body!r} reads ${step.index} of {len(inputs)} inputs")
            types.append(inputs[step.index])
        elif step.kind == "literal":
            types.append(TensorType((), step.op.params[1]))
        else:
            operand_types = [types[i] for i in step.args]
            if step.op.name == "D":
                dots.append((step.op, *operand_types))
            if step.op.name in ("T", "W"):
                perm = _ints(step.op.params[0])
                if perm and perm[-1] != len(perm) - 1:
                    transposed += operand_types[0].nbytes
            types.append(step_type(step, operand_types))
    return types[-1], tuple(dots), transposed


def region_type(body: str, inputs: Sequence[TensorType]) -> TensorType:
    """The output type of a region body over inputs of these types."""
    return analyse(body, tuple(inputs))[0]


def dot_operand_types(body: str, inputs: Sequence[TensorType]) -> tuple[tuple[BodyOp, TensorType, TensorType], ...]:
    """Each body dot_general with the types of its two operands."""
    return analyse(body, tuple(inputs))[1]


@dataclass(frozen=True)
class RegionStats:
    """What a cost model or a report needs to know of a body."""

    ops: tuple[str, ...]  # body op names in evaluation order (no inputs, no literals)
    transposes: tuple[tuple[int, ...], ...]  # permutations of the transposes inside
    dots: int  # dot_generals inside (the region is their epilogue)
    writes_transposed: bool  # the region's root is a transpose (W): it writes another layout


@functools.lru_cache(maxsize=65536)
def stats(body: str) -> RegionStats:
    steps = [st for st in compile_body(body) if st.kind == "op"]
    perms = tuple(_ints(st.op.params[0]) for st in steps if st.op.name in ("T", "W"))
    return RegionStats(
        tuple(st.op.name for st in steps), perms, sum(1 for st in steps if st.op.name == "D"),
        parse(body).name == "W",
    )


def lone_matmul(body: str) -> dict[str, Any] | None:
    """dot_general params if the body is one matmul of $0 and $1 and nothing else, else None."""
    root = parse(body)
    if root.name != "D" or [a.name for a in root.args] != ["$0", "$1"]:
        return None
    return _ir_op(root)[1]


def transposed_bytes(body: str, inputs: Sequence[TensorType]) -> float:
    """Bytes of the tensors transposed inside a region by permutations that move the minor axis."""
    return analyse(body, tuple(inputs))[2]


def dot_flops(op: BodyOp, a: TensorType, b: TensorType) -> float:
    """2 x batch x M x N x K of a body dot_general on operands of these types."""
    import math

    lc, rc, lb, rb = (_ints(p) for p in op.params[:4])
    batch = math.prod(a.shape[i] for i in lb)
    k = math.prod(a.shape[i] for i in lc)
    m = math.prod(a.shape[i] for i in range(a.rank) if i not in lc and i not in lb)
    n = math.prod(b.shape[i] for i in range(b.rank) if i not in rc and i not in rb)
    return 2.0 * batch * m * n * k
