"""Projection layouts of attention blocks: which Q/K/V projections a program merges, which V
layout its attention reads, and the three programs the trade-off is between (issue 9):

- ``"a"``: one fused QKV matmul feeding standard (or packed-QKV) attention;
- ``"b"``: one fused QKV matmul, a materialised Vᵀ and transposed-V attention;
- ``"c"``: a fused QK matmul plus a separate V projection that writes Vᵀ, transposed-V attention.

`VariantModel` steers extraction to one of them on top of any cost model (tests, the benchmark
and the report use it); `layout_decision` explains a chosen program by the predicted costs of
the variants it beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cost.model import CostModel, OpView, program_cost
from .ir import Program

VARIANTS = ("a", "b", "c")
VARIANT_TEXT = {
    "a": "fused QKV matmul -> standard/packed attention",
    "b": "fused QKV matmul -> materialised Vᵀ -> transposed-V attention",
    "c": "fused QK matmul + V projection writing Vᵀ -> transposed-V attention",
    "split": "three projections, V projection writing Vᵀ -> transposed-V attention",
}
MATMUL_PENALTY = 1.0  # seconds per matmul: fewer projection matmuls win within a variant
FORBIDDEN = 1e3  # seconds: a construct the variant excludes


def _transposed_v(node: OpView) -> bool:
    return node.op == "attention" and str(node.params["v_layout"])[-1] == "S"


@dataclass(frozen=True)
class VariantModel:
    """``base``, plus penalties that make extraction pick variant "a", "b" or "c"."""

    base: CostModel
    variant: str

    @property
    def name(self) -> str:
        return f"{getattr(self.base, 'name', 'model')}+variant-{self.variant}"

    def node_cost(self, node: OpView) -> float:
        cost = float(self.base.node_cost(node))
        if node.op == "dot_general":
            cost += MATMUL_PENALTY
        if self.variant == "a" and _transposed_v(node):
            cost += FORBIDDEN
        if self.variant in ("b", "c") and (node.op == "packed_attention" or node.op == "attention" and not _transposed_v(node)):
            cost += FORBIDDEN
        if self.variant == "c" and node.op == "transpose":
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


def classify(program: Program) -> str:
    """"a", "b" or "c" for a one-attention block whose Q, K, V are projections of one input
    (see the module docstring); "other" for anything else."""
    attn = [program.nodes[i] for i in program.live_nodes() if program.nodes[i].op in ("attention", "packed_attention")]
    if len(attn) != 1:
        return "other"
    node = attn[0]
    matmuls = program.count("dot_general")
    if node.op == "packed_attention" or str(node["v_layout"])[-1] == "D":
        return "a" if matmuls == 1 else "other"
    if matmuls == 1 and program.count("transpose") >= 1:
        return "b"
    if matmuls == 2 and program.count("transpose") == 0:
        return "c"
    if matmuls == 3 and program.count("transpose") == 0:
        return "split"
    return "other"


@dataclass(frozen=True)
class LayoutDecision:
    """The predicted cost of the chosen program and of the best program of each variant."""

    chosen: str  # the chosen program's variant ("a", "b", "c" or "other")
    chosen_cost: float
    alternatives: dict[str, float]  # variant -> predicted seconds of its best program
    merged: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"projections: {m}" for m in self.merged] or ["projections: none merged"]
        what = VARIANT_TEXT.get(self.chosen, "another layout")
        out.append(f"V layout: chose {self.chosen} ({what}), predicted {self.chosen_cost * 1e6:.4g} us")
        for variant, cost in sorted(self.alternatives.items()):
            if variant == self.chosen:
                continue
            delta = cost - self.chosen_cost
            out.append(f"  rejected {variant} ({VARIANT_TEXT[variant]}): {cost * 1e6:.4g} us ({delta * 1e6:+.4g} us)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def extract_variant(egraph, encoding, model: CostModel) -> Program:
    """The cheapest program under ``model``, exactly (ILP) where the e-graph is small enough.

    Greedy extraction prices each sibling projection's e-class on its own, so it finds a matmul
    shared by Q, K and V only when one node reads all three from it (packed attention); the
    exact extractor also finds (b) and (c). Larger graphs fall back to greedy extraction.
    """
    from .egraph import extract_program
    from .egraph.ilp import ILPExtractionError, extract_program_ilp

    try:
        return extract_program_ilp(egraph, encoding, model)[0]
    except ILPExtractionError:
        return extract_program(egraph, encoding, model)[0]


def layout_decision(egraph, encoding, model: CostModel, chosen: Program) -> LayoutDecision:
    """Explain ``chosen`` (extracted from this e-graph under ``model``) by the best program of
    each variant, priced under ``model``."""
    alternatives = {}
    for variant in VARIANTS:
        program = extract_variant(egraph, encoding, VariantModel(model, variant))
        alternatives[variant] = program_cost(program, model)
    return LayoutDecision(classify(chosen), program_cost(chosen, model), alternatives, tuple(projections(chosen)))
