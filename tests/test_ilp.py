"""ILP extraction (HiGHS): value-correct, never costlier than greedy-DAG, strictly better where greedy is not optimal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.capture import capture
from eqsat_attn.cost import MaterializedBytes, OpView, for_device, program_cost
from eqsat_attn.egraph.extract import extract_program
from eqsat_attn.egraph.ilp import ILPExtractionError, extract_program_ilp
from eqsat_attn.lower import lower
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program, saturate
from work_limits import SAFETY_NET_S

LIMITS = Limits(iterations=12, nodes=20_000, seconds=SAFETY_NET_S)


def _inputs(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _mlp_t(x, w):
    y = jnp.tanh(x.T)
    return (y @ w).T + jnp.exp(y).sum()


def _transposes_around_elementwise(x, y):
    a = jnp.exp(x.T) * y.T
    return (jnp.tanh(a).T + x, a.sum(axis=0))


def _matmul_chain(x, w1, w2):
    h = jnp.maximum((x @ w1).T, 0.0)
    return (w2.T @ h).T


def _shared_transpose(x):
    t = jnp.tanh(x)
    return t.T, t * 2.0, jnp.transpose(jnp.exp(t.T))


CASES = {
    "mlp_t": (_mlp_t, [(16, 32), (16, 8)]),
    "transposes_around_elementwise": (_transposes_around_elementwise, [(8, 12), (8, 12)]),
    "matmul_chain": (_matmul_chain, [(6, 10), (10, 12), (12, 4)]),
    "shared_transpose": (_shared_transpose, [(8, 24)]),
}
MODELS = {"roofline-cpu": for_device("cpu"), "roofline-h100": for_device("h100"), "bytes": MaterializedBytes()}


def _check_values(program, fn, args):
    expected = jax.tree_util.tree_leaves(fn(*args))
    got = lower(program)(*args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def saturated():
    out = {}
    for name, (fn, shapes) in CASES.items():
        args = _inputs(shapes)
        prog = capture(fn, *args).program
        egraph, enc, _ = saturate(prog, OptimizeOptions(limits=LIMITS))
        out[name] = (fn, args, prog, egraph, enc)
    return out


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_ilp_matches_or_beats_greedy_and_keeps_values(saturated, case, model_name):
    fn, args, prog, egraph, enc = saturated[case]
    model = MODELS[model_name]
    greedy, _ = extract_program(egraph, enc, model)
    exact, objective = extract_program_ilp(egraph, enc, model)
    _check_values(greedy, fn, args)
    _check_values(exact, fn, args)
    assert exact.output_types == prog.output_types
    cost_g, cost_i = program_cost(greedy, model), program_cost(exact, model)
    assert objective == pytest.approx(cost_i, rel=1e-9, abs=1e-15)  # the ILP objective is the program's cost
    assert cost_i <= cost_g * (1 + 1e-9) + 1e-12
    assert cost_i <= program_cost(prog, model) * (1 + 1e-9) + 1e-12


def test_ilp_agrees_with_greedy_where_greedy_is_optimal(saturated):
    """A single chain with no sharing: greedy-DAG is optimal, so both find the same cost."""
    fn, args, prog, egraph, enc = saturated["mlp_t"]
    model = MODELS["roofline-cpu"]
    greedy, _ = extract_program(egraph, enc, model)
    exact, _ = extract_program_ilp(egraph, enc, model)
    assert program_cost(exact, model) == pytest.approx(program_cost(greedy, model), rel=1e-9)
    assert exact.count("transpose") == greedy.count("transpose") == 0


class _WideCheap:
    """Elementwise ops are cheaper on tall outputs than on wide ones; transposes cost 1.

    Under it, with outputs (tanh(x)ᵀ, tanh(x)) for a wide x, the class of tanh(x)ᵀ alone is
    cheapest as tanh(xᵀ) (1 + 1 < 1 + 1.5), which is what greedy-DAG picks class by class; but
    the program also needs tanh(x), so sharing it (transpose of the shared tanh: 1 + 1.5 in all)
    beats greedy's 1 + 1 + 1.5.
    """

    name = "wide-cheap"

    def node_cost(self, node: OpView) -> float:
        if node.op in ("input", "literal", "constant", "reshape"):
            return 0.0
        if node.op == "transpose":
            return 1.0
        shape = node.output.shape
        return 1.0 if len(shape) == 2 and shape[0] > shape[1] else 1.5


def test_ilp_beats_greedy_dag_when_sharing_matters():
    def fn(x):
        t = jnp.tanh(x)
        return t.T, t

    args = _inputs([(4, 16)])
    prog = capture(fn, *args).program
    egraph, enc, _ = saturate(prog, OptimizeOptions(rules=["transpose"], limits=LIMITS))
    model = _WideCheap()
    greedy, greedy_cost = extract_program(egraph, enc, model)
    exact, exact_cost = extract_program_ilp(egraph, enc, model)
    _check_values(greedy, fn, args)
    _check_values(exact, fn, args)
    assert program_cost(greedy, model) == pytest.approx(3.5)
    assert program_cost(exact, model) == pytest.approx(2.5) == exact_cost
    assert exact.count("tanh") == 1 and greedy.count("tanh") == 2


def test_pipeline_extractor_option():
    args = _inputs([(8, 12), (8, 12)])
    prog = capture(_transposes_around_elementwise, *args).program
    model = for_device("cpu")
    results = {}
    for extractor in ("greedy-dag", "tree", "ilp"):
        res = optimize_program(prog, OptimizeOptions(cost_model=model, limits=LIMITS, extractor=extractor))
        assert not res.warnings or "saturation" in res.warnings[0]
        _check_values(res.program, _transposes_around_elementwise, args)
        results[extractor] = res.cost_after
    assert results["ilp"] <= min(results.values()) * (1 + 1e-9)


def test_too_large_graph_is_refused(saturated):
    _, _, _, egraph, enc = saturated["matmul_chain"]
    with pytest.raises(ILPExtractionError, match="greedy-dag"):
        extract_program_ilp(egraph, enc, MaterializedBytes(), max_enodes=3)



def test_an_extractor_panic_falls_back_to_the_original_program():
    """egglog's tree extractor panics on a deep DAG (a 12-layer residual stream doubles tree
    costs at every layer); optimizing must still return a program with the same values."""
    import warnings

    from eqsat_attn import examples

    fn, args = examples.stacked_example(12)
    prog = capture(fn, *args).program
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = optimize_program(prog, OptimizeOptions(extractor="tree"))
    assert all("extractor failed" in str(w.message) for w in caught if w.category is RuntimeWarning)
    expected = jax.tree_util.tree_leaves(fn(*args))
    got = lower(res.program)(*jax.tree_util.tree_leaves(args))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)


def test_ilp_extraction_prints_nothing():
    """HiGHS prints a banner from C++ on a process's first solver; a user's output stays clean
    (checked in a fresh process, since this one may have made its first solver already)."""
    import os
    import subprocess
    import sys

    code = ("import jax.numpy as jnp, numpy as np\n"
            "import eqsat_attn as ea\n"
            "f = ea.optimize(lambda x: jnp.tanh(x.T).T, extractor='ilp')\n"
            "f(np.arange(6.0, dtype=np.float32).reshape(2, 3))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HiGHS" not in out.stdout and out.stdout == "", out.stdout


def _random_problem(rng):
    """A small extraction problem (e-classes c0..c5, root c0; 1-3 e-nodes each reading 0-2 other
    classes, so cycles such as x = transpose(transpose(x)) occur; integer costs, so ties occur)
    with the graph fields `ilp.solve` reads, or None when the root cannot be extracted."""
    from types import SimpleNamespace

    from eqsat_attn.egraph.ilp import Problem, _prune

    classes = [f"c{i}" for i in range(6)]
    cost, children, alive, nodes = {}, {}, {}, {}
    for c in classes:
        alive[c] = []
        for j in range(int(rng.integers(1, 4))):
            n = f"{c}.{j}"
            others = [k for k in classes if k != c]
            children[n] = list(rng.choice(others, size=int(rng.integers(0, 3)), replace=False))
            cost[n] = float(rng.integers(0, 6))
            alive[c].append(n)
            nodes[n] = {"eclass": c}
    try:
        alive = _prune(alive, children, "c0")
    except ILPExtractionError:
        return None
    return Problem(SimpleNamespace(root="c0", nodes=nodes), cost, children, alive)


def _brute_force(problem):
    """The cheapest acyclic extraction's DAG cost, by trying every choice of one e-node per class."""
    import itertools

    from eqsat_attn.egraph.ilp import find_cycle

    classes = [c for c in problem.alive if problem.alive[c]]
    best = float("inf")
    for choice in itertools.product(*(problem.alive[c] for c in classes)):
        picks = dict(zip(classes, choice))
        if find_cycle(problem.g.root, picks, problem.children) is None:
            best = min(best, problem.dag_cost(picks))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_ilp_finds_the_brute_force_optimum_of_small_problems(monkeypatch, seed):
    """`ilp.solve`'s model (one support row per class and child class, the acyclicity rows) keeps
    every acyclic extraction and finds the cheapest, with HiGHS's defaults and with the
    neighbourhood solve's options (`refine.HIGHS_OPTIONS`, `HIGHS_HEURISTICS_OFF`): checked
    against brute force on random small problems with cycles and ties."""
    from eqsat_attn.egraph import ilp
    from eqsat_attn.egraph.refine import HIGHS_HEURISTICS_OFF, HIGHS_OPTIONS

    monkeypatch.setattr(ilp, "_decode", lambda g, chosen, enc: None)  # synthetic graphs have no terms
    rng = np.random.default_rng(seed)
    solved = 0
    while solved < 25:
        problem = _random_problem(rng)
        if problem is None:
            continue
        best = _brute_force(problem)
        if best == float("inf"):  # every extraction of the root is cyclic: draw another
            continue
        for options, optional in ((None, None), (HIGHS_OPTIONS, HIGHS_HEURISTICS_OFF)):
            found = ilp.solve(problem, None, highs_options=options, optional_highs_options=optional)
            assert found.optimal and found.cost == pytest.approx(best, abs=1e-9), (seed, solved, options)
            assert problem.dag_cost(found.picks) == pytest.approx(found.cost, abs=1e-9)
            assert ilp.find_cycle(problem.g.root, found.picks, problem.children) is None
        solved += 1


def test_optional_highs_options_unknown_to_highs_are_skipped(monkeypatch):
    """An option this HiGHS does not have (older versions lack some heuristics' switches) is
    skipped among ``optional_highs_options`` and refused among ``highs_options``."""
    from eqsat_attn.egraph import ilp

    monkeypatch.setattr(ilp, "_decode", lambda g, chosen, enc: None)
    rng = np.random.default_rng(7)
    problem = None
    while problem is None or _brute_force(problem) == float("inf"):
        problem = _random_problem(rng)
    found = ilp.solve(problem, None, optional_highs_options={"mip_no_such_switch": False})
    assert found.optimal and found.cost == pytest.approx(_brute_force(problem), abs=1e-9)
    with pytest.raises(ValueError, match="mip_no_such_switch"):
        ilp.solve(problem, None, highs_options={"mip_no_such_switch": False})
