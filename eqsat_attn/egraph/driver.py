"""Run named rule sets on an e-graph under limits, answering index-math questions between rounds.

Each iteration runs the shape/dtype analysis to saturation, then every "raise" rule set
once (on a large e-graph up to `RAISE_PASSES` times), then every "rewrite" rule set twice (EGGLOG_NOTES: raising before analyses before
layout rules; see `_round_schedule`), one rule set at a time, with the e-node and time limits
checked after each. After it, questions the rules asked (`ask`) are answered in Python. The run
stops when nothing changed and no question is open (saturated), or at a limit."""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from typing import Any

from egglog import EGraph, Schedule, bindings, seq
from egglog.runtime import resolve_callable
from egglog.egraph_state import span

from ..limits import Limits
from . import index_math
from .analysis import ANALYSIS_RULES, analysis
from .egglog_batch import commands_in_one_call
from .encode import EncodingCommands, declare_language, encoding_commands
from .language import answer, ask
from .relevance import RuleSymbols, Symbol, SymbolNames, relevant_rules, rule_symbols
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
    #: per iteration: e-nodes, rules fired, steps run (the analysis and each rule set's run: fewer
    #: than a round's where a limit stopped the run within the iteration)
    steps: list[dict] = field(default_factory=list)


def egraph_size(egraph: EGraph) -> int:
    """Number of e-nodes over all functions (terms, analyses and tables).

    The sum of ``egraph.all_function_sizes()`` (the tables of declared functions), read without
    building a Python callable per table: the driver asks after every rule set's run."""
    state = egraph._state
    (output,) = state.run_program(bindings.PrintSize(span(1), None))
    assert isinstance(output, bindings.PrintAllFunctionsSize)
    declared = state.egg_fn_to_callable_refs
    return sum(size for name, size in output.sizes if declared.get(name))


def _literal_tree(termdag: bindings.TermDag, tid: int, memo: dict[int, Any]) -> Any:
    """A term of literals and vectors as Python values (vec-of -> tuple), memoised per term."""
    if tid in memo:
        return memo[tid]
    term = termdag.get(tid)
    if isinstance(term, bindings.TermLit):
        out = term.value.value
    elif isinstance(term, bindings.TermApp):
        out = () if term.name == "vec-empty" else tuple(_literal_tree(termdag, a, memo) for a in term.args)
    else:
        raise ValueError(f"unexpected term {term!r} in a table of literals")
    memo[tid] = out
    return out


def table_rows(egraph: EGraph, fn: Any) -> list[tuple]:
    """Rows of a table over primitives, read straight from egglog's term DAG (fast)."""
    ref, _ = resolve_callable(fn)
    egg_name = egraph._state.callable_ref_to_egg(ref)[0]
    cmd = bindings.PrintFunction(span(1), egg_name, None, None, bindings.DefaultPrintFunctionMode())
    (output,) = egraph._state.run_program(cmd)
    termdag = output.termdag  # each attribute access copies the DAG: read it once
    memo: dict[int, Any] = {}
    return [_literal_tree(termdag, call, memo) for call, _ in output.terms]


def _vec_text(values: tuple[int, ...]) -> str:
    return f"(vec-of {' '.join(map(str, values))})" if values else "(vec-empty)"


class QuestionAnswerer:
    """Answers the `ask` relation's new questions with `index_math`."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self.rows_read = -1  # size of the `ask` table when it was last read

    def __call__(self, egraph: EGraph) -> int:
        state = egraph._state
        answer_fn = state.callable_ref_to_egg(resolve_callable(answer)[0])[0]
        ask_fn = state.callable_ref_to_egg(resolve_callable(ask)[0])[0]
        (size,) = state.run_program(bindings.PrintSize(span(1), ask_fn))
        if size.size == self.rows_read:  # questions are only ever added: nothing new to answer
            return 0
        self.rows_read = size.size
        commands = []
        for kind, *vecs in table_rows(egraph, ask):
            sig = (kind, *vecs)
            if sig in self.seen:
                continue
            self.seen.add(sig)
            outs = index_math.solve(kind, *vecs)
            if outs is None:
                continue
            args = " ".join(_vec_text(v) for v in vecs)
            commands.extend(
                f'(set ({answer_fn} "{kind}" {args} {k}) {_vec_text(out)})' for k, out in enumerate(outs)
            )
        if commands:  # egglog text is far cheaper to submit than Python expressions
            egraph._state.egraph.parse_and_run_program("\n".join(commands))
        return len(commands)


def schedule_command(egraph: EGraph, schedule: Schedule) -> bindings._Command:
    """``schedule`` as one egglog command, converted (and its rule sets registered) once.

    ``egraph.run`` converts its schedule and every rule in it again on each call, then
    translates the report back to Python declarations: together more than egglog's own run
    time on small graphs. The driver converts once and reads egglog's report directly.
    """
    egraph._add_decls(schedule)
    return egraph._state.run_schedule_to_egg(schedule.schedule)


def run_schedule(egraph: EGraph, command: bindings._Command) -> bindings.RunReport:
    """Run a command made by `schedule_command`; egglog's report (rule names as egglog keys)."""
    (output,) = egraph._state.run_program(command)
    assert isinstance(output, bindings.RunScheduleOutput)
    return output.report


def family_of(rule_name: str) -> str | None:
    """``transpose.compose#3`` -> ``transpose.compose``; ask halves and analysis rules -> None."""
    if rule_name.endswith("?") or rule_name.startswith("analysis."):
        return None
    return rule_name.split("#", 1)[0]


def _round_steps(rulesets: list[RuleSet]) -> list[RuleSet]:
    """One round after the analysis: every raise rule set once, then the rewrite rule sets twice,
    each a step of its own (the driver checks its limits between steps). The second rewrite pass
    carries on what the first created (transpose chains, and questions answered in earlier
    rounds: repeated layers ask the same ones), so fewer rounds reach the same saturated e-graph
    (12 layers: 14 rounds -> 9, ~15% less saturation time)."""
    raise_ = [r for r in rulesets if r.phase == "raise"]
    rewrite = [r for r in rulesets if r.phase == "rewrite"]
    return [*raise_, *rewrite, *rewrite]


#: passes of a raise rule set (each after the analysis) in one step of a round once the e-graph is
#: past `RAISE_PASSES_FROM_ENODES` e-nodes; they stop early once a pass changes nothing. Raising is
#: a chain of recognitions that read each other's facts (masks, then scores, softmax, attention
#: and its gradients): one pass per round spreads that chain over as many rounds, each of which
#: also runs the transpose rules over the whole e-graph (a jax.grad of jax.nn.dot_product_attention
#: with a bias and a local window raised its backward in round 14, at 26,601 e-nodes).
RAISE_PASSES = 3
#: below this many e-nodes a raise set runs once per round: a round is cheap there, and the
#: extra passes cost small programs 7-20% more time for the same rounds and e-graph
RAISE_PASSES_FROM_ENODES = 4_000


def _step_schedule(rs: RuleSet, rules: Schedule, passes: int = 1) -> Schedule:
    """What one step of a round runs of rule set ``rs`` (its ``rules``: all or a subset): a raise
    set ``passes`` times, each pass but the first after the analysis (its new terms get their
    shapes and dtypes, which its rules read); a rewrite set once."""
    if rs.phase != "raise" or passes == 1:
        return rules
    return seq(rules, seq(analysis.saturate(), rules) * (passes - 1))


def _round_schedule(rulesets: list[RuleSet], kept: tuple[bool, ...] | None = None) -> Schedule:
    """One round as one schedule: the analysis to saturation, then `_round_steps` in order
    (``kept``: only the rules `relevant_mask` kept, rule sets with none left out)."""
    subsets = _subsets(rulesets, kept)
    return seq(analysis.saturate(), *(subsets[r.name] for r in _round_steps(rulesets) if subsets[r.name] is not None))


_RELEVANCE: dict[tuple[int, ...], tuple[list[RuleSet], Any]] = {}  # see `_relevance_entries`
_RULE_SYMBOLS: dict[int, tuple[Any, RuleSymbols]] = {}  # id(rule) -> (rule, `relevance.rule_symbols`)


def _symbols_of(rule: Any) -> RuleSymbols:
    """`relevance.rule_symbols` of an egglog rule, once per process (the entry holds the rule,
    so its id is not reused)."""
    found = _RULE_SYMBOLS.get(id(rule))
    if found is None:
        found = _RULE_SYMBOLS[id(rule)] = (rule, rule_symbols(rule.decl))
    return found[1]


_NAMING: dict[tuple[int, ...], tuple[list[Any], EGraph]] = {}
_NAMING_LOCK = threading.RLock()  # a naming e-graph declares tables as they are first named: one thread at a time


def naming_egraph(rulesets: list[RuleSet]) -> EGraph:
    """An e-graph with the declarations of ``rulesets`` and no rule registered, one per process
    for each list of rule sets: it names tables for relevance and builds encodings
    (`encode.encoding_commands`) before an e-graph with only the rules a program needs is picked.
    egglog-python names a table after its declaration, so the names are every e-graph's."""
    key = tuple(id(r.ruleset) for r in rulesets)
    with _NAMING_LOCK:
        found = _NAMING.get(key)
        if found is None:  # the entry holds the rule sets, so their ids are not reused
            egraph = EGraph()
            egraph._add_decls(_round_schedule(rulesets))
            found = _NAMING[key] = ([r.ruleset for r in rulesets], egraph)
    return found[1]


def program_encoding(program: Any, rulesets: list[RuleSet]) -> EncodingCommands:
    """`encode.encoding_commands` of ``program`` built with the naming e-graph of ``rulesets``
    (its ``encoding.symbols`` give `relevant_mask`); valid in any e-graph of those rule sets."""
    with _NAMING_LOCK:
        return encoding_commands(program, naming_egraph(rulesets))


def _relevance_entries(rulesets: list[RuleSet]) -> tuple[list[Any], frozenset[Symbol], dict[str, str]]:
    """For `relevance.relevant_rules`: each rule's (reads, writes) over table names, what the
    analysis rules write, and {ask: answer}; once per process for each list of rule sets."""
    key = tuple(id(r.ruleset) for r in rulesets)
    found = _RELEVANCE.get(key)
    if found is not None:
        return found[1]
    with _NAMING_LOCK:  # the entry holds the rule sets, so their ids are not reused
        found = _RELEVANCE.get(key)
        if found is not None:
            return found[1]
        names = SymbolNames(naming_egraph(rulesets)._state)
        analysis_writes = frozenset().union(*(names.symbols(_symbols_of(r).writes) for r in ANALYSIS_RULES))
        entries = []
        for r in rulesets:
            for rule in r.rules:
                symbols = _symbols_of(rule)
                entries.append((None if symbols.reads is None else names.symbols(symbols.reads), names.symbols(symbols.writes)))
        ask_name, answer_name = (names.table(resolve_callable(fn)[0]) for fn in (ask, answer))
        answered = {ask_name: answer_name} if ask_name and answer_name else {}
        found = _RELEVANCE[key] = (list(rulesets), (entries, analysis_writes, answered))
    return found[1]


#: `relevance.relevant_rules`' answer per (rule sets, program symbols): a model's repeated parts
#: and a function optimized again write the same symbols (a pure function of both; bounded)
_KEPT: dict[tuple, tuple[bool, ...]] = {}
_KEPT_MAX = 256


def relevant_mask(rulesets: list[RuleSet], symbols: frozenset[Symbol]) -> tuple[bool, ...]:
    """For each rule of ``rulesets`` in order, whether it can match a program whose encoding
    wrote ``symbols`` (`encode.Encoding.symbols`; `relevance`)."""
    key = (tuple(id(r.ruleset) for r in rulesets), symbols)  # `_relevance_entries` keeps the ids alive
    kept = _KEPT.get(key)
    if kept is None:
        entries, analysis_writes, answered = _relevance_entries(rulesets)
        kept = tuple(relevant_rules(entries, symbols | analysis_writes, answered))
        if len(_KEPT) >= _KEPT_MAX:
            _KEPT.pop(next(iter(_KEPT)), None)  # the oldest
        _KEPT[key] = kept
    return kept


def _subsets(rulesets: list[RuleSet], kept: tuple[bool, ...] | None) -> dict[str, Schedule | None]:
    """Each rule set's rules where ``kept`` (one flag per rule, `relevant_mask`), by name: its
    whole ruleset, a combination of some of its rules, or None; ``kept`` None: every ruleset."""
    if kept is None:
        return {r.name: r.ruleset for r in rulesets}
    out, start = {}, 0
    for r in rulesets:
        n = len(r.rules)
        out[r.name] = r.subset(kept[start:start + n])
        start += n
    return out


def _relevant_subsets(rulesets: list[RuleSet], relevant_to: frozenset[Symbol] | None) -> dict[str, Schedule | None]:
    """Each rule set's rules that can match a program that wrote ``relevant_to`` (`relevance`),
    by name (`_subsets`); ``relevant_to`` None: every whole ruleset."""
    return _subsets(rulesets, None if relevant_to is None else relevant_mask(rulesets, relevant_to))


def prepare_rulesets(egraph: EGraph, rulesets: list[RuleSet],
                     kept: tuple[bool, ...] | None = None) -> list[bindings._Command] | None:
    """Register ``rulesets`` (and the analysis) in an e-graph before a program is encoded; returns
    the egglog commands that did it (None where `commands_in_one_call` does not keep them).
    ``kept``: only the rules `relevant_mask` kept for the program (None: all of them).

    egglog adds a rule to a filled e-graph several times more slowly than to an empty one
    (48 layers: 0.9 s against 0.13 s for the default rule sets); `run_rulesets` then finds
    them registered. Their commands go to egglog in one call (`commands_in_one_call`: ~0.1 s less).
    """
    with commands_in_one_call(egraph) as sent:
        schedule_command(egraph, _round_schedule(rulesets, kept))
        schedule_command(egraph, analysis.saturate())
        declare_language(egraph)  # the tables an encoding calls, whichever rules are kept
    return None if sent is None else list(sent)


#: an e-graph's registered rules: the rule sets' ids, and the `relevant_mask` kept (None: all)
PoolKey = tuple[tuple[int, ...], tuple[bool, ...] | None]

_PREPARED: dict[PoolKey, tuple[list[Any], list[EGraph]]] = {}
_PREPARED_LOCK = threading.Lock()
#: a pooled e-graph that grew past this many e-nodes in one use is dropped, not pooled again:
#: egglog's ``pop`` restores the e-nodes but not the capacity a run grew, and later runs in that
#: e-graph are slower (one-layer block, 2,855 e-nodes: 20% slower after a 9,270-e-node run in
#: the same e-graph, 5-10x after 200,000), while preparing a fresh one re-registers the rule sets
#: (the default and gradient sets: 0.8-1.8 s in a profile of a jax.grad of jax.nn attention,
#: 11,184 e-nodes, which the former limit of 10,000 made pay it on every call)
POOL_MAX_ENODES = 30_000

#: registrations (and pools) a process keeps, the oldest dropped first: one per combination of
#: rule sets and the rules a program needs (a model has a few: its layer, its embedding and head)
POOL_MAX_KEYS = 32


#: per combination of rule sets (as `_PREPARED`'s keys): the rule sets, the egglog-python state a
#: registration left and the commands it sent egglog (`registered_egraph`)
_REGISTERED: dict[PoolKey, tuple[list[Any], Any, list[bindings._Command]]] = {}


def _bounded(table: dict, key: Any, entry: Any) -> Any:
    """``table[key]``, set to ``entry`` if absent, the oldest key dropped past `POOL_MAX_KEYS`
    (call holding `_PREPARED_LOCK`)."""
    if key not in table and len(table) >= POOL_MAX_KEYS:
        table.pop(next(iter(table)))
    return table.setdefault(key, entry)


def registered_egraph(rulesets: list[RuleSet], kept: tuple[bool, ...] | None = None) -> EGraph:
    """A new e-graph with ``rulesets`` registered (`prepare_rulesets`). egglog-python converts the
    rule sets to egglog commands for each e-graph; the process's first registration keeps them and
    the state it left, and later ones send egglog the same commands with a copy of that state (the
    same e-graph: same commands, same order): default and gradient rule sets 1.2 -> 0.8 s. A
    pooled e-graph that grew too large is replaced this way (`prepared_egraph`). ``kept``: only
    those rules (`relevant_mask`), a registration of its own."""
    egglog_rulesets = [r.ruleset for r in rulesets]
    key = (tuple(map(id, egglog_rulesets)), kept)
    egraph = EGraph()
    with _PREPARED_LOCK:
        found = _REGISTERED.get(key)
    if found is not None:
        _, state, commands = found
        replayed = state.copy()  # the declarations and egglog names the commands were made with
        replayed.egraph = egraph._state.egraph
        egraph._state = replayed
        replayed.run_program(*commands)
        return egraph
    commands = prepare_rulesets(egraph, rulesets, kept)
    if commands is not None:
        state = egraph._state.copy()
        state.egraph = None  # set for each e-graph made from it: this one is not kept alive
        with _PREPARED_LOCK:  # the entry keeps the rulesets alive, so their ids are not reused
            _bounded(_REGISTERED, key, (egglog_rulesets, state, commands))
    return egraph


def pooled_egraphs(rulesets: list[RuleSet], kept: tuple[bool, ...] | None = None) -> list[EGraph]:
    """The idle prepared e-graphs the pool holds for ``rulesets`` (``kept``: registered with only
    those rules), a copy of the list."""
    with _PREPARED_LOCK:
        entry = _PREPARED.get((tuple(id(r.ruleset) for r in rulesets), kept))
        return list(entry[1]) if entry else []


@contextmanager
def prepared_egraph(rulesets: list[RuleSet], kept: tuple[bool, ...] | None = None,
                    steps_for: tuple[bool, ...] | None = None) -> Iterator[EGraph]:
    """An e-graph with ``rulesets`` registered and nothing else, reverted when the block ends;
    ``kept``: only the rules `relevant_mask` kept for the program about to be encoded in it.

    Registering the default rule sets costs ~0.3 s per e-graph; a process keeps prepared
    e-graphs (one per combination of rule sets and kept rules, per concurrent user) and hands
    one out between egglog's ``push`` and ``pop``, so only its first optimization pays. egglog's
    push copies every registered rule and pop drops them (default rule sets: ~0.1 s; a GPT-2
    layer's kept rules: a quarter of that), hence registering only the rules a program needs.
    One that grew past `POOL_MAX_ENODES` is dropped instead: a later run gets a freshly prepared one.
    ``steps_for``: the `relevant_mask` of the program about to run (``kept`` or more): its steps'
    commands are made before the push and kept with the e-graph (`StepCommands`), so a later
    run of a program that keeps the same rules converts and registers nothing.
    """
    egglog_rulesets = [r.ruleset for r in rulesets]
    key = (tuple(map(id, egglog_rulesets)), kept)
    with _PREPARED_LOCK:  # the entry keeps the rulesets alive, so their ids are not reused
        _, idle = _bounded(_PREPARED, key, (egglog_rulesets, []))
        egraph = idle.pop() if idle else None
    if egraph is None:
        egraph = registered_egraph(rulesets, kept)
    if steps_for is not None:
        _prepare_step_commands(egraph, rulesets, steps_for)
    egraph.push()
    try:
        yield egraph
    finally:
        grown = egraph_size(egraph)
        egraph.pop()  # raises if egglog cannot revert: the e-graph is then not reused
        if grown <= POOL_MAX_ENODES:
            with _PREPARED_LOCK:
                idle.append(egraph)


class StepCommands:
    """The egglog commands of `run_rulesets`' steps for the rules ``mask`` kept (None: all): the
    analysis, each step of a round (`_round_steps`, rule sets with no kept rule left out) and
    the steps of a round past `RAISE_PASSES_FROM_ENODES` e-nodes (`large_steps`).

    Making them converts each step's schedule (`schedule_command`), which registers the
    combination of the rules kept (an egglog ruleset per mask) and hashes every rule of it: in
    the shared e-graph, after a push, again on every optimization (a jax.grad of attention:
    0.14-0.17 s). A pooled e-graph keeps them (`_prepare_step_commands`, before its push: what
    they register survives the pop)."""

    def __init__(self, egraph: EGraph, rulesets: list[RuleSet], mask: tuple[bool, ...] | None) -> None:
        self._subsets = _subsets(rulesets, mask)
        self._kept = [r for r in _round_steps(rulesets) if self._subsets[r.name] is not None]  # others cannot match
        self.analysis = schedule_command(egraph, analysis.saturate())
        self.steps = [("analysis", self.analysis)] + [(r.name, schedule_command(egraph, self._subsets[r.name]))
                                                     for r in self._kept]
        self._large: dict[int, list[tuple[str, bindings._Command]]] = {}  # by RAISE_PASSES

    def large_steps(self, egraph: EGraph) -> list[tuple[str, bindings._Command]]:
        """The steps of a round past `RAISE_PASSES_FROM_ENODES` e-nodes (`_step_schedule` with
        `RAISE_PASSES`), in ``egraph`` (the one the steps were made in): those `keep_large_steps`
        made, else made now (they register nothing new: the kept combinations are the steps')."""
        kept = self._large.get(RAISE_PASSES)
        if kept is not None:
            return kept
        return [self.steps[0]] + [
            (r.name, schedule_command(egraph, _step_schedule(r, self._subsets[r.name], RAISE_PASSES)))
            for r in self._kept]

    def keep_large_steps(self, egraph: EGraph) -> None:
        """Make `large_steps` now and keep them."""
        self._large[RAISE_PASSES] = self.large_steps(egraph)


#: masks whose `StepCommands` one pooled e-graph keeps (the oldest dropped first; what they
#: registered stays: an egglog ruleset naming the kept rules, no table and no e-node)
STEP_COMMANDS_PER_EGRAPH = 64
_STEP_COMMANDS_ATTR = "_eqsat_attn_step_commands"


def _step_key(rulesets: list[RuleSet], mask: tuple[bool, ...] | None) -> tuple:
    return tuple(id(r.ruleset) for r in rulesets), mask


def _prepare_step_commands(egraph: EGraph, rulesets: list[RuleSet], mask: tuple[bool, ...] | None) -> None:
    """Make and keep with ``egraph`` the `StepCommands` of ``mask``, with nothing pushed: what
    their conversion registers is part of the e-graph every later pop restores."""
    kept: dict = egraph.__dict__.setdefault(_STEP_COMMANDS_ATTR, {})
    key = _step_key(rulesets, mask)
    if key in kept:
        kept[key] = kept.pop(key)  # the most recent last
        return
    commands = StepCommands(egraph, rulesets, mask)
    commands.keep_large_steps(egraph)  # made now, with nothing pushed
    if len(kept) >= STEP_COMMANDS_PER_EGRAPH:
        kept.pop(next(iter(kept)))
    kept[key] = commands


def _pooled_step_commands(egraph: EGraph, rulesets: list[RuleSet], mask: tuple[bool, ...] | None) -> StepCommands | None:
    """The `StepCommands` `_prepare_step_commands` kept with ``egraph`` for ``mask``, or None."""
    return egraph.__dict__.get(_STEP_COMMANDS_ATTR, {}).get(_step_key(rulesets, mask))


_clock = time.perf_counter  # the safety net's clock (tests replace it)


def _limit_reached(egraph: EGraph, limits: Limits, start: float, stop_when: StopWhenFired | None = None,
                   fired_before: int = 0, fired_now: int = 0, step_name: str | None = None,
                   rounds_after: int = 0) -> str | None:
    """Which limit a run has passed, checked between steps: e-nodes first (deterministic), then
    ``stop_when`` (deterministic; the counts, step name and rounds as `StopWhenFired.reached` takes
    them), then the clock (a safety net); None while within all."""
    size = egraph_size(egraph)
    if size > limits.nodes:
        return f"e-node limit ({limits.nodes})"
    if stop_when is not None:
        reason = stop_when.reached(fired_before, fired_now, step_name, size, rounds_after)
        if reason:
            return reason
    if _clock() - start > limits.seconds:
        return f"time limit ({limits.seconds:g} s)"
    return None


@dataclass(frozen=True)
class StopWhenFired:
    """Stop a run once rule family ``family`` (or any of several) has fired and either a run of
    its rule set has then fired none of them (raising has settled) past ``settled_enodes``
    e-nodes, or the e-graph has passed ``enodes``. Both count work: a run stops at the same step
    on any machine. The pipeline restarts from the program extracted there
    (`pipeline.optimize_part`)."""

    family: str | tuple[str, ...]  # "rule_set.family", or several counted together
    settled_enodes: int
    enodes: int
    required: str | None = None  # a family that must have fired before the run stops (None: any)
    #: whole rounds the run goes on after the one where the families first fired before either
    #: criterion may stop it (a gradient's backward reaches dQ and dK rounds after dV)
    grace_rounds: int = 0

    def armed(self, fired: Counter[str]) -> bool:
        """Whether the run may stop, given each family's matches so far."""
        return self.required is None or fired[self.required] > 0

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family,) if isinstance(self.family, str) else tuple(self.family)

    @property
    def rulesets(self) -> frozenset[str]:
        return frozenset(f.split(".", 1)[0] for f in self.families)

    def reached(self, fired_before: int, fired_now: int, step_name: str | None, size: int,
                rounds_after: int = 0) -> str | None:
        """``fired_before``: the families' matches before this step; ``fired_now``: in this step
        (``step_name`` None: checked between iterations, not after a step); ``rounds_after``: whole
        rounds run since the one where they first fired."""
        if rounds_after < self.grace_rounds:
            return None
        name = " or ".join(self.families)
        if fired_before and step_name in self.rulesets and not fired_now and size > self.settled_enodes:
            return f"{name} settled, at {size} e-nodes (over {self.settled_enodes})"
        if (fired_before or fired_now) and size > self.enodes:
            return f"{name} fired, at {size} e-nodes (over {self.enodes})"
        return None


def run_rulesets(
    egraph: EGraph, rulesets: list[RuleSet], limits: Limits, answerer: QuestionAnswerer | None = None,
    stop_when: StopWhenFired | None = None, relevant_to: frozenset[Symbol] | None = None,
) -> RunResult:
    """Saturate ``egraph`` with ``rulesets`` under ``limits``.

    Each round runs as steps (the analysis to saturation, then each rule set of `_round_steps`),
    the same schedule as `_round_schedule`, with the e-node and time limits checked after each
    step: a run stops within one rule set's run of either. Iterations and e-nodes count work, so
    where they stop a run its result is the same on any machine; ``limits.seconds`` is a safety
    net, and a run it stops warns (RuntimeWarning) that its result may differ elsewhere.

    ``answerer``: pass the same `QuestionAnswerer` to successive runs on one e-graph (the
    explorer's steps) so questions answered before are not answered and submitted again.
    ``stop_when``: also stop after the step where it is reached (`StopWhenFired`; the run is
    then not saturated, and its stop reason says why).
    ``relevant_to``: what the e-graph's program wrote (`encode.Encoding.symbols`): only the rules
    that can match it, or what rules that can match write, are run (`relevance`; the e-graph
    and the counts are those of the full rule sets).
    """
    start = _clock()
    result = RunResult()
    answerer = answerer if answerer is not None else QuestionAnswerer()
    fired: Counter[str] = Counter()
    watched = stop_when.families if stop_when else ()  # the families stop_when counts
    first_fired: int | None = None  # the iteration where they had first fired, stop_when armed
    mask = None if relevant_to is None else relevant_mask(rulesets, relevant_to)
    commands = _pooled_step_commands(egraph, rulesets, mask) or StepCommands(egraph, rulesets, mask)
    analysis_command, steps = commands.analysis, commands.steps
    large_steps: list[tuple[str, bindings._Command]] | None = None  # once past RAISE_PASSES_FROM_ENODES
    size = egraph_size(egraph)
    for iteration in range(limits.iterations):
        step: Counter[str] = Counter()
        updated = False
        stopped = None
        steps_run = 0
        if size > RAISE_PASSES_FROM_ENODES and large_steps is None:
            large_steps = commands.large_steps(egraph)
        for name, command in (large_steps if size > RAISE_PASSES_FROM_ENODES else steps):
            before = sum(fired[f] + step[f] for f in watched)
            report = run_schedule(egraph, command)
            steps_run += 1
            updated = updated or report.updated
            for key, n in report.num_matches_per_rule.items():
                family = family_of(key)
                if family is not None and n:
                    step[family] += n
            now = sum(fired[f] + step[f] for f in watched) - before
            armed = stop_when if stop_when and stop_when.armed(fired + step) else None
            if armed and first_fired is None and before + now:
                first_fired = iteration
            rounds_after = 0 if first_fired is None else iteration - first_fired - 1  # whole ones
            stopped = _limit_reached(egraph, limits, start, armed, before, now, name, rounds_after)
            if stopped:
                break
        fired.update(step)
        answered = 0 if stopped else answerer(egraph)
        result.iterations = iteration + 1
        size = egraph_size(egraph)
        result.steps.append({"iteration": iteration + 1, "egraph_nodes": size, "rules_fired": dict(step),
                             "steps_run": steps_run})
        if not stopped and not updated and answered == 0:
            result.saturated = True
            result.stop_reason = "saturated"
            break
        armed = stop_when if stop_when and stop_when.armed(fired) else None
        rounds_after = 0 if first_fired is None else iteration - first_fired
        stopped = stopped or _limit_reached(egraph, limits, start, armed, sum(fired[f] for f in watched),
                                            rounds_after=rounds_after)
        if stopped:
            result.stop_reason = stopped
            break
    else:
        result.stop_reason = f"iteration limit ({limits.iterations})"
    while not result.saturated:  # every term extraction may choose gets its shape and dtype
        run_schedule(egraph, analysis_command)  # (a saturated run ended with the analysis complete)
        if answerer(egraph) == 0:
            break
    result.rules_fired = dict(fired)
    result.egraph_nodes = egraph_size(egraph)
    result.seconds = _clock() - start
    if result.stop_reason.startswith("time limit"):
        warnings.warn(
            f"eqsat_attn: saturation stopped at its {result.stop_reason}, a safety net, after "
            f"{result.iterations} iteration(s) and {result.egraph_nodes} e-nodes: the result depends on this "
            "machine's speed. Limits.iterations and Limits.nodes count work and give the same result anywhere: "
            "lower them (or raise Limits.seconds)", RuntimeWarning, stacklevel=2)
    return result
