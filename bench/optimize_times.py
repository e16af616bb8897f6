"""Optimize time, e-nodes and chosen program of every attention corpus case and spelling probe.

    python bench/optimize_times.py --json out.json [--only SUBSTR ...] [--repeats 3] [--no-probes]
    python bench/optimize_times.py --compare before.json after.json     # programs and costs
    python bench/optimize_times.py --only CASE ... --repeats 3 --baseline eqsat_attn.egraph.driver.X=VALUE

``--baseline MODULE.ATTR=VALUE`` (repeatable) also times each case with those module attributes
set (a Python literal each), alternating with the code as it is in every round: a before/after
pair from one process on the same load (rows get ``base_*`` fields).

Each case (``tests/attention_corpus.py``'s CASES, then ``bench/probe_attention_spellings.py``'s
probes forward and as ``jax.grad``) is captured once; then ``--repeats`` rounds each optimize
every case once, in order (interleaved, so load on a shared machine spreads over all cases),
after one untimed warm-up round that registers the rule sets (``--repeats 0``: the warm-up
round is the timed one, for a quick survey). Per case: the median optimize
seconds (CPU and wall) over the rounds, the e-graph runs (e-nodes, rounds, stop reasons), the
families fired most, the rules with the most search time (egglog's report), the predicted cost
and the chosen program's text. Options are the corpus's (H100 model, ``LIMITS``, exact).

``--compare`` lists the cases whose chosen program or predicted cost differs between two files
(a cost that rose is marked WORSE) and the e-node counts side by side.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import pathlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from attention_corpus import CASES, LIMITS, Case  # noqa: E402

from eqsat_attn import pipeline  # noqa: E402
from eqsat_attn.capture import capture  # noqa: E402
from eqsat_attn.collector import collection_paused  # noqa: E402
from eqsat_attn.cost import for_device  # noqa: E402
from eqsat_attn.egraph import driver  # noqa: E402
from eqsat_attn.pipeline import OptimizeOptions, optimize_program  # noqa: E402


def all_cases(with_probes: bool) -> list[Case]:
    out = list(CASES)
    if with_probes:
        import probe_attention_spellings as probes
        for p in probes.PROBES:
            out.extend(probes.cases(p, True))
    return out


class Recorder:
    """Collects the driver's runs and egglog's per-rule times while one optimization runs."""

    def __init__(self) -> None:
        self.runs: list[driver.RunResult] = []
        self.search: Counter[str] = Counter()
        self._run_schedule = driver.run_schedule
        self._optimize_part = pipeline.optimize_part

    def __enter__(self) -> "Recorder":
        def run_schedule(egraph, command):
            report = self._run_schedule(egraph, command)
            for name, t in report.search_and_apply_time_per_rule.items():
                self.search[name] += t.total_seconds() if hasattr(t, "total_seconds") else float(t)
            return report

        def optimize_part(*args, **kwargs):
            chosen, run, graph = self._optimize_part(*args, **kwargs)
            self.runs.append(run)
            return chosen, run, graph

        driver.run_schedule = run_schedule
        pipeline.optimize_part = optimize_part
        return self

    def __exit__(self, *exc) -> None:
        driver.run_schedule = self._run_schedule
        pipeline.optimize_part = self._optimize_part


def optimize_once(program, options: OptimizeOptions) -> tuple[dict, float, float]:
    with Recorder() as rec, collection_paused():
        wall, cpu = time.perf_counter(), time.process_time()
        result = optimize_program(program, options, warn=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    fired: Counter[str] = Counter(result.rules_fired)
    info = {
        "egraph_nodes": result.egraph_nodes,
        "runs": [{"egraph_nodes": r.egraph_nodes, "iterations": r.iterations, "stop": r.stop_reason,
                  "round_enodes": [s["egraph_nodes"] for s in r.steps]} for r in rec.runs],
        "fired_top": fired.most_common(8),
        "search_top": [(k, round(v, 3)) for k, v in rec.search.most_common(8)],
        "cost": result.cost_after,
        "saturated": result.saturated,
        "fallback": result.fallback,
        "program": str(result.program),
    }
    return info, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--compare", nargs=2)
    parser.add_argument("--baseline", action="append", default=[], help="MODULE.ATTR=VALUE, set for the baseline runs")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    options = OptimizeOptions(cost_model=for_device("h100"), limits=LIMITS)
    cases = [c for c in all_cases(not args.no_probes) if not args.only or any(s == c.name for s in args.only)]
    programs = {c.name: capture(c.fn, *c.args()).program for c in cases}
    rows: dict[str, dict] = {c.name: {"name": c.name} for c in cases}
    baseline = [_setting(text) for text in args.baseline]
    for rnd in range(args.repeats + 1):
        for c in cases:
            row = rows[c.name]
            for prefix in ("base_", "") if baseline else ("",):
                with _patched(baseline if prefix else []):
                    info, wall, cpu = optimize_once(programs[c.name], options)
                if rnd == 0:
                    row.update({prefix + k: v for k, v in info.items()})
                    if args.repeats:
                        continue
                row.setdefault(prefix + "wall", []).append(wall)
                row.setdefault(prefix + "cpu", []).append(cpu)
                if rnd == args.repeats:
                    row[prefix + "wall_median"] = statistics.median(row[prefix + "wall"])
                    row[prefix + "cpu_median"] = statistics.median(row[prefix + "cpu"])
                    print(f"{prefix + c.name:55s} cpu {row[prefix + 'cpu_median']:6.2f}s wall "
                          f"{row[prefix + 'wall_median']:6.2f}s nodes {row[prefix + 'egraph_nodes']:6d} runs "
                          f"{[(r['egraph_nodes'], r['iterations']) for r in row[prefix + 'runs']]}", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(list(rows.values()), indent=1))


def _setting(text: str) -> tuple[object, str, object]:
    """``package.module.ATTR=VALUE`` -> (module, attribute, value)."""
    path, value = text.split("=", 1)
    module_name, attr = path.rsplit(".", 1)
    module = importlib.import_module(module_name)
    getattr(module, attr)  # a misspelt name fails here, not silently
    return module, attr, ast.literal_eval(value)


@contextmanager
def _patched(settings: list[tuple[object, str, object]]) -> Iterator[None]:
    old = [getattr(m, a) for m, a, _ in settings]
    for m, a, v in settings:
        setattr(m, a, v)
    try:
        yield
    finally:
        for (m, a, _), v in zip(settings, old):
            setattr(m, a, v)


def compare(before_path: str, after_path: str) -> None:
    before = {r["name"]: r for r in json.loads(pathlib.Path(before_path).read_text())}
    after = {r["name"]: r for r in json.loads(pathlib.Path(after_path).read_text())}
    changed = 0
    for name in before.keys() & after.keys():
        b, a = before[name], after[name]
        if b["program"] != a["program"] or b["cost"] != a["cost"]:
            changed += 1
            mark = "WORSE" if a["cost"] > b["cost"] * (1 + 1e-9) else ("better" if a["cost"] < b["cost"] else "same cost")
            print(f"{name:50s} cost {b['cost']:.6g} -> {a['cost']:.6g} {mark}; program "
                  f"{'same' if b['program'] == a['program'] else 'differs'}")
    print(f"{changed} of {len(before.keys() & after.keys())} cases differ")
    for name in sorted(before.keys() & after.keys(), key=lambda n: -before[n]["egraph_nodes"])[:25]:
        print(f"{name:50s} e-nodes {before[name]['egraph_nodes']:7d} -> {after[name]['egraph_nodes']:7d}")


if __name__ == "__main__":
    main()
