"""Rule-set ablation on the built-in transformer block: what each rule set buys, predicted and measured.

    python bench/rule_ablation.py [--reps 200] [--drop canonical transpose ...] [--out F]

Runs on whatever device jax has (CPU included: the demo's machine). The block
(`examples.block_example`) under ``jax.jit`` as written, optimized with every rule set, and
optimized with each rule set left out (``--drop``: only those); every variant's value is checked
against the original. Timing: the variants take turns call by call (so drifts in machine load hit
them alike), ``--reps`` rounds after one warm-up each, median per variant. The page lists the
cost model's prediction beside each measurement: where they disagree, the model is what to fix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import device_tag, header, write_results  # noqa: E402

import eqsat_attn as ea  # noqa: E402
from eqsat_attn import examples  # noqa: E402
from eqsat_attn.egraph import resolve  # noqa: E402


def interleaved_medians(fns: dict[str, Callable[..., Any]], args: Sequence[Any], reps: int) -> dict[str, float]:
    """Median seconds per function, the functions called in turn ``reps`` times after a warm-up."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(reps: int, drop: Sequence[str] | None) -> list[dict[str, Any]]:
    fn, args = examples.block_example()
    names = [rs.name for rs in resolve(None)]
    unknown = sorted(set(drop or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown rule sets {unknown}; the rule sets are {names}")
    variants: dict[str, list[str] | None] = {"as written": None, "all rule sets": names}
    for name in drop or names:
        variants[f"without {name}"] = [n for n in names if n != name]
    expected = np.asarray(jax.jit(fn)(*args))
    fns, rows = {}, []
    for label, rules in variants.items():
        row: dict[str, Any] = {"variant": label, "predicted": None, "nodes": None}
        if rules is None:
            fns[label] = jax.jit(fn)
        else:
            optimized = ea.optimize(fn, rules=rules)
            report = optimized.explain(*args)
            row.update(predicted=report.cost_after, before=report.cost_before,
                       nodes=len(report.after.live_nodes()))
            fns[label] = jax.jit(optimized)
        row["err"] = float(np.max(np.abs(np.asarray(fns[label](*args)) - expected)))
        rows.append(row)
    medians = interleaved_medians(fns, args, reps)
    for row in rows:
        row["seconds"] = medians[row["variant"]]
    return rows


def render(rows: list[dict[str, Any]], reps: int, command: str) -> str:
    lines = header("Rule-set ablation: the built-in transformer block", command)
    base = rows[0]["seconds"]
    predicted_base = next((r["before"] for r in rows if r.get("before")), None)
    lines += [
        f"- workload: `examples.block_example()` (B2 S64 E128 H4 f32 pre-norm block, causal); the "
        f"device's roofline cost model; {reps} interleaved rounds after a warm-up, median",
        "",
        "| variant | predicted us | predicted speed-up | measured ms | measured speed-up | live nodes | max err |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        predicted = r["predicted"] if r["predicted"] is not None else predicted_base
        pred_speedup = predicted_base / predicted if predicted_base and predicted else None
        lines.append(
            f"| {r['variant']} | {predicted * 1e6:.1f} | {pred_speedup:.2f}x | {r['seconds'] * 1e3:.3f} | "
            f"{base / r['seconds']:.2f}x | {r['nodes'] if r['nodes'] is not None else '-'} | {r['err']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--drop", nargs="*", default=None, help="rule sets to leave out one at a time (default: each)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    ns = p.parse_args(argv)
    rows = run(ns.reps, ns.drop)
    text = render(rows, ns.reps, "python bench/rule_ablation.py " + " ".join(argv))
    print(text)
    default = f"rule-ablation-{device_tag()}-{dt.date.today().isoformat()}.md"
    write_results(text, ns.out, default)
    return 0


if __name__ == "__main__":
    main()
