"""Run named rule sets on an e-graph under limits, answering index-math questions between rounds.

Each iteration runs the shape/dtype analysis to saturation, then every "raise" rule set
once, then every "rewrite" rule set once (EGGLOG_NOTES: raising before analyses before
layout rules). After it, questions the rules asked (`ask`) are answered in Python. The run
stops when nothing changed and no question is open (saturated), or at a limit.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from egglog import EGraph, get_callable_args, seq, set_

from ..pipeline import Limits
from . import index_math
from .analysis import analysis
from .extract import _py
from .language import answer, ask, ivec
from .rulesets import RuleSet


@dataclass
class RunResult:
    """What a saturation run did."""

    rules_fired: dict[str, int] = field(default_factory=dict)
    egraph_nodes: int = 0
    saturated: bool = False
    iterations: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    steps: list[dict] = field(default_factory=list)  # per iteration: nodes, rules fired


def egraph_size(egraph: EGraph) -> int:
    """Number of e-nodes over all functions (terms, analyses and tables)."""
    return sum(size for _, size in egraph.all_function_sizes())


class QuestionAnswerer:
    """Answers the `ask` relation's new questions with `index_math`."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()

    def __call__(self, egraph: EGraph) -> int:
        actions = []
        for key in egraph.function_values(ask):
            kind, *vecs = (_py(a) for a in get_callable_args(key))
            sig = (kind, *vecs)
            if sig in self.seen:
                continue
            self.seen.add(sig)
            outs = index_math.solve(kind, *vecs)
            if outs is None:
                continue
            args = [ivec(v) for v in vecs]
            actions.extend(set_(answer(kind, *args, k)).to(ivec(out)) for k, out in enumerate(outs))
        if actions:
            egraph.register(*actions)
        return len(actions)


def family_of(rule_name: str) -> str | None:
    """``transpose.compose#3`` -> ``transpose.compose``; ask halves and analysis rules -> None."""
    if rule_name.endswith("?") or rule_name.startswith("analysis."):
        return None
    return rule_name.split("#", 1)[0]


def run_rulesets(egraph: EGraph, rulesets: list[RuleSet], limits: Limits) -> RunResult:
    """Saturate ``egraph`` with ``rulesets`` under ``limits``."""
    start = time.perf_counter()
    result = RunResult()
    answerer = QuestionAnswerer()
    ordered = [r.ruleset for r in rulesets if r.phase == "raise"] + [r.ruleset for r in rulesets if r.phase == "rewrite"]
    fired: Counter[str] = Counter()
    for iteration in range(limits.iterations):
        report = egraph.run(seq(analysis.saturate(), *ordered))
        step: Counter[str] = Counter()
        for key, n in report.num_matches_per_rule.items():
            family = family_of(str(getattr(key, "name", None) or key))
            if family is not None and n:
                step[family] += n
        fired.update(step)
        answered = answerer(egraph)
        result.iterations = iteration + 1
        size = egraph_size(egraph)
        result.steps.append({"iteration": iteration + 1, "egraph_nodes": size, "rules_fired": dict(step)})
        if not report.updated and answered == 0:
            result.saturated = True
            result.stop_reason = "saturated"
            break
        if size > limits.nodes:
            result.stop_reason = f"e-node limit ({limits.nodes})"
            break
        if time.perf_counter() - start > limits.seconds:
            result.stop_reason = f"time limit ({limits.seconds} s)"
            break
    else:
        result.stop_reason = f"iteration limit ({limits.iterations})"
    while True:  # every term extraction may choose gets its shape and dtype
        egraph.run(analysis.saturate())
        if answerer(egraph) == 0:
            break
    result.rules_fired = dict(fired)
    result.egraph_nodes = egraph_size(egraph)
    result.seconds = time.perf_counter() - start
    return result
