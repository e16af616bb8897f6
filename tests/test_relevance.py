"""Rules that cannot match a program are not run, and that changes nothing (egraph/relevance.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_corpus import CASES
from eqsat_attn.capture import capture
from eqsat_attn.egraph import driver, encode, resolve, run_rulesets
from eqsat_attn.egraph.encode import encoding_commands
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


def _run(program, rulesets, limits, relevant: bool, registered_kept: bool = False):
    """One run; ``registered_kept``: in an e-graph with only the kept rules registered, the
    program encoded from commands built with the naming e-graph's names (as the pipeline does)."""
    built = encoding_commands(program, driver.naming_egraph(rulesets)) if registered_kept else None
    kept = driver.relevant_mask(rulesets, built.encoding.symbols) if registered_kept else None
    with driver.prepared_egraph(rulesets, kept) as egraph:
        enc = encode(program, egraph, built=built)
        if registered_kept:
            assert enc is built.encoding  # the commands were valid here: not rebuilt
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
    only_registered = _run(program, names, limits, True, registered_kept=True)
    def drop_steps_run(steps):  # a rule set none of whose rules can match is not run at all
        return [{k: v for k, v in step.items() if k != "steps_run"} for step in steps]

    for run in (only_relevant, only_registered):
        assert drop_steps_run(run.steps) == drop_steps_run(full.steps)
        assert (run.rules_fired, run.egraph_nodes, run.stop_reason) == (full.rules_fired, full.egraph_nodes, full.stop_reason)


def test_a_program_without_softmax_runs_no_attention_raising():
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    program = capture(_mlp, x, jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 8), jnp.float32)).program
    rulesets = resolve(None)
    with driver.prepared_egraph(rulesets) as egraph:
        subsets = driver._relevant_subsets(rulesets, encode(program, egraph).symbols)
    raise_ = next(r for r in rulesets if r.name == "attention_raise")
    assert subsets["attention_raise"] is not raise_.ruleset  # a part of it at most
    assert subsets["fp8_attention"] is None  # nothing there reads what an MLP has


def test_tables_are_named_alike_with_declarations_only():
    """The naming e-graph (the rule sets' declarations, no rule registered) names each table a
    rule reads or writes as an e-graph with every rule registered does, and calls the rest
    primitives: relevance and encodings built with it hold in the e-graph a program runs in."""
    from egglog import bindings
    from egglog.egraph_state import span

    from eqsat_attn.egraph.relevance import SymbolNames

    rulesets = [*resolve(None), *resolve([GRADIENT_RULES])]
    full = driver.registered_egraph(rulesets)
    (output,) = full._state.run_program(bindings.PrintSize(span(1), None))
    tables = {name for name, _ in output.sizes}
    names = SymbolNames(driver.naming_egraph(rulesets)._state)
    refs = {ref for r in rulesets for rule in r.rules
            for ref, _ in {*(driver._symbols_of(rule).reads or ()), *driver._symbols_of(rule).writes}}
    assert len(refs) > 50
    for ref in refs:
        try:
            name = full._state.callable_ref_to_egg(ref)[0]
        except Exception:  # noqa: BLE001 - a primitive
            name = None
        assert names.table(ref) == (name if name in tables else None), ref


def test_the_pipeline_registers_only_the_rules_a_program_needs():
    """An MLP's pooled e-graph is registered with the kept rules (no attention raising), and a
    second optimization reuses it."""
    from eqsat_attn.pipeline import OptimizeOptions, optimize_program

    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    program = capture(_mlp, x, jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 8), jnp.float32)).program
    first = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    rulesets = resolve(None)
    kept = driver.relevant_mask(rulesets, encoding_commands(program, driver.naming_egraph(rulesets)).encoding.symbols)
    assert not all(kept) and any(kept)
    raise_ = next(r for r in rulesets if r.name == "attention_raise")
    start = sum(len(r.rules) for r in rulesets[:rulesets.index(raise_)])
    assert sum(kept[start:start + len(raise_.rules)]) < len(raise_.rules) / 2  # the few that read products alone
    pooled = driver.pooled_egraphs(rulesets, kept)
    assert pooled
    again = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    assert driver.pooled_egraphs(rulesets, kept) == pooled  # the same e-graph, taken and given back
    assert (again.program, again.egraph_nodes, again.rules_fired) == (first.program, first.egraph_nodes, first.rules_fired)


def test_a_replayed_registration_takes_encodings_built_elsewhere():
    """A second e-graph registered with the same kept rules replays the first one's commands (the
    language's tables among them): an encoding built with the naming e-graph runs in both alike."""
    program = _program("mask_key_padding_bool")
    rulesets = resolve(None)
    kept = driver.relevant_mask(rulesets, driver.program_encoding(program, rulesets).encoding.symbols)
    runs = []
    for egraph in (driver.registered_egraph(rulesets, kept), driver.registered_egraph(rulesets, kept)):
        built = driver.program_encoding(program, rulesets)
        enc = encode(program, egraph, built=built)
        assert enc is built.encoding
        run = run_rulesets(egraph, rulesets, Limits(iterations=3), relevant_to=enc.symbols)
        runs.append((run.egraph_nodes, run.rules_fired))
    assert runs[0] == runs[1] and runs[0][0] > 0
