"""Projection layouts of attention blocks: which Q/K/V projections a program merges, which V
layout its attention reads, and the three programs the trade-off is between (issue 9):

- ``"a"``: one fused QKV matmul feeding standard (or packed-QKV) attention;
- ``"b"``: one fused QKV matmul, a materialised Vᵀ and transposed-V attention;
- ``"c"``: a fused QK matmul plus a separate V projection that writes Vᵀ, transposed-V attention.

`VariantModel` steers extraction to one of them on top of any cost model (tests, the benchmark
and the report use it); `layout_decision` explains a chosen program by the predicted costs of
the variants it beat. `ea.Report` shows that explanation through `LazyLayoutDecision`, a view
over the optimizer's own extraction: the pipeline keeps the serialized e-graph its program was
extracted from (`egraph.refine.Extraction.graph`; nothing is saturated again), and the three
exact extractions over it run only when the report is first printed or its ``layout_decision``
read, so optimizing (and calling) a function never pays for them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from dataclasses import dataclass

from .cost.model import CostModel, OpView, program_cost
from .egraph.extract import UNKNOWN_TYPE_COST, extract_program
from .egraph.ilp import ILPExtraction, ILPExtractionError, Problem, extract_ilp, extract_program_ilp, read_graph
from .egraph.refine import greedy_dag
from .ir import Program, TensorType

VARIANTS = ("a", "b", "c")
VARIANT_TEXT = {
    "a": "fused QKV matmul -> standard/packed attention",
    "b": "fused QKV matmul -> materialised Vᵀ -> transposed-V attention",
    "c": "fused QK matmul + V projection writing Vᵀ -> transposed-V attention",
    "split": "three projections, V projection writing Vᵀ -> transposed-V attention",
    "unmerged": "three projections -> standard attention",
}
MATMUL_PENALTY = 1.0  # seconds per matmul: fewer projection matmuls win within a variant
#: a construct the variant excludes: never chosen, priced as an untyped e-node. The exact
#: extractor leaves such e-nodes out of its model rather than pricing them, which keeps its
#: objective on the scale of real costs (a finite 1e3 s made microsecond costs vanish under
#: HiGHS's tolerances)
FORBIDDEN = UNKNOWN_TYPE_COST


def moves_data(perm, shape) -> bool:
    """Whether a transpose by ``perm`` of an array of ``shape`` moves data: one that moves only
    size-1 axes (a decode step's [B, 1, H, D] -> [B, H, 1, D]) keeps every element in place."""
    kept = [a for a in perm if shape[a] != 1]
    return kept != sorted(kept)


def _transposed_v(node: OpView) -> bool:
    return node.op == "attention" and str(node.params["v_layout"])[-1] == "S"


def _batch_before_d(node: OpView) -> bool:
    layout = str(node.params["v_layout"])
    return layout.index("B") < layout.index("D")


@dataclass(frozen=True)
class VariantModel:
    """``base``, plus penalties that make extraction pick variant "a", "b" or "c".

    Variant "c" forbids transposes that move data (moving only size-1 axes is free), except of a
    tensor typed like one of ``caches``: a decode step's V cache, a [B, H, S, D] argument the
    program concatenates the new token's V onto, is transposed as a whole for transposed-V
    attention (priced by ``base``: a real cost), while the new token's Vᵀ comes from its own
    projection. With one new token, any matmul's V part is its own Vᵀ, so two more rules keep
    "c" to its definition: no matmul with an output axis of ``fused_width`` (the Q, K and V
    projections' widths summed: the fused QKV matmul of (b)), and, where there are caches, V
    read with its batch axis after D ([H, D, B, S], as a projection by the weight on the left
    writes it): a fused K|V matmul, whose type equals a fused Q|K one, cannot give that without
    moving data. `for_program` finds caches and width; `classify` judges the extracted program."""

    base: CostModel
    variant: str
    caches: frozenset[TensorType] = frozenset()
    fused_width: int = 0

    @classmethod
    def for_program(cls, base: CostModel, variant: str, program: Program) -> VariantModel:
        """The model steering extraction from ``program``'s e-graph to ``variant``: its caches are
        the types of the arguments ``program`` concatenates something onto, its fused width the
        output widths of ``program``'s projections (matmuls by a rank-2 argument) summed."""
        args = set(program.inputs)
        caches, width = set(), 0
        for i in program.live_nodes():
            node = program.nodes[i]
            if node.op == "concatenate":
                caches |= {program.type_of(j) for j in node.inputs if j in args}
            if node.op == "dot_general":
                for w, contract in zip(node.inputs, (node["lhs_contract"], node["rhs_contract"])):
                    shape = program.type_of(w).shape
                    if w in args and len(shape) == 2 and len(contract) == 1:
                        width += shape[1 - contract[0]]
        return cls(base, variant, frozenset(caches), width)

    def node_cost(self, node: OpView) -> float:
        cost = float(self.base.node_cost(node))
        if node.op == "dot_general":
            cost += MATMUL_PENALTY
            if node.params.get("lhs_batch"):  # every variant computes attention as one op: no
                cost += FORBIDDEN  # batched matmul (Q Kᵀ, P V) of the unfused form
        if self.variant == "a" and _transposed_v(node):
            cost += FORBIDDEN
        if self.variant in ("b", "c") and (node.op == "packed_attention" or node.op == "attention" and not _transposed_v(node)):
            cost += FORBIDDEN
        if (self.variant == "c" and node.op == "transpose" and node.inputs[0] not in self.caches
                and moves_data(node.params["perm"], node.inputs[0].shape)):
            cost += FORBIDDEN
        if self.variant == "c" and node.op == "dot_general" and 0 < self.fused_width in node.output.shape:
            cost += FORBIDDEN
        if self.variant == "c" and self.caches and _transposed_v(node) and _batch_before_d(node):
            cost += FORBIDDEN
        return cost


def _input_names(program: Program, node_id: int) -> list[str]:
    """The program arguments a weight is built from (through concatenations and slices)."""
    node = program.nodes[node_id]
    if node.op == "input":
        return [f"arg{node['index']}"]
    if node.op == "slice":
        (src,) = node.inputs
        axis = [i for i, (a, b, n) in enumerate(zip(node["start_indices"], node["limit_indices"], program.type_of(src).shape))
                if (a, b) != (0, n)]
        where = ",".join(f"{node['start_indices'][i]}:{node['limit_indices'][i]}" for i in axis)
        return [f"{name}[{where}]" for name in _input_names(program, src)]
    if node.op == "concatenate":
        return [name for i in node.inputs for name in _input_names(program, i)]
    return [f"%{node_id}"]


def projections(program: Program) -> list[str]:
    """One line per matmul whose weight is a concatenation (merged projections) or a slice of a
    program argument (a split-off part of a fused projection)."""
    lines = []
    for i in program.live_nodes():
        node = program.nodes[i]
        if node.op != "dot_general":
            continue
        for x_id, w_id in (node.inputs, node.inputs[::-1]):  # the weight may be either operand
            w = program.nodes[w_id]
            if w.op == "concatenate":
                lines.append(f"%{i}: merged projection of %{x_id} by [{' | '.join(_input_names(program, w_id))}]")
                break
            if w.op == "slice":
                lines.append(f"%{i}: split projection of %{x_id} by {_input_names(program, w_id)[0]}")
                break
    return lines


def _producers(program: Program, node_id: int) -> tuple[set[int], int, int]:
    """The matmuls an attention operand is computed from (walking back through other ops, not
    past a matmul), the number of transposes between them and the operand, and the number of
    all transposes on the way (also those of something no matmul computes, such as a decode
    step's cache argument)."""
    memo: dict[int, tuple[frozenset[int], frozenset[int], frozenset[int]]] = {}

    def walk(i: int) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
        if i not in memo:
            node = program.nodes[i]
            if node.op == "dot_general":
                memo[i] = frozenset({i}), frozenset(), frozenset()
            else:
                found = [walk(j) for j in node.inputs]
                dots = frozenset().union(*(f[0] for f in found))
                moving = node.op == "transpose" and moves_data(node["perm"], program.type_of(node.inputs[0]).shape)
                mine = frozenset({i}) if moving else frozenset()
                after_dots = frozenset().union(*(f[1] for f in found)) | (mine if dots else frozenset())
                memo[i] = dots, after_dots, frozenset().union(*(f[2] for f in found)) | mine
        return memo[i]

    dots, after_dots, transposes = walk(node_id)
    return set(dots), len(after_dots), len(transposes)


_ATTENTION_OPS = ("attention", "attention_fp8", "packed_attention")


def _attention_projections(program: Program) -> tuple[str, set[int]]:
    """`classify`'s label and the projection matmuls Q, K and V are computed from."""
    attn = [i for i in program.live_nodes() if program.nodes[i].op in _ATTENTION_OPS]
    if len(attn) != 1:
        return "other", set()
    node = program.nodes[attn[0]]
    if node.op == "packed_attention":
        dots, *_ = _producers(program, node.inputs[0])
        return ("a" if len(dots) == 1 else "other"), dots
    (q_dots, *_), (k_dots, *_), (v_dots, v_transposes, v_all_transposes) = (
        _producers(program, i) for i in node.inputs[:3])
    dots = q_dots | k_dots | v_dots
    if str(node["v_layout"])[-1] == "D":  # standard V
        return {1: "a", 3: "unmerged"}.get(len(dots), "other"), dots
    if len(dots) == 1 and v_all_transposes >= 1:
        return "b", dots
    if len(dots) == 2 and v_transposes == 0 and q_dots == k_dots and not v_dots & q_dots:
        return "c", dots
    if len(dots) == 3 and v_transposes == 0:
        return "split", dots
    return "other", dots


def classify(program: Program) -> str:
    """"a", "b" or "c" for a program with one attention (16-bit, fp8 or packed) whose Q, K, V
    are projections (see the module docstring); "split" (three projections, transposed V),
    "unmerged" (three projections, standard V) or "other" for anything else. Only the matmuls
    Q, K and V are computed from and the transposes on V's way count: (b) materialises Vᵀ (a
    transpose of V, or in a decode step of its cache: the new token's V of shape [B, H, 1, D] is
    its own Vᵀ); in (c) and "split" no transpose lies between V's projection and the attention
    (a decode step's cache argument may be transposed)."""
    return _attention_projections(program)[0]


def is_qkv_block(program: Program) -> bool:
    """Whether ``program`` has one attention whose Q, K, V are projections of one input (the
    programs `layout_decision` explains): `classify` knows its form, and its projection
    matmuls all read one operand."""
    label, dots = _attention_projections(program)
    return label != "other" and bool(set.intersection(*(set(program.nodes[i].inputs) for i in dots)))


@dataclass(frozen=True)
class LayoutDecision:
    """The predicted cost of the chosen program and of the best program of each variant."""

    chosen: str  # the chosen program's variant ("a", "b", "c" or "other")
    chosen_cost: float
    alternatives: dict[str, float]  # variant -> predicted seconds of its best program
    merged: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()  # variants extraction could not steer to (left out above)
    #: variants whose exact extraction stopped short of a proof of optimality (at its work limit,
    #: or at its time limit, a safety net that warns)
    time_limited: tuple[str, ...] = ()

    def lines(self, projections: bool = True) -> list[str]:
        """Readable lines: the merged projections (unless ``projections`` is false), the chosen
        variant and its predicted cost, each rejected variant's predicted cost and difference."""
        out = [f"projections: {m}" for m in self.merged] or ["projections: as written (none merged or split)"]
        out = out if projections else []
        what = VARIANT_TEXT.get(self.chosen, "another layout")
        out.append(f"V layout: chose {self.chosen} ({what}), predicted {self.chosen_cost * 1e6:.4g} us")
        for variant, cost in sorted(self.alternatives.items()):
            if variant == self.chosen:
                continue
            delta = cost - self.chosen_cost
            missed = "; cheaper: the extractor did not find it" if delta < 0 else ""
            if variant in self.time_limited:
                missed += "; best found within the exact extractor's limits, the best program may cost less"
            out.append(f"  rejected {variant} ({VARIANT_TEXT[variant]}): {cost * 1e6:.4g} us ({delta * 1e6:+.4g} us{missed})")
        out += [f"  not found {variant} ({VARIANT_TEXT[variant]}): not in the e-graph, or extraction could not "
                "reach it" for variant in self.unreachable]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def extract_variant(egraph, encoding, model: CostModel, time_limit: float | None = None) -> Program:
    """The cheapest program under ``model``, exactly (ILP) where the e-graph is small enough.

    Why not the default greedy-DAG extractor: it fixes one e-node per e-class bottom-up, pricing
    each class by the DAG of its own best subterms, so a subterm is shared only below one class.
    Q, K and V are three sibling classes: for each alone, its own projection (one matmul on E
    columns) is cheaper than a slice of the fused matmul (a matmul on 3E columns plus the weight
    concatenation), and no VariantModel penalty changes that (the fused matmul costs at least as
    many penalties as each projection). The saving of a shared matmul only appears in a class
    whose one e-node reads all three parts, which is packed attention: so greedy reaches (a)
    through packed attention but not (b) or (c), which read Q, K and Vᵀ as separate operands.
    Measured on the GPT-2 and Llama test blocks (tests/test_qkv.py): greedy with
    ``VariantModel(h100 or cpu, v)`` gives (a) for v="a"; for "b" and "c" it gives three
    projections ("split"), except GPT-2 on H100 where it gives (c) for both. The exact extractor
    finds all three. Graphs too large for it fall back to greedy extraction. Past the ILP's work
    limit (`ilp.MAX_MIP_NODES`) its best solution so far is used; ``time_limit`` (seconds, default
    `ilp.TIME_LIMIT_S`) is a safety net that warns.
    """
    try:
        return extract_program_ilp(egraph, encoding, model, time_limit=time_limit)[0]
    except ILPExtractionError:
        return extract_program(egraph, encoding, model)[0]


def layout_decision(egraph, encoding, model: CostModel, chosen: Program,
                    time_limit: float | None = None, graph: Any = None) -> LayoutDecision:
    """Explain ``chosen`` (extracted from this e-graph under ``model``) by the best program of
    each variant, priced under ``model`` (under its base model when ``model`` is itself a
    `VariantModel`: the penalties steer, they are not costs). Each variant's exact extraction
    stops at the ILP's work limit (deterministic); ``time_limit`` (seconds per variant, default
    `ilp.TIME_LIMIT_S`) is a safety net that warns. ``graph``: the e-graph as `ilp.read_graph`
    serialized it (the optimizer keeps it); then ``egraph`` is not read and may be None."""
    pricing = model.base if isinstance(model, VariantModel) else model
    steering = {v: VariantModel.for_program(pricing, v, encoding.program) for v in VARIANTS}

    def exact(variant: str) -> ILPExtraction | None:
        try:
            return extract_ilp(egraph, encoding, steering[variant], time_limit, graph=graph)
        except ILPExtractionError:
            return None

    def greedy(variant: str) -> Program | None:
        """Greedy-DAG extraction, where the exact one gave no answer."""
        if egraph is not None:  # egglog's (on this thread: it uses egglog)
            return extract_program(egraph, encoding, steering[variant])[0]
        try:
            problem = Problem.build(graph, steering[variant], max_enodes=10 * EXPLAIN_MAX_ENODES)
            return problem.decode(greedy_dag(problem)[0], encoding)
        except ILPExtractionError:
            return None

    try:
        graph = read_graph(egraph) if graph is None else graph
    except ILPExtractionError:
        results: list[ILPExtraction | None] = [None] * len(VARIANTS)
    else:  # the solves run side by side, one a core (HiGHS releases the GIL)
        with ThreadPoolExecutor(max_workers=min(len(VARIANTS), os.cpu_count() or 1)) as pool:
            results = list(pool.map(exact, VARIANTS))
    alternatives, unreachable, limited = {}, [], []
    for variant, found in zip(VARIANTS, results):
        if found is None:
            program = greedy(variant)
        else:
            program = found.program
            if not found.optimal:
                limited.append(variant)
        if program is not None and classify(program) == variant:
            alternatives[variant] = program_cost(program, pricing)
        else:
            unreachable.append(variant)
    label, cost = classify(chosen), program_cost(chosen, pricing)
    if label in unreachable:  # the chosen program is itself one of its variant's programs
        unreachable.remove(label)
        alternatives[label] = cost
    return LayoutDecision(label, cost, alternatives, tuple(projections(chosen)), tuple(unreachable), tuple(limited))


#: a report explains the layout of programs whose e-graph has at most this many e-nodes (the
#: exact extractor's reach). Each variant's extraction stops at the ILP's work limit
#: (`ilp.MAX_MIP_NODES`: the same explanation on any machine); this many seconds is its safety
#: net, which warns when hit (the three run side by side, a core each: the demo block's slowest
#: proof takes 10-12 s on a 2-core machine, the rest under 5 s)
EXPLAIN_MAX_ENODES = 5000
EXPLAIN_SECONDS = 300.0


class LazyLayoutDecision:
    """`layout_decision` for one extraction, computed on the first call and then kept.

    ``graph`` is the serialized e-graph (at most `EXPLAIN_MAX_ENODES` e-nodes) the optimizer
    extracted ``chosen`` from and ``encoding`` its encoding: explaining reads them, it does not
    saturate again. Each variant's exact extraction stops at the ILP's work limit (with
    `EXPLAIN_SECONDS` as a safety net). A failure becomes ``None`` with the reason in ``error``:
    explaining never breaks a report.
    """

    def __init__(self, graph: Any, encoding: Any, model: CostModel | None, chosen: Program | None) -> None:
        self._pending: tuple | None = (graph, encoding, model, chosen)
        self._value: LayoutDecision | None = None
        self.error: str | None = None

    @classmethod
    def unavailable(cls, reason: str) -> LazyLayoutDecision:
        """An explanation that was not computed, saying why."""
        out = cls(None, None, None, None)
        out._pending, out.error = None, reason
        return out

    @property
    def computed(self) -> bool:
        return self._pending is None

    def __call__(self) -> LayoutDecision | None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                graph, encoding, model, chosen = pending
                self._value = layout_decision(None, encoding, model, chosen, EXPLAIN_SECONDS, graph=graph)
            except Exception as exc:  # noqa: BLE001 - the report says why instead
                self.error = f"{type(exc).__name__}: {exc}"
        return self._value
