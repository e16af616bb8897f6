"""Rules that cannot match a program are not run, and that changes nothing (egraph/relevance.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_corpus import CASES
from eqsat_attn.capture import capture
from eqsat_attn.egraph import driver, encode, resolve, run_rulesets
from eqsat_attn.egraph.relevance import OpVar, relevant_rules
from eqsat_attn.limits import Limits
from eqsat_attn.pipeline import GRADIENT_RULES

EXP, LOG, MAX = ("unary", "exp"), ("unary", "log"), ("reduce", "max")


def test_a_rule_is_kept_only_once_what_it_reads_can_exist():
    rules = [
        (frozenset({EXP, MAX}), frozenset({("attention", None)})),  # reads exp and max
        (frozenset({("unary", "neg")}), frozenset({EXP})),  # writes exp from neg
        (frozenset({("attention", None)}), frozenset({("layout", None)})),
    ]
    assert relevant_rules(rules, {MAX}) == [False, False, False]
    assert relevant_rules(rules, {MAX, ("unary", "neg")}) == [True, True, True]  # a chain of two
    assert relevant_rules(rules, {("reduce", None), EXP}) == [True, False, True]  # None: any op written


def test_an_op_variable_writes_only_the_ops_it_matched():
    v = OpVar("op")
    push_transpose = (frozenset({("unary", v), ("transpose", None)}), frozenset({("unary", v), ("transpose", None)}))
    needs_exp = (frozenset({EXP}), frozenset())
    assert relevant_rules([push_transpose, needs_exp], {LOG, ("transpose", None)}) == [True, False]
    assert relevant_rules([push_transpose, needs_exp], {EXP, ("transpose", None)}) == [True, True]
    unbound = (frozenset({("transpose", None)}), frozenset({("unary", OpVar("elsewhere"))}))
    assert relevant_rules([unbound, needs_exp], {("transpose", None)}) == [True, True]


def test_questions_asked_get_answers_of_their_kind():
    asks = (frozenset({("dot", None)}), frozenset({("ask", "dot_shape")}))
    uses = (frozenset({("dot", None), ("answer", "dot_shape")}), frozenset({("reshape", None)}))
    other = (frozenset({("answer", "reshape_split")}), frozenset())
    assert relevant_rules([asks, uses, other], {("dot", None)}, {"ask": "answer"}) == [True, True, False]
    assert relevant_rules([asks, uses, other], {("reshape", None)}, {"ask": "answer"}) == [False, False, False]


def _program(name):
    case = next(c for c in CASES if c.name == name)
    return capture(case.fn, *case.args()).program


def _mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2


def _run(program, rulesets, limits, relevant: bool):
    with driver.prepared_egraph(rulesets) as egraph:
        enc = encode(program, egraph)
        return run_rulesets(egraph, rulesets, limits, relevant_to=enc.symbols if relevant else None)


@pytest.mark.parametrize("name", [
    "sfdp01_extreme", "mask_key_padding_bool", "rank5_grouped_with_bias", "softmax_exp_s_minus_logsumexp",
    "mask_key_padding_grad", "neg_weights_also_returned", "mlp",
])
def test_runs_are_those_of_the_full_rule_sets(name):
    """Every iteration's e-nodes and rule matches, and where the run stopped, are the same."""
    if name == "mlp":
        x = np.zeros((4, 8), np.float32)
        program = capture(_mlp, x, np.zeros((8, 16), np.float32), np.zeros((16, 8), np.float32)).program
    else:
        program = _program(name)
    names = [*resolve(None)] + ([*resolve([GRADIENT_RULES])] if name.endswith("_grad") else [])
    limits = Limits(iterations=6, nodes=20_000)
    full, only_relevant = _run(program, names, limits, False), _run(program, names, limits, True)
    def drop_steps_run(steps):  # a rule set none of whose rules can match is not run at all
        return [{k: v for k, v in step.items() if k != "steps_run"} for step in steps]

    assert drop_steps_run(only_relevant.steps) == drop_steps_run(full.steps)
    assert (only_relevant.rules_fired, only_relevant.egraph_nodes, only_relevant.stop_reason) == (
        full.rules_fired, full.egraph_nodes, full.stop_reason)


def test_a_program_without_softmax_runs_no_attention_raising():
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    program = capture(_mlp, x, jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 8), jnp.float32)).program
    rulesets = resolve(None)
    with driver.prepared_egraph(rulesets) as egraph:
        subsets = driver._relevant_subsets(egraph, rulesets, encode(program, egraph).symbols)
    raise_ = next(r for r in rulesets if r.name == "attention_raise")
    assert subsets["attention_raise"] is not raise_.ruleset  # a part of it at most
    assert subsets["fp8_attention"] is None  # nothing there reads what an MLP has
