"""A second extraction for fp8 attention left reading V in the standard layout.

When Q, K and V are each quantized with a scale from their own amax (``max(|V|)``), V's
projection output has two readers: the quantize and the amax reduction. The e-graph holds
the program where the projection writes Vᵀ and both read that (a full max-reduction does not
depend on the layout; `rules/transpose.py`'s reduce rules put both forms in one e-class), but
greedy-DAG extraction cannot find it: it picks one member of the scale's e-class before it
knows which layout V's quantize will read, the members over Vᵀ and over V tie, and it keeps
the one over V, so the transposed-V program is priced with both projections and loses.

`prefer_transposed_v` asks the exact (ILP) extractor, under the same model with
standard-layout fp8 attention and materialised transposes as large as V made prohibitively
expensive, for the best program whose V producer writes Vᵀ, and keeps it only when the real
model prices it below the greedy choice. It runs only where that question arises (an fp8
attention reading V with D minor, or a transpose of V materialised for it, on a model whose fp8
transposed-V kernel is the faster one), within the exact extractor's work limit (its time limit
is a safety net that warns); any failure keeps the greedy choice."""

from __future__ import annotations

from typing import Any

from . import ir
from .cost.model import CostModel, OpView, program_cost, view_of
from .egraph.ilp import extract_program_ilp
from .qkv_layouts import moves_data

#: added in the steering model (seconds, far above any block's cost) to each standard-layout
#: fp8 attention and to each materialised transpose as large as V: the search is for V written
#: transposed by its producer, not copied there (the real model then judges the program found;
#: small transposes, of a bias or weight, stay priced as they are)
STANDARD_V_PENALTY = 1.0
TRANSPOSE_PENALTY = 0.5


class _TransposedVSteering:
    """``model`` with every fp8 attention whose kernel would run the standard variant, and every
    materialised transpose of at least ``large`` elements, penalised."""

    def __init__(self, model: Any, large: int) -> None:
        self.model = model
        self.large = large
        self.name = f"{getattr(model, 'name', 'model')}, fp8 transposed-V steered"

    def node_cost(self, node: OpView) -> float:
        cost = self.model.node_cost(node)
        if node.op == "attention_fp8" and self.model.attention_variant(node) == "standard":
            cost += STANDARD_V_PENALTY
        if node.op == "transpose" and moves_data(node.params["perm"], node.inputs[0].shape) \
                and node.output.size >= self.large:
            cost += TRANSPOSE_PENALTY
        return cost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _v_sizes_to_steer(program: ir.Program, model: Any) -> list[int]:
    """Element counts of the V operands of the fp8 attentions whose transposed-V variant ``model``
    prices faster but which do not get it from V's producer: run in the standard variant, or
    reading a transpose of V materialised for them."""
    if not (hasattr(model, "attention_variant") and hasattr(model, "relaid_v_layout")):
        return []
    sizes = []
    for i in program.live_nodes():
        node = program.nodes[i]
        if node.op != "attention_fp8":
            continue
        view = view_of(program, i)
        causal = bool(node.params.get("causal"))
        dtype = program.type_of(node.inputs[0]).dtype
        if view is None or model.relaid_v_layout(dtype, causal) != "BHDS":
            continue
        v = program.nodes[node.inputs[2]]
        copied = v.op == "transpose" and moves_data(v.params["perm"], program.type_of(v.inputs[0]).shape)
        if model.attention_variant(view) == "standard" or copied:
            sizes.append(program.type_of(node.inputs[2]).size)
    return sizes


def wants_transposed_v(program: ir.Program, model: Any) -> bool:
    """Whether ``program`` has an fp8 attention whose faster transposed-V variant ``model`` would
    have V's producer write (see `_v_sizes_to_steer`)."""
    return bool(_v_sizes_to_steer(program, model))


def prefer_transposed_v(egraph: Any, encoding: Any, model: CostModel, chosen: ir.Program) -> ir.Program:
    """``chosen``, or the cheapest program (under ``model``) whose fp8 attention reads V
    transposed from V's producer where that is cheaper; see the module docstring."""
    sizes = _v_sizes_to_steer(chosen, model)
    if not sizes:
        return chosen
    try:
        steering = _TransposedVSteering(model, large=min(sizes))
        steered, _ = extract_program_ilp(egraph, encoding, steering)  # its work limit decides (ilp.MAX_MIP_NODES)
    except Exception:  # noqa: BLE001 - no solver, too large a graph, a solver failure: keep greedy's choice
        return chosen
    if steered.output_types == chosen.output_types and program_cost(steered, model) < program_cost(chosen, model):
        return steered
    return chosen
