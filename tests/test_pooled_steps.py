"""A pooled e-graph keeps its programs' step commands (driver.StepCommands): a later run
converts and registers nothing, and runs exactly as in a fresh e-graph, whatever ran before."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention_corpus import CASES
from eqsat_attn.capture import capture
from eqsat_attn.egraph import driver, encode, resolve, run_rulesets
from eqsat_attn.egraph.encode import encoding_commands
from eqsat_attn.limits import Limits
from eqsat_attn.pipeline import GRADIENT_RULES

LIMITS = Limits(iterations=3, nodes=20_000)


def _program(name):
    case = next(c for c in CASES if c.name == name)
    return capture(case.fn, *case.args()).program


def _mlp_program():
    def mlp(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    return capture(mlp, np.zeros((4, 8), np.float32), np.zeros((8, 16), np.float32), np.zeros((16, 8), np.float32)).program


def _run(program, rulesets):
    """One run in the pool's e-graph holding every rule (``kept`` None, as a jax.grad program
    runs), its step commands prepared before the push as the pipeline does; the run's steps,
    matches, e-nodes, stop reason and the serialized size read in the block."""
    built = encoding_commands(program, driver.naming_egraph(rulesets))
    mask = driver.relevant_mask(rulesets, built.encoding.symbols)
    with driver.prepared_egraph(rulesets, None, steps_for=mask) as egraph:
        run = run_rulesets(egraph, rulesets, LIMITS, relevant_to=encode(program, egraph, built=built).symbols)
    return run.steps, run.rules_fired, run.egraph_nodes, run.stop_reason


def test_runs_do_not_depend_on_what_the_pooled_egraph_ran_before(monkeypatch):
    """A gradient program, then an MLP and a forward attention (other masks) in the same pooled
    e-graph, then the gradient again: its run is the same as its first, and its second run
    converts no schedule (the commands came with the e-graph)."""
    monkeypatch.setattr(driver, "_PREPARED", {})  # a pool of this test's own
    rulesets = [*resolve(None), *resolve([GRADIENT_RULES])]
    grad = _program("mask_key_padding_grad")
    first = _run(grad, rulesets)
    assert len(driver.pooled_egraphs(rulesets)) == 1
    for other in (_mlp_program(), _program("sfdp01_extreme")):
        _run(other, rulesets)
    converted = []
    real = driver.schedule_command
    monkeypatch.setattr(driver, "schedule_command", lambda egraph, schedule: converted.append(schedule) or real(egraph, schedule))
    again = _run(grad, rulesets)
    assert converted == []
    assert again == first
    assert len(driver.pooled_egraphs(rulesets)) == 1  # the same e-graph served every run


def test_an_egraph_outside_the_pool_converts_its_steps_each_run(monkeypatch):
    """`run_rulesets` on an e-graph the pool did not prepare makes its commands itself."""
    rulesets = resolve(["transpose", "canonical"])
    program = _mlp_program()
    converted = []
    real = driver.schedule_command
    monkeypatch.setattr(driver, "schedule_command", lambda egraph, schedule: converted.append(schedule) or real(egraph, schedule))
    egraph = driver.registered_egraph(rulesets)
    before = len(converted)
    enc = encode(program, egraph)
    run = run_rulesets(egraph, rulesets, LIMITS, relevant_to=enc.symbols)
    assert len(converted) > before and run.iterations >= 1
