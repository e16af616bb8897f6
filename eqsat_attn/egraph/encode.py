"""Program -> egglog terms: one `let` per node (sharing kept, every expression shallow).

Leaves (inputs, constants, opaque results) get their shape and dtype here; the analysis
rule set derives the rest. Nodes the language does not model are encoded as `Term.opaque`
over their operands, so decoding restores them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from typing import Any

from egglog import EGraph, bindings
from egglog.declarations import LetRefDecl, TypedExprDecl
from egglog.egraph import to_runtime_expr
from egglog.egraph_state import span
from egglog.runtime import RuntimeExpr

from .. import ir
from ..static_values import MAX_ELEMENTS, StaticValues, is_causal_value, keeps_every_row
from .language import KERNEL_FILL, MAX_REGION_INPUTS, Term, TermList, causal_mask, dtype, program_order, rows_kept, shape
from .relevance import Symbol, program_symbols

AXES = ir.ATTENTION_AXES  # logical axes of an attention operand
PACKED_AXES = ir.PACKED_AXES  # logical axes of a packed Q/K/V array; "3" indexes Q, K, V


def _positions(layout: str, names: str, what: str) -> tuple[int, ...]:
    if sorted(layout) != sorted(names):
        raise ValueError(f"{what} layout {layout!r} must be a permutation of {names!r}")
    return tuple(layout.index(a) for a in names)


def _layout(axes: tuple[int, ...], names: str) -> str:
    out = [""] * len(names)
    for logical, pos in enumerate(axes):
        out[pos] = names[logical]
    return "".join(out)


def layout_to_axes(layout: str) -> tuple[int, ...]:
    """"BHDS" -> (0, 1, 3, 2): the physical position of each logical axis B, H, S, D."""
    return _positions(layout, AXES, "attention")


def axes_to_layout(axes: tuple[int, ...]) -> str:
    return _layout(axes, AXES)


def packed_layout_to_axes(layout: str) -> tuple[int, ...]:
    """"BS3HD" -> (0, 3, 1, 4, 2): the physical position of each of B, H, S, D and the packed axis."""
    return _positions(layout, PACKED_AXES, "packed")


def axes_to_packed_layout(axes: tuple[int, ...]) -> str:
    return _layout(axes, PACKED_AXES)


@dataclass
class Encoding:
    """Terms of an encoded program and the side tables decoding needs."""

    program: ir.Program
    terms: dict[int, Term] = field(default_factory=dict)  # node id -> let-bound term
    uninterpreted: list[ir.Node] = field(default_factory=list)  # Term.opaque / constant index -> node
    root: TermList | None = None
    #: what the encoding writes in the e-graph (`relevance.program_symbols`): which rules can match
    symbols: frozenset[Symbol] = frozenset()


class _Egg:
    """egglog-level (bindings) builders for the language's terms, actions and let-bound names.

    Registering each node through ``egraph.let`` costs ~1 ms of Python per node (declaration
    merging and expression conversion in egglog's high-level API); building the same commands
    here and submitting them in one ``run_program`` costs a few microseconds per node.
    """

    CTORS = (
        "input", "literal", "constant", "iota", "unary", "binary", "integer_pow", "convert", "select", "softmax",
        "transpose", "reshape", "broadcast", "reduce", "dot", "attention", "attention_fp8", "attention_vjp", "no_mask",
        "mask_pair", "opaque", "output", "slice", "concat", "packed_attention", *(f"fused{n}" for n in range(MAX_REGION_INPUTS + 1)),
    )

    def __init__(self, egraph: EGraph) -> None:
        self.egraph = egraph
        self.span = span()
        self.declared: dict[Any, str] = {}  # callable reference -> its egglog name in this e-graph
        self.fn = {name: self._name(getattr(Term, name)) for name in self.CTORS}
        self.nil = self._name(TermList.nil)
        self.cons = self._name(TermList.cons)
        self.shape = self._name(shape)
        self.dtype = self._name(dtype)
        self.causal = self._name(causal_mask)
        self.rows_kept = self._name(rows_kept)
        self.order = self._name(program_order)
        self.vecs: dict[tuple[int, ...], bindings.Call] = {}

    def _name(self, fn: Any) -> str:
        ref, name = self.egraph._callable_to_egg(fn)
        self.declared[ref] = name
        return name

    def call(self, fn: str, *args: Any) -> bindings.Call:
        return bindings.Call(self.span, fn, list(args))

    def ctor(self, name: str, *args: Any) -> bindings.Call:
        return bindings.Call(self.span, self.fn[name], list(args))

    def i64(self, value: int) -> bindings.Lit:
        return bindings.Lit(self.span, bindings.Int(int(value)))

    def f64(self, value: float) -> bindings.Lit:
        return bindings.Lit(self.span, bindings.Float(float(value)))

    def string(self, value: str) -> bindings.Lit:
        return bindings.Lit(self.span, bindings.String(str(value)))

    def vec(self, values) -> bindings.Call:
        key = tuple(int(v) for v in values)
        if key not in self.vecs:
            self.vecs[key] = self.call("vec-of", *map(self.i64, key)) if key else self.call("vec-empty")
        return self.vecs[key]

    def var(self, name: str) -> bindings.Var:
        return bindings.Var(self.span, f"${name}")

    def let(self, name: str, expr: bindings.Call) -> bindings.ActionCommand:
        return bindings.ActionCommand(bindings.Let(self.span, f"${name}", expr))

    def set(self, fn: str, arg: bindings.Var, value: Any) -> bindings.ActionCommand:
        return bindings.ActionCommand(bindings.Set(self.span, fn, [arg], value))


#: the egglog types of a term and of a term list (for the handles of let-bound names)
TERM_TYPE = to_runtime_expr(Term.input(0)).__egg_typed_expr__.tp
LIST_TYPE = to_runtime_expr(TermList.nil()).__egg_typed_expr__.tp


def _let_ref(egraph: EGraph, name: str, tp: Any) -> Any:
    """The Python handle of a let-bound name (what ``egraph.let`` returns)."""
    return RuntimeExpr.__from_values__(egraph.__egg_decls__, TypedExprDecl(tp, LetRefDecl(name)))


def declare_language(egraph: EGraph) -> None:
    """Declare in ``egraph`` every table an encoding calls (a pooled e-graph does it once, before
    it is pushed: `encode` then finds them, whichever rules the e-graph holds)."""
    _Egg(egraph)


def _names_hold(egraph: EGraph, names: tuple[tuple[Any, str], ...]) -> bool:
    """Whether ``egraph`` has declared each reference under the name the commands call."""
    known = egraph._state.callable_ref_to_egg_fn
    return all(known.get(ref, (None,))[0] == name for ref, name in names)


def _term(node: ir.Node, args: list[bindings.Var], enc: Encoding, egg: _Egg) -> bindings.Call:
    """The egglog term of ``node`` over its operands' let-bound names."""
    op, p, c, vec = node.op, node.params, egg.ctor, egg.vec
    if op == "input":
        return c("input", egg.i64(p["index"]))
    if op == "literal" and f64_holds_exactly(p["value"]):
        return c("literal", egg.f64(float(p["value"])), egg.string(node.type.dtype))
    if op in ("constant", "literal"):  # a literal f64 cannot hold exactly stays uninterpreted
        enc.uninterpreted.append(node)
        return c("constant", egg.i64(len(enc.uninterpreted) - 1))
    if op == "iota":
        return c("iota", egg.string(node.type.dtype), vec(node.type.shape), egg.i64(p["dimension"]))
    if op in ir.UNARY_OPS:
        return c("unary", egg.string(op), args[0])
    if op in ir.BINARY_OPS:
        return c("binary", egg.string(op), args[0], args[1])
    if op == "softmax":
        return c("softmax", args[0])
    if op == "integer_pow":
        return c("integer_pow", args[0], egg.i64(p["y"]))
    if op == "convert_element_type":
        return c("convert", args[0], egg.string(str(p["new_dtype"])))
    if op == "select_n" and len(args) == 3:
        return c("select", args[0], args[1], args[2])
    if op == "transpose":
        return c("transpose", args[0], vec(p["perm"]))
    if op == "reshape":
        return c("reshape", args[0], vec(node.type.shape))
    if op == "broadcast_in_dim":
        return c("broadcast", args[0], vec(node.type.shape), vec(p["broadcast_dimensions"]))
    if op in ir.REDUCE_OPS:
        return c("reduce", egg.string(op), args[0], vec(sorted(p["axes"])))
    if op == "dot_general":
        return c(
            "dot", args[0], args[1], vec(p["lhs_contract"]), vec(p["rhs_contract"]),
            vec(p["lhs_batch"]), vec(p["rhs_batch"]), egg.string(p.get("preferred_element_type") or ""),
            egg.string(p.get("precision") or ""),
        )
    if op == "attention":
        return c(
            "attention", args[0], args[1], args[2], _attention_mask(node, args[3:], enc, egg),
            *(vec(layout_to_axes(p[f"{n}_layout"])) for n in "qkvo"),
            egg.f64(float(p["scale"])), egg.i64(int(bool(p["causal"]))), egg.string(p["mask_kind"]),
            egg.string(str(p.get("compute_dtype") or "")),
            egg.f64(float(p.get("mask_fill", KERNEL_FILL))), egg.f64(float(p.get("softcap", 0.0))),
        )
    if op == "attention_vjp":
        return c(
            "attention_vjp", *args[:4], _attention_mask(node, args[4:], enc, egg),
            *(vec(layout_to_axes(p[f"{n}_layout"])) for n in "qkvo"),
            egg.f64(float(p["scale"])), egg.i64(int(bool(p["causal"]))), egg.string(p["mask_kind"]),
            egg.string(str(p.get("compute_dtype") or "")),
            egg.f64(float(p.get("mask_fill", KERNEL_FILL))), egg.f64(float(p.get("softcap", 0.0))),
            egg.i64(int(p["wrt"])),
        )
    if op == "attention_fp8":
        return c(
            "attention_fp8", *args[:6], *(vec(layout_to_axes(p[f"{n}_layout"])) for n in "qkvo"),
            egg.f64(float(p["scale"])), egg.i64(int(bool(p["causal"]))), egg.string(str(p["out_dtype"])),
        )
    if op == "slice":
        return c("slice", args[0], vec(p["start_indices"]), vec(p["limit_indices"]))
    if op == "concatenate":
        parts = egg.call(egg.nil)
        for a in reversed(args):
            parts = egg.call(egg.cons, a, parts)
        return c("concat", parts, egg.i64(p["dimension"]))
    if op == "packed_attention":
        mask = args[1] if len(args) > 1 else c("no_mask")
        return c(
            "packed_attention", args[0], mask, vec(packed_layout_to_axes(p["packed_layout"])),
            vec(layout_to_axes(p["o_layout"])), egg.f64(float(p["scale"])), egg.i64(int(bool(p["causal"]))),
            egg.string(p["mask_kind"]),
        )
    if op == "opaque_output":
        return c("output", args[0], egg.i64(p["index"]))
    if op == "fused" and len(args) <= MAX_REGION_INPUTS:
        return c(f"fused{len(args)}", egg.string(str(p["body"])), *args)
    # opaque, and anything the language does not model: kept as is
    enc.uninterpreted.append(node)
    operands = egg.call(egg.nil)
    for a in reversed(args):
        operands = egg.call(egg.cons, a, operands)
    return c("opaque", egg.i64(len(enc.uninterpreted) - 1), operands)


def _attention_mask(node: ir.Node, masks: list[bindings.Var], enc: Encoding, egg: _Egg) -> bindings.Call:
    """The mask operand of an attention or attention_vjp node whose mask inputs are ``masks`` (those
    after q, k, v and, for the vjp, do): `Term.no_mask`, its mask tensor, or for "bias+bool" the
    `Term.mask_pair` of its bias and boolean mask, each broadcast to their common shape where they
    differ (the op broadcasts both to [B, H, Sq, Sk] anyway)."""
    kind = str(node.params.get("mask_kind", "none"))
    operands = ir.ATTENTION_MASK_OPERANDS.get(kind)
    if operands is None or len(masks) != len(operands):
        raise ValueError(f"an {node.op} with mask_kind {kind!r} has the mask inputs "
                         f"{operands if operands is not None else 'of no known kind'}, got {len(masks)}")
    if kind == "none":
        return egg.ctor("no_mask")
    if kind != "bias+bool":
        return masks[0]
    types = [enc.program.type_of(i) for i in node.inputs[-2:]]
    common = tuple(np.broadcast_shapes(*(t.shape for t in types)))
    pair = [
        arg if t.shape == common else
        egg.ctor("broadcast", arg, egg.vec(common), egg.vec(range(len(common) - t.rank, len(common))))
        for arg, t in zip(masks, types)
    ]
    return egg.ctor("mask_pair", *pair)


def f64_holds_exactly(value: Any) -> bool:
    """Whether egglog's f64 keeps this literal value exactly and apart from every other value.

    egglog compares f64 values as ordered floats, so -0.0 equals 0.0 and every NaN equals every
    other; integers beyond 2**53 (int64 and uint64 under x64) lose their low bits. Such literals
    are encoded as uninterpreted constants, which rules leave alone and decoding restores bit
    for bit.
    """
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (int, np.integer)):
        return abs(int(value)) <= 2**53
    v = float(value)
    return not math.isnan(v) and not (v == 0.0 and math.copysign(1.0, v) < 0)


def static_mask_facts(node: ir.Node, value: np.ndarray | None) -> tuple[str, ...]:
    """The mask relations (``"causal_mask"``, ``"rows_kept"``) a static node's value proves."""
    if value is None:
        return ()
    facts = ("causal_mask",) if is_causal_value(value) else ()
    return facts + (("rows_kept",) if keeps_every_row(value) else ())


def _is_literal_fill(program: ir.Program, node_id: int) -> bool:
    node = program.nodes[node_id]
    while node.op == "broadcast_in_dim":
        node = program.nodes[node.inputs[0]]
    return node.op == "literal"


def _is_mask_candidate(program: ir.Program, node: ir.Node) -> bool:
    """Nodes worth evaluating for mask facts: booleans, and 0/1 indicators of rank 2 or more (a
    closed-over constant, a cast of booleans, a select between two literals), not arithmetic on
    closed-over weights."""
    t = node.type
    if t is None or t.rank < 1:
        return False
    if t.dtype == "bool":
        return True
    if t.rank < 2:
        return False
    operands = [program.nodes[j] for j in node.inputs]
    if node.op == "convert_element_type":
        return operands[0].type is not None and operands[0].type.dtype == "bool"
    if node.op == "select_n":
        return len(operands) == 3 and all(_is_literal_fill(program, j) for j in node.inputs[1:])
    return node.op == "constant"


def _is_leaf_typed(node: ir.Node) -> bool:
    """Nodes whose shape and dtype the analysis cannot derive."""
    if node.op == "literal":
        return not f64_holds_exactly(node.params["value"])
    return node.type is not None and node.op not in (
        "literal", "iota", "softmax", "transpose", "reshape", "broadcast_in_dim", "integer_pow",
        "convert_element_type", "dot_general", "attention", "attention_fp8", "attention_vjp", "slice", "concatenate", "packed_attention",
        *ir.UNARY_OPS, *ir.BINARY_OPS, *ir.REDUCE_OPS,
    ) or node.op == "select_n" and len(node.inputs) != 3


@dataclass(frozen=True)
class EncodingCommands:
    """A program's encoding built but not yet submitted (`encoding_commands`): its egglog
    commands, valid in any e-graph with the language declared (egglog-python names a table after
    its declaration: ``names`` checks that), and what they write (``encoding.symbols``)."""

    encoding: Encoding
    commands: list[Any]
    names: tuple[tuple[Any, str], ...]  # (callable reference, egglog name) of each table the commands call


def encoding_commands(program: ir.Program, egraph: EGraph, static_elements: int = MAX_ELEMENTS) -> EncodingCommands:
    """The commands `encode` submits, built with ``egraph``'s names, and their symbols.

    Static masks (computed from no input, at most ``static_elements`` elements) are evaluated once
    each and their facts asserted (`causal_mask`, `rows_kept`); rules carry the facts on through
    larger broadcasts. Node i is the let-bound global ``$n{i}`` (one let per node keeps every
    expression shallow), the outputs the ``$root`` list.
    """
    enc = Encoding(program)
    egg = _Egg(egraph)
    commands: list[Any] = []
    static = StaticValues(program, static_elements)
    for i in program.live_nodes():
        node = program.nodes[i]
        commands.append(egg.let(f"n{i}", _term(node, [egg.var(f"n{j}") for j in node.inputs], enc, egg)))
        ref = egg.var(f"n{i}")
        commands.append(egg.set(egg.order, ref, egg.i64(i)))
        if _is_mask_candidate(program, node):  # a static mask: its facts by evaluation (broadcasts via rules)
            for fact in static_mask_facts(node, static.value(i)):
                relation = egg.causal if fact == "causal_mask" else egg.rows_kept
                commands.append(bindings.ActionCommand(bindings.Expr_(egg.span, egg.call(relation, ref))))
        if _is_leaf_typed(node):
            commands.append(egg.set(egg.shape, ref, egg.vec(node.type.shape)))
            commands.append(egg.set(egg.dtype, ref, egg.string(node.type.dtype)))
    root = egg.call(egg.nil)
    for out in reversed(program.roots):
        root = egg.call(egg.cons, egg.var(f"n{out}"), root)
    commands.append(egg.let("root", root))
    enc.symbols = frozenset(program_symbols(commands))
    return EncodingCommands(enc, commands, tuple(egg.declared.items()))


def encode(program: ir.Program, egraph: EGraph, static_elements: int = MAX_ELEMENTS,
           built: EncodingCommands | None = None) -> Encoding:
    """Register ``program`` in ``egraph``; returns the encoding with a root over its outputs
    and then its effects (decoding a root list puts its opaque nodes back among the effects).
    All of it goes to egglog in one ``run_program`` call (`encoding_commands` says what).

    ``built``: the commands `encoding_commands` made for this program with another e-graph's
    names (the driver reads their symbols before it picks an e-graph); rebuilt here unless this
    e-graph has declared each table they call under the same name (`declare_language`).
    """
    if built is None or built.encoding.program is not program or not _names_hold(egraph, built.names):
        built = encoding_commands(program, egraph, static_elements)
    enc = built.encoding
    egraph._state.run_program(*built.commands)
    enc.terms = {i: _let_ref(egraph, f"n{i}", TERM_TYPE) for i in program.live_nodes()}
    enc.root = _let_ref(egraph, "root", LIST_TYPE)
    return enc
