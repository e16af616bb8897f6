"""The `eqsat-attn` command line: `demo`, `rules`, `explore` and `bench`.

    eqsat-attn demo                                   # optimize the built-in transformer block
    eqsat-attn rules                                  # rule sets and their families
    eqsat-attn explore block --shapes 2x16x32         # a built-in example (block, attention, ...)
    eqsat-attn explore mymod:fn --shapes 2x8x64,64x64 --dtype bf16 --cost-model roofline-h100 --svg g.svg
    eqsat-attn explore block --svg attention.svg --focus attention --depth 2 --fold --why-svg why.svg
    eqsat-attn bench scaling|end-to-end|cost-model|rule-ablation [options of the benchmark]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from . import examples
from .capture import capture
from .choices import COST_MODEL_NAMES, check_choice, check_rules, cost_model_from_name
from .egraph import resolve
from .explore import Exploration, _fmt_cost
from .limits import Limits
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


class UsageError(ValueError):
    """A mistake in the command line: `main` prints its message on one line and returns 2."""


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"2x8x64,64x64" -> [(2, 8, 64), (64, 64)] ("" or "scalar" is a rank-0 shape)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("", "scalar", "()"):
            shapes.append(())
            continue
        try:
            dims = tuple(int(d) for d in part.split("x"))
        except ValueError:
            raise UsageError(f"bad shape {part!r} in --shapes; write dimensions like 2x8x64") from None
        if any(d < 0 for d in dims):
            raise UsageError(f"bad shape {part!r} in --shapes: dimensions cannot be negative")
        shapes.append(dims)
    return shapes


def parse_dtype(name: str) -> Any:
    """The NumPy dtype of a --dtype value (f32, bf16, ... or a NumPy name)."""
    import jax.numpy as jnp

    try:
        return jnp.dtype(DTYPES.get(name, name))
    except TypeError:
        raise UsageError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)} or a NumPy dtype name") from None


def import_target(target: str) -> Callable[..., Any]:
    """The function of ``module:function``. The working directory is searched after installed
    packages (appended to sys.path, never put first), so files there cannot shadow them."""
    import importlib
    import os

    module_name, _, fn_name = target.partition(":")
    if not module_name or not fn_name:
        raise UsageError(f"bad target {target!r}; write MODULE:FUNCTION, e.g. mymodel:forward")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure to import the user's module is theirs to fix
        raise UsageError(f"cannot import module {module_name!r} of {target!r}: {type(exc).__name__}: {exc}") from None
    fn = module
    for attr in fn_name.split("."):
        fn = getattr(fn, attr, None)
        if fn is None:
            raise UsageError(f"module {module_name!r} has no {fn_name!r} (from {target!r})")
    if not callable(fn):
        raise UsageError(f"{target!r} is a {type(fn).__name__}, not a function")
    return fn


def resolve_target(target: str, shapes: str | None, dtype: str, heads: int) -> tuple[Callable[..., Any], tuple[Any, ...], str]:
    """(fn, args, description) for a built-in example name or ``module:function``."""
    import inspect

    np_dtype = parse_dtype(dtype)
    if ":" not in target:
        if target not in examples.EXAMPLES:
            raise UsageError(f"unknown example {target!r}; built-in: {', '.join(examples.EXAMPLES)}"
                             " (or pass MODULE:FUNCTION with --shapes)")
        dims = parse_shapes(shapes)[0] if shapes else None
        if target in ("block", "stack2"):
            if dims is not None and len(dims) != 3:
                raise UsageError(f"--shapes for {target} is BxSxE, e.g. 2x16x32")
            bs = examples.BlockShape(*dims, heads=heads) if dims else examples.BlockShape(heads=heads)
            if heads < 1 or bs.embed % heads:
                raise UsageError(f"--heads {heads} must divide the embedding size E={bs.embed}")
            if target == "block":
                fn, args = examples.stacked_example(1, bs, dtype=np_dtype)
                fn1 = lambda params, x: examples.transformer_block(params, x, bs.heads)  # noqa: E731
                return fn1, (args[0][0], args[1]), f"transformer block B{bs.batch} S{bs.seq} E{bs.embed} H{bs.heads}"
            fn, args = examples.stacked_example(2, bs, dtype=np_dtype)
            return fn, args, f"2 transformer blocks B{bs.batch} S{bs.seq} E{bs.embed} H{bs.heads}"
        if dims is not None and len(dims) != 4:
            raise UsageError(f"--shapes for {target} is BxHxSxD, e.g. 2x4x16x8")
        kw = dict(zip(("batch", "heads", "seq", "head_dim"), dims)) if dims else {}
        fn, args = examples.EXAMPLES[target](**kw, dtype=np_dtype)
        return fn, args, f"{target} {'x'.join(map(str, args[0].shape))}"
    fn = import_target(target)
    if not shapes:
        raise UsageError("MODULE:FUNCTION needs --shapes, one per argument, e.g. --shapes 2x8x64,64x64")
    parsed = parse_shapes(shapes)
    try:
        inspect.signature(fn).bind(*parsed)
    except TypeError as exc:
        raise UsageError(f"{target} does not take {len(parsed)} arguments (one per --shapes entry): {exc}") from None
    except ValueError:  # no signature (a builtin): let the call say
        pass
    keys = jax.random.split(jax.random.PRNGKey(0), len(parsed))
    args = tuple(
        (jax.random.normal(k, s) / np.sqrt(max(1, s[-1] if s else 1))).astype(np_dtype)
        for k, s in zip(keys, parsed)
    )
    return fn, args, f"{target}({', '.join(str(a.dtype) + str(list(a.shape)) for a in args)})"


def check_explore_args(ns: argparse.Namespace) -> tuple[list[str] | None, list[str]]:
    """Check the options of `explore` before any work; returns (rule names, compared models)."""
    from pathlib import Path

    for option, value, least in (("--iterations", ns.iterations, 1), ("--heads", ns.heads, 1),
                                 ("--alternatives", ns.alternatives, 0)):
        if value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
    if not ns.seconds > 0:
        raise UsageError(f"--seconds must be positive, got {ns.seconds}")
    compare = [m for m in (ns.compare or "").split(",") if m]
    for option, name in [("--cost-model", ns.cost_model), *(("--compare", m) for m in compare)]:
        try:
            check_choice("cost model", name, COST_MODEL_NAMES)
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None
    try:
        rules = check_rules([r for r in (ns.rules or "").split(",") if r] or None)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"--rules: {exc}") from None
    for option, value in (("--svg", ns.svg), ("--why-svg", ns.why_svg)):
        if value:
            path = Path(value)
            if path.is_dir() or not path.absolute().parent.is_dir():
                raise UsageError(f"{option} {value}: {'is a folder' if path.is_dir() else 'its folder does not exist'};"
                                 " give a file path in an existing folder")
    if not ns.svg:
        drawing_options = (("--focus", ns.focus is not None), ("--depth", ns.depth is not None), ("--fold", ns.fold))
        for option, given in drawing_options:
            if given:
                raise UsageError(f"{option} shapes the e-graph drawing: give --svg FILE too")
    if ns.depth is not None and ns.depth < 0:
        raise UsageError(f"--depth must be at least 0, got {ns.depth}")
    return rules, compare


def explore_command(console: Console, ns: argparse.Namespace) -> int:
    """Trace a function, run rule sets step by step, extract, explain the attention choice."""
    rules, compare = check_explore_args(ns)
    fn, args, what = resolve_target(ns.target, ns.shapes, ns.dtype, ns.heads)
    model = cost_model_from_name(ns.cost_model)
    with console.status(f"tracing and encoding {what}..."):
        try:
            captured = capture(fn, *args)
        except Exception as exc:  # noqa: BLE001 - the user's function rejected the arguments they described
            raise UsageError(f"tracing {what} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        ex = Exploration(captured, fn=fn)
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
    console.print(f"predicted cost under {best.model.name}: {_fmt_cost(best.original_cost, model)} -> "
                  f"{_fmt_cost(best.cost, model)}", highlight=False)
    for info in best.attention:
        console.print(f"  {info}", highlight=False, markup=False)
    if not best.attention:
        console.print("  no attention op in the chosen program")
    if compare:
        with console.status("extracting under every cost model..."):
            console.print(ex.compare(compare).table())
    if best.attention:
        with console.status("pricing the alternatives of each attention e-class..."):
            why = ex.why("attention", model)
        console.print(why.format(limit=ns.alternatives), highlight=False, markup=False, soft_wrap=True)
    if ns.why_svg:
        with console.status(f"charting the alternatives of each attention e-class to {ns.why_svg}..."):
            (why if best.attention else ex.why("attention", model)).svg(ns.why_svg, limit=ns.alternatives or None)
        console.print(f"wrote {ns.why_svg}")
    if ns.svg:
        with console.status(f"drawing the e-graph to {ns.svg}..."):
            try:
                ex.svg(ns.svg, focus=ns.focus, depth=2 if ns.depth is None else ns.depth, fold=ns.fold)
            except ValueError as exc:  # a focus that names nothing in this e-graph
                raise UsageError(f"--focus {ns.focus}: {exc}") from None
        console.print(f"wrote {ns.svg}" + (f" (around {ns.focus})" if ns.focus is not None else ""), soft_wrap=True)
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as a `UsageError` (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a usage mistake prints one line to stderr and returns 2."""
    try:
        return _main(argv)
    except UsageError as exc:
        print(f"eqsat-attn: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    parser = _Parser(prog="eqsat-attn", description=__doc__.split("\n\n")[0])
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
    ex.add_argument("--svg", help="draw the e-graph to this SVG file (a summary when it is large: use --focus)")
    ex.add_argument("--focus", help="draw only around this: attention, an op name (dot_general, transpose...),"
                                    " an e-class id (c57) or a program node (%%30)")
    ex.add_argument("--depth", type=int, help="e-class hops around --focus, up and down (default 2)")
    ex.add_argument("--fold", action="store_true",
                    help="hide structural e-nodes (identity transposes, same-shape reshapes) in the drawing")
    ex.add_argument("--why-svg", help="chart the priced alternatives of each attention e-class to this SVG file")
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
