"""How much of the attention corpus (tests/attention_corpus.py) the rules raise, by family.

    python bench/attention_coverage.py [--family mask ...] [--cases] [--json out.json] [--precision fast_math]

Optimizes every case priced for an H100 (on whatever device jax has; the CPU is enough) and prints
a markdown table: per family, the positives raised with equal values, the negatives left alone
with equal values, and the median and largest optimize time (wall time of ``explain``: trace,
e-graph, extraction, lowering; on a loaded machine the per-case CPU seconds of ``--cases`` say
more). A case counts as "ok" only with equal values and no fallback. ``--cases`` adds one row per
case. One untimed optimization of the first case runs before the timed ones (the process's
one-time costs, rule files and registration, are issue 22's first call; ``--no-warmup`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from dataclasses import asdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from attention_corpus import CASES, KNOWN_RAISED_NEGATIVES, KNOWN_UNRAISED, Case, Outcome, evaluate  # noqa: E402


def verdict(case: Case, outcome: Outcome) -> str:
    """"ok" when the case behaved as its verdict says, else what went wrong."""
    if not outcome.values_equal:
        return "VALUES CHANGED"
    if outcome.fallbacks:
        return "fell back"
    if case.positive:
        return "ok" if outcome.fully_raised else "not raised"
    return "RAISED" if outcome.raised else "ok"


def family_table(results: list[tuple[Case, Outcome]]) -> list[str]:
    families = sorted({c.family for c, _ in results}, key=lambda f: (f == "negative", f))
    lines = ["| family | positives raised | negatives left alone | median optimize s | max s |",
             "|---|---|---|---|---|"]
    for family in families:
        rows = [(c, o) for c, o in results if c.family == family]
        pos = [verdict(c, o) == "ok" for c, o in rows if c.positive]
        neg = [verdict(c, o) == "ok" for c, o in rows if not c.positive]
        times = [o.seconds for _, o in rows]
        lines.append(
            f"| {family} | {f'{sum(pos)} / {len(pos)}' if pos else '-'} | {f'{sum(neg)} / {len(neg)}' if neg else '-'} "
            f"| {statistics.median(times):.2f} | {max(times):.2f} |")
    pos = [verdict(c, o) == "ok" for c, o in results if c.positive]
    neg = [verdict(c, o) == "ok" for c, o in results if not c.positive]
    times = [o.seconds for _, o in results]
    lines.append(f"| **all** | {sum(pos)} / {len(pos)} | {sum(neg)} / {len(neg)} "
                 f"| {statistics.median(times):.2f} | {max(times):.2f} |")
    return lines


def case_table(results: list[tuple[Case, Outcome]]) -> list[str]:
    lines = ["| case | family | expected | result | attention ops | e-nodes | optimize s | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for c, o in results:
        lines.append(f"| {c.name} | {c.family} | {'attention' if c.positive else 'not attention'} | "
                     f"{verdict(c, o)} | {o.raised} | {o.egraph_nodes}{'' if o.saturated else ' (limit)'} "
                     f"| {o.seconds:.2f} | {o.cpu_seconds:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="*", help="only these families")
    parser.add_argument("--case", nargs="*", help="only these case names")
    parser.add_argument("--cases", action="store_true", help="also print one row per case")
    parser.add_argument("--json", type=pathlib.Path, help="write every outcome to this file")
    parser.add_argument("--precision", default="exact", choices=("exact", "fast_math"),
                        help="the optimizer's precision policy (README, \"Precision policy\")")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the first case with the process's one-time costs (rule files, registration)")
    args = parser.parse_args()
    selected = [c for c in CASES if (not args.family or c.family in args.family)
                and (not args.case or c.name in args.case)]
    if selected and not args.no_warmup:  # one untimed optimization pays the process's start-up
        evaluate(selected[0], precision=args.precision)
    results = []
    for c in selected:
        outcome = evaluate(c, precision=args.precision)
        results.append((c, outcome))
        print(f"{c.name}: {verdict(c, outcome)} ({outcome.seconds:.2f} s, CPU {outcome.cpu_seconds:.2f} s)",
              file=sys.stderr, flush=True)
    print("\n".join(family_table(results)))
    cpu = sorted(o.cpu_seconds for _, o in results)
    if cpu:
        print(f"\nCPU seconds per case: median {statistics.median(cpu):.2f}, max {cpu[-1]:.2f}, "
              f"{sum(t > 1.0 for t in cpu)} of {len(cpu)} over 1 s")
    if args.cases:
        print()
        print("\n".join(case_table(results)))
    stale = [c.name for c, o in results if c.name in KNOWN_UNRAISED and o.fully_raised]
    stale += [c.name for c, o in results if c.name in KNOWN_RAISED_NEGATIVES and not o.raised]
    if stale and args.precision == "exact":
        print(f"\nbehaving now, remove from KNOWN_UNRAISED / KNOWN_RAISED_NEGATIVES: {', '.join(stale)}",
              file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(
            [{"name": c.name, "family": c.family, "positive": c.positive, "verdict": verdict(c, o),
              **{k: v for k, v in asdict(o).items() if k != "after"}} for c, o in results], indent=1))


if __name__ == "__main__":
    main()
