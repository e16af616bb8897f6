"""Interactive exploration of one function's e-graph: ``ex = ea.explore(fn, *args)``.

    ex = ea.explore(block, params, x)
    ex.run("attention_raise")                 # one round of one rule set; returns a Step
    ex.run("canonical", "transpose", iterations=3)
    ex.run(limits=ea.Limits(iterations=30))   # the default rule sets to saturation
    ex.history                                # every Step: e-graph size, rules fired, time
    best = ex.extract()                       # Extraction: program, predicted cost, attention
    ex.compare({"h100": "roofline-h100", "cpu": "roofline-cpu", "bytes": "bytes"})
    ex.why("attention")                       # every alternative e-node of attention's e-classes, priced
    ex.why("attention").svg("why.svg")        # the same as ranked bar charts
    ex.svg("a.svg", focus="attention", fold=True)  # the e-classes around attention, priced, choice in red
    ex.svg("egraph.svg")                      # drawing (small graphs) or summary (large ones)

In a notebook, the explorer, its steps, extractions, comparisons and explanations display
as HTML. Everything here reads the same egglog `EGraph` the optimizer uses
(`eqsat_attn.pipeline.saturate`'s building blocks), so what you see is what `ea.optimize` does.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egglog import EGraph, bindings
from egglog.egraph import to_runtime_expr

from . import ir
from .capture import Captured, capture
from .cost import program_cost
from .cost.model import CostModel
from .choices import EXTRACTORS, check_choice, check_limits, cost_model_from_name, rule_names
from .egraph import encode, resolve, run_rulesets
from .egraph.driver import QuestionAnswerer, egraph_size, registered_egraph
from .egraph.extract import RawCostModel
from .egraph.ilp import extract_program_ilp
from .egraph.refine import extract_best
from .explore_charts import comparison_html, why_svg
from .explore_draw import ENGINES, MAX_WIDTH, Picture, build_picture, render_svg, summary_svg, to_dot
from .explore_graph import (
    ATTENTION_CTORS, EGraphView, Pricing, classes_holding, match_terms, nearest_named, price, priced_members,
    shown_nodes, type_text,
)
from .pipeline import Limits, OptimizeOptions
from .report import AttentionInfo, _format_seconds, attention_infos

__all__ = [
    "Comparison", "Explanation", "Exploration", "Extraction", "Step", "cost_model_from_name", "explore",
    "program_summary",
]

# A drawing is readable up to about this many tensor e-nodes; beyond it `svg` draws a summary.
DRAW_LIMIT = 400
# Alternatives drawn per e-class in a focused view (the cheapest; the chosen one always).
FOCUS_ALTERNATIVES = 4


# ----------------------------------------------------------------------------------- cost models
# (by name: `eqsat_attn.choices`, shared with ea.optimize and the command line)


def _model_name(model: Any) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _fmt_cost(value: float, model: Any) -> str:
    """Seconds for roofline models, plain numbers (bytes) otherwise."""
    if value >= 1e29:
        return "unpriced"
    if _model_name(model).startswith("roofline"):
        return _format_seconds(value)
    return f"{value:.4g}"


# ----------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Step:
    """One `Exploration.run` call: what ran, how the e-graph grew and which rules fired."""

    index: int
    rulesets: tuple[str, ...]
    iterations: int
    nodes_before: int
    nodes_after: int
    rules_fired: dict[str, int]
    seconds: float
    saturated: bool
    stop_reason: str
    per_iteration: tuple[dict, ...] = ()

    def __str__(self) -> str:
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(self.rules_fired.items(), key=lambda kv: (-kv[1], kv[0])))
        return (
            f"step {self.index}: {'+'.join(self.rulesets)} x{self.iterations} iteration(s) in "
            f"{self.seconds:.3f} s: {self.nodes_before} -> {self.nodes_after} e-nodes"
            f" ({'saturated' if self.saturated else self.stop_reason}); fired: {fired or 'nothing'}"
        )

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"


#: ops that run attention (bf16/f32, packed QKV, fp8)
ATTENTION_OPS = ("attention", "packed_attention", "attention_fp8", "attention_vjp")


def program_summary(program: ir.Program) -> dict[str, Any]:
    """Node count, attention ops and their V layouts, and materialized transposes of a program."""
    live = program.live_nodes()
    ops = Counter(program.nodes[i].op for i in live)
    attention = [program.nodes[i] for i in live if program.nodes[i].op in ATTENTION_OPS]
    v_layouts = [str(n.params["v_layout"]) if "v_layout" in n.params else f"packed {n.params['packed_layout']}"
                 for n in attention]
    transposes = sum(
        1 for i in live
        if program.nodes[i].op == "transpose" and tuple(program.nodes[i].params["perm"]) != tuple(range(len(program.nodes[i].params["perm"])))
    )
    return {"nodes": len(live), "attention": len(attention), "v_layouts": v_layouts, "transposes": transposes,
            "dots": ops.get("dot_general", 0)}


@dataclass(frozen=True)
class Extraction:
    """The program extraction chose under one cost model, with its predicted cost."""

    program: ir.Program
    cost: float  # program_cost of the chosen program under `model`
    original_cost: float  # program_cost of the captured program under `model`
    model: Any
    attention: tuple[AttentionInfo, ...]
    extracted_cost: float  # the extraction's cost (DAG cost over e-nodes, each paid once)
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        return program_summary(self.program)

    def __str__(self) -> str:
        s = self.summary
        lines = [
            f"cost model {_model_name(self.model)}: {_fmt_cost(self.original_cost, self.model)} -> "
            f"{_fmt_cost(self.cost, self.model)} (extracted in {self.seconds:.3f} s)",
            f"{s['nodes']} nodes, {s['attention']} attention (V layouts {', '.join(s['v_layouts']) or '-'}), "
            f"{s['transposes']} transposes",
            *(f"  {a}" for a in self.attention),
            "",
            str(self.program),
        ]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head, _, prog = str(self).partition("\n\n")
        return f"<pre>{html.escape(head)}</pre><details><summary>program</summary><pre>{html.escape(prog)}</pre></details>"


@dataclass(frozen=True)
class Comparison:
    """Each cost model's chosen program, priced under every model."""

    models: dict[str, Any]
    rows: list[dict[str, Any]]  # one per model: name, summary fields, costs {model name: cost}, program
    original: dict[str, Any] | None = None  # the captured program, same fields

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["chosen by", "nodes", "attention", "V layouts", "transposes",
                   *(f"cost under {n}" for n in self.models)]
        body = []
        for row in self.rows + ([self.original] if self.original else []):
            body.append([
                row["model"], str(row["nodes"]), str(row["attention"]), ", ".join(row["v_layouts"]) or "-",
                str(row["transposes"]),
                *(_fmt_cost(row["costs"][n], m) + (" *" if n == row["model"] else "") for n, m in self.models.items()),
            ])
        return headers, body

    def table(self):
        """A rich Table (``*`` marks each model's cost of its own choice)."""
        from rich.table import Table

        headers, body = self._cells()
        t = Table(title="extraction under each cost model (* = the model's own choice)")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i in (0, 3) else "right")
        for r in body:
            t.add_row(*r)
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        headers, body = self._cells()
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])

    def _repr_html_(self) -> str:
        headers, body = self._cells()
        everyone = self.rows + ([self.original] if self.original else [])
        costs = [[row["costs"][n] for n in self.models] for row in everyone]
        return comparison_html(headers, body, costs, first_cost_column=len(headers) - len(self.models))


@dataclass(frozen=True)
class Alternative:
    """One e-node of an e-class, priced: its own cost plus the cheapest way to compute its operands."""

    description: str
    own_cost: float
    operands_cost: float
    layouts: dict[str, str] = field(default_factory=dict)
    operand_transposes: int = 0  # materialized transposes in the operands' cheapest programs

    @property
    def total(self) -> float:
        return self.own_cost + self.operands_cost


@dataclass(frozen=True)
class EClassAlternatives:
    """The alternatives of one e-class holding the op asked about."""

    label: str  # the original program node(s) this e-class contains, e.g. "%20 dot_general"
    alternatives: list[Alternative]

    @property
    def best(self) -> Alternative:
        return min(self.alternatives, key=lambda a: a.total)


@dataclass(frozen=True)
class Explanation:
    """`Exploration.why`: for each e-class holding ``op``, every member e-node priced."""

    op: str
    model: Any
    classes: list[EClassAlternatives]

    def __str__(self) -> str:
        return self.format()

    def format(self, limit: int | None = None) -> str:
        """The explanation as text; ``limit``: show only the cheapest alternatives of each e-class."""
        if not self.classes:
            return f"no e-class holds a {self.op} e-node (run the rule sets that raise it first)"
        out = [f"why: alternatives of each e-class holding {self.op!r}, under {_model_name(self.model)}"
               " (total = own + cheapest operands; shared operands counted once per alternative)"]
        for cls in self.classes:
            out.append(f"\ne-class of {cls.label}: {len(cls.alternatives)} alternatives")
            best = cls.best
            ranked = sorted(cls.alternatives, key=lambda a: a.total)
            for alt in ranked[:limit]:
                mark = "->" if alt is best else "  "
                out.append(
                    f" {mark} {_fmt_cost(alt.total, self.model):>10}  (own {_fmt_cost(alt.own_cost, self.model)},"
                    f" operands {_fmt_cost(alt.operands_cost, self.model)}, {alt.operand_transposes} transposes)"
                    f"  {alt.description}"
                )
            if limit is not None and len(ranked) > limit:
                out.append(f"    ... {len(ranked) - limit} more (Exploration.why shows all)")
        return "\n".join(out)

    def svg(self, path: str | Path | None = None, limit: int | None = 10) -> str:
        """The alternatives of each e-class as ranked bars (own cost + cheapest operands), cheapest
        ``limit`` of each; written to ``path`` if given."""
        fmt = lambda v: _fmt_cost(v, self.model)  # noqa: E731
        heading = (f"why: alternatives of each e-class holding {self.op!r} under {_model_name(self.model)}"
                   if self.classes else self.format())
        svg = why_svg([(f"e-class of {c.label}", c.alternatives) for c in self.classes], fmt, heading, limit)
        if path is not None:
            Path(path).write_text(svg)
        return svg

    def _repr_html_(self) -> str:
        return (f"{self.svg()}<details><summary>as text</summary><pre>{html.escape(str(self))}</pre></details>")


# ----------------------------------------------------------------------------------- explorer
class Exploration:
    """A captured program and one e-graph you step rule sets on, extract from and inspect."""

    def __init__(self, captured: Captured, *, fn: Callable[..., Any] | None = None) -> None:
        self.captured = captured
        self.program = captured.program
        self.fn = fn
        # the rule sets `run()` runs by default, registered first: egglog adds rules to an empty
        # e-graph faster, and a process registers a combination once (`driver.registered_egraph`)
        self.egraph = registered_egraph(resolve(OptimizeOptions().rule_names(self.program)))
        start = time.perf_counter()
        self.encoding = encode(self.program, self.egraph)
        self.encode_seconds = time.perf_counter() - start
        self.history: list[Step] = []
        self._answerer = QuestionAnswerer()  # shared by every step: old questions are not re-answered
        self._serialized: tuple[int, dict] | None = None
        self._view: tuple[dict, EGraphView] | None = None
        self._pricing: tuple[EGraphView, Pricing] | None = None
        #: (e-graph size, model, e-node ids) of the last `extract` whose exact re-solve chose the program
        self._refined: tuple[int, CostModel, frozenset[str]] | None = None
        self._model: Any = None  # the last extraction's cost model: pictures price under it

    # ------------------------------------------------------------------ rewriting
    @property
    def size(self) -> int:
        return egraph_size(self.egraph)

    def run(self, *rulesets: str | Sequence[str], iterations: int = 1, limits: Limits | None = None) -> Step:
        """Run rule sets (names or rule-file paths; none = the default list `ea.optimize` would run
        on this program: the gradient rules too where it writes out softmax's backward) and record a `Step`.

        ``iterations`` rounds (each: analyses, raising sets, rewriting sets, index-math answers),
        or ``limits`` for full control (e.g. ``Limits(iterations=30)`` to saturate).
        """
        if limits is None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        lim = check_limits(limits) if limits is not None else Limits(iterations=iterations)
        names = [name for names in rulesets for name in rule_names(names)]  # run("a", "b") or run(["a", "b"])
        sets = resolve(names or OptimizeOptions().rule_names(self.program))  # the defaults ea.optimize runs
        before = self.size
        result = run_rulesets(self.egraph, sets, lim, answerer=self._answerer)
        self._serialized = None
        step = Step(
            index=len(self.history) + 1,
            rulesets=tuple(r.name for r in sets),
            iterations=result.iterations,
            nodes_before=before,
            nodes_after=result.egraph_nodes,
            rules_fired=dict(result.rules_fired),
            seconds=result.seconds,
            saturated=result.saturated,
            stop_reason=result.stop_reason,
            per_iteration=tuple(result.steps),
        )
        self.history.append(step)
        return step

    def saturate(self, *rulesets: str, limits: Limits = Limits()) -> Step:
        """Run rule sets (default list) until nothing changes or a limit is reached."""
        return self.run(*rulesets, limits=limits)

    @property
    def rules_fired(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.history:
            total.update(s.rules_fired)
        return dict(total)

    # ------------------------------------------------------------------ extraction
    def extract(self, cost_model: str | CostModel | None = None, extractor: str = "greedy-dag") -> Extraction:
        """The cheapest program in the e-graph under ``cost_model`` (default: this device's roofline)."""
        check_choice("extractor", extractor, EXTRACTORS)
        model = cost_model_from_name(cost_model)
        self._model = model
        start = time.perf_counter()
        if extractor == "ilp":
            chosen, extracted = extract_program_ilp(self.egraph, self.encoding, model)
        else:
            found = extract_best(self.egraph, self.encoding, model, extractor=extractor)  # as optimize extracts
            chosen, extracted = found.program, found.cost
            self._refined = None if found.picks is None else (self.size, model, found.picks)
            self._pricing = None  # pictures mark the e-nodes this extraction chose
        seconds = time.perf_counter() - start
        kernel = getattr(model, "attention_kernel", "reference")
        return Extraction(
            program=chosen,
            cost=program_cost(chosen, model),
            original_cost=program_cost(self.program, model),
            model=model,
            attention=tuple(attention_infos(chosen, kernel)),
            extracted_cost=float(extracted),
            seconds=seconds,
        )

    def compare(self, models: Mapping[str, str | CostModel] | Sequence[str]) -> Comparison:
        """Extract under each model; price every chosen program under every model."""
        if not isinstance(models, Mapping):
            models = {str(m): m for m in models}
        resolved = {name: cost_model_from_name(m) for name, m in models.items()}
        rows = []
        current = self._model  # comparing does not change the model pictures price under
        for name, model in resolved.items():
            ext = self.extract(model)
            self._model = current
            costs = {other: program_cost(ext.program, m) for other, m in resolved.items()}
            rows.append({"model": name, **ext.summary, "costs": costs, "program": ext.program})
        original = {"model": "(original)", **program_summary(self.program),
                    "costs": {other: program_cost(self.program, m) for other, m in resolved.items()},
                    "program": self.program}
        return Comparison(resolved, rows, original)

    # ------------------------------------------------------------------ explanation
    def serialized(self) -> dict:
        """egglog's serialized e-graph as JSON (nodes, classes with their let-bound names)."""
        size = self.size
        if self._serialized is None or self._serialized[0] != size:
            ser = self.egraph._serialize(split_primitive_outputs=False)
            self._serialized = (size, json.loads(ser.to_json()))
        return self._serialized[1]

    def why(self, op: str = "attention", cost_model: str | CostModel | None = None, max_alternatives: int = 64) -> Explanation:
        """For each e-class holding an ``op`` e-node ("attention": attention, packed or fp8
        attention), wherever it sits (a program node's e-class, or one under a reshape or inside a
        grouped form that no program node names): every alternative e-node, with its own cost and
        the cost of the cheapest operands it needs (e.g. standard attention beside transposed-V
        attention plus the transpose of V that it needs), cheapest ``max_alternatives`` of each.

        Priced as `pricing` prices (greedy DAG under the same model, as extraction): an
        alternative's operand cost is the DAG cost of the union of its operands' cheapest terms,
        so a subterm its operands share is paid once.
        """
        model = cost_model_from_name(cost_model)
        view = self.view()
        holding = classes_holding(view, op)
        if not holding:
            return Explanation(op, model, [])
        pricing = self.pricing(model)
        classes = []
        for eclass in holding:
            alts = [Alternative(p.description, p.own, p.operands, p.layouts, p.operand_transposes)
                    for p in priced_members(view, pricing, eclass)[:max_alternatives]]
            classes.append(EClassAlternatives(self._place(view, eclass), alts))
        return Explanation(op, model, classes)

    def _place(self, view: EGraphView, eclass: str) -> str:
        """Where an e-class sits: its program nodes ("%20 dot_general"), else its e-class id, type
        and the program node nearest above it ("c57 f32[2,4,64,16] under %26 reshape")."""
        def named(c: str) -> str:
            ids = [int(x[1:]) for x in view.names.get(c, "").split(",") if x[1:].isdigit()]
            return ", ".join(f"%{i} {self.program.nodes[i].op}" for i in ids) or view.names.get(c, "")

        if eclass in view.names:
            return named(eclass)
        above, hops = nearest_named(view, eclass)
        where = f" under {named(above)}" if above else " (used by no program node)"
        return f"{view.short_id(eclass)} {type_text(view.types.get(eclass))}{where}"

    def _extract_many(self, exprs: list[Any], model: CostModel) -> tuple[Any, list[int | None]]:
        """Greedy-DAG extraction of several terms already in the e-graph, in one call."""
        if not exprs:
            return None, []
        state = self.egraph._state
        roots = []
        for e in exprs:
            runtime = to_runtime_expr(e)
            self.egraph._add_decls(runtime)
            sort = state.type_ref_to_egg(runtime.__egg_typed_expr__.tp)
            egg_expr = state.typed_expr_to_egg(runtime.__egg_typed_expr__, expr_to_let=True)
            roots.append((sort, state.egraph.eval_expr(egg_expr)[1]))
        adapter = _bindings_cost_model(self.egraph, self.encoding, model)
        termdag, results = bindings.extract_best_with_dag_cost_model(state.egraph, roots, adapter, extractor="greedy-dag")
        return termdag, [None if r is None else r[1] for r in results]

    # ------------------------------------------------------------------ drawing
    def summary(self) -> dict[str, Any]:
        """Counts of e-classes and e-nodes per tensor op (plus analysis/table rows)."""
        view = self.view()
        per_op = Counter(n.ctor for n in view.nodes.values())
        return {"e-nodes": len(view.nodes), "e-classes": len(view.classes), "per op": dict(per_op.most_common()),
                "all rows (incl. analyses)": self.size}

    def view(self) -> EGraphView:
        """The tensor part of the e-graph as it is now (`eqsat_attn.explore_graph.EGraphView`)."""
        data = self.serialized()
        if self._view is None or self._view[0] is not data:
            self._view = (data, EGraphView.parse(data))
        return self._view[1]

    def pricing(self, cost_model: str | CostModel | None = None) -> Pricing:
        """Every e-node and e-class priced under a model (default: the last `extract`'s, else this
        device's roofline), with the cheapest program's e-nodes (greedy DAG, as `extract`)."""
        model = self._model if cost_model is None and self._model is not None else cost_model_from_name(cost_model)
        view = self.view()
        cached = self._pricing
        if cached is not None and cached[0] is view and cached[1].model is model:
            return cached[1]
        chosen = None
        refined = self._refined
        if refined is not None and refined[0] == self.size and refined[1] is model:  # what `extract` chose
            chosen = frozenset(k for k in refined[2] if k in view.nodes)
        elif self.encoding.root is not None:  # mark what extraction picks (greedy DAG), ties included
            termdag, terms = self._extract_many([self.encoding.root], model)
            chosen = None if terms[0] is None else match_terms(view, termdag, terms[0])
        pricing = price(view, model, chosen)
        self._pricing = (view, pricing)  # the view itself is kept: a new one is a changed e-graph
        return pricing

    def picture(self, focus: str | int | None = None, depth: int = 2, fold: bool = False,
                cost_model: str | CostModel | None = None, max_alternatives: int | None = None) -> Picture:
        """What `svg` draws: the e-classes around ``focus`` (all without one), priced and marked."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}")
        if max_alternatives is not None and (isinstance(max_alternatives, bool) or not isinstance(max_alternatives, int)
                                             or max_alternatives < 1):
            raise ValueError(f"max_alternatives must be a positive int or None, got {max_alternatives!r}")
        view = self.view()
        pricing = self.pricing(cost_model)
        fmt = lambda v: _fmt_cost(v, pricing.model)  # noqa: E731
        if focus is None:
            return build_picture(view, pricing, fmt, fold=fold, max_alternatives=max_alternatives)
        targets = view.resolve_focus(focus)
        if not targets:
            raise ValueError(
                f"focus {focus!r} names nothing in the e-graph: give 'attention', an op or constructor name"
                f" ({', '.join(sorted(self.summary()['per op']))}), an e-class id such as"
                f" {view.short_id(next(iter(view.classes)))!r} or a program node such as '%3'"
                + (" (run the rule sets that raise attention first)" if focus == "attention" else ""))
        limit = FOCUS_ALTERNATIVES if max_alternatives is None else max_alternatives

        def through(c: str) -> list[str]:  # the focus: every drawn alternative; beyond it, the cheapest
            if c in targets:
                return shown_nodes(view, pricing, c, fold, limit)
            return [k for k in view.classes[c] if k == pricing.best.get(c) or k in pricing.chosen]

        levels = view.neighbourhood(targets, depth, through)
        return build_picture(view, pricing, fmt, classes=sorted(levels, key=lambda c: (-levels[c], c)),
                             focus=targets, fold=fold, max_alternatives=limit, levels=levels,
                             heading=f"e-graph around {focus} (depth {depth})")

    def dot(self, focus: str | int | None = None, depth: int = 2, fold: bool = False,
            cost_model: str | CostModel | None = None, max_width: int = MAX_WIDTH) -> str:
        """Graphviz DOT text of `picture` (one cluster per e-class, the chosen program in red)."""
        return to_dot(self.picture(focus, depth, fold, cost_model), max_width)

    def svg(self, path: str | Path | None = None, focus: str | int | None = None, depth: int = 2,
            fold: bool = False, cost_model: str | CostModel | None = None, max_nodes: int = DRAW_LIMIT,
            max_alternatives: int | None = None, engine: str = "auto", max_width: int = MAX_WIDTH) -> str:
        """Draw the e-graph as SVG (written to ``path`` if given) and return the SVG text.

        ``focus`` ("attention", an op name, an e-class id like ``c57`` or a program node like
        ``%30``) draws only the e-classes within ``depth`` hops of it (operands and users), each
        with its cheapest ``max_alternatives`` e-nodes (default 4); without it the whole e-graph,
        or a summary when it has more than ``max_nodes`` tensor e-nodes. ``fold`` hides identity
        transposes, same-shape reshapes and e-nodes reading only their own e-class. Costs are
        under ``cost_model`` (default: the last `extract`'s); the chosen program is in bold red.
        ``engine``: "dot" (Graphviz), "builtin" or "auto" (dot when installed); the drawing is at
        most ``max_width`` CSS pixels wide.
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if focus is None and len(self.view().nodes) > max_nodes:
            s = self.summary()
            lines = [f"e-graph too large to draw ({s['e-nodes']} tensor e-nodes > {max_nodes}):",
                     f"{s['e-classes']} e-classes, {s['all rows (incl. analyses)']} rows in all tables",
                     "draw a part of it: svg(focus='attention', fold=True) or --focus attention --fold", ""]
            lines += [f"{op:<16} {n:>7}" for op, n in s["per op"].items()]
            svg = summary_svg(lines)
        else:
            picture = self.picture(focus, depth, fold, cost_model, max_alternatives)
            if picture.node_count > max_nodes:
                svg = summary_svg([f"{picture.node_count} e-nodes within {depth} hops of {focus!r} > {max_nodes}:",
                                   "draw fewer: a smaller depth, fold=True or max_alternatives", "",
                                   *picture.title])
            else:
                svg = render_svg(picture, engine, max_width)
        if path is not None:
            Path(path).write_text(svg)
        return svg

    def __str__(self) -> str:
        s = self.summary()
        top = ", ".join(f"{k} {v}" for k, v in list(s["per op"].items())[:8])
        steps = "\n".join(f"  {st}" for st in self.history) or "  (no rule sets run yet: call .run())"
        return (f"Exploration of a {len(self.program.live_nodes())}-node program: e-graph {s['e-nodes']} tensor e-nodes"
                f" in {s['e-classes']} e-classes ({top})\n{steps}")

    def _repr_html_(self) -> str:
        text = f"<pre>{html.escape(str(self))}</pre>"
        try:
            view = self.view()
            focus = None
            if len(view.nodes) > DRAW_LIMIT and any(n.ctor in ATTENTION_CTORS for n in view.nodes.values()):
                focus = "attention"  # too large to draw whole: where attention sits
            svg = self.svg(focus=focus, fold=focus is not None)
            return text + f"<div style='max-height:800px;overflow:auto'>{svg}</div>"
        except Exception as exc:  # noqa: BLE001 - a drawing failure must not hide the text
            return text + f"<p>(no drawing: {html.escape(str(exc))})</p>"


def explore(fn: Callable[..., Any], *args: Any, static_argnums: int | Sequence[int] = (), **kwargs: Any) -> Exploration:
    """Trace ``fn(*args, **kwargs)`` and encode it in a fresh e-graph (no rules run yet)."""
    return Exploration(capture(fn, *args, static_argnums=static_argnums, **kwargs), fn=fn)


# ----------------------------------------------------------------------------------- helpers
def _bindings_cost_model(egraph: EGraph, enc: Any, model: CostModel) -> Any:
    """The extractor's cost model as extraction uses it (raw-value pricing where available)."""
    return RawCostModel(egraph, model).bindings_model()


