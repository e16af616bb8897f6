"""Fused regions: the body language of a ``fused`` node, shared by rules, cost, lowering and reports.

A fused node computes one output from its real inputs in one kernel. Its body is a small
expression text, built by the `fusion` rule set with egglog string operations and read here:

- ``$i``: the i-th input of the region (``$0`` .. ``$9``)
- ``exp($0)``, ``add($0,$1)``: every unary and binary elementwise op of `ir`
- ``convert[float32](x)``, ``ipow[3](x)``, ``select(c,a,b)``
- ``T[0,2,1](x)``: a transpose inside the region (it reads or writes the other layout)
- ``B[2,3,4;0,2](x)``: broadcast_in_dim to shape (2,3,4) with dimensions (0,2)
- ``L[0.5;float32]``: a rank-0 literal
- ``D[lc;rc;lb;rb;dtype](a,b)``: a dot_general whose elementwise consumers are its epilogue

Bodies are parsed once (cached); typing and evaluation reuse `ir.infer_type` and
`lower.lower_node` per body op, so a region computes exactly what its unfused ops compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import ir

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


def _ir_op(op: BodyOp) -> tuple[str, dict[str, Any], ir.TensorType | None]:
    """(IR op, params, output type when it is not inferred) of one body op."""
    n, p = op.name, op.params
    if n in ir.UNARY_OPS or n in ir.BINARY_OPS:
        return n, {}, None
    if n == "convert":
        return "convert_element_type", {"new_dtype": p[0]}, None
    if n == "ipow":
        return "integer_pow", {"y": int(p[0])}, None
    if n == "select":
        return "select_n", {}, None
    if n == "T":
        return "transpose", {"perm": _ints(p[0])}, None
    if n == "B":
        return "broadcast_in_dim", {"broadcast_dimensions": _ints(p[1])}, None  # type: shape from p[0]
    if n == "D":
        return "dot_general", {
            "lhs_contract": _ints(p[0]), "rhs_contract": _ints(p[1]), "lhs_batch": _ints(p[2]),
            "rhs_batch": _ints(p[3]), "preferred_element_type": p[4] or None,
        }, None
    raise RegionSyntaxError(f"unknown op {n!r} in a region body")


def _literal(op: BodyOp) -> tuple[Any, str]:
    value, dtype = float(op.params[0]), op.params[1]
    py = bool(value) if dtype == "bool" else int(value) if "int" in dtype else value
    return py, dtype


def _walk(body: str, inputs: Sequence[Any], leaf, apply):
    """Evaluate a body bottom-up (iteratively: bodies can be deep): ``leaf`` for $i and
    literals, ``apply(op, args)`` for every other op."""
    root = parse(body)
    values: dict[int, Any] = {}
    stack: list[tuple[BodyOp, bool]] = [(root, False)]
    while stack:
        op, ready = stack.pop()
        if id(op) in values:
            continue
        if op.name.startswith(ARG) or op.name == "L":
            values[id(op)] = leaf(op)
            continue
        if not ready:
            stack.append((op, True))
            stack.extend((a, False) for a in op.args if id(a) not in values)
            continue
        values[id(op)] = apply(op, [values[id(a)] for a in op.args])
    return values[id(root)]


def _op_type(op: BodyOp, types: list[ir.TensorType]) -> ir.TensorType:
    name, params, _ = _ir_op(op)
    if op.name == "B":
        return ir.TensorType(_ints(op.params[0]), types[0].dtype)
    return ir.infer_type(name, params, types)


def region_type(body: str, inputs: Sequence[ir.TensorType]) -> ir.TensorType:
    """The output type of a region body over inputs of these types."""

    def leaf(op: BodyOp) -> ir.TensorType:
        if op.name == "L":
            return ir.TensorType((), op.params[1])
        return inputs[int(op.name[1:])]

    return _walk(body, inputs, leaf, _op_type)


def evaluate(body: str, inputs: Sequence[Any]) -> Any:
    """The region's value: its body's ops applied as `lower.lower_node` applies the unfused ops."""
    import numpy as np
    import jax.numpy as jnp

    from .lower import lower_node

    def leaf(op: BodyOp) -> Any:
        if op.name == "L":
            value, dtype = _literal(op)
            return np.array(value, dtype=jnp.dtype(dtype))
        return inputs[int(op.name[1:])]

    def apply(op: BodyOp, args: list[Any]) -> Any:
        name, params, _ = _ir_op(op)
        types = [ir.TensorType(tuple(np.shape(a)), str(jnp.result_type(a))) for a in args]
        node = ir.Node(name, (), ir.Params(params), _op_type(op, types))
        return lower_node(node, args)

    return _walk(body, inputs, leaf, apply)


@dataclass(frozen=True)
class RegionStats:
    """What a cost model or a report needs to know of a body."""

    ops: tuple[str, ...]  # body op names, bottom-up (no args, no literals)
    transposes: tuple[tuple[int, ...], ...]  # the permutations of transposes inside
    dots: tuple[BodyOp, ...]  # dot_generals inside (a matmul with its epilogue)


@functools.lru_cache(maxsize=65536)
def stats(body: str) -> RegionStats:
    ops: list[str] = []
    perms: list[tuple[int, ...]] = []
    dots: list[BodyOp] = []

    def apply(op: BodyOp, _args: list[Any]) -> None:
        ops.append(op.name)
        if op.name == "T":
            perms.append(_ints(op.params[0]))
        if op.name == "D":
            dots.append(op)

    _walk(body, (), lambda _op: None, apply)
    return RegionStats(tuple(ops), tuple(perms), tuple(dots))


def dot_flops(op: BodyOp, a: ir.TensorType, b: ir.TensorType) -> float:
    """2 x batch x M x N x K of a body dot_general on operands of these types."""
    import math

    lc, rc, lb, rb = (_ints(p) for p in op.params[:4])
    batch = math.prod(a.shape[i] for i in lb)
    k = math.prod(a.shape[i] for i in lc)
    m = math.prod(a.shape[i] for i in range(a.rank) if i not in lc and i not in lb)
    n = math.prod(b.shape[i] for i in range(b.rank) if i not in rc and i not in rb)
    return 2.0 * batch * m * n * k


def dot_operand_types(body: str, inputs: Sequence[ir.TensorType]) -> list[tuple[BodyOp, ir.TensorType, ir.TensorType]]:
    """Each body dot_general with the types of its two operands."""
    out: list[tuple[BodyOp, ir.TensorType, ir.TensorType]] = []

    def leaf(op: BodyOp) -> ir.TensorType:
        return ir.TensorType((), op.params[1]) if op.name == "L" else inputs[int(op.name[1:])]

    def apply(op: BodyOp, types: list[ir.TensorType]) -> ir.TensorType:
        if op.name == "D":
            out.append((op, types[0], types[1]))
        return _op_type(op, types)

    _walk(body, inputs, leaf, apply)
    return out
