"""Program -> egglog terms: one `let` per node (sharing kept, every expression shallow).

Leaves (inputs, constants, opaque results) get their shape and dtype here; the analysis
rule set derives the rest. Nodes the language does not model are encoded as `Term.opaque`
over their operands, so decoding restores them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from egglog import Action, EGraph, String, set_

from .. import ir
from .language import MAX_REGION_INPUTS, Term, TermList, causal_mask, dtype, fused, ivec, program_order, shape

AXES = "BHSD"


def layout_to_axes(layout: str) -> tuple[int, ...]:
    """"BHDS" -> (0, 1, 3, 2): the physical position of each logical axis B, H, S, D."""
    if sorted(layout) != sorted(AXES):
        raise ValueError(f"attention layout {layout!r} must be a permutation of {AXES!r}")
    return tuple(layout.index(a) for a in AXES)


def axes_to_layout(axes: tuple[int, ...]) -> str:
    out = [""] * 4
    for logical, pos in enumerate(axes):
        out[pos] = AXES[logical]
    return "".join(out)


PACKED_AXES = "BHSD3"  # logical axes of a packed Q/K/V array; "3" indexes Q, K, V


def packed_layout_to_axes(layout: str) -> tuple[int, ...]:
    """"BS3HD" -> (0, 3, 1, 4, 2): the physical position of each of B, H, S, D and the packed axis."""
    if sorted(layout) != sorted(PACKED_AXES):
        raise ValueError(f"packed layout {layout!r} must be a permutation of {PACKED_AXES!r}")
    return tuple(layout.index(a) for a in PACKED_AXES)


def axes_to_packed_layout(axes: tuple[int, ...]) -> str:
    out = [""] * 5
    for logical, pos in enumerate(axes):
        out[pos] = PACKED_AXES[logical]
    return "".join(out)


@dataclass
class Encoding:
    """Terms of an encoded program and the side tables decoding needs."""

    program: ir.Program
    terms: dict[int, Term] = field(default_factory=dict)  # node id -> let-bound term
    uninterpreted: list[ir.Node] = field(default_factory=list)  # Term.opaque / constant index -> node
    root: TermList | None = None


def _vec(values) -> object:
    return ivec(values)


def _term(node: ir.Node, args: list[Term], enc: Encoding) -> Term:
    op, p = node.op, node.params
    if op == "input":
        return Term.input(p["index"])
    if op == "literal":
        return Term.literal(float(p["value"]), String(node.type.dtype))
    if op == "constant":
        enc.uninterpreted.append(node)
        return Term.constant(len(enc.uninterpreted) - 1)
    if op == "iota":
        return Term.iota(String(node.type.dtype), _vec(node.type.shape), p["dimension"])
    if op in ir.UNARY_OPS:
        return Term.unary(op, args[0])
    if op in ir.BINARY_OPS:
        return Term.binary(op, args[0], args[1])
    if op == "softmax":
        return Term.softmax(args[0])
    if op == "integer_pow":
        return Term.integer_pow(args[0], p["y"])
    if op == "convert_element_type":
        return Term.convert(args[0], String(str(p["new_dtype"])))
    if op == "select_n" and len(args) == 3:
        return Term.select(args[0], args[1], args[2])
    if op == "transpose":
        return Term.transpose(args[0], _vec(p["perm"]))
    if op == "reshape":
        return Term.reshape(args[0], _vec(node.type.shape))
    if op == "broadcast_in_dim":
        return Term.broadcast(args[0], _vec(node.type.shape), _vec(p["broadcast_dimensions"]))
    if op in ir.REDUCE_OPS:
        return Term.reduce(op, args[0], _vec(sorted(p["axes"])))
    if op == "dot_general":
        return Term.dot(
            args[0], args[1], _vec(p["lhs_contract"]), _vec(p["rhs_contract"]),
            _vec(p["lhs_batch"]), _vec(p["rhs_batch"]), String(p.get("preferred_element_type") or ""),
        )
    if op == "attention":
        mask = args[3] if len(args) > 3 else Term.no_mask()
        return Term.attention(
            args[0], args[1], args[2], mask,
            _vec(layout_to_axes(p["q_layout"])), _vec(layout_to_axes(p["k_layout"])),
            _vec(layout_to_axes(p["v_layout"])), _vec(layout_to_axes(p["o_layout"])),
            float(p["scale"]), int(bool(p["causal"])), String(p["mask_kind"]),
        )
    if op == "attention_fp8":
        axes = [_vec(layout_to_axes(p[f"{n}_layout"])) for n in "qkvo"]
        return Term.attention_fp8(*args[:6], *axes, float(p["scale"]), int(bool(p["causal"])),
                                  String(str(p["out_dtype"])))
    if op == "slice":
        return Term.slice(args[0], _vec(p["start_indices"]), _vec(p["limit_indices"]))
    if op == "concatenate":
        parts = TermList.nil()
        for a in reversed(args):
            parts = TermList.cons(a, parts)
        return Term.concat(parts, p["dimension"])
    if op == "packed_attention":
        mask = args[1] if len(args) > 1 else Term.no_mask()
        return Term.packed_attention(
            args[0], mask, _vec(packed_layout_to_axes(p["packed_layout"])), _vec(layout_to_axes(p["o_layout"])),
            float(p["scale"]), int(bool(p["causal"])), String(p["mask_kind"]),
        )
    if op == "opaque_output":
        return Term.output(args[0], p["index"])
    if op == "fused" and len(args) <= MAX_REGION_INPUTS:
        return fused(String(str(p["body"])), *args)
    # opaque, and anything the language does not model: kept as is
    enc.uninterpreted.append(node)
    operands = TermList.nil()
    for a in reversed(args):
        operands = TermList.cons(a, operands)
    return Term.opaque(len(enc.uninterpreted) - 1, operands)


def is_causal_constant(array: np.ndarray) -> bool:
    """A closed-over mask equal to tril(ones) over its last two axes (bool or 0/1 values)."""
    if array.ndim < 2 or array.dtype.kind not in "biuf":
        return False
    tril = np.tril(np.ones(array.shape[-2:], dtype=bool))
    return bool(np.all(np.where(tril, array == 1, array == 0)))


def _is_leaf_typed(node: ir.Node) -> bool:
    """Nodes whose shape and dtype the analysis cannot derive."""
    return node.type is not None and node.op not in (
        "literal", "iota", "softmax", "transpose", "reshape", "broadcast_in_dim", "integer_pow",
        "convert_element_type", "dot_general", "attention", "attention_fp8", "slice", "concatenate", "packed_attention",
        *ir.UNARY_OPS, *ir.BINARY_OPS, *ir.REDUCE_OPS,
    ) or node.op == "select_n" and len(node.inputs) != 3


def encode(program: ir.Program, egraph: EGraph) -> Encoding:
    """Register ``program`` in ``egraph``; returns the encoding with a root over its outputs."""
    enc = Encoding(program)
    actions: list[Action] = []
    for i in program.live_nodes():
        node = program.nodes[i]
        # one let per node keeps every registered expression shallow (no deep nesting)
        ref = egraph.let(f"n{i}", _term(node, [enc.terms[j] for j in node.inputs], enc))
        enc.terms[i] = ref
        actions.append(set_(program_order(ref)).to(i))
        if node.op == "constant" and is_causal_constant(node["value"].array):
            actions.append(causal_mask(ref))
        if _is_leaf_typed(node):
            actions.append(set_(shape(ref)).to(_vec(node.type.shape)))
            actions.append(set_(dtype(ref)).to(String(node.type.dtype)))
    root = TermList.nil()
    for out in reversed(program.outputs):
        root = TermList.cons(enc.terms[out], root)
    egraph.register(*actions)
    enc.root = egraph.let("root", root)
    return enc
