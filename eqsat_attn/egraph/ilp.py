"""Exact DAG extraction by integer linear programming (HiGHS), for e-graphs up to a few thousand e-nodes.

The e-graph is read through egglog's serializer (`EGraph.serialize`, JSON: every e-node with
its op, children e-nodes and e-class; shape/dtype analysis values appear as `shape`/`dtype`
function nodes). Each Term e-node is priced by the same `CostModel` as greedy extraction (the
`OpView` is built as `extract.enode_view` builds it); TermList nodes (the outputs list, opaque
operands) are free structure and primitives are parameters, not choices.

The ILP is the standard one for e-graph extraction:

- a binary ``x_n`` per candidate e-node; exactly one node of the root class; at most one per class;
- a chosen node needs one chosen node in each of its child classes, one row per class and child
  class ``c`` for all the class's nodes that read ``c`` (at most one of them is chosen):
  ``sum_{n reads c} x_n <= sum_{m in c} x_m``, summed only over the nodes of ``c`` that do not
  use n's class back (two classes cannot support each other: x = transpose(transpose(x)) is no
  way to compute x). Valid for every acyclic choice, and both lift the LP relaxation, which
  otherwise prices a block's matmuls at almost nothing by letting x and transpose(x) hold each
  other up fractionally, or by spreading a class over its nodes' operand layouts so that each
  layout is paid in part (a row per node asks each child class only for the largest part);
- acyclicity, only inside strongly connected components of the class graph (edges between
  components cannot close a cycle): for two classes that use each other (x and transpose(x)),
  one clique row ``sum x <= 1`` over the nodes of either that use the other; for components of
  three or more classes, an order variable ``t_c`` with ``t_c >= t_c' + 1 - M (1 - x_n)`` for
  each node n of c and child class c' in its component. Nodes that are their own child are
  never chosen. (``acyclicity="lazy"`` instead forbids cycles as solutions show them.)
- HiGHS starts from a greedy-DAG extraction computed here, so the result is never worse;
- minimise ``sum cost_n x_n``: every chosen e-node is paid once (shared subterms once), which
  is the cost `program_cost` gives the decoded program.

The chosen nodes are decoded into an `ir.Program` with the same node construction as
`decode.py`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from egglog import EGraph

from .. import ir
from ..cost.model import CostModel, OpView
from .decode import _Decoder
from .encode import Encoding
from .ctors import FREE_CTORS
from .extract import concat_view, op_view

MAX_ENODES = 5000  # candidate Term/TermList e-nodes reachable from the root
#: branch-and-bound nodes one HiGHS solve may explore: this work count, not the clock, decides
#: where an exact extraction stops short of a proof, so a loaded machine returns the same
#: program as a fast one (HiGHS runs single-threaded with a fixed seed: deterministic). The
#: tests' ILPs (measured over tests/test_ilp.py, test_qkv.py and the fp8 layout decision) prove
#: optimality within 4,969 nodes (bench qkv_layouts' CPU smoke block, 466 candidate e-nodes,
#: 12.6 s on a loaded 2-core machine; the fp8 smoke block's steered variants need up to 1,609,
#: at ~4 ms a node); this allows 4x the most. (Measured with a support row per e-node: the row per
#: class and child class proves tests/test_limits.py's packed-QKV extraction at the root instead
#: of after 1,268 nodes, the transformer block example's for an H100 within ~180.)
MAX_MIP_NODES = 20_000
#: seconds one exact extraction may take: a safety net, above what `MAX_MIP_NODES` nodes take
#: (50-90 s at the rates above); an extraction it stops warns (RuntimeWarning), as its result
#: then depends on the machine's speed and load
TIME_LIMIT_S = 300.0
_HIGHS_LOG = False  # set True to see the solver log
_BANNER_DONE = False  # HiGHS printed (or swallowed) its once-per-process banner
_BANNER_LOCK = threading.Lock()  # extractions may run on threads (HiGHS releases the GIL)
_INFEASIBLE = 1e29  # a node priced at or above this (untyped) is never chosen


def _new_highs(highspy: Any) -> Any:
    """A HiGHS instance that logs only with ``_HIGHS_LOG``. HiGHS prints its banner from C++ on a
    process's first instance, before any option can be set, so that one is made with the
    process's standard output pointed at the null device."""
    global _BANNER_DONE
    with _BANNER_LOCK:
        if _HIGHS_LOG or _BANNER_DONE:
            h = highspy.Highs()
        else:
            sys.stdout.flush()
            saved = os.dup(1)
            try:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 1)
                    h = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            _BANNER_DONE = True
    h.setOptionValue("output_flag", _HIGHS_LOG)
    return h


class ILPExtractionError(RuntimeError):
    """The ILP extractor could not run (graph too large, infeasible, solver failure)."""


@functools.lru_cache(maxsize=4096)
def _ctor(op: str) -> tuple[str, str] | None:
    """("Term" | "TermList", constructor) of a serialized op name, None for other functions
    (remembered: an e-graph spells a few dozen op names over thousands of e-nodes)."""
    for sort in ("TermList_", "Term_"):
        k = op.rfind(sort)
        if k >= 0 and (k == 0 or op[k - 1] in "_."):
            return sort[:-1], op[k + len(sort):]
    return None


@dataclass
class _Graph:
    """The serialized e-graph, indexed."""

    nodes: dict[str, dict[str, Any]]
    class_type: dict[str, str]
    class_nodes: dict[str, list[str]] = field(default_factory=dict)
    root: str | None = None
    #: `sort` and `primitive` answers, remembered (the snapshot never changes; pricing asks the
    #: same e-classes and literals once per e-node that reads them)
    _sorts: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _primitives: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, egraph: EGraph) -> _Graph:
        """The e-graph as it is now (a snapshot: later rewrites do not change it)."""
        serialized = egraph._egraph.serialize([])
        if serialized.truncated_functions or serialized.discarded_functions:
            raise ILPExtractionError(
                f"the e-graph serialization was cut short (truncated {serialized.truncated_functions}, "
                f"discarded {serialized.discarded_functions})"
            )
        data = json.loads(serialized.to_json())
        g = cls(data["nodes"], {c: d.get("type", "") for c, d in data.get("class_data", {}).items()})
        for nid, node in g.nodes.items():
            g.class_nodes.setdefault(node["eclass"], []).append(nid)
            g.class_type.setdefault(node["eclass"], "")
        roots = [c for c, d in data.get("class_data", {}).items() if d.get("let") == "$root"]
        if len(roots) != 1:
            raise ILPExtractionError(f"cannot find the root e-class (let $root) in the serialized e-graph: {roots}")
        g.root = roots[0]
        return g

    def sort(self, eclass: str) -> str:
        found = self._sorts.get(eclass)
        if found is None:
            t = self.class_type.get(eclass, "")
            if t.endswith(".TermList") or t == "TermList":
                found = "TermList"
            elif t.endswith(".Term") or t == "Term":
                found = "Term"
            else:
                found = t
            self._sorts[eclass] = found
        return found

    def primitive(self, nid: str) -> Any:
        """The Python value of a primitive child (i64, f64, String, Vec[i64])."""
        if nid in self._primitives:
            return self._primitives[nid]
        value = self._primitive(nid)
        self._primitives[nid] = value
        return value

    def _primitive(self, nid: str) -> Any:
        node = self.nodes[nid]
        if not nid.startswith("primitive-"):  # a function node whose value is a primitive class
            prims = [m for m in self.class_nodes[node["eclass"]] if m.startswith("primitive-")]
            if not prims:
                raise ILPExtractionError(f"no primitive value in e-class {node['eclass']}")
            return self.primitive(prims[0])
        sort = self.class_type.get(node["eclass"], "")
        op = node["op"]
        if sort.startswith("Vec"):
            return tuple(int(self.primitive(c)) for c in node["children"])
        if sort == "i64":
            return int(op)
        if sort == "f64":
            return float(op)
        if sort == "String":
            try:
                return json.loads(op)
            except json.JSONDecodeError:
                return op.strip('"')
        if sort == "Unit":
            return None
        raise ILPExtractionError(f"unsupported primitive sort {sort!r} ({op!r})")


def read_graph(egraph: EGraph) -> _Graph:
    """A snapshot of ``egraph`` for `extract_program_ilp` (``graph=``)."""
    return _Graph.read(egraph)


def _class_types(g: _Graph) -> dict[str, ir.TensorType]:
    """Term e-class -> (shape, dtype) from the analysis function nodes."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for nid, node in g.nodes.items():
        op = node["op"]
        if not node["children"] or _ctor(op) is not None:
            continue
        if op.endswith("_shape") or op == "shape":
            target = g.nodes[node["children"][0]]["eclass"]
            shapes[target] = tuple(g.primitive(nid))
        elif op.endswith("_dtype") or op == "dtype":
            target = g.nodes[node["children"][0]]["eclass"]
            dtypes[target] = str(g.primitive(nid))
    return {c: ir.TensorType(s, dtypes[c]) for c, s in shapes.items() if c in dtypes}


def _view(g: _Graph, nid: str, types: dict[str, ir.TensorType]) -> OpView | None | float:
    """The OpView of a Term e-node (as `extract.enode_view`); None if free; inf if untyped."""
    sort, ctor = _ctor(g.nodes[nid]["op"])
    if sort != "Term" or ctor in FREE_CTORS:
        return None
    children = g.nodes[nid]["children"]
    if ctor == "concat":  # its operands are a list: priced from its own e-class's type
        own = types.get(g.nodes[nid]["eclass"])
        return math.inf if own is None else concat_view(int(g.primitive(children[-1])), own)
    tensor_classes = [g.nodes[c]["eclass"] for c in children if g.sort(g.nodes[c]["eclass"]) == "Term"]
    if ctor == "packed_attention":
        mask_class = tensor_classes[1]
        if any(_ctor(g.nodes[m]["op"]) == ("Term", "no_mask") for m in g.class_nodes[mask_class]):
            tensor_classes = tensor_classes[:1]
    if ctor in ("attention", "attention_vjp"):
        n_tensors = 3 if ctor == "attention" else 4  # q, k, v (and the gradient's do), then the mask
        mask_class = tensor_classes[n_tensors]
        if any(_ctor(g.nodes[m]["op"]) == ("Term", "no_mask") for m in g.class_nodes[mask_class]):
            tensor_classes = tensor_classes[:n_tensors]
    inputs = []
    for c in tensor_classes:
        if c not in types:
            return math.inf
        inputs.append(types[c])
    statics = [g.primitive(c) for c in children if g.sort(g.nodes[c]["eclass"]) not in ("Term", "TermList")]
    try:
        return op_view(ctor, statics, inputs)
    except Exception:  # noqa: BLE001 - a node whose type cannot be inferred is never chosen
        return math.inf


def _undominated(members: list[str], cost: dict[str, float], children: dict[str, list[str]]) -> list[str]:
    """Drop a node when another of its class costs no more and uses a subset of its child classes.

    Swapping it for the other keeps every solution valid (fewer edges cannot close a cycle) and
    no costlier, so the optimum is unchanged; ties keep the first node.
    """
    keep: list[str] = []
    for i, n in enumerate(members):
        kids = set(children[n])
        dominated = False
        for j, m in enumerate(members):
            if j == i or not set(children[m]) <= kids:
                continue
            if cost[m] < cost[n] or (cost[m] == cost[n] and (set(children[m]) < kids or j < i)):
                dominated = True
                break
        if not dominated:
            keep.append(n)
    return keep


def _sccs(succ: dict[str, set[str]]) -> dict[str, int]:
    """Strongly connected components (iterative Tarjan): class -> component id."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    comp: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    ncomp = 0
    for start in succ:
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp[w] = ncomp
                    if w == v:
                        break
                ncomp += 1
    return comp


class ILPExtraction(NamedTuple):
    """What `extract_ilp` found: the program, its cost under the model (the ILP objective),
    whether HiGHS proved it optimal, and if not, which limit stopped it with its best so far
    ("node limit (N)", "round limit (N)", "time limit (S s)"; "" when optimal or when HiGHS
    could not improve on the warm start for another reason)."""

    program: ir.Program
    cost: float
    optimal: bool
    limit: str = ""
    picks: dict[str, str] | None = None  # e-class -> chosen e-node (serialized ids), reachable ones


def extract_program_ilp(egraph: EGraph, enc: Encoding, model: CostModel, time_limit: float | None = None,
                        **options: Any) -> tuple[ir.Program, float]:
    """(program, cost) of `extract_ilp`: the cheapest program under ``model``, solved exactly."""
    found = extract_ilp(egraph, enc, model, time_limit, **options)
    return found.program, found.cost


def extract_ilp(
    egraph: EGraph,
    enc: Encoding,
    model: CostModel,
    time_limit: float | None = None,
    max_enodes: int = MAX_ENODES,
    acyclicity: str = "order",
    max_rounds: int = 200,
    graph: _Graph | None = None,
    max_nodes: int = MAX_MIP_NODES,
) -> ILPExtraction:
    """The cheapest program in the root's e-class under ``model`` (DAG cost), solved exactly.

    Returns the program, its cost under ``model`` (the ILP objective) and whether that was
    proved optimal: past ``max_nodes`` branch-and-bound nodes per solve (deterministic work) the
    best solution HiGHS found is used. ``time_limit`` (seconds, default `TIME_LIMIT_S`) is a
    safety net: an extraction it stops warns (RuntimeWarning). Raises `ILPExtractionError` if
    more than ``max_enodes`` candidate e-nodes are reachable.

    ``acyclicity``: "order" (one solve: a clique row per pair of classes that use each other,
    big-M order variables for the classes of larger strongly connected components) or "lazy"
    (solve without them, forbid each cycle found in the solution, solve again, up to
    ``max_rounds``; weak when free cycles abound). HiGHS starts from a greedy DAG
    extraction computed here, so the result is never costlier than that start.

    ``graph``: the e-graph as `read_graph` returned it, read once for several extractions (which
    may then run on threads: the e-graph itself is not touched, HiGHS releases the GIL).
    """
    if acyclicity not in ("lazy", "order"):
        raise ValueError(f"acyclicity must be 'lazy' or 'order', got {acyclicity!r}")
    g = graph if graph is not None else _Graph.read(egraph)
    return solve(Problem.build(g, model, max_enodes), enc, time_limit, acyclicity, max_rounds, max_nodes)


@dataclass
class Problem:
    """An e-graph's extraction problem under one cost model: each candidate e-node's price and
    child e-classes, and the e-nodes of each class that can be chosen (typed, not their own
    child, every child class extractable, not dominated by a member of their class)."""

    g: _Graph
    cost: dict[str, float]
    children: dict[str, list[str]]
    alive: dict[str, list[str]]

    @classmethod
    def build(cls, g: _Graph, model: CostModel, max_enodes: int = MAX_ENODES) -> Problem:
        """Price the e-nodes reachable from ``g``'s root under ``model``; raises
        `ILPExtractionError` past ``max_enodes`` candidates or when nothing is extractable."""
        types = _class_types(g)

        # candidate nodes: Term/TermList nodes of the classes reachable from the root
        known: dict[str, list[str]] = {}  # each e-node's child classes, read once

        def child_classes(nid: str) -> list[str]:
            seen = known.get(nid)
            if seen is None:
                seen = known[nid] = []
                for c in g.nodes[nid]["children"]:
                    eclass = g.nodes[c]["eclass"]
                    if g.sort(eclass) in ("Term", "TermList") and eclass not in seen:
                        seen.append(eclass)
            return seen

        reach: list[str] = [g.root]
        seen_classes = {g.root}
        cand: dict[str, list[str]] = {}
        count = 0  # candidate e-nodes so far
        for klass in reach:
            members = [n for n in g.class_nodes.get(klass, []) if _ctor(g.nodes[n]["op"]) is not None]
            cand[klass] = members
            count += len(members)
            if count > max_enodes:
                raise ILPExtractionError(
                    f"ILP extraction is for e-graphs up to {max_enodes} e-nodes reachable from the root; "
                    "this one has more: use the greedy-dag extractor"
                )
            for n in members:
                for c in child_classes(n):
                    if c not in seen_classes:
                        seen_classes.add(c)
                        reach.append(c)

        # price, and drop nodes that can never be chosen (untyped, self-referencing, dead children)
        cost: dict[str, float] = {}
        children: dict[str, list[str]] = {}
        for klass, members in cand.items():
            for n in members:
                ch = child_classes(n)
                if klass in ch:
                    continue
                view = _view(g, n, types)
                c = 0.0 if view is None else view if isinstance(view, float) else float(model.node_cost(view))
                if not c < _INFEASIBLE:
                    continue
                cost[n] = c
                children[n] = ch
        alive = {c: _undominated([n for n in members if n in cost], cost, children) for c, members in cand.items()}
        return cls(g, cost, children, _prune(alive, children, g.root))

    def used(self, picks: dict[str, str]) -> list[str] | None:
        """The classes an extraction (class -> e-node) computes: those reachable from the root
        through its picks (None if one of them has no pick)."""
        return _reachable(self.g.root, picks, self.children)

    def dag_cost(self, picks: dict[str, str]) -> float:
        """What an extraction costs, each used class paid once (inf if it is incomplete)."""
        return _dag_cost(self.g.root, picks, self.children, self.cost)

    def decode(self, picks: dict[str, str], enc: Encoding) -> ir.Program:
        """The program of an (acyclic) extraction."""
        return _decode(self.g, picks, enc)

    def fixed(self, picks: dict[str, str]) -> Problem:
        """This problem with each class of ``picks`` reduced to its picked e-node (when that one
        can be chosen): a smaller problem, solved exactly over the classes left free."""
        alive = {c: [picks[c]] if picks.get(c) in members else members for c, members in self.alive.items()}
        return Problem(self.g, self.cost, self.children, _below_root(_prune(alive, self.children, self.g.root),
                                                                     self.children, self.g.root))


def _below_root(alive: dict[str, list[str]], children: dict[str, list[str]], root: str) -> dict[str, list[str]]:
    """``alive`` restricted to the classes some candidate below the root can read: with most
    classes fixed to one pick, the rest of the e-graph cannot be chosen and need not be modelled."""
    seen, stack = {root}, [root]
    while stack:
        for n in alive[stack.pop()]:
            for c in children[n]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
    return {c: members for c, members in alive.items() if c in seen}


def _prune(alive: dict[str, list[str]], children: dict[str, list[str]], root: str) -> dict[str, list[str]]:
    """``alive`` without e-nodes that have a child class with nothing left to choose."""
    alive = dict(alive)
    changed = True
    while changed:
        changed = False
        for c, members in alive.items():
            keep = [n for n in members if all(alive[k] for k in children[n])]
            if len(keep) != len(members):
                alive[c] = keep
                changed = True
    if not alive[root]:
        raise ILPExtractionError("no extractable term for the root (every candidate is untyped or cyclic)")
    return alive


def solve(problem: Problem, enc: Encoding, time_limit: float | None = None, acyclicity: str = "order",
          max_rounds: int = 200, max_nodes: int = MAX_MIP_NODES,
          highs_options: dict[str, Any] | None = None,
          optional_highs_options: dict[str, Any] | None = None) -> ILPExtraction:
    """`extract_ilp` on a built `Problem` (its arguments as there); ``highs_options``: more
    HiGHS options (name -> value) for this solve (ValueError if HiGHS rejects one);
    ``optional_highs_options``: options set where the installed HiGHS has them (older versions
    lack some switches)."""
    import highspy
    import numpy as np

    g, cost, children, alive = problem.g, problem.cost, problem.children, problem.alive
    nodes = [n for members in alive.values() for n in members]
    col = {n: i for i, n in enumerate(nodes)}
    classes = [c for c in alive if alive[c]]

    # acyclicity only matters inside strongly connected components of the class graph
    succ = {c: {cc for n in alive[c] for cc in children[n]} for c in classes}
    comp = _sccs(succ)
    comp_size: dict[int, int] = {}
    for c in classes:
        comp_size[comp[c]] = comp_size.get(comp[c], 0) + 1
    # 2-cycles (c -> c' -> c, as x and transpose(x) make) are forbidden by one clique row per
    # pair: at most one of the nodes of c that use c' and of c' that use c. Order variables are
    # only needed for components of three or more classes.
    cyclic = [c for c in classes if comp_size[comp[c]] > 2] if acyclicity == "order" else []
    tcol = {c: len(nodes) + i for i, c in enumerate(cyclic)}

    scale_ref = max((abs(v) for v in cost.values()), default=0.0)
    scale = 1e4 / scale_ref if scale_ref > 0 else 1.0

    h = _new_highs(highspy)
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("threads", 1)  # one thread and a fixed seed: the same search on every machine
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("mip_max_nodes", int(max_nodes))
    for name, value in (highs_options or {}).items():
        if h.setOptionValue(name, value) != highspy.HighsStatus.kOk:
            raise ValueError(f"HiGHS rejected the option {name}={value!r}")
    for name, value in (optional_highs_options or {}).items():
        h.setOptionValue(name, value)  # an unknown option leaves HiGHS's default
    inf = highspy.kHighsInf
    ncols = len(nodes) + len(cyclic)
    lower = np.zeros(ncols)
    upper = np.concatenate([np.ones(len(nodes)), np.array([comp_size[comp[c]] - 1.0 for c in cyclic])])
    costs = np.concatenate([np.array([cost[n] * scale for n in nodes]), np.zeros(len(cyclic))])
    h.addCols(ncols, costs, lower, upper, 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))

    rows_lo: list[float] = []
    rows_hi: list[float] = []
    starts: list[int] = []
    index: list[int] = []
    values: list[float] = []

    def row(lo: float, hi: float, entries: Iterable[tuple[int, float]]) -> None:
        rows_lo.append(lo)
        rows_hi.append(hi)
        starts.append(len(index))
        for j, v in entries:
            index.append(j)
            values.append(v)

    def flush() -> None:
        if rows_lo:
            h.addRows(len(rows_lo), np.array(rows_lo), np.array(rows_hi), len(index),
                      np.array(starts, dtype=np.int32), np.array(index, dtype=np.int32), np.array(values))
        for buf in (rows_lo, rows_hi, starts, index, values):
            buf.clear()

    row(1.0, 1.0, ((col[n], 1.0) for n in alive[g.root]))
    for c in classes:
        if c != g.root and len(alive[c]) > 1:
            row(-inf, 1.0, ((col[n], 1.0) for n in alive[c]))
    readers: dict[tuple[str, str], list[str]] = {}  # (class, child class) -> the class's nodes reading it
    for n in nodes:
        cls = g.nodes[n]["eclass"]
        for cc in children[n]:
            readers.setdefault((cls, cc), []).append(n)
    for (cls, cc), reading in readers.items():
        # a chosen node needs a chosen node in each child class, and (2-cycles) one that does
        # not use this node's class back: x and transpose(x) cannot support each other. At most
        # one node of a class is chosen, so its nodes reading cc share one row (the same integer
        # solutions as a row per node; a tighter LP relaxation, which no longer pays for a child
        # class once per layout of its readers)
        support = [m for m in alive[cc] if cls not in children[m]]
        row(0.0, inf, [(col[n], -1.0) for n in reading] + [(col[m], 1.0) for m in support])
    for n in nodes:
        cls = g.nodes[n]["eclass"]
        for cc in children[n]:
            if cls in tcol and comp[cc] == comp[cls]:
                big = float(comp_size[comp[cls]])
                # t_cls - t_cc - M x_n >= 1 - M
                row(1.0 - big, inf, ((tcol[cls], 1.0), (tcol[cc], -1.0), (col[n], -big)))
    if acyclicity == "order":
        uses: dict[tuple[str, str], list[str]] = {}
        for n in nodes:
            cls = g.nodes[n]["eclass"]
            for cc in children[n]:
                if comp[cc] == comp[cls]:
                    uses.setdefault((cls, cc), []).append(n)
        for (a, b), forward in uses.items():
            if a < b and (b, a) in uses:
                row(-inf, 1.0, ((col[n], 1.0) for n in forward + uses[(b, a)]))
    flush()

    # warm start: the better of a greedy DAG and a tree extraction computed here (always acyclic)
    warm = _warm_start(g.root, classes, alive, children, cost)
    h.changeColsIntegrality(len(nodes), np.arange(len(nodes), dtype=np.int32),
                            np.array([highspy.HighsVarType.kInteger] * len(nodes)))
    time_limit = TIME_LIMIT_S if time_limit is None else time_limit
    deadline = time.monotonic() + time_limit
    chosen: dict[str, str] | None = None
    optimal = False
    limit = ""
    for _ in range(max_rounds):
        left = deadline - time.monotonic()
        if left <= 0:
            limit = f"time limit ({time_limit:g} s)"
            break
        h.setOptionValue("time_limit", float(left))
        if warm is not None:
            x0 = np.zeros(ncols)
            for c in _reachable(g.root, warm, children) or []:
                x0[col[warm[c]]] = 1.0
            for c, level in _levels(g.root, warm, children).items():
                if c in tcol:
                    x0[tcol[c]] = float(level)
            sol = highspy.HighsSolution()
            sol.col_value = list(x0)
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        status = h.getModelStatus()
        limit = {highspy.HighsModelStatus.kTimeLimit: f"time limit ({time_limit:g} s)",
                 highspy.HighsModelStatus.kSolutionLimit: f"node limit ({max_nodes})"}.get(status, "")
        if h.getInfo().primal_solution_status != 2:  # kSolutionStatusFeasible
            break
        x = h.getSolution().col_value
        pick: dict[str, str] = {}
        for c in classes:
            best = max(alive[c], key=lambda n: x[col[n]])
            if x[col[best]] > 0.5:
                pick[c] = best
        cycle = find_cycle(g.root, pick, children)
        if cycle is None:
            chosen = pick
            optimal = status == highspy.HighsModelStatus.kOptimal
            break
        # lazy acyclicity: forbid this cycle of chosen nodes, solve again
        row(-inf, len(cycle) - 1.0, ((col[n], 1.0) for n in cycle))
        flush()
    else:
        limit = f"round limit ({max_rounds})"
    if chosen is None or (warm is not None and _dag_cost(g.root, warm, children, cost) < _dag_cost(g.root, chosen, children, cost)):
        chosen, optimal = warm, False  # out of time (or rounds): the warm start is a valid extraction
    if chosen is None:
        raise ILPExtractionError(f"HiGHS found no acyclic solution: {h.modelStatusToString(h.getModelStatus())}")
    limit = "" if optimal else limit
    if limit.startswith("time limit"):
        warnings.warn(
            f"eqsat_attn: exact (ILP) extraction stopped at its {limit}, a safety net: the program it returns "
            f"depends on this machine's speed and load (its work limit, max_nodes={max_nodes} branch-and-bound "
            "nodes, gives the same result anywhere); pass a larger time_limit, or a smaller max_nodes",
            RuntimeWarning, stacklevel=2)
    picks = {c: chosen[c] for c in _reachable(g.root, chosen, children) or []}
    return ILPExtraction(_decode(g, chosen, enc), float(_dag_cost(g.root, chosen, children, cost)), optimal, limit, picks)


def _reachable(root: str, chosen: dict[str, str], children: dict[str, list[str]]) -> list[str] | None:
    """Classes reachable from the root through the chosen nodes (None if one has no choice)."""
    out, seen, stack = [], {root}, [root]
    while stack:
        c = stack.pop()
        if c not in chosen:
            return None
        out.append(c)
        for cc in children[chosen[c]]:
            if cc not in seen:
                seen.add(cc)
                stack.append(cc)
    return out


def _dag_cost(root: str, chosen: dict[str, str], children: dict[str, list[str]], cost: dict[str, float]) -> float:
    used = _reachable(root, chosen, children)
    return math.inf if used is None else sum(cost[chosen[c]] for c in used)


def find_cycle(root: str, chosen: dict[str, str], children: dict[str, list[str]]) -> list[str] | None:
    """The chosen nodes of one cycle reachable from the root, or None if they form a DAG."""
    state: dict[str, int] = {}  # 1 on the DFS path, 2 done
    path: list[str] = []
    stack: list[tuple[str, int]] = [(root, 0)]
    while stack:
        c, i = stack.pop()
        if i == 0:
            state[c] = 1
            path.append(c)
        kids = children[chosen[c]] if c in chosen else []
        if i < len(kids):
            stack.append((c, i + 1))
            cc = kids[i]
            if state.get(cc) == 1:
                loop = path[path.index(cc):]
                return [chosen[x] for x in loop]
            if cc not in state:
                stack.append((cc, 0))
        else:
            state[c] = 2
            path.pop()
    return None


def _levels(root: str, chosen: dict[str, str], children: dict[str, list[str]]) -> dict[str, int]:
    """Height of each reachable class in the chosen DAG (leaves 0): a valid order for warm starts."""
    order = _reachable(root, chosen, children) or []
    level: dict[str, int] = {}
    pending = list(reversed(order))
    while pending:
        rest = []
        for c in pending:
            kids = children[chosen[c]]
            if all(k in level for k in kids):
                level[c] = 1 + max((level[k] for k in kids), default=-1)
            else:
                rest.append(c)
        if len(rest) == len(pending):
            break
        pending = rest
    return level


def _parents(classes: list[str], alive: dict[str, list[str]], children: dict[str, list[str]]) -> dict[str, list[str]]:
    """Child class -> the candidate e-nodes (of ``classes``) that read it."""
    parents: dict[str, list[str]] = {}
    for c in classes:
        for n in alive[c]:
            for k in children[n]:
                parents.setdefault(k, []).append(n)
    return parents


def greedy_dag_picks(classes: list[str], alive: dict[str, list[str]], children: dict[str, list[str]],
                     cost: dict[str, float]) -> tuple[dict[str, str], dict[str, tuple[float, frozenset[str]]]]:
    """Greedy-DAG extraction (egglog's algorithm): each class's pick, and for each e-node that
    could be priced, the cost of its DAG (its own cost and each class below it once) and the
    classes in it. Passes over the classes repeat until no pick changes; an e-node priced before
    on the same children's DAGs is skipped (a class's DAG only ever gets cheaper, so its outcome
    is the same): it is priced again only once a child class's DAG has changed (``stale``)."""
    dag: dict[str, dict[str, float]] = {}
    dag_total: dict[str, float] = {}  # sum(dag[c].values()), kept with it
    stale = {n for c in classes for n in alive[c]}  # e-nodes not priced on their children's current DAGs
    parents = _parents(classes, alive, children)
    pick: dict[str, str] = {}
    member: dict[str, tuple[float, frozenset[str]]] = {}
    for _ in range(len(classes) + 1):
        changed = False
        for c in classes:
            for n in alive[c]:
                if n not in stale:
                    continue
                kids = children[n]
                if not all(k in dag for k in kids):
                    continue
                stale.discard(n)
                merged: dict[str, float] = {}
                for k in kids:
                    merged.update(dag[k])
                if c in merged:  # the DAG would read its own class: a cycle
                    continue
                merged[c] = cost[n]
                total = sum(merged.values())
                member[n] = (total, frozenset(merged))
                if c not in dag or total < dag_total[c] - 1e-15 * max(1.0, abs(total)):
                    dag[c], dag_total[c], pick[c] = merged, total, n
                    stale.update(parents.get(c, ()))
                    changed = True
        if not changed:
            break
    return pick, member


def _tree_picks(classes: list[str], alive: dict[str, list[str]], children: dict[str, list[str]],
                cost: dict[str, float]) -> dict[str, str]:
    """Tree-cost extraction: class cost = min over its e-nodes of own cost + children's class
    costs, to a fixed point (an e-node priced before on the same children's costs is skipped)."""
    tree: dict[str, float] = {}
    tree_pick: dict[str, str] = {}
    stale = {n for c in classes for n in alive[c]}  # e-nodes not priced on their children's current costs
    parents = _parents(classes, alive, children)
    for _ in range(len(classes) + 1):
        changed = False
        for c in classes:
            for n in alive[c]:
                if n not in stale:
                    continue
                kids = children[n]
                if not all(k in tree for k in kids):
                    continue
                stale.discard(n)
                t = cost[n] + sum(tree[k] for k in kids)
                if t < tree.get(c, math.inf) - 1e-15 * max(1.0, abs(t)):
                    tree[c], tree_pick[c] = t, n
                    stale.update(parents.get(c, ()))
                    changed = True
        if not changed:
            break
    return tree_pick


def _warm_start(
    root: str, classes: list[str], alive: dict[str, list[str]], children: dict[str, list[str]],
    cost: dict[str, float],
) -> dict[str, str] | None:
    """A valid (acyclic) extraction: the cheaper of a greedy-DAG and a tree-cost fixpoint."""
    candidates = []
    for pick in (greedy_dag_picks(classes, alive, children, cost)[0], _tree_picks(classes, alive, children, cost)):
        if root in pick and _reachable(root, pick, children) is not None and find_cycle(root, pick, children) is None:
            candidates.append((_dag_cost(root, pick, children, cost), dict(pick)))
    if not candidates:
        return None
    return min(candidates, key=lambda t: t[0])[1]


def _decode(g: _Graph, chosen: dict[str, str], enc: Encoding) -> ir.Program:
    """Build the program of the chosen nodes, children first (iteratively)."""
    dec = _Decoder(None, enc)  # type: ignore[arg-type] - only its node construction is used
    values: dict[str, Any] = {}
    stack = [g.root]
    # in a DAG each class is pushed at most once per parent edge: a cycle exhausts this budget
    budget = 2 * (2 + sum(len(g.nodes[n]["children"]) for n in chosen.values()))
    while stack:
        budget -= 1
        if budget < 0:
            raise ILPExtractionError("the chosen e-nodes form a cycle")
        cls = stack[-1]
        if cls in values:
            stack.pop()
            continue
        nid = chosen.get(cls)
        if nid is None:
            raise ILPExtractionError(f"the ILP chose no node for e-class {cls}")
        node = g.nodes[nid]
        pending = []
        for c in node["children"]:
            cc = g.nodes[c]["eclass"]
            if g.sort(cc) in ("Term", "TermList") and cc not in values and cc not in pending:
                pending.append(cc)
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        args = [values[g.nodes[c]["eclass"]] if g.sort(g.nodes[c]["eclass"]) in ("Term", "TermList") else g.primitive(c)
                for c in node["children"]]
        sort, ctor = _ctor(node["op"])
        if sort == "TermList":
            values[cls] = [] if ctor == "nil" else [args[0], *args[1]]
        else:
            values[cls] = dec._node(ctor, args)
    outputs = values[g.root]
    return dec.builder.build(outputs)
