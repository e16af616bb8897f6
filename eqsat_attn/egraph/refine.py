"""One extraction step: greedy-DAG, then an exact re-solve where greedy's choices interact.

egglog's greedy-DAG extractor fixes one e-node per e-class bottom-up, pricing each class by the
DAG of its own best subterms, so what two classes could share is invisible to it: it rejects an
e-node that is cheaper itself when its inputs cost more on their own, even where the program
computes those inputs anyway or could compute them once for several readers. Two cases the
tests pin down: fp8 attention reading V transposed (its V scale's amax e-class holds a reduction
over V and one over Vᵀ, tied; greedy keeps the one over V, so the transposed-V attention is
priced with both projections), and Q/K/V as slices of one merged projection (each slice alone
costs more than its own projection).

`extract_best` runs egglog's greedy-DAG extractor, then reads the e-graph (`ilp.read_graph`),
prices it (`ilp.Problem`), repeats the greedy extraction with each e-node's DAG recorded, and
finds the *contested* classes: classes of the greedy program whose e-graph holds a member
cheaper by itself than greedy's pick, by at least `MIN_GAP` of the program's cost. Their
neighbourhood (each such class, and the classes of the DAGs of its pick and of those cheaper
members, examined the same way in turn, plus the DAGs of members tied with a free class's
pick: `contested_neighbourhood`) is solved exactly (`ilp.solve`) with every other class fixed
to greedy's pick, and the solution then improved one class at a time (`swap_improve`); the
cheaper program of the two under the model is kept (greedy's on a tie). Without a contested
class the result is greedy's program, for the cost of reading and pricing the e-graph.

Bounded by work, not time: no refinement past `ilp.MAX_ENODES` candidate e-nodes (or an e-graph
of more than `MAX_SERIALIZED` rows, never serialized), and at most `MAX_MIP_NODES`
branch-and-bound nodes (HiGHS single-threaded, fixed seed: the same program on any machine) and
`MAX_SWAP_SWEEPS` passes of swaps; the ILP's clock (`ilp.TIME_LIMIT_S`) is only a safety net,
which warns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from egglog import EGraph

from .. import ir
from ..cost.model import CostModel, program_cost
from .driver import egraph_size
from .encode import Encoding
from .extract import extract_program
from .ilp import MAX_ENODES, ILPExtractionError, Problem, find_cycle, greedy_dag_picks, read_graph, solve

#: a member counts as contested when it is cheaper by itself than greedy's pick by at least this
#: fraction of the greedy program's cost (smaller savings are not worth an exact solve)
MIN_GAP = 0.01
#: branch-and-bound nodes for the neighbourhood's exact solve: the improvements the tests pin down
#: are found and proved optimal within them; past this the best solution found is used
MAX_MIP_NODES = 10
#: HiGHS settings for that solve. Where the LP relaxation is weak (the CPU table's blocks: a 47%
#: gap at the root) a restart after presolve cost over a second without improving on greedy. The
#: primal heuristics are off: the solve starts from the better of greedy-DAG and tree extraction
#: and `swap_improve` follows it, and on the models' and the corpus's 56 neighbourhoods HiGHS's
#: own (RINS, RENS, feasibility jump, root reduced cost) found nothing cheaper while taking most
#: of the root node's time (BERT's block 1.2 -> 0.4 s). A cut pool of 100 rows (default 10,000)
#: bounds the root's separation work: Llama's block is then proved optimal in 7 nodes. (A pool of
#: 1 took BERT's block from 0.85 to 0.45 s and Llama's from 0.90 to 1.32 s; strong branching off
#: left the Flax nnx blocks unproved.)
#: (The heuristics' switches are `HIGHS_HEURISTICS_OFF`, set where the installed HiGHS has them:
#: highspy 1.16 does, older ones may not, and run their heuristics.)
HIGHS_OPTIONS = {"mip_allow_restart": False, "mip_pool_soft_limit": 100}
HIGHS_HEURISTICS_OFF = {
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_root_reduced_cost": False,
}
#: members of a free class whose DAG costs at most this fraction more than the pick's tie with it
TIE = 1e-9
#: e-graphs with more rows than this (terms and analyses together) are not serialized: their
#: candidate e-nodes would exceed `ilp.MAX_ENODES` anyway
MAX_SERIALIZED = 4 * MAX_ENODES
#: passes of `swap_improve` over the program's classes at most (work, not time)
MAX_SWAP_SWEEPS = 8


@dataclass(frozen=True)
class Extraction:
    """The chosen program, its cost under the model, how it was found ("greedy-dag", "tree",
    "greedy-dag + exact neighbourhood (N e-classes)"), and the serialized e-graph it was read
    from (None when the e-graph was too large to read): later explanations reuse it instead of
    saturating again. ``picks``: the serialized ids of the chosen e-nodes where the exact
    re-solve chose the program (None where egglog's extractor did)."""

    program: ir.Program
    cost: float
    how: str
    graph: Any = None
    picks: frozenset[str] | None = None


def greedy_dag(problem: Problem) -> tuple[dict[str, str], dict[str, tuple[float, frozenset[str]]]]:
    """Greedy-DAG extraction of ``problem`` (`ilp.greedy_dag_picks`): each class's pick, and for
    each e-node that could be priced, the cost of its DAG and the classes in it."""
    alive = problem.alive
    return greedy_dag_picks([c for c in alive if alive[c]], alive, problem.children, problem.cost)


def contested_neighbourhood(problem: Problem, pick: dict[str, str],
                            member: dict[str, tuple[float, frozenset[str]]], min_gap: float = MIN_GAP) -> set[str]:
    """The classes to re-solve exactly: for each class of the greedy program holding a member
    cheaper by itself than the pick (by ``min_gap`` of the program's cost), that class and the
    classes of its pick's and those members' DAGs; the classes so added are examined the same
    way, and members tied with a free class's pick add their DAGs' classes. Empty when greedy's
    choices do not interact."""
    gap = min_gap * problem.dag_cost(pick)
    free: set[str] = set()
    pending, seen = list(problem.used(pick) or []), set()
    while pending:  # the classes of a contested class's DAGs are examined in turn
        c = pending.pop()
        if c in seen:
            continue
        seen.add(c)
        chosen = pick[c]
        cheaper = [m for m in problem.alive[c] if m in member and problem.cost[m] < problem.cost[chosen] - gap]
        if cheaper:
            for n in (chosen, *cheaper):
                new = member[n][1] - free
                free |= new
                pending.extend(sorted(new - seen))
    for c in sorted(free):  # members tied with a free class's pick: their inputs become free too
        best = member[pick[c]][0]
        for m in problem.alive[c]:
            if m in member and m != pick[c] and member[m][0] <= best * (1 + TIE) and member[m][1] != member[pick[c]][1]:
                free |= member[m][1]
    return free


def refine(graph: Any, enc: Encoding, model: CostModel, max_nodes: int = MAX_MIP_NODES):
    """The exact re-solve of greedy's contested neighbourhood in ``graph``: an `ilp.ILPExtraction`
    (with the number of free classes) or None when nothing is contested."""
    problem = Problem.build(graph, model)
    pick, member = greedy_dag(problem)
    free = contested_neighbourhood(problem, pick, member)
    if not free:
        return None
    found = solve(problem.fixed({c: n for c, n in pick.items() if c not in free}), enc, max_nodes=max_nodes,
                  highs_options=HIGHS_OPTIONS, optional_highs_options=HIGHS_HEURISTICS_OFF)
    if found.picks:
        swapped = swap_improve(problem, found.picks)
        if swapped != found.picks:
            found = found._replace(program=problem.decode(swapped, enc), cost=problem.dag_cost(swapped),
                                   optimal=False, picks=swapped)
    return found, len(free)


def swap_improve(problem: Problem, picks: dict[str, str]) -> dict[str, str]:
    """``picks`` (e-class -> e-node, the classes a program computes) improved one class at a time:
    a class's pick gives way to another member of its class where that lowers the program's DAG
    cost; the classes the member reads that the program does not compute yet take the members
    cheapest to add to it (`cheapest_additions`), and what only the old pick read is dropped.
    The exact solve's branch-and-bound stops at `MAX_MIP_NODES`, short of such a swap where the
    LP relaxation is weak: on the CPU table, fp8 attention reading quantized operands (a
    transpose of those the program quantizes) in place of a plain attention reading their
    dequantizations (dearer by itself; the dequantizations it spares make up the difference).
    Deterministic: classes and members in sorted order, first improvement taken, at most
    `MAX_SWAP_SWEEPS` passes."""
    picks = dict(picks)
    root, children = problem.g.root, problem.children
    best = problem.dag_cost(picks)
    for _ in range(MAX_SWAP_SWEEPS):
        improved = False
        additions = cheapest_additions(problem, set(picks))
        for c in sorted(picks):
            if c not in picks:
                continue
            for m in sorted(problem.alive.get(c, ())):
                if m == picks[c]:
                    continue
                trial = {**additions, **picks, c: m}
                reached = problem.used(trial)
                if reached is None:
                    continue
                cost = sum(problem.cost[trial[k]] for k in reached)
                if cost < best and find_cycle(root, trial, children) is None:  # the cycle check only where it pays
                    picks, best, improved = {k: trial[k] for k in reached}, cost, True
                    additions = cheapest_additions(problem, set(picks))
                    if c not in picks:
                        break
        if not improved:
            break
    return picks


def cheapest_additions(problem: Problem, computed: set[str]) -> dict[str, str]:
    """For each class outside ``computed``, the member cheapest to add to a program that computes
    ``computed`` already: its own cost plus its child classes' (free when computed; a shared
    child counted per reader, as tree extraction counts it). Bellman-Ford over the classes."""
    cost = {c: 0.0 if c in computed else math.inf for c in problem.alive}
    choice: dict[str, str] = {}
    for _ in range(len(cost)):
        changed = False
        for c, members in problem.alive.items():
            if c in computed:
                continue
            for m in members:
                price = problem.cost[m] + sum(cost.get(k, math.inf) for k in problem.children[m])
                if price < cost[c]:
                    cost[c], choice[c], changed = price, m, True
        if not changed:
            break
    return choice


def extract_best(egraph: EGraph, enc: Encoding, model: CostModel, extractor: str = "greedy-dag",
                 keep_graph: bool = False) -> Extraction:
    """The program to run from ``egraph``: egglog's ``extractor`` ("greedy-dag" or "tree"),
    improved where greedy-DAG's choices interact (see the module docstring). ``keep_graph``:
    read the e-graph for the result's ``graph`` even where no refinement runs."""
    greedy, _ = extract_program(egraph, enc, model, extractor=extractor)
    best = Extraction(greedy, program_cost(greedy, model), extractor)
    if egraph_size(egraph) > MAX_SERIALIZED or not (extractor == "greedy-dag" or keep_graph):
        return best
    try:
        graph = read_graph(egraph)
    except ILPExtractionError:
        return best
    best = Extraction(best.program, best.cost, best.how, graph)
    if extractor != "greedy-dag":
        return best
    try:
        refined = refine(graph, enc, model)
    except ILPExtractionError:  # too many candidate e-nodes, or nothing the solver could use
        return best
    if refined is None:
        return best
    found, free = refined
    cost = program_cost(found.program, model)
    if found.program.output_types == greedy.output_types and cost < best.cost:
        return Extraction(found.program, cost, f"greedy-dag + exact neighbourhood ({free} e-classes)", graph,
                          frozenset(found.picks.values()))
    return best
