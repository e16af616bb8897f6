"""The `eqsat-attn` command line: `demo` (the README's main job) and `rules`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from . import examples
from .egraph import resolve
from .optimize import optimize


def _median_seconds(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def demo(console: Console) -> int:
    """Optimize the built-in transformer block; show programs, costs, timings and a value check."""
    fn, args = examples.block_example()
    optimized = optimize(fn)
    with console.status("tracing, saturating and extracting the built-in transformer block..."):
        report = optimized.explain(*args)
    console.print(str(report), highlight=False, markup=False)
    expected = jax.jit(fn)(*args)
    got = optimized(*args)
    err = float(np.max(np.abs(np.asarray(expected) - np.asarray(got))))
    with console.status("timing (20 repetitions each, median)..."):
        t_ref = _median_seconds(jax.jit(fn), args)
        t_opt = _median_seconds(jax.jit(optimized), args)
    table = Table(title=f"measured on this machine ({jax.devices()[0].device_kind})")
    table.add_column("program")
    table.add_column("median time", justify="right")
    table.add_row("original under jax.jit", f"{t_ref * 1e3:.3f} ms")
    table.add_row("eqsat_attn.optimize under jax.jit", f"{t_opt * 1e3:.3f} ms")
    console.print(table)
    ok = err <= 1e-4 * max(1.0, float(np.max(np.abs(np.asarray(expected)))))
    console.print(f"value check: max |optimized - original| = {err:.3g} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


def list_rules(console: Console) -> int:
    """Every rule set with its rule families and their one-line docs."""
    for rs in resolve(None):
        table = Table(title=f"{rs.name} ({rs.phase}): {rs.doc}", show_lines=False)
        table.add_column("family")
        table.add_column("rules", justify="right")
        table.add_column("what it says")
        for fam in rs:
            table.add_row(fam.name, str(len(fam.rules)), fam.doc)
        console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqsat-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="optimize the built-in transformer block and check its values")
    sub.add_parser("rules", help="list the rule sets and their rule families")
    ns = parser.parse_args(argv)
    console = Console()
    if ns.command == "demo":
        return demo(console)
    return list_rules(console)


if __name__ == "__main__":
    sys.exit(main())
