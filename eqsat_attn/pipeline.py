"""Program -> Program: the optimizer stage between capture and lowering.

`optimize_program` is the single entry point the decorator, the CLI and the explorer use.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from egglog import EGraph

from .attention_misses import PreferAttention, has_attention, unchosen_attention_note
from .blocks import Split, splice, split_repeated, union, unpack
from .choices import (
    BACKENDS, EXTRACTORS, check_choice, check_cost_model, check_limits, cost_model_from_name, rule_names,
)
from .cost import current_device_model, program_cost
from .egraph import encode, extract_program, resolve, run_rulesets
from .egraph.driver import RunResult, StopWhenFired, prepared_egraph, program_encoding, registered_egraph, relevant_mask
from .egraph.ilp import extract_ilp, read_graph
from .egraph.refine import extract_best
from .egraph.rulesets import DEFAULT_RULESETS
from .ir import Program
from .limits import Limits
from .nested import merge, optimize_bodies
from .qkv_layouts import EXPLAIN_MAX_ENODES, LazyLayoutDecision, is_qkv_block


@dataclass(frozen=True)
class OptimizeOptions:
    """What the user chose in ``ea.optimize(...)``."""

    rules: Sequence[str] | None = None  # rule-set names or paths (one name: a list of one); None = defaults
    cost_model: object | None = None  # an eqsat_attn.cost model or its name (choices.COST_MODEL_NAMES); None = default
    backend: str = "auto"  # "auto" | "pallas" | "reference": how Attention is lowered
    limits: Limits = field(default_factory=Limits)
    extractor: str = "greedy-dag"  # "greedy-dag" | "tree" (egglog's) | "ilp" (exact, small graphs)
    precision: str = "exact"  # PRECISIONS: how far raising may change values
    reuse_blocks: bool = True  # optimize identical repeated parts (a model's layers) once: eqsat_attn.blocks

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_choice("backend", self.backend, BACKENDS)
        check_choice("extractor", self.extractor, EXTRACTORS)
        check_limits(self.limits)
        if self.rules is not None:
            object.__setattr__(self, "rules", tuple(rule_names(self.rules)))  # "transpose" is ("transpose",)
        if isinstance(self.cost_model, str):  # by name, as the explorer and the CLI take it
            model = None if self.cost_model == "default" else cost_model_from_name(self.cost_model, self.backend)
            object.__setattr__(self, "cost_model", model)
        elif self.cost_model is not None:
            check_cost_model(self.cost_model)

    def rule_names(self, program: Program | None = None) -> list[str] | None:
        """The rule sets to run: the chosen ones, plus the precision's own (`PRECISION_RULES`); with
        the default sets, a gradient's too (`gradient_rules`)."""
        extra = gradient_rules(program) if self.rules is None and program is not None else []
        if self.precision == "exact":
            return None if self.rules is None and not extra else [*(self.rules or DEFAULT_RULESETS), *extra]
        names = [*(DEFAULT_RULESETS if self.rules is None else self.rules), *extra]
        own = PRECISION_RULES[self.precision]
        return names if own in names else [*names, own]


#: the rule set raising a jax.grad program's attention backward (rules/attention.py): its rules
#: match only where softmax's backward is written out, so the default sets add it only then
GRADIENT_RULES = "attention_grad"

#: the rule set raising V's gradient alone (Pᵀ · do where Q and K are not differentiated): opt in,
#: ``ea.optimize(fn, rules=[*DEFAULT_RULESETS, VALUE_GRADIENT_RULES])`` (see `gradient_rules`)
VALUE_GRADIENT_RULES = "attention_value_grad"


def writes_softmax_backward(program: Program) -> bool:
    """Whether ``program`` holds ``sum(-(P * dP))`` over an axis, the row sum of softmax's VJP as
    jax.grad writes it (every jax.grad of attention through jax.nn.softmax has one), ``sum(P * -w)``,
    as it writes the VJP of a softmax divided by its sum by hand, or ``sum(-kept)`` with ``kept``
    a product's row sum reshaped to [.., 1], as it writes jax.nn.softmax's before jax 0.12; or the
    VJP written by hand (a custom_vjp's backward): ``dP - sum(P * dP)`` or ``P * dP - P * sum(P * dP)``
    (`textbook_softmax_backward`)."""
    nodes = program.nodes

    def row_sum_of_backward(node) -> bool:
        summed = nodes[node.inputs[0]]
        if summed.op == "neg":
            negated = nodes[summed.inputs[0]]
            if negated.op == "reshape" and nodes[negated.inputs[0]].op == "reduce_sum":
                negated = nodes[nodes[negated.inputs[0]].inputs[0]]
            return negated.op == "mul"
        return summed.op == "mul" and any(nodes[i].op == "neg" for i in summed.inputs)

    return (any(node.op == "reduce_sum" and row_sum_of_backward(node) for node in nodes)
            or textbook_softmax_backward(program))


def textbook_softmax_backward(program: Program) -> bool:
    """Whether ``program`` subtracts a broadcast row sum ``r = sum(a * b)`` (or a product with it)
    from a, b or a * b: softmax's VJP written by hand, ``P * (dP - r)`` or ``P * dP - P * r``."""
    nodes = program.nodes
    row_sums = {i: set(nodes[node.inputs[0]].inputs) | {node.inputs[0]} for i, node in enumerate(nodes)
                if node.op == "reduce_sum" and nodes[node.inputs[0]].op == "mul"}
    spread: dict[int, set[int]] = {}  # a row sum broadcast back (through [.., 1] or not)
    for i, node in enumerate(nodes):
        if node.op in ("broadcast_in_dim", "reshape") and (node.inputs[0] in row_sums or node.inputs[0] in spread):
            spread[i] = row_sums.get(node.inputs[0]) or spread[node.inputs[0]]

    def subtracted(node) -> set[int]:
        """What the row sum behind ``node`` (its broadcast, or a product with it) was computed from."""
        if node in spread:
            return spread[node]
        if nodes[node].op == "mul":
            return set().union(*(spread.get(i, set()) for i in nodes[node].inputs))
        return set()

    return any(node.op == "sub" and node.inputs[0] in subtracted(node.inputs[1]) for node in nodes)


def gradient_rules(program: Program) -> list[str]:
    """The gradient rule set ``program`` needs: `GRADIENT_RULES` where it writes out softmax's
    backward. (`VALUE_GRADIENT_RULES` is never added by default: V's gradient alone, Pᵀ · do, is
    also a softmax over the queries contracted with V over the keys, a form that is not attention;
    and beside dQ and dK a dV op of its own would run the backward a second time.)"""
    return [GRADIENT_RULES] if writes_softmax_backward(program) else []


#: "exact": values change only by float reassociation; "fast_math": softmax spellings equal to
#: attention but for Inf/NaN, signed zeros and exp's rounding are raised too; "fp8": attention may
#: run in fp8 (README, "Precision policy").
PRECISIONS = ("exact", "fast_math", "fp8")

#: the rule set each precision but "exact" adds to the chosen ones
PRECISION_RULES = {"fast_math": "attention_fast_math", "fp8": "fp8_policy"}


@dataclass(frozen=True)
class PipelineResult:
    """The chosen program and what the e-graph run did to find it."""

    program: Program
    rules_fired: dict[str, int]
    egraph_nodes: int
    saturated: bool
    cost_before: float
    cost_after: float
    warnings: tuple[str, ...] = ()
    repeated_blocks: int = 0  # identical parts optimized once and reused (0: the whole program at once)
    #: why the chosen program's V layout and projections won, when it is one Q/K/V attention
    #: block: a `qkv_layouts.LazyLayoutDecision` (exact extractions run on its first call)
    layout_decision: Callable[[], object] | None = None
    #: attention found in the e-graph but not chosen, with both predicted costs (attention_misses)
    attention_notes: tuple[str, ...] = ()
    fallback: str | None = None  # why the original program is returned, when optimization failed


def default_cost_model(backend: str = "auto"):
    """The roofline model of the device JAX runs on ("reference" prices attention as plain XLA)."""
    return current_device_model("reference" if backend == "reference" else "pallas")


def saturate(program: Program, options: OptimizeOptions) -> tuple[EGraph, Any, RunResult]:
    """Encode ``program`` in a new e-graph, run the rule sets; returns (egraph, encoding, run
    result), the e-graph the caller's to keep. Use `saturated` where it is read only in a block:
    that e-graph comes from the process's pool, with no rule registration to pay."""
    rulesets = resolve(options.rule_names(program))
    egraph = registered_egraph(rulesets)  # rules first: egglog registers them faster in an empty e-graph
    encoding = encode(program, egraph)
    run = run_rulesets(egraph, rulesets, options.limits, relevant_to=encoding.symbols)
    return egraph, encoding, run


@contextmanager
def saturated(program: Program, options: OptimizeOptions, limits: Limits | None = None,
              stop_when: StopWhenFired | None = None) -> Iterator[tuple[EGraph, Any, RunResult]]:
    """`saturate` in a pooled e-graph (`driver.prepared_egraph`), reverted when the block ends:
    read, extract from it only inside the block. ``limits``: instead of ``options.limits``.

    The pooled e-graph holds every rule of the rule sets, or, for a program that can match at most
    `OWN_REGISTRATION_SHARE` of them (`driver.relevant_mask`), only those: egglog's push and pop
    copy every rule an e-graph holds (~0.1 s for the default sets), and registering a small
    share once costs less than copying the rest on every run. The e-graph a run builds is the
    same either way (only the kept rules run); a larger share would pay its own registration
    (0.3-2 s) for each new program where the shared one is registered once per process."""
    rulesets = resolve(options.rule_names(program))
    built = program_encoding(program, rulesets)  # its symbols say which rules it needs
    kept = relevant_mask(rulesets, built.encoding.symbols)
    own = kept if sum(kept) <= OWN_REGISTRATION_SHARE * len(kept) else None
    with prepared_egraph(rulesets, own, steps_for=kept) as egraph:
        encoding = encode(program, egraph, built=built)
        yield egraph, encoding, run_rulesets(egraph, rulesets, limits or options.limits, stop_when=stop_when,
                                             relevant_to=encoding.symbols)


#: a program that can match at most this share of the rules runs in an e-graph registered with
#: only those (`saturated`): a model's embedding and head (4-26% of the default rules) and its
#: layers (44-58%: GPT-2, BERT, Llama), forward attention (27-44%); jax.grad programs (83-85%),
#: whose own registration costs the most (1-2 s), share the e-graph holding every rule
OWN_REGISTRATION_SHARE = 0.6


RESTART_ENODES = 30_000
"""A run still growing at this many e-nodes restarts once from its best program (`optimize_part`)."""

RAISED_SETTLED_ENODES = 8_000
"""A run past this many e-nodes whose raise rule set has raised attention and then raises no
more in a run of its own restarts once from its best program (`optimize_part`). Below it, the
e-graph is left to saturate: a Flax nnx block (7,000 e-nodes) finds its cheapest layout only
then (restarting it at 3,000-7,000 e-nodes chose programs predicted up to 15% slower)."""

RAISED_RESTART_ENODES = 12_000
"""A run that has raised attention and is past this many e-nodes restarts once from its best
program, raising settled or not (`optimize_part`)."""

GRADIENT_GRACE_ROUNDS = 2
"""Whole rounds a gradient program's run goes on after its backward first raised before it may
restart: V's gradient is raised at once, Q's and K's once the scores' cotangent has passed back
through their modifications (a where-mask, a scale: a round each). Restarting at once kept
jax.nn.dot_product_attention's causal gradient written out under jax 0.11, whose e-graph passes
`RAISED_RESTART_ENODES` as its backward first raises."""

RAISED = "attention_raise.attention"
"""The rule family that raises attention (rules/attention.py)."""

RAISED_GRADIENTS = "attention_grad.attention_gradients"
"""The rule family that raises a gradient's attention backward (rules/attention.py): a restart
watches it as it watches `RAISED` (a jax.grad program may raise only through it)."""


def optimize_part(program: Program, options: OptimizeOptions, model,
                  notes: list[str] | None = None) -> tuple[Program, RunResult, Any]:
    """Saturate and extract one program; returns (chosen program, the driver's RunResult, the
    serialized e-graph it was chosen from, or None: `egraph.refine.Extraction.graph`).

    A run that has not saturated at `RESTART_ENODES` e-nodes (and may grow further under
    ``options.limits``) restarts once from the program extracted there: attention raised by then is
    one op in the new e-graph, so the layout rules no longer permute the scores, masks and softmax
    it replaced (5-D einsums with masks grew past 100,000 e-nodes that way, in 35-110 s). Both
    stages count work, so the program chosen is the same on any machine; the cheaper is kept.
    (A restart can miss what one longer run finds, so the threshold sits above the e-graphs of
    ordinary blocks: a 3-layer Flax stack saturates at 6,700 e-nodes.) A run restarts as well
    once attention has been raised (`RAISED` fired; in a program writing out softmax's backward,
    `RAISED_GRADIENTS` too) and then either the raise rule set's next run
    raises no more past `RAISED_SETTLED_ENODES` e-nodes (the variants found later, a causal flag
    among them, are in the e-graph by then) or the e-graph is past `RAISED_RESTART_ENODES`: what
    grows after that is mostly transposes of the scores and masks attention replaces
    (jax.nn.dot_product_attention with a mask: 12,000 e-nodes at the raise, 30,000 one rule set
    later), and the second run relates attention's layouts from one op.

    ``notes``: receives a line when the e-graph holds attention the chosen program does not use.
    ``options.limits`` bound each e-graph run (with repeated blocks: each distinct block's).
    Never returns something the model predicts slower than ``program``.
    """
    first = replace(options.limits, nodes=min(options.limits.nodes, RESTART_ENODES))
    # a program writing out softmax's backward restarts only once its backward has raised too: its
    # forward raises first, and restarting there left Flax nnx MHA's backward written out
    gradient = GRADIENT_RULES in (options.rule_names(program) or ())
    stop_when = StopWhenFired((RAISED, RAISED_GRADIENTS), RAISED_SETTLED_ENODES, RAISED_RESTART_ENODES,
                              required=RAISED_GRADIENTS if gradient else None,
                              grace_rounds=GRADIENT_GRACE_ROUNDS if gradient else 0)
    chosen, run, graph = _saturate_and_extract(program, options, first, model, notes, stop_when)
    early = run.stop_reason.startswith(stop_when.families)  # settled, or fired past RAISED_RESTART_ENODES
    if run.saturated or not (early or (options.limits.nodes > RESTART_ENODES and run.stop_reason.startswith("e-node"))):
        return chosen, run, graph
    second, rerun, second_graph = _saturate_and_extract(chosen, options, options.limits, model, notes)
    if program_cost(second, model) <= program_cost(chosen, model):
        chosen, graph = second, second_graph
    fired = dict(run.rules_fired)
    for name, count in rerun.rules_fired.items():
        fired[name] = fired.get(name, 0) + count
    return chosen, replace(
        rerun, rules_fired=fired, iterations=run.iterations + rerun.iterations, seconds=run.seconds + rerun.seconds,
        egraph_nodes=max(run.egraph_nodes, rerun.egraph_nodes),  # the larger e-graph of the two
        steps=run.steps + rerun.steps, stop_reason=f"{rerun.stop_reason}, after a restart at {run.egraph_nodes} e-nodes ({run.stop_reason})",
    ), graph


def _saturate_and_extract(program: Program, options: OptimizeOptions, limits: Limits, model,
                          notes: list[str] | None, stop_when: StopWhenFired | None = None) -> tuple[Program, RunResult, Any]:
    """One e-graph run of ``program`` under ``limits`` (and ``stop_when``), the extraction of its
    best program (`egraph.refine.extract_best`, or the exact extractor), and the (encoding,
    serialized e-graph) pair a layout explanation reads, or None."""
    graph = None
    with saturated(program, options, limits, stop_when) as (egraph, encoding, run):
        if options.extractor == "ilp":
            graph = read_graph(egraph)
            chosen = extract_ilp(egraph, encoding, model, graph=graph).program
        else:
            found = extract_best(egraph, encoding, model, extractor=options.extractor,
                                 keep_graph=run.egraph_nodes <= EXPLAIN_MAX_ENODES)
            chosen, graph = found.program, found.graph
        if notes is not None and run.rules_fired.get("attention_raise.attention") and not has_attention(chosen):
            extractor = "greedy-dag" if options.extractor == "ilp" else options.extractor
            steered, _ = extract_program(egraph, encoding, PreferAttention(model), extractor=extractor)
            note = unchosen_attention_note(chosen, steered, model)
            if note:
                notes.append(note)
    if chosen.output_types != program.output_types:
        raise AssertionError(
            f"extracted program has output types {chosen.output_types}, expected {program.output_types}"
        )
    if program_cost(chosen, model) > program_cost(program, model):
        chosen = program
    return chosen, run, None if graph is None else (encoding, graph)


def optimize_program(program: Program, options: OptimizeOptions = OptimizeOptions(), *, warn: bool = True) -> PipelineResult:
    """Return the cheapest program equivalent to ``program`` under the options' cost model.

    The bodies of its scan and checkpoint nodes are optimized first, as programs of their own
    with the same options (`eqsat_attn.nested`); the result counts their rules, e-nodes and costs.
    With ``options.reuse_blocks``, a program made of repeated identical parts (a stack of
    layers; `eqsat_attn.blocks`) has each distinct part optimized once and spliced back.
    Any internal failure returns the original program, its reason in ``fallback``, and a
    RuntimeWarning unless ``warn=False`` (the decorator warns itself, naming the function):
    optimizing never changes what the user computes.
    """
    program, bodies = optimize_bodies(program, lambda body: optimize_program(body, options, warn=warn), options.backend)
    return merge(_optimize_flat(program, options, warn), bodies)


def _optimize_flat(program: Program, options: OptimizeOptions, warn: bool) -> PipelineResult:
    """`optimize_program` for ``program`` itself, its opaque nodes (and their bodies) as they are."""
    model = options.cost_model or default_cost_model(options.backend)
    cost_before = program_cost(program, model)
    try:
        split = split_repeated(program) if options.reuse_blocks else None
        attention_notes: list[str] = []
        graph = None
        if split is None:
            chosen, run, graph = optimize_part(program, options, model, attention_notes)
            runs = [run]
        else:
            optimized, runs = _optimize_parts(split, options, model, attention_notes)
            chosen = splice(program, split, optimized)
        if chosen.output_types != program.output_types:
            raise AssertionError(
                f"extracted program has output types {chosen.output_types}, expected {program.output_types}"
            )
        if _effect_calls(chosen) != _effect_calls(program):
            raise AssertionError("extracted program does not run the original effects in their order")
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the original program
        message = f"optimization failed ({type(exc).__name__}: {exc}); running the original program"
        if warn:
            warnings.warn(f"eqsat_attn: {message}", RuntimeWarning, stacklevel=4)
        return PipelineResult(program, {}, 0, False, cost_before, cost_before, (message,), fallback=message)
    cost_after = program_cost(chosen, model)
    if cost_after > cost_before:  # extraction is greedy: never return something predicted slower
        chosen, cost_after = program, cost_before
    fired: Counter[str] = Counter()
    for run in runs:
        fired.update(run.rules_fired)
    saturated = all(run.saturated for run in runs)
    notes = tuple(
        f"saturation stopped at the {run.stop_reason}; best program found so far used" for run in runs if not run.saturated
    )[:1]
    return PipelineResult(
        chosen, dict(fired), sum(run.egraph_nodes for run in runs), saturated, cost_before, cost_after, notes,
        split.repeats if split is not None else 0,
        _layout_decision(model, chosen, runs, graph) if split is None else None,
        tuple(dict.fromkeys(attention_notes)) if chosen is not program else (),
    )


def _optimize_parts(split: Split, options: OptimizeOptions, model,
                    notes: list[str]) -> tuple[dict[Program, Program], list[RunResult]]:
    """Each distinct part of a `blocks.Split` optimized: the repeated unit on its own, the parts
    that occur once (before and after the run) together in one e-graph run when their result
    cuts back into parts (`blocks.union`, `blocks.unpack`), else each on its own."""
    once = [p for p in split.distinct if sum(q.program == p for q in split.parts) == 1]
    optimized, runs = {}, []
    if len(once) > 1:
        joined, run, _ = optimize_part(union(once), options, model, notes)
        pieces = unpack(joined, once)
        if pieces is not None:
            optimized.update(zip(once, pieces))
            runs.append(run)
    for part in split.distinct:
        if part not in optimized:
            optimized[part], run, _ = optimize_part(part, options, model, notes)
            runs.append(run)
    return optimized, runs


def _effect_calls(program: Program) -> list:
    """The opaque calls ``program`` runs for their effects, in order (compared by identity)."""
    return [program.nodes[i].params["call"] for i in program.effects]


def _layout_decision(model, chosen: Program, runs: list[RunResult], graph):
    """A lazy explanation of the chosen projection/V layout for a program with one attention
    whose Q/K/V are projections of one input, read from ``graph`` (the encoding and serialized
    e-graph the program was extracted from: nothing is saturated again); None for anything else."""
    if not is_qkv_block(chosen):
        return None
    egraph_nodes = sum(run.egraph_nodes for run in runs)
    if egraph_nodes > EXPLAIN_MAX_ENODES or graph is None:
        return LazyLayoutDecision.unavailable(
            f"the e-graph has {egraph_nodes} e-nodes; the exact extractions behind this explanation run up to "
            f"{EXPLAIN_MAX_ENODES} (eqsat_attn.qkv_layouts.layout_decision on an explorer's e-graph tries anyway)")
    encoding, serialized = graph
    return LazyLayoutDecision(serialized, encoding, model, chosen)
