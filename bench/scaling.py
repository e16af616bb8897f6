"""Optimizer scaling (issue 6): trace + saturate + extract time and e-graph size for a stack of
1..48 transformer layers, beside XLA's compile time for the same function, with a profile of
where the optimizer's time goes.

    python bench/scaling.py                               # layers 1 2 4 12 24 48, writes bench/results/scaling-<date>.md
    python bench/scaling.py --layers 1 2 4 --out /tmp/s.md
    eqsat-attn bench scaling [--layers ...]

Shape B2 S64 E128 H4 f32 (the optimizer's cost depends on the graph, not on tensor sizes).
Each layer is `examples.transformer_block` with its own weights. Optimizer stages use the
default options of `ea.optimize` (default rule sets, `Limits()`: 30 iterations, 200k e-nodes,
20 s), the current device's roofline cost model and the greedy-DAG extractor, exactly as
`eqsat_attn.pipeline.optimize_program` runs them; the stages are timed separately:

- trace: jax.make_jaxpr + capture into ir.Program
- encode: Program -> egglog lets
- rules: egglog run-schedule commands of the saturation loop (per iteration: analysis, raise, rewrite)
- answer: index-math questions answered in Python between iterations (read table + submit)
- size: counting e-nodes after each iteration (the driver's limit check)
- final: the driver's closing analysis + answer loop
- extract: greedy-DAG extraction, of which `callback` is the Python cost function egglog
  calls once per e-node (`RawCostModel.enode_cost`; `view` = its child-type lookups), then `decode`.

Targets (issue 6): 12 layers < 1.0 s, 48 layers < 4.4 x the 12-layer time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import pathlib
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from eqsat_attn import examples  # noqa: E402
from eqsat_attn.capture import capture  # noqa: E402

DEFAULT_LAYERS = (1, 2, 4, 12, 24, 48)
TARGET_12 = 1.0
TARGET_RATIO = 4.4


@dataclass
class Profile:
    """Seconds per stage of one optimizer run, and counters."""

    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: Counter = field(default_factory=Counter)
    per_iteration: list[dict[str, float]] = field(default_factory=list)
    rule_time: Counter = field(default_factory=Counter)  # egglog search+apply seconds per rule family

    def add(self, key: str, seconds: float, n: int = 1) -> None:
        self.times[key] += seconds
        self.counts[key] += n


def _timed(profile: Profile, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.add(key, time.perf_counter() - start)

    return wrapper


def _family(rule: Any) -> str:
    name = str(getattr(rule, "name", None) or rule)
    return name.split("#", 1)[0].rstrip("?")


class _Patched:
    """Wrap the driver's and extractor's module-level helpers with timers for one run."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.saved: list[tuple[Any, str, Any]] = []

    def patch(self, module: Any, name: str, new: Any) -> None:
        self.saved.append((module, name, getattr(module, name)))
        setattr(module, name, new)

    def __enter__(self) -> _Patched:
        from eqsat_attn.egraph import driver, extract

        p = self.profile
        self.patch(driver, "egraph_size", _timed(p, "size", driver.egraph_size))
        answer_call = driver.QuestionAnswerer.__call__
        self.patch(driver.QuestionAnswerer, "__call__", _timed(p, "answer", answer_call))
        self.patch(extract, "decode", _timed(p, "decode", extract.decode))
        # the extractor's Python callback: RawCostModel.enode_cost, once per e-node
        self.patch(extract.RawCostModel, "enode_cost", _timed(p, "callback", extract.RawCostModel.enode_cost))
        self.patch(extract.RawCostModel, "_type", _timed(p, "view", extract.RawCostModel._type))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, old in reversed(self.saved):
            setattr(module, name, old)


def optimize_profiled(program: Any, profile: Profile, reuse_blocks: bool = True) -> dict[str, Any]:
    """`pipeline.optimize_program`'s stages (same calls), timed: split into repeated blocks
    (`eqsat_attn.blocks`), then encode, saturate and extract each distinct part, then splice."""
    from eqsat_attn.blocks import splice, split_repeated
    from eqsat_attn.cost import program_cost
    from eqsat_attn.pipeline import default_cost_model

    model = default_cost_model()
    start = time.perf_counter()
    split = split_repeated(program) if reuse_blocks else None
    profile.add("split", time.perf_counter() - start)
    parts = [program] if split is None else split.distinct
    results = [_optimize_part_profiled(part, profile, model) for part in parts]
    start = time.perf_counter()
    if split is None:
        chosen = results[0]["chosen"]
    else:
        chosen = splice(program, split, {part: r["chosen"] for part, r in zip(parts, results)})
    profile.add("split", time.perf_counter() - start)
    if program_cost(chosen, model) > program_cost(program, model):
        chosen = program
    return {
        "nodes": sum(r["nodes"] for r in results),
        "iterations": max(r["iterations"] for r in results),
        "saturated": all(r["saturated"] for r in results),
        "stop": "; ".join(r["stop"] for r in results if not r["saturated"]),
        "repeats": split.repeats if split is not None else 0,
        "parts": len(parts),
        "cost_before": program_cost(program, model),
        "cost_after": program_cost(chosen, model),
        "attention": sum(1 for i in chosen.live_nodes() if chosen.nodes[i].op == "attention"),
        "v_layouts": Counter(str(chosen.nodes[i].params["v_layout"]) for i in chosen.live_nodes()
                             if chosen.nodes[i].op == "attention"),
        "transposes": sum(1 for i in chosen.live_nodes() if chosen.nodes[i].op == "transpose"),
        "chosen": chosen,
    }


def _optimize_part_profiled(program: Any, profile: Profile, model: Any) -> dict[str, Any]:
    """`pipeline.optimize_part`'s stages for one (part) program, timed."""
    from eqsat_attn.cost import program_cost
    from eqsat_attn.egraph import driver, encode, extract_program, resolve, run_rulesets
    from eqsat_attn.pipeline import Limits

    with _Patched(profile) as patched, contextlib.ExitStack() as stack:
        rulesets = resolve(None)
        start = time.perf_counter()
        # counted in "saturate": registering the rules (a process's first run) or reverting to them
        egraph = stack.enter_context(driver.prepared_egraph(rulesets))
        prepare_seconds = time.perf_counter() - start
        profile.add("prepare", prepare_seconds)
        start = time.perf_counter()
        enc = encode(program, egraph)
        profile.add("encode", time.perf_counter() - start)
        runs: list[tuple[float, Any]] = []
        original_run = driver.run_schedule

        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            report = original_run(*args, **kwargs)
            runs.append((time.perf_counter() - t0, report))
            return report

        patched.patch(driver, "run_schedule", run)
        start = time.perf_counter()
        result = run_rulesets(egraph, rulesets, Limits())
        profile.add("saturate", time.perf_counter() - start + prepare_seconds)
        n_loop = result.iterations
        for i, (seconds, report) in enumerate(runs):
            profile.add("rules" if i < n_loop else "final_rules", seconds)
            for rule, t in report.search_and_apply_time_per_rule.items():
                profile.rule_time[_family(rule)] += t.total_seconds() if hasattr(t, "total_seconds") else float(t)
        profile.per_iteration += [{"seconds": s, **st} for (s, _), st in zip(runs, result.steps)]
        start = time.perf_counter()
        chosen, _ = extract_program(egraph, enc, model)
        profile.add("extract", time.perf_counter() - start)
    if program_cost(chosen, model) > program_cost(program, model):  # as pipeline.optimize_part
        chosen = program
    return {"chosen": chosen, "nodes": result.egraph_nodes, "iterations": result.iterations,
            "saturated": result.saturated, "stop": result.stop_reason}


def xla_compile_seconds(fn: Callable[..., Any], args: Sequence[Any]) -> float:
    f = jax.jit(lambda *a: fn(*a))  # a fresh function: no compilation cache hit
    start = time.perf_counter()
    f.lower(*args).compile()
    return time.perf_counter() - start


def measure(layers: int, reuse_blocks: bool = True) -> dict[str, Any]:
    fn, args = examples.stacked_example(layers)
    profile = Profile()
    cpu_start = time.process_time()
    start = time.perf_counter()
    captured = capture(fn, *args)
    profile.add("trace", time.perf_counter() - start)
    out = optimize_profiled(captured.program, profile, reuse_blocks)
    cpu = time.process_time() - cpu_start
    t = profile.times
    out.update(
        layers=layers,
        program_nodes=len(captured.program.live_nodes()),
        total=t["trace"] + t["split"] + t["encode"] + t["saturate"] + t["extract"],
        cpu=cpu,
        xla=xla_compile_seconds(fn, args),
        profile=profile,
    )
    return out


def _s(x: float) -> str:
    return f"{x:.3f}"


def _spread(row: dict[str, Any]) -> str:
    lo, hi = row.get("spread", (row["total"], row["total"]))
    return "" if lo == hi else f" ({lo:.2f}-{hi:.2f})"


def render(rows: list[dict[str, Any]], command: str, reuse: bool = True, repeat: int = 1) -> str:
    """The results file (markdown)."""
    import egglog

    now = dt.datetime.now()
    lines = [
        f"# Optimizer scaling: {now:%Y-%m-%d}",
        "",
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.platform()}),"
        f" jax {jax.__version__} on {jax.devices()[0].device_kind}, egglog {getattr(egglog, '__version__', '14')},"
        f" Python {platform.python_version()}",
        f"- date: {now:%Y-%m-%d %H:%M}",
        f"- command: `{command}`",
        "- workload: `examples.stacked_example(layers)`: B2 S64 E128 H4 f32 pre-norm transformer blocks,"
        " own weights per layer; default rule sets, `Limits()`, current-device roofline, greedy-DAG extraction.",
        f"- repeated blocks: {'reused (default: identical layers optimized once, eqsat_attn.blocks)' if reuse else 'off (--whole: the whole program in one e-graph)'}.",
        f"- times: wall seconds, {'one run each' if repeat == 1 else f'median of {repeat} runs (min-max in the total column)'}"
        " (expect +-30% noise on this machine; more when other processes run; load average at the end:"
        f" {', '.join(f'{x:.1f}' for x in os.getloadavg())}); `cpu` = process time of trace + optimizer"
        " (this process only, less sensitive to other load).",
        "",
        "## Totals",
        "",
        "| layers | program nodes | repeats | e-nodes | iterations | saturated | trace | split+splice | encode | "
        "saturate | extract | **optimizer total** | cpu | XLA compile | total / XLA |",
        "|---:|---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["profile"].times
        lines.append(
            f"| {r['layers']} | {r['program_nodes']} | {r['repeats']} | {r['nodes']} | {r['iterations']} | "
            f"{'yes' if r['saturated'] else 'no: ' + r['stop']} | {_s(t['trace'])} | {_s(t['split'])} | "
            f"{_s(t['encode'])} | {_s(t['saturate'])} | {_s(t['extract'])} | **{_s(r['total'])}**{_spread(r)} | "
            f"{_s(r['cpu'])} | {_s(r['xla'])} | {r['total'] / r['xla']:.1f}x |"
        )
    by = {r["layers"]: r for r in rows}
    lines += ["", "## Targets", ""]
    if 12 in by:
        t12 = by[12]["total"]
        lines.append(f"- 12 layers < {TARGET_12} s: {'met' if t12 < TARGET_12 else 'MISSED'} ({t12:.2f} s)")
        if 48 in by:
            ratio = by[48]["total"] / t12
            lines.append(f"- 48 layers < {TARGET_RATIO} x 12 layers: {'met' if ratio < TARGET_RATIO else 'MISSED'}"
                         f" ({ratio:.2f}x)")
    else:
        lines.append("- (12 layers not measured in this run)")
    lines += [
        "",
        "## Where the time goes",
        "",
        "Stage seconds (share of the optimizer total). `split` = finding repeated blocks and splicing the"
        " optimized ones back; `prepare` = registering the rule sets in an e-graph (a process's first"
        " optimization) or reverting a prepared one (egglog push/pop); `rules` = egglog `run` of the saturation loop;",
        "`answer` = Python index-math questions; `size` = e-node counting per iteration; `final` = the",
        "closing analysis/answer loop; `callback` = Python cost function inside extraction"
        " (`view` = child-type table lookups inside it), calls = e-nodes priced.",
        "",
        "| layers | trace | split | prepare | encode | rules | answer | size | final | extract |"
        " of which callback (calls) | view | decode |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["profile"]
        t = p.times
        tot = r["total"]
        pct = lambda k: f"{t[k]:.3f} ({100 * t[k] / tot:.0f}%)"  # noqa: E731
        lines.append(
            f"| {r['layers']} | {pct('trace')} | {pct('split')} | {pct('prepare')} | {pct('encode')} | {pct('rules')} | {pct('answer')} | {pct('size')} | "
            f"{t['final_rules']:.3f} | {pct('extract')} | {t['callback']:.3f} ({p.counts['callback']}) | "
            f"{t['view']:.3f} | {t['decode']:.3f} |"
        )
    biggest = rows[-1]
    p = biggest["profile"]
    lines += [
        "",
        f"### Per iteration at {biggest['layers']} layers",
        "",
        "| iteration | egglog run s | e-nodes after | families fired (top 4) |",
        "|---:|---:|---:|:---|",
    ]
    for it in p.per_iteration:
        fired = sorted(it.get("rules_fired", {}).items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"| {it.get('iteration', '')} | {it['seconds']:.3f} | {it.get('egraph_nodes', '')} | "
                     + ", ".join(f"{k} x{v}" for k, v in fired) + " |")
    lines += ["", f"### egglog search+apply time per rule family at {biggest['layers']} layers (top 10)", "",
              "| family | seconds |", "|:---|---:|"]
    for fam, secs in p.rule_time.most_common(10):
        lines.append(f"| {fam} | {secs:.3f} |")
    lines += ["", "## Chosen programs", "", "| layers | attention | V layouts | transposes | predicted cost before -> after |",
              "|---:|---:|:---|---:|:---|"]
    for r in rows:
        lay = ", ".join(f"{k} x{v}" for k, v in r["v_layouts"].items()) or "-"
        lines.append(f"| {r['layers']} | {r['attention']} | {lay} | {r['transposes']} | "
                     f"{r['cost_before'] * 1e3:.3f} ms -> {r['cost_after'] * 1e3:.3f} ms |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (not a project dependency; `pip install matplotlib` to get one)"
    xs = [r["layers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["total"] for r in rows], "o-", label="eqsat-attn (trace+encode+saturate+extract)")
    ax.plot(xs, [r["xla"] for r in rows], "s-", label="XLA compile")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("transformer layers")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path.name}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--out", type=pathlib.Path, default=None, help="markdown results file")
    parser.add_argument("--cpu-smoke", action="store_true", help="layers 1 and 2 only (tests)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per layer count; the median run (by optimizer total) is reported, with min and max")
    parser.add_argument("--whole", action="store_true",
                        help="optimize the whole program in one e-graph (no reuse of repeated blocks)")
    ns = parser.parse_args(argv)
    layers = [1, 2] if ns.cpu_smoke else ns.layers
    out = ns.out or ROOT / "bench" / "results" / f"scaling-{dt.date.today():%Y-%m-%d}.md"
    command = "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scaling", total=len(layers))
        for n in layers:
            progress.update(task, description=f"{n} layer(s): trace, saturate, extract, XLA compile")
            runs = sorted((measure(n, reuse_blocks=not ns.whole) for _ in range(ns.repeat)), key=lambda r: r["total"])
            r = runs[len(runs) // 2]  # the median run by optimizer total (its profile is reported)
            r["spread"] = (runs[0]["total"], runs[-1]["total"])
            rows.append(r)
            console.print(f"{n:>3} layers: optimizer {r['total']:.2f} s ({r['nodes']} e-nodes, "
                          f"{'saturated' if r['saturated'] else r['stop']}), XLA compile {r['xla']:.2f} s")
            progress.advance(task)
    text = render(rows, command.strip(), reuse=not ns.whole, repeat=ns.repeat)
    note = plot(rows, out.with_suffix(".png")) if not ns.cpu_smoke else "no plot (smoke run)"
    text += f"\n{note}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
