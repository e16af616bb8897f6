"""The `eqsat-attn` command line: `demo`, `rules`, `explore` and `bench`.

    eqsat-attn demo                                   # optimize the built-in transformer block
    eqsat-attn rules                                  # rule sets and their families
    eqsat-attn explore block --shapes 2x16x32         # a built-in example (block, attention, ...)
    eqsat-attn explore mymod:fn --shapes 2x8x64,64x64 --dtype bf16 --cost-model roofline-h100 --svg g.svg
    eqsat-attn bench scaling|end-to-end|cost-model|rule-ablation [options of the benchmark]
"""

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
    with console.status("explaining the projection / V layout choice (exact extractions)..."):
        report.layout_decision  # computed on first access, printed below
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


DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "fp8": "float8_e4m3fn"}
BENCHMARKS = {"scaling": "scaling", "end-to-end": "end_to_end", "cost-model": "cost_model_experiment",
              "rule-ablation": "rule_ablation"}


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"2x8x64,64x64" -> [(2, 8, 64), (64, 64)] ("" or "scalar" is a rank-0 shape)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("", "scalar", "()"):
            shapes.append(())
            continue
        try:
            shapes.append(tuple(int(d) for d in part.split("x")))
        except ValueError:
            raise SystemExit(f"eqsat-attn: bad shape {part!r} in --shapes; write dimensions like 2x8x64") from None
    return shapes


def resolve_target(target: str, shapes: str | None, dtype: str, heads: int) -> tuple[Callable[..., Any], tuple[Any, ...], str]:
    """(fn, args, description) for a built-in example name or ``module:function``."""
    import importlib
    import os

    import jax.numpy as jnp

    np_dtype = jnp.dtype(DTYPES.get(dtype, dtype))
    if ":" not in target:
        if target not in examples.EXAMPLES:
            raise SystemExit(f"eqsat-attn: unknown example {target!r}; built-in: {', '.join(examples.EXAMPLES)}"
                             " (or pass MODULE:FUNCTION with --shapes)")
        dims = parse_shapes(shapes)[0] if shapes else None
        if target in ("block", "stack2"):
            bs = examples.BlockShape(*dims, heads=heads) if dims else examples.BlockShape()
            if len(dims or (0, 0, 0)) != 3:
                raise SystemExit("eqsat-attn: --shapes for block is BxSxE, e.g. 2x16x32")
            if target == "block":
                fn, args = examples.stacked_example(1, bs, dtype=np_dtype)
                fn1 = lambda params, x: examples.transformer_block(params, x, bs.heads)  # noqa: E731
                return fn1, (args[0][0], args[1]), f"transformer block B{bs.batch} S{bs.seq} E{bs.embed} H{bs.heads}"
            fn, args = examples.stacked_example(2, bs, dtype=np_dtype)
            return fn, args, f"2 transformer blocks B{bs.batch} S{bs.seq} E{bs.embed} H{bs.heads}"
        if dims is not None and len(dims) != 4:
            raise SystemExit(f"eqsat-attn: --shapes for {target} is BxHxSxD, e.g. 2x4x16x8")
        kw = dict(zip(("batch", "heads", "seq", "head_dim"), dims)) if dims else {}
        fn, args = examples.EXAMPLES[target](**kw, dtype=np_dtype)
        return fn, args, f"{target} {'x'.join(map(str, args[0].shape))}"
    module_name, _, fn_name = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"eqsat-attn: cannot load {target!r}: {exc}") from None
    if not shapes:
        raise SystemExit("eqsat-attn: MODULE:FUNCTION needs --shapes, one per argument, e.g. --shapes 2x8x64,64x64")
    keys = jax.random.split(jax.random.PRNGKey(0), len(parse_shapes(shapes)))
    args = tuple(
        (jax.random.normal(k, s) / np.sqrt(max(1, s[-1] if s else 1))).astype(np_dtype)
        for k, s in zip(keys, parse_shapes(shapes))
    )
    return fn, args, f"{target}({', '.join(str(a.dtype) + str(list(a.shape)) for a in args)})"


def explore_command(console: Console, ns: argparse.Namespace) -> int:
    """Trace a function, run rule sets step by step, extract, explain the attention choice."""
    from .explore import Exploration, cost_model_from_name
    from .pipeline import Limits

    fn, args, what = resolve_target(ns.target, ns.shapes, ns.dtype, ns.heads)
    rules = [r for r in (ns.rules or "").split(",") if r] or None
    model = cost_model_from_name(ns.cost_model)
    with console.status(f"tracing and encoding {what}..."):
        from .capture import capture

        ex = Exploration(capture(fn, *args), fn=fn)
    console.print(f"[bold]{what}[/]: {len(ex.program.live_nodes())} nodes, e-graph {ex.size} e-nodes after encoding"
                  f" ({ex.encode_seconds:.2f} s)")
    if ns.show_before:
        console.rule("before")
        console.print(str(ex.program), highlight=False, markup=False)
    with console.status("running rule sets (one step per iteration)...") as status:
        for i in range(ns.iterations):
            step = ex.run(*(rules or ()), limits=Limits(iterations=1, seconds=ns.seconds))
            status.update(f"iteration {i + 1}: {step.nodes_after} e-nodes")
            if step.saturated or step.nodes_after > Limits().nodes:
                break
    table = Table(title="rule-set steps")
    for col in ("step", "e-nodes", "seconds", "rule families fired (matches)"):
        table.add_column(col, justify="left" if col.startswith("rule") else "right")
    for st in ex.history:
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(st.rules_fired.items(), key=lambda kv: (-kv[1], kv[0])))
        table.add_row(str(st.index), f"{st.nodes_before} -> {st.nodes_after}", f"{st.seconds:.3f}", fired or "-")
    console.print(table)
    last = ex.history[-1]
    console.print("saturated" if last.saturated else f"stopped after {len(ex.history)} iterations (not saturated)")
    with console.status(f"extracting under {getattr(model, 'name', model)}..."):
        best = ex.extract(model)
    console.rule("after")
    console.print(str(best.program), highlight=False, markup=False)
    from .explore import _fmt_cost

    console.print(f"predicted cost under {best.model.name}: {_fmt_cost(best.original_cost, model)} -> "
                  f"{_fmt_cost(best.cost, model)}", highlight=False)
    for info in best.attention:
        console.print(f"  {info}", highlight=False, markup=False)
    if not best.attention:
        console.print("  no attention op in the chosen program")
    if ns.compare:
        with console.status("extracting under every cost model..."):
            console.print(ex.compare([m for m in ns.compare.split(",") if m]).table())
    if best.attention:
        with console.status("pricing the alternatives of each attention e-class..."):
            why = ex.why("attention", model)
        console.print(why.format(limit=ns.alternatives), highlight=False, markup=False, soft_wrap=True)
    if ns.svg:
        with console.status(f"drawing the e-graph to {ns.svg}..."):
            ex.svg(ns.svg)
        console.print(f"wrote {ns.svg}")
    return 0


def bench_command(console: Console, name: str, rest: Sequence[str]) -> int:
    """Run ``bench/<name>.py``'s main with the remaining arguments (needs a source checkout)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{BENCHMARKS[name]}.py"
    if not path.is_file():
        console.print(f"eqsat-attn bench: {path} not found; the benchmarks ship with the source tree, not the wheel")
        return 2
    spec = importlib.util.spec_from_file_location(f"eqsat_attn_bench_{BENCHMARKS[name]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up there
    spec.loader.exec_module(module)
    return int(module.main(list(rest)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqsat-attn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="optimize the built-in transformer block and check its values")
    sub.add_parser("rules", help="list the rule sets and their rule families")
    ex = sub.add_parser("explore", help="trace a function, run rule sets step by step, explain the chosen program")
    ex.add_argument("target", help=f"MODULE:FUNCTION or a built-in example ({', '.join(examples.EXAMPLES)})")
    ex.add_argument("--shapes", help="argument shapes, e.g. 2x8x64,64x64 (built-ins: block BxSxE, attention BxHxSxD)")
    ex.add_argument("--dtype", default="f32", help=f"argument dtype: {', '.join(DTYPES)} or a NumPy name (default f32)")
    ex.add_argument("--heads", type=int, default=4, help="heads of the built-in block (default 4)")
    ex.add_argument("--rules", help="comma-separated rule-set names or rule-file paths (default: the default list)")
    ex.add_argument("--cost-model", default="default",
                    help="bytes | roofline-h100 | roofline-h200 | roofline-cpu (add -reference for XLA attention)"
                         " | default (this device)")
    ex.add_argument("--compare", help="also compare these cost models, e.g. bytes,roofline-h100,roofline-cpu")
    ex.add_argument("--iterations", type=int, default=30, help="most rule-set iterations (default 30)")
    ex.add_argument("--seconds", type=float, default=20.0, help="time limit per iteration (default 20)")
    ex.add_argument("--alternatives", type=int, default=8, help="cheapest alternatives shown per e-class (default 8)")
    ex.add_argument("--svg", help="draw the e-graph to this SVG file (a summary when it is large)")
    ex.add_argument("--show-before", action=argparse.BooleanOptionalAction, default=True,
                    help="print the captured program (default on)")
    bench = sub.add_parser("bench", help="run a benchmark: scaling, end-to-end, cost-model or rule-ablation")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark (see its --help)")
    ns = parser.parse_args(argv)
    console = Console()
    if ns.command == "demo":
        return demo(console)
    if ns.command == "explore":
        return explore_command(console, ns)
    if ns.command == "bench":
        return bench_command(console, ns.benchmark, ns.args)
    return list_rules(console)


if __name__ == "__main__":
    sys.exit(main())
