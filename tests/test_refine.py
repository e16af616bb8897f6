"""The one extraction step (`eqsat_attn.egraph.refine`): greedy-DAG, then an exact re-solve of the
contested neighbourhood. Its program is never costlier than what greedy extraction followed by the
former fp8 transposed-V steering chose; it is deterministic; the layout explanation reads the
optimizer's own e-graph instead of saturating again."""

from __future__ import annotations

import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn.cost import for_device, program_cost
from eqsat_attn.cost.model import OpView
from eqsat_attn.egraph import extract_program
from eqsat_attn.egraph.ilp import ILPExtractionError, extract_program_ilp
from eqsat_attn.egraph.refine import extract_best
from eqsat_attn.examples import EXAMPLES
from eqsat_attn.qkv_layouts import moves_data
from test_fp8_rules import fp8_ln_block, h100_fp8_steered, ln_block_args
from test_qkv import LIMITS, block_args


class FormerTransposedVSteering:
    """The steering model of the former second pass (fp8_layout.prefer_transposed_v): standard-V
    fp8 attention and materialised transposes as large as V penalised, for the exact extractor."""

    def __init__(self, model, large: int) -> None:
        self.model, self.large = model, large

    def node_cost(self, node: OpView) -> float:
        cost = self.model.node_cost(node)
        if node.op == "attention_fp8" and self.model.attention_variant(node) == "standard":
            cost += 1.0
        if node.op == "transpose" and moves_data(node.params["perm"], node.inputs[0].shape) and node.output.size >= self.large:
            cost += 0.5
        return cost

    def __getattr__(self, name):
        return getattr(self.model, name)


def former_choice(ex, model):
    """What the pipeline chose before: greedy-DAG, then (fp8 attention in the program) the steered
    exact extraction, kept where the real model prices it lower."""
    greedy, _ = extract_program(ex.egraph, ex.encoding, model)
    fp8 = [greedy.nodes[i] for i in greedy.live_nodes() if greedy.nodes[i].op == "attention_fp8"]
    if not fp8:
        return greedy
    large = min(greedy.type_of(n.inputs[2]).size for n in fp8)
    try:
        steered, _ = extract_program_ilp(ex.egraph, ex.encoding, FormerTransposedVSteering(model, large))
    except ILPExtractionError:
        return greedy
    return steered if program_cost(steered, model) < program_cost(greedy, model) else greedy


CASES = {
    "fp8_ln_block": lambda: (fp8_ln_block, ln_block_args(3)),
    "qkv_gpt2": lambda: block_args("gpt2", seed=5),
    "qkv_llama": lambda: block_args("llama", seed=5),
    "attention_vt": EXAMPLES["attention_vt"],
    "attention": EXAMPLES["attention"],
    "block": EXAMPLES["block"],
}
MODELS = {"h100": lambda: for_device("h100"), "cpu": lambda: for_device("cpu"), "h100_fp8": h100_fp8_steered}


@pytest.mark.parametrize("case,model_name", [
    ("fp8_ln_block", "h100_fp8"), ("fp8_ln_block", "h100"), ("qkv_gpt2", "h100"), ("qkv_gpt2", "cpu"),
    ("qkv_llama", "h100"), ("attention_vt", "h100"), ("attention_vt", "cpu"), ("attention", "cpu"), ("block", "h100"),
])
def test_one_extraction_is_no_costlier_than_the_special_cases(case, model_name):
    fn, args = CASES[case]()
    model = MODELS[model_name]()
    ex = ea.explore(fn, *args)
    ex.saturate()
    former = former_choice(ex, model)
    found = extract_best(ex.egraph, ex.encoding, model)
    assert found.cost == pytest.approx(program_cost(found.program, model), rel=1e-12)
    assert found.cost <= program_cost(former, model) * (1 + 1e-9), (case, found.how)
    assert found.program.output_types == ex.program.output_types
    again = extract_best(ex.egraph, ex.encoding, model)  # deterministic: the same program again
    assert str(again.program) == str(found.program) and again.how == found.how


def test_fp8_block_is_improved_where_greedy_ties():
    """Under H100 steered to fp8, greedy's program pays for V's projection twice; the exact
    neighbourhood re-solve finds a strictly cheaper program with fp8 attention."""
    model = h100_fp8_steered()
    ex = ea.explore(fp8_ln_block, *ln_block_args(3))
    ex.saturate()
    greedy, _ = extract_program(ex.egraph, ex.encoding, model)
    found = extract_best(ex.egraph, ex.encoding, model)
    assert found.cost < program_cost(greedy, model) * (1 - 1e-3) and found.how.startswith("greedy-dag + exact")
    assert [n for n in found.program.nodes if n.op == "attention_fp8"]
    assert found.graph is not None  # kept for explanations


def test_swap_improve_trades_a_pick_for_one_that_spares_work_and_skips_cycles():
    """`swap_improve` on a small extraction problem shaped like the CPU table's fp8 block: the
    exact solve's program reads a dequantized operand (plain attention 10 + dequantize 3 +
    quantize 5); fp8 attention (11, dearer by itself) reads a transpose of the quantized operand
    (0.001), which the program does not compute yet: the swap takes it with the cheapest way to
    add that transpose (not a second quantize), dropping the dequantize: 18 -> 16.001. A member
    that would read its own reader back (a cycle, cost 0) is never taken."""
    from types import SimpleNamespace

    from eqsat_attn.egraph.ilp import Problem
    from eqsat_attn.egraph.refine import cheapest_additions, swap_improve

    cost = {"plain": 10.0, "fp8": 11.0, "deq": 3.0, "quant": 5.0, "back": 0.0, "tq": 0.001, "requant": 6.0,
            "in": 0.0}
    children = {"plain": ["d"], "fp8": ["t"], "deq": ["q"], "quant": ["x"], "back": ["d"], "tq": ["q"],
                "requant": ["x"], "in": []}
    alive = {"r": ["plain", "fp8"], "d": ["deq"], "q": ["quant", "back"], "t": ["requant", "tq"], "x": ["in"]}
    problem = Problem(SimpleNamespace(root="r"), cost, children, alive)
    start = {"r": "plain", "d": "deq", "q": "quant", "x": "in"}
    assert problem.dag_cost(start) == 18.0
    assert cheapest_additions(problem, set(start)) == {"t": "tq"}
    better = swap_improve(problem, start)
    assert better == {"r": "fp8", "t": "tq", "q": "quant", "x": "in"}
    assert problem.dag_cost(better) == pytest.approx(16.001, rel=1e-12)
    assert swap_improve(problem, better) == better  # nothing left to improve; deterministic


def test_layout_explanation_reads_the_optimizers_egraph(monkeypatch):
    """The report's V-layout explanation runs after optimizing without saturating again."""
    import eqsat_attn.pipeline as pipeline

    fn, args = block_args("llama", seed=6)
    report = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS).explain(*args)
    assert report.layout_explainer is not None and not report.layout_explainer.computed

    def no_saturation(*_, **__):
        raise AssertionError("the explanation saturated again")

    monkeypatch.setattr(pipeline, "run_rulesets", no_saturation)
    monkeypatch.setattr(pipeline, "saturate", no_saturation)
    decision = report.layout_decision
    assert decision is not None, report.layout_explainer.error
    assert decision.chosen_cost == pytest.approx(report.cost_after)
    assert decision.alternatives and np.isfinite(list(decision.alternatives.values())).all()
