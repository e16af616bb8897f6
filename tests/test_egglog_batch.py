"""Registering rule sets with their egglog commands in one call (eqsat_attn.egraph.egglog_batch):
one call to egglog, and an e-graph that behaves as one registered command by command."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from egglog import EGraph

from eqsat_attn.capture import capture
from eqsat_attn.disk_cache import program_digest
from eqsat_attn.egraph import driver, rulesets
from eqsat_attn.egraph.egglog_batch import commands_in_one_call
from eqsat_attn.examples import attention_vt_example
from eqsat_attn.pipeline import OptimizeOptions, optimize_program


class CountingEGraph:
    """egglog's e-graph, counting the commands it is sent and the calls that send them."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.commands = inner, 0, 0

    def run_program(self, *commands: Any) -> Any:
        self.calls += 1
        self.commands += len(commands)
        return self.inner.run_program(*commands)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def registered(batched: bool) -> CountingEGraph:
    egraph = EGraph()
    counting = CountingEGraph(egraph._state.egraph)
    egraph._state.egraph = counting
    batch = commands_in_one_call if batched else lambda _: contextlib.nullcontext()
    with batch(egraph):
        driver.schedule_command(egraph, driver._round_schedule(rulesets.resolve(None)))
    return counting


def test_the_same_commands_go_in_one_call() -> None:
    one, each = registered(batched=True), registered(batched=False)
    assert one.calls == 1 and each.calls == each.commands > 100
    assert one.commands == each.commands


def test_nothing_is_sent_after_an_error() -> None:
    egraph = EGraph()
    counting = CountingEGraph(egraph._state.egraph)
    egraph._state.egraph = counting
    with pytest.raises(RuntimeError, match="stop"):
        with commands_in_one_call(egraph):
            driver.schedule_command(egraph, driver._round_schedule(rulesets.resolve(["canonical"])))
            raise RuntimeError("stop")
    assert counting.calls == 0
    assert "run_program" not in vars(egraph._state)  # egglog-python's own method again


def test_an_optimization_is_the_same_with_commands_sent_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fn, args = attention_vt_example(batch=1, heads=2, seq=8, head_dim=4)
    program = capture(fn, *args).program
    options = OptimizeOptions(extractor="tree")
    results = []
    for batch in (commands_in_one_call, lambda _: contextlib.nullcontext()):
        monkeypatch.setattr(driver, "commands_in_one_call", batch)
        monkeypatch.setattr(driver, "_PREPARED", {})  # a freshly prepared e-graph each time
        monkeypatch.setattr(driver, "_REGISTERED", {})  # its rule sets converted again
        results.append(optimize_program(program, options))
    one, each = results
    assert one.saturated and one.program.count("attention") == 1
    assert program_digest(one.program) == program_digest(each.program)
    assert one.rules_fired == each.rules_fired and one.egraph_nodes == each.egraph_nodes
    assert one.cost_after == each.cost_after


def test_a_registration_sent_again_optimizes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new e-graph for rule sets registered before in the process gets the commands kept from
    that registration (`driver.registered_egraph`: they are not converted again) and optimizes
    exactly as a freshly registered one: the same program, rules fired, e-nodes and cost."""
    fn, args = attention_vt_example(batch=1, heads=2, seq=8, head_dim=4)
    program = capture(fn, *args).program
    options = OptimizeOptions(extractor="tree")
    monkeypatch.setattr(driver, "_REGISTERED", {})
    conversions = []
    prepare = driver.prepare_rulesets
    monkeypatch.setattr(driver, "prepare_rulesets", lambda *a: conversions.append(1) or prepare(*a))
    results = []
    for _ in range(2):
        monkeypatch.setattr(driver, "_PREPARED", {})  # no pooled e-graph: a new one each time
        results.append(optimize_program(program, options))
    assert len(conversions) == 1 and len(driver._REGISTERED) == 1
    fresh, replayed = results
    assert fresh.saturated and fresh.program.count("attention") == 1
    assert program_digest(fresh.program) == program_digest(replayed.program)
    assert fresh.rules_fired == replayed.rules_fired and fresh.egraph_nodes == replayed.egraph_nodes
    assert fresh.cost_after == replayed.cost_after
