"""Results do not depend on wall-clock time or machine load (issue 20): `Limits` checks its
fields; iterations and e-nodes (work) decide where saturation stops, checked after every rule
set's run; the seconds limit is a safety net that stops within an iteration and warns; the exact
(ILP) extractor stops at a node count, not a clock; the e-graph pool does not keep what a large
run grew. Clocks are faked where a time limit must be hit: no assertion depends on timing."""

from __future__ import annotations

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.cost import for_device
from eqsat_attn.egraph import driver, encode, extract_program, resolve, run_rulesets
from eqsat_attn.egraph.ilp import extract_ilp
from eqsat_attn.capture import capture
from eqsat_attn.pipeline import Limits, OptimizeOptions, saturate, saturated
from test_qkv import SPLIT, p_packed
from test_rules import B


def chain_program(links: int = 6):
    """``x = (x @ w).T`` repeated (square x and w): transposes and matmuls the rules rewrite."""
    b = B()
    x, w = b.input(8, 8), b.input(8, 8)
    for _ in range(links):
        x = b.t(b.dot(x, w, lc=(1,), rc=(0,)), 1, 0)
    return b.build(x)


# ----------------------------------------------------------------------------- Limits


@pytest.mark.parametrize("field, value", [
    ("iterations", 0), ("iterations", -3), ("iterations", 2.5), ("iterations", "30"), ("iterations", True),
    ("nodes", 0), ("nodes", -1), ("nodes", None), ("nodes", 1e5),
    ("seconds", 0), ("seconds", -1.0), ("seconds", math.nan), ("seconds", "2"), ("seconds", None), ("seconds", False),
])
def test_limits_reject_non_positive_and_non_numeric_fields(field, value):
    with pytest.raises(ValueError, match=rf"Limits\.{field} must be .*got {value!r}"):
        Limits(**{field: value})


def test_limits_accept_positive_numbers_and_no_time_limit():
    limits = Limits(iterations=np.int64(3), nodes=1, seconds=math.inf)
    assert (limits.iterations, limits.nodes, limits.seconds) == (3, 1, math.inf)
    assert Limits(seconds=1).seconds == 1 and Limits(seconds=0.5).seconds == 0.5


# ----------------------------------------------------------------------------- saturation


def _round_length(rulesets) -> int:
    return 1 + len(driver._round_steps(rulesets))  # the analysis, then each rule set's run


def test_stepped_rounds_give_the_one_schedule_result_when_no_limit_is_hit():
    """The driver's steps are `_round_schedule` cut into pieces: the same e-graph after every
    iteration, the same rules fired and the same extracted program as running it whole."""
    program = chain_program()
    rulesets = resolve(None)
    limits = Limits(iterations=30, seconds=math.inf)
    model = for_device("h100")
    with driver.prepared_egraph(rulesets) as egraph:
        encoding = encode(program, egraph)
        stepped = run_rulesets(egraph, rulesets, limits)
        stepped_program, stepped_cost = extract_program(egraph, encoding, model)
    assert stepped.saturated and stepped.iterations > 2
    with driver.prepared_egraph(rulesets) as egraph:  # the same loop, one schedule per round
        encoding = encode(program, egraph)
        command = driver.schedule_command(egraph, driver._round_schedule(rulesets))
        answerer = driver.QuestionAnswerer()
        sizes = []
        for _ in range(limits.iterations):
            report = driver.run_schedule(egraph, command)
            answered = answerer(egraph)
            sizes.append(driver.egraph_size(egraph))
            if not report.updated and answered == 0:
                break
        whole_program, whole_cost = extract_program(egraph, encoding, model)
    assert [s["egraph_nodes"] for s in stepped.steps] == sizes
    assert stepped_cost == whole_cost and str(stepped_program) == str(whole_program)


def test_raise_passes_finish_the_raising_chain_in_fewer_rounds(monkeypatch):
    """Past `RAISE_PASSES_FROM_ENODES` (here from the start) a raise set runs up to `RAISE_PASSES`
    passes per round: GPT-2's where-masked attention is raised rounds earlier, and the run still
    saturates at the same e-graph, from which the same program is extracted."""
    def gpt2(q, k, v):  # [B, S, H, D] each, as tests/attention_corpus.py's sfdp18 writes it
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        s = jnp.matmul(q, k.transpose(0, 1, 3, 2)) / jnp.full((), v.shape[-1] ** 0.5, jnp.float32)
        s = jnp.where(jnp.tril(jnp.ones((8, 8), bool))[None, None], s, jnp.finfo(jnp.float32).min)
        return jnp.matmul(jax.nn.softmax(s, axis=-1), v)

    program = capture(gpt2, *[jax.ShapeDtypeStruct((2, 8, 2, 16), jnp.float32)] * 3).program
    options = OptimizeOptions(cost_model=for_device("h100"))
    monkeypatch.setattr(driver, "RAISE_PASSES_FROM_ENODES", 0)
    runs = []
    for passes in (1, driver.RAISE_PASSES):
        monkeypatch.setattr(driver, "RAISE_PASSES", passes)
        with saturated(program, options) as (egraph, encoding, run):
            chosen, cost = extract_program(egraph, encoding, options.cost_model)
        raised = [s["iteration"] for s in run.steps if s["rules_fired"].get("attention_raise.attention")]
        runs.append((raised[0], run.saturated, run.egraph_nodes, str(chosen), cost))
    (one_pass, *single), (passes, *multi) = runs
    assert passes < one_pass and single == multi and single[0]


def test_seconds_limit_stops_within_an_iteration_and_warns(monkeypatch):
    """A clock that advances 1 s per reading: the 2.5 s safety net stops the first iteration
    after its third step (not at its end) and warns, naming the time limit."""
    ticks = itertools.count()
    monkeypatch.setattr(driver, "_clock", lambda: float(next(ticks)))
    rulesets = resolve(None)
    with driver.prepared_egraph(rulesets) as egraph:
        encode(chain_program(), egraph)
        with pytest.warns(RuntimeWarning, match=r"time limit \(2\.5 s\), a safety net"):
            result = run_rulesets(egraph, rulesets, Limits(iterations=30, seconds=2.5))
    assert result.stop_reason == "time limit (2.5 s)" and not result.saturated
    assert result.iterations == 1 and result.steps[0]["steps_run"] == 3 < _round_length(rulesets)


def test_node_limit_stops_between_rule_sets_without_a_warning():
    """The e-node limit is checked after every step: a run stops in the step that passed it
    (here the analysis, the round's first), and work limits do not warn."""
    rulesets = resolve(None)
    with driver.prepared_egraph(rulesets) as egraph:
        encode(chain_program(20), egraph)
        before = driver.egraph_size(egraph)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = run_rulesets(egraph, rulesets, Limits(iterations=30, nodes=before + 1, seconds=math.inf))
    assert result.stop_reason == f"e-node limit ({before + 1})" and result.iterations == 1
    assert result.steps[0]["steps_run"] == 1 and not result.steps[0]["rules_fired"]


# ----------------------------------------------------------------------------- the pool


def test_pool_drops_an_egraph_that_grew_past_its_limit(monkeypatch):
    """A run that grows the pooled e-graph past `POOL_MAX_ENODES` does not return it: the next
    run starts from a freshly prepared e-graph of the pristine size. A small run's e-graph is
    reused."""
    rulesets = resolve(["transpose", "canonical"])
    with driver.prepared_egraph(rulesets) as egraph:
        pristine = driver.egraph_size(egraph)
    small, big = chain_program(1), chain_program(12)
    with driver.prepared_egraph(rulesets) as egraph:
        encode(small, egraph)
        run_rulesets(egraph, rulesets, Limits(iterations=30))
        small_size = driver.egraph_size(egraph)
    assert any(e is egraph for e in driver.pooled_egraphs(rulesets))  # small: pooled again
    monkeypatch.setattr(driver, "POOL_MAX_ENODES", small_size + 1)
    with driver.prepared_egraph(rulesets) as grown:
        encode(big, grown)
        run_rulesets(grown, rulesets, Limits(iterations=30))
        assert driver.egraph_size(grown) > small_size + 1
    assert not any(e is grown for e in driver.pooled_egraphs(rulesets))
    with driver.prepared_egraph(rulesets) as egraph:
        assert egraph is not grown and driver.egraph_size(egraph) == pristine


# ----------------------------------------------------------------------------- exact extraction


@pytest.fixture(scope="module")
def packed_graph():
    """The packed-QKV e-graph (its SPLIT extraction is proved optimal at the root)."""
    program = p_packed()
    egraph, encoding, _ = saturate(program, OptimizeOptions(limits=Limits(iterations=20, nodes=100_000)))
    return egraph, encoding


@pytest.fixture(scope="module")
def block_graph():
    """The transformer block example's e-graph, whose exact extraction for an H100 needs ~180
    branch-and-bound nodes."""
    import eqsat_attn as ea
    from eqsat_attn.examples import EXAMPLES

    fn, args = EXAMPLES["block"]()
    explorer = ea.explore(fn, *args)
    explorer.saturate()
    return explorer.egraph, explorer.encoding


def test_ilp_stops_at_its_node_limit_with_one_answer(block_graph):
    """A node limit below what the proof needs: not optimal, the limit named, no warning, and
    the same program and cost on every solve (HiGHS single-threaded, fixed seed)."""
    model = for_device("h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = [extract_ilp(*block_graph, model, max_nodes=40) for _ in range(2)]
    assert all(not r.optimal and r.limit == "node limit (40)" for r in runs)
    assert runs[0].cost == runs[1].cost and str(runs[0].program) == str(runs[1].program)
    proved = extract_ilp(*block_graph, model)
    assert proved.optimal and proved.limit == "" and proved.cost <= runs[0].cost


def test_ilp_proves_the_packed_qkv_extraction_within_a_few_nodes(packed_graph):
    """The support rows are one per class and child class (`ilp.solve`): the LP relaxation no
    longer pays for each layout of an operand in part, and the packed-QKV SPLIT extraction is
    proved optimal within 5 branch-and-bound nodes (a row per e-node needed 1,268)."""
    found = extract_ilp(*packed_graph, SPLIT, max_nodes=5)
    assert found.optimal and found.limit == ""


def test_ilp_time_limit_is_a_safety_net_that_warns(packed_graph):
    """A time limit of 0 s stops before the first solve: the warm start comes back (a valid
    extraction) with a RuntimeWarning naming the time limit."""
    with pytest.warns(RuntimeWarning, match=r"time limit \(0 s\), a safety net"):
        found = extract_ilp(*packed_graph, SPLIT, time_limit=0.0)
    assert not found.optimal and found.limit == "time limit (0 s)"
    assert found.program.output_types == packed_graph[1].program.output_types


def test_stop_when_fired_stops_once_raising_settles_or_the_egraph_is_large():
    """`StopWhenFired` counts work only: after its family fired, a run of the family's own rule set
    that fires it no more stops past ``settled_enodes``; any step stops past ``enodes``."""
    stop = driver.StopWhenFired("attention_raise.attention", settled_enodes=100, enodes=1000)
    raise_step = "attention_raise"
    assert stop.reached(0, 0, raise_step, 5000) is None  # never fired: no stop at any size
    assert stop.reached(3, 2, raise_step, 500) is None  # still raising, below `enodes`
    assert stop.reached(3, 0, "transpose", 500) is None  # another rule set fired nothing of it
    assert stop.reached(3, 0, raise_step, 100) is None  # settled, but not past `settled_enodes`
    assert "settled" in stop.reached(3, 0, raise_step, 101)
    assert "fired" in stop.reached(0, 1, raise_step, 1001)
    assert "fired" in stop.reached(2, 0, None, 1001)  # checked between iterations


def test_stop_when_fired_counts_several_families_together():
    """Several families (forward attention and a gradient's backward, each in its own raise rule
    set) count together: a run of either family's rule set that fires none of them has settled."""
    stop = driver.StopWhenFired(("attention_raise.attention", "attention_grad.attention_gradients"), 100, 1000)
    assert stop.rulesets == {"attention_raise", "attention_grad"}
    assert stop.reached(0, 0, "attention_grad", 5000) is None  # neither fired
    assert stop.reached(2, 1, "attention_grad", 500) is None  # still raising
    assert stop.reached(2, 0, "transpose", 500) is None
    assert "attention_grad.attention_gradients settled" in stop.reached(2, 0, "attention_grad", 101)
    assert "settled" in stop.reached(2, 0, "attention_raise", 101)
    assert "fired" in stop.reached(0, 1, "attention_grad", 1001)
    assert driver.StopWhenFired("attention_raise.attention", 1, 2).families == ("attention_raise.attention",)


def test_a_required_family_holds_the_stop_until_it_has_fired():
    """`StopWhenFired.required`: a jax.grad program's run may restart only once its backward has
    raised (its forward raises first); without it, any watched family's firing arms the stop."""
    from collections import Counter

    watch = driver.StopWhenFired(("raise.attention", "grad.gradients"), 10, 20, required="grad.gradients")
    assert not watch.armed(Counter({"raise.attention": 4}))
    assert watch.armed(Counter({"raise.attention": 4, "grad.gradients": 1}))
    assert driver.StopWhenFired(("raise.attention", "grad.gradients"), 10, 20).armed(Counter({"raise.attention": 4}))
    # once armed, the stop is reached as before: settled past 10 e-nodes, or fired past 20
    assert watch.reached(5, 0, "grad", 11) and watch.reached(5, 1, None, 21) and not watch.reached(0, 0, "grad", 11)


def test_grace_rounds_hold_the_stop_for_whole_rounds_after_the_first_firing():
    """`StopWhenFired.grace_rounds`: the run goes on for that many whole rounds after the one where
    the family first fired (a gradient's dQ and dK raise rounds after its dV), then stops as before."""
    assert driver.StopWhenFired("r.f", 1, 1, grace_rounds=2).reached(3, 1, "r", 10, rounds_after=1) is None
    assert "fired" in driver.StopWhenFired("r.f", 1, 1, grace_rounds=2).reached(3, 1, "r", 10, rounds_after=2)
    rulesets = resolve(None)
    runs = {}
    for grace in (0, 2):
        with driver.prepared_egraph(rulesets) as egraph:
            encode(chain_program(), egraph)
            stop = driver.StopWhenFired("transpose.dot_output", 1, 1, grace_rounds=grace)
            runs[grace] = run_rulesets(egraph, rulesets, Limits(iterations=30, seconds=math.inf), stop_when=stop)
    first = runs[0].iterations  # the round where transpose.dot_output first fired: stopped there
    assert runs[0].steps[-1]["rules_fired"].get("transpose.dot_output")
    assert not any(s["rules_fired"].get("transpose.dot_output") for s in runs[0].steps[:-1])
    assert runs[2].iterations == first + 2 and runs[2].stop_reason.startswith("transpose.dot_output fired")
    assert runs[2].steps[-1]["steps_run"] == runs[2].steps[0]["steps_run"]  # stopped at a round's end
