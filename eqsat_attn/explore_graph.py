"""The tensor part of a serialized e-graph, priced under a cost model, and the parts of it worth drawing.

`EGraphView.parse` reads egglog's serialized JSON (`Exploration.serialized`): Term e-nodes,
their e-classes, operand e-classes, static arguments and each e-class's type (from the
`shape`/`dtype` analysis rows). `price` runs greedy-DAG extraction over it with the same
pricing as extraction and `Exploration.why` (`op_view` + `CostModel.node_cost`): each e-node's
own cost, its total (own plus its cheapest operands, a shared operand paid once), each
e-class's cheapest total and the e-nodes the cheapest program from the root uses.
`neighbourhood` picks the e-classes within some hops of a focus; `is_structural` names the
e-nodes `fold=True` hides (identity transposes, same-shape reshapes, e-nodes reading only
their own e-class).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import ir
from .cost.model import CostModel
from .egraph.ctors import ARG_KINDS, FREE_CTORS, split_args
from .egraph.encode import axes_to_layout, axes_to_packed_layout
from .egraph.extract import UNKNOWN_TYPE_COST, concat_view, op_view

#: constructors of attention-like e-nodes (``focus="attention"``)
ATTENTION_CTORS = ("attention", "packed_attention", "attention_fp8", "attention_vjp")
_TENSOR_PREFIXES = ("Term.", "TermList.")
_IR_TO_CTOR = {"dot_general": "dot", "broadcast_in_dim": "broadcast", "select_n": "select",
               "convert_element_type": "convert", "concatenate": "concat"}


@dataclass(frozen=True)
class ENode:
    """One tensor e-node: constructor, operand e-classes (in order) and static arguments."""

    id: str
    ctor: str  # "transpose", "attention", ... ("cons"/"nil" for operand lists)
    eclass: str
    children: tuple[str, ...]  # e-classes of its Term/TermList arguments, in order
    statics: tuple[Any, ...]  # primitive arguments, in order (vectors as tuples)

    @property
    def operands(self) -> tuple[str, ...]:
        """The tensor operands that are computed (an attention without a mask has three)."""
        if self.ctor in ARG_KINDS and len(self.statics) + len(self.children) == len(ARG_KINDS[self.ctor]):
            args = _interleave(self.ctor, self.children, self.statics)
            return tuple(split_args(self.ctor, args)[0]) + tuple(
                c for k, c in zip(ARG_KINDS[self.ctor], args) if k == "L")
        return self.children


@dataclass
class EGraphView:
    """Tensor e-nodes and e-classes of a serialized e-graph, with types and program names."""

    nodes: dict[str, ENode]
    classes: dict[str, list[str]]  # e-class -> its e-node ids
    types: dict[str, ir.TensorType]  # e-class -> type (from the shape/dtype analysis)
    names: dict[str, str]  # e-class -> program names, e.g. "%30" or "root"
    parents: dict[str, set[str]] = field(default_factory=dict)  # e-class -> e-classes using it

    @classmethod
    def parse(cls, data: dict) -> EGraphView:
        raw = data["nodes"]
        nodes: dict[str, ENode] = {}
        for key, n in raw.items():
            if not n["op"].startswith(_TENSOR_PREFIXES):
                continue
            children, statics = [], []
            for c in n["children"]:
                child = raw.get(c)
                if child is None:
                    continue
                if child["op"].startswith(_TENSOR_PREFIXES):
                    children.append(child["eclass"])
                else:
                    statics.append(_primitive(child, raw))
            nodes[key] = ENode(key, n["op"].split(".", 1)[1], n["eclass"], tuple(children), tuple(statics))
        classes: dict[str, list[str]] = {}
        for key, node in nodes.items():
            classes.setdefault(node.eclass, []).append(key)
        view = cls(nodes, classes, _types(raw, classes), _names(data, classes))
        for node in nodes.values():
            for c in node.children:
                if c != node.eclass:
                    view.parents.setdefault(c, set()).add(node.eclass)
        return view

    def short_id(self, eclass: str) -> str:
        """``c57`` for ``eqsat_attn.egraph.language.Term-57`` (``l3`` for an operand list's)."""
        kind, _, number = eclass.rpartition("-")
        return ("l" if kind.endswith("TermList") else "c") + number

    def resolve_focus(self, focus: str | int) -> set[str]:
        """E-classes a focus names: "attention" (attention-like e-nodes), an op or constructor name,
        an e-class id (``c57``, ``57`` or egglog's full id) or a program node (``%30``)."""
        text = str(focus).strip()
        if text in self.classes:
            return {text}
        by_short = {self.short_id(c): c for c in self.classes}
        if text.isdigit():
            text = f"c{text}"
        if text in by_short:
            return {by_short[text]}
        if text.startswith("%"):
            return {c for c, name in self.names.items() if text in name.split(",")}
        ctors = set(ATTENTION_CTORS) if text == "attention" else {_IR_TO_CTOR.get(text, text)}
        return {n.eclass for n in self.nodes.values() if n.ctor in ctors}

    def neighbourhood(self, focus: set[str], depth: int, through: Callable[[str], list[str]]) -> dict[str, int]:
        """E-classes within ``depth`` hops of ``focus``, walking from each e-class along the e-nodes
        ``through`` gives (down to their operands, up to e-classes whose such e-nodes use it).

        Returns e-class -> level: 0 for the focus, -d for d hops down, +d for d hops up.
        """
        users: dict[str, list[str]] = {}
        for key, node in self.nodes.items():
            for c in set(node.children):
                users.setdefault(c, []).append(key)
        level = {c: 0 for c in focus}
        down, up = set(focus), set(focus)
        for d in range(1, depth + 1):
            below = {ch for c in down for k in through(c) for ch in self.nodes[k].children} - level.keys()
            level.update({c: -d for c in below})
            above = {self.nodes[u].eclass for c in up for u in users.get(c, ())
                     if u in through(self.nodes[u].eclass)} - level.keys()
            level.update({c: d for c in above})
            down, up = below, above
        return level

    def is_structural(self, key: str) -> bool:
        """Whether an e-node only restates an e-class: an identity transpose, a reshape to its
        operand's shape, or an e-node whose operands are all its own e-class."""
        node = self.nodes[key]
        if node.children and all(c == node.eclass for c in node.children):
            return True
        if node.ctor == "transpose" and node.statics and tuple(node.statics[0]) == tuple(range(len(node.statics[0]))):
            return True
        if node.ctor == "reshape" and node.children and node.statics:
            t = self.types.get(node.children[0])
            return t is not None and tuple(t.shape) == tuple(node.statics[0])
        return False

    def roots(self) -> list[str]:
        """The program's root e-class (let-bound ``root``), else e-classes nothing uses."""
        named = [c for c, n in self.names.items() if n == "root"]
        return named or [c for c in self.classes if not self.parents.get(c)]


@dataclass(frozen=True)
class Pricing:
    """Greedy-DAG costs of every e-node and e-class under one model, and the cheapest program."""

    model: CostModel
    own: dict[str, float]  # e-node -> its own cost
    total: dict[str, float]  # e-node -> own + cheapest operands (shared operands once)
    best: dict[str, str]  # e-class -> its cheapest e-node
    class_cost: dict[str, float]  # e-class -> cost of its cheapest e-node
    chosen: frozenset[str]  # e-nodes of the cheapest program from the root(s)
    members: dict[str, frozenset[str]] = field(default_factory=dict)  # e-class -> e-nodes of its cheapest term


def match_terms(view: EGraphView, termdag: Any, root: int) -> frozenset[str] | None:
    """The e-nodes an extracted term (egglog's `TermDag` and root term id) is made of, or None
    where a term matches no e-node (the e-graph changed since)."""
    index: dict[tuple, str] = {}
    for key, node in view.nodes.items():
        index.setdefault((node.ctor, node.children, _norm(node.statics)), key)
    values: dict[int, Any] = {}  # term id -> primitive value, or ("class", e-class) for a tensor term
    used: set[str] = set()
    stack = [root]
    while stack:
        tid = stack[-1]
        if tid in values:
            stack.pop()
            continue
        term = termdag.get(tid)
        pending = [a for a in getattr(term, "args", ()) if a not in values]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        if not hasattr(term, "args"):  # a literal
            lit = getattr(term, "value", None)
            values[tid] = getattr(lit, "value", lit)
            continue
        args = [values[a] for a in term.args]
        if term.name in ("vec-of", "vec-empty"):
            values[tid] = tuple(args)
            continue
        ctor = _ctor_of_term(term.name)
        children = tuple(a[1] for a in args if isinstance(a, tuple) and a[:1] == ("class",))
        statics = tuple(a for a in args if not (isinstance(a, tuple) and a[:1] == ("class",)))
        key = index.get((ctor, children, _norm(statics)))
        if key is None:
            return None
        used.add(key)
        values[tid] = ("class", view.nodes[key].eclass)
    return frozenset(used)


def price(view: EGraphView, model: CostModel, chosen: frozenset[str] | None = None) -> Pricing:
    """Price every e-node (as extraction does) and run greedy-DAG extraction to a fixed point.

    ``chosen``: the e-nodes of the program extraction chose (`match_terms`); default: the
    cheapest found here (the same algorithm; ties may fall the other way).
    """
    own: dict[str, float] = {}
    cache: dict[tuple, float] = {}
    for key, node in view.nodes.items():
        own[key] = _own_cost(view, node, model, cache)
    users: dict[str, list[str]] = {}
    for key, node in view.nodes.items():
        for c in set(node.operands):
            users.setdefault(c, []).append(key)
    picked: dict[str, frozenset[str]] = {}  # e-class -> e-nodes of its cheapest term (a DAG)
    cost: dict[str, float] = {}
    best: dict[str, str] = {}
    total: dict[str, float] = {}
    pending = deque(view.nodes)
    queued = set(pending)
    while pending:
        key = pending.popleft()
        queued.discard(key)
        node = view.nodes[key]
        if any(c not in picked for c in node.operands):
            continue
        members = frozenset({key}).union(*(picked[c] for c in node.operands))
        value = math.fsum(own[k] for k in members)
        total[key] = value
        if value < cost.get(node.eclass, math.inf):
            cost[node.eclass], picked[node.eclass], best[node.eclass] = value, members, key
            for user in users.get(node.eclass, ()):
                if user not in queued:
                    queued.add(user)
                    pending.append(user)
    if chosen is None:
        chosen = frozenset().union(*(picked.get(root, frozenset()) for root in view.roots()))
    return Pricing(model, own, total, best, cost, chosen, picked)


@dataclass(frozen=True)
class Priced:
    """One e-node of an e-class, priced as `price` prices it (`Exploration.why` shows these)."""

    key: str
    description: str
    own: float
    operands: float  # the cheapest operands' DAG cost (a shared subterm once); inf if none is computable
    layouts: dict[str, str]  # attention: q, k, v, o layouts; {} otherwise
    operand_transposes: int  # materialized transposes in the cheapest operands


def classes_holding(view: EGraphView, op: str) -> list[str]:
    """E-classes holding an ``op`` e-node ("attention": any attention-like one), wherever they
    sit: named program nodes first (by node id), then the rest (under a reshape, inside a grouped
    form) by the program node nearest above them."""
    ctors = set(ATTENTION_CTORS) if op == "attention" else {_IR_TO_CTOR.get(op, op)}
    found = {n.eclass for n in view.nodes.values() if n.ctor in ctors}

    def order(c: str) -> tuple:
        above, hops = nearest_named(view, c)
        ids = [int(x[1:]) for x in (view.names.get(above, "") if above else "").split(",") if x[1:].isdigit()]
        return (hops > 0, min(ids, default=1 << 60), hops, int(c.rpartition("-")[2] or 0))

    return sorted(found, key=order)


def nearest_named(view: EGraphView, eclass: str) -> tuple[str | None, int]:
    """The nearest e-class at or above ``eclass`` that holds a program node (or the root), and
    how many hops up it is; (None, -1) when nothing named uses it."""
    seen, frontier = {eclass}, [eclass]
    for hops in range(len(view.classes) + 1):
        named = sorted(c for c in frontier if c in view.names)
        if named:
            return named[0], hops
        frontier = sorted({p for c in frontier for p in view.parents.get(c, ())} - seen)
        seen.update(frontier)
        if not frontier:
            break
    return None, -1


def priced_members(view: EGraphView, pricing: Pricing, eclass: str) -> list[Priced]:
    """Every e-node of an e-class with its own cost and its cheapest operands' cost, cheapest first."""
    out = []
    for key in view.classes[eclass]:
        node = view.nodes[key]
        own = pricing.own.get(key, math.inf)
        total = pricing.total.get(key, math.inf)
        below = frozenset().union(*(pricing.members.get(c, frozenset()) for c in node.operands)) - {key}
        transposes = sum(1 for k in below if _moves_data(view.nodes[k]))
        layouts = {}
        if node.ctor in ("attention", "attention_fp8", "attention_vjp") and len(node.statics) >= 4:
            layouts = {n: axes_to_layout(tuple(a)) for n, a in zip("qkvo", node.statics[:4])}
        out.append(Priced(key, describe(view, pricing, node), own, total - own if math.isfinite(total) else math.inf,
                          layouts, transposes))
    return sorted(out, key=lambda p: (p.own + p.operands, p.key))


def describe(view: EGraphView, pricing: Pricing, node: ENode) -> str:
    """An e-node's label with its type; attention also names what its V (or packed operand) is."""
    text = f"{label(view, node, width=160)} -> {type_text(view.types.get(node.eclass))}"
    if node.ctor in ("attention", "attention_fp8", "packed_attention") and node.operands:
        which = 0 if node.ctor == "packed_attention" else min(2, len(node.operands) - 1)
        operand = node.operands[which]
        best = pricing.best.get(operand)
        shown = label(view, view.nodes[best], width=60) if best else "?"
        text += f"; {'packed' if which == 0 else 'v'} = {shown} {type_text(view.types.get(operand))}"
    return text


def _moves_data(node: ENode) -> bool:
    """A transpose e-node that is not the identity."""
    return node.ctor == "transpose" and bool(node.statics) and tuple(node.statics[0]) != tuple(range(len(node.statics[0])))


def shown_nodes(view: EGraphView, pricing: Pricing, eclass: str, fold: bool, limit: int | None) -> list[str]:
    """The e-nodes of an e-class a picture draws: the chosen one first, then by total cost, at most
    ``limit``; structural ones left out when folding (one kept if nothing else is left)."""
    members = view.classes[eclass]
    shown = [k for k in members if not (fold and view.is_structural(k))] or members[:1]
    shown.sort(key=lambda k: (k not in pricing.chosen, pricing.total.get(k, math.inf), k))
    return shown if limit is None else shown[:max(1, limit)]


def label(view: EGraphView, node: ENode, width: int = 56) -> str:
    """A short readable label of an e-node: attention by its layouts, others by their statics."""
    s = node.statics
    if node.ctor in ("attention", "attention_fp8", "attention_vjp") and len(s) >= 6:
        q, k, v, o = (axes_to_layout(tuple(a)) for a in s[:4])
        flags = (" causal" if s[5] else "") + (f" mask={s[6]}" if len(s) > 6 and s[6] not in ("none", "") else "")
        text = f"{node.ctor} q={q} k={k} v={v} o={o}{flags}"
    elif node.ctor == "packed_attention" and len(s) >= 4:
        text = (f"packed_attention {axes_to_packed_layout(tuple(s[0]))} o={axes_to_layout(tuple(s[1]))}"
                + (" causal" if s[3] else ""))
    elif node.ctor in ("unary", "binary", "reduce") and s:
        text = f"{s[0]}" + (f" axes={_vec(s[1])}" if node.ctor == "reduce" and len(s) > 1 else "")
    elif node.ctor == "dot" and len(s) >= 4:
        text = f"dot c={_vec(s[0])}x{_vec(s[1])}" + (f" b={_vec(s[2])}x{_vec(s[3])}" if s[2] else "")
        text += f" {s[5]}" if len(s) > 5 and s[5] else ""  # a non-default precision
    elif node.ctor in ("reshape", "broadcast") and s:
        text = f"{node.ctor} {'x'.join(map(str, s[0]))}"
    elif node.ctor == "input" and s:
        text = f"input {s[0]}"
    elif node.ctor.startswith("fused"):
        text = f"{node.ctor} {str(s[0])[:24] if s else ''}"
    else:
        text = " ".join([node.ctor, *(_vec(a) if isinstance(a, tuple) else str(a) for a in s)])
    return text if len(text) <= width else text[:width - 1] + "…"


def type_text(t: ir.TensorType | None) -> str:
    if t is None:
        return ""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "bool": "bool",
             "int32": "i32", "float8_e4m3fn": "fp8"}.get(t.dtype, t.dtype)
    return f"{short}[{','.join(map(str, t.shape))}]"


# ----------------------------------------------------------------------------------- helpers
def _vec(v: Any) -> str:
    return "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)


def _norm(statics: Iterable[Any]) -> tuple:
    """Static arguments compared across JSON and extracted terms (ints and floats as floats)."""
    return tuple(_norm(v) if isinstance(v, tuple) else float(v) if isinstance(v, (int, float)) else v
                 for v in statics)


def _ctor_of_term(name: str) -> str:
    """"eqsat_attn_egraph_language_Term_transpose" (or "Term.transpose") -> "transpose"."""
    for prefix in ("TermList_", "Term_", "TermList.", "Term."):
        k = name.rfind(prefix)
        if k >= 0:
            return name[k + len(prefix):]
    return name


def _interleave(ctor: str, children: Iterable[str], statics: Iterable[Any]) -> list[Any]:
    """Arguments in constructor order from the e-class and static lists."""
    ch, st = iter(children), iter(statics)
    return [next(ch) if k in ("T", "L") else next(st) for k in ARG_KINDS[ctor]]


def _primitive(node: dict, raw: dict) -> Any:
    """A primitive argument from its serialized node: i64, f64, string or vector."""
    op = node["op"]
    if op == "Vec":
        return tuple(_primitive(raw[c], raw) for c in node["children"] if c in raw)
    if op.startswith('"'):
        try:
            return json.loads(op)
        except ValueError:
            return op.strip('"')
    for parse in (int, float):
        try:
            return parse(op)
        except ValueError:
            pass
    return op


def _types(raw: dict, classes: dict[str, list[str]]) -> dict[str, ir.TensorType]:
    """Each Term e-class's type, from the ``shape`` and ``dtype`` analysis rows."""
    value_of_class = {n["eclass"]: n for k, n in raw.items() if k.startswith("primitive-")}
    shapes, dtypes = {}, {}
    for n in raw.values():
        if n["op"] in ("shape", "dtype") and len(n["children"]) == 1 and n["children"][0] in raw:
            cls = raw[n["children"][0]]["eclass"]
            value = value_of_class.get(n["eclass"])
            if value is not None:
                (shapes if n["op"] == "shape" else dtypes)[cls] = _primitive(value, raw)
    return {c: ir.TensorType(tuple(int(x) for x in shapes[c]), str(dtypes[c]))
            for c in classes if c in shapes and c in dtypes and isinstance(shapes[c], tuple)}


def _names(data: dict, classes: dict[str, list[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cls, info in data.get("class_data", {}).items():
        let = str(info.get("let") or "").lstrip("$")
        if cls not in classes:
            continue
        if let.startswith("n") and let[1:].isdigit():
            out[cls] = (out[cls] + "," if cls in out else "") + f"%{let[1:]}"
        elif let == "root":
            out[cls] = "root"
    return out


def _own_cost(view: EGraphView, node: ENode, model: CostModel, cache: dict[tuple, float]) -> float:
    """What extraction pays for this e-node alone (`RawCostModel.enode_cost` on serialized values)."""
    if node.ctor not in ARG_KINDS or node.ctor in FREE_CTORS:
        return 0.0  # operand lists, free leaves
    kinds = ARG_KINDS[node.ctor]
    if len(node.children) + len(node.statics) != len(kinds):
        return UNKNOWN_TYPE_COST
    args = _interleave(node.ctor, node.children, node.statics)
    if node.ctor == "concat":
        out = view.types.get(node.eclass)
        return UNKNOWN_TYPE_COST if out is None else float(model.node_cost(concat_view(int(node.statics[0]), out)))
    tensors, statics = split_args(node.ctor, args)
    inputs = [view.types.get(c) for c in tensors]
    if any(t is None for t in inputs):
        return UNKNOWN_TYPE_COST
    key = (node.ctor, repr(statics), tuple(inputs))
    if key not in cache:
        cache[key] = float(model.node_cost(op_view(node.ctor, list(statics), inputs)))
    return cache[key]
