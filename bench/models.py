"""Real-model benchmarks (issue 22): GPT-2 small, Llama (GQA, rotary) and BERT (padding mask),
written in Flax linen with random weights (bench/model_zoo.py), optimized vs jax.jit.

    python bench/models.py                   # GPU: every section at the real shapes, writes
                                             #   bench/results/models-<device>-<date>.md
    python bench/models.py --optimize-time   # any device: optimize time vs XLA compile time (and
                                             #   --profile: where it goes), models-optimize-time-<device>-<date>.md
    python bench/models.py --cpu-smoke [--layers N] [--out F]   # tiny shapes on CPU: checks the script only

Sections:
- optimize time: each model's forward at its real shape (Llama 3 8B-like: 32 layers, 4096 wide,
  traced with jax.ShapeDtypeStruct inputs: nothing is allocated) in a fresh process per model
  (a subprocess): ``import eqsat_attn``, the first ``ea.optimize(f).explain(...)`` (rule files
  loaded and registered, trace, optimize, lower) and the steady state (a second ``ea.optimize`` of
  the same function in the same process), against XLA's compile time of the same function
  (``jax.jit(f).lower(*args).compile()``, trace included, timed before eqsat_attn is imported).
  Target (issue 22): steady optimize time / XLA compile time <= 1.0. Then a second fresh process
  reads the program the first wrote to a disk cache (target: a lookup <= 0.1 s besides tracing).
  ``--profile`` runs the
  first and a steady-state optimization under cProfile and gives the time of each stage;
  ``--compare-whole`` also times ``reuse_blocks=False`` (GPT-2 and BERT).
- forward: inference (Llama: DEVICE_LLAMA_LAYERS layers), jax.jit(f) vs jax.jit(ea.optimize(f)),
  plus the model with its attention substituted by
  ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU; "xla" in --cpu-smoke), timed in
  interleaved rounds after warm-up (median), each checked against jax.jit.
- train step: forward + backward + an optax AdamW update, jitted; one optimized row takes the
  gradient through ``ea.optimize(loss)`` (as a user writes ``jax.grad(ea.optimize(loss))``, so the
  attention kernels' own backward runs), another optimizes ``jax.value_and_grad(loss)`` as a whole
  (its written-out backward raised to the op's gradients). Loss, updated parameters and optimizer
  state are checked against jax.jit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model_zoo  # noqa: E402
from common import device_tag, header, on_gpu, require_gpu, write_results  # noqa: E402

# eqsat_attn is imported inside functions on purpose: the optimize-time probe times its import.

MODELS = ("gpt2", "llama", "bert")
#: max|optimized - jax.jit| / max|jax.jit| allowed, by dtype (reassociated sums)
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}
#: XLA compiles and steady-state optimizations per model in the optimize-time probe (median)
PROBE_REPEATS = 3
#: Llama's layers in the device rows (the optimize-time rows trace all 32, abstractly): 32 layers
#: of 4096 with AdamW's state would not fit one GPU
DEVICE_LLAMA_LAYERS = 4
#: the training step's AdamW learning rate
LEARNING_RATE = 1e-4


# --- optimize time (one fresh process per model) ---------------------------------------------

def probe(family: str, cfg: model_zoo.ModelConfig, whole: bool = False, repeats: int = PROBE_REPEATS,
          cache_dir: str | None = None) -> dict[str, Any]:
    """Run in a fresh process: XLA compile time, then eqsat_attn's import, first and steady
    optimization of the model's forward at ``cfg`` (abstract inputs); ``whole``: also once with
    ``reuse_blocks=False`` (the whole program in one e-graph). XLA and steady times are medians
    of ``repeats`` (each XLA compile of a fresh function object, so no jax cache is hit).
    ``cache_dir``: at the end, one more optimization writes the program to that disk cache
    (`cached_probe` reads it in another process)."""
    built = model_zoo.build(cfg, abstract=True)
    forward = _forward(built)
    args = (built.params, *built.inputs)
    xla = []
    for _ in range(repeats):
        fresh = (lambda f: lambda *a: f(*a))(forward)
        start = time.perf_counter()
        jax.jit(fresh).lower(*args).compile()
        xla.append(time.perf_counter() - start)

    start = time.perf_counter()
    import eqsat_attn as ea

    imported = time.perf_counter() - start
    start = time.perf_counter()
    first = ea.optimize(forward).explain(*args)  # rule files load in ea.optimize(...)
    first_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        steady = ea.optimize(forward).explain(*args)
        runs.append((time.perf_counter() - start, steady))
    steady_s, steady = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    xla = statistics.median(xla)
    whole_s, whole_report = None, None
    if whole:
        start = time.perf_counter()
        whole_report = ea.optimize(forward, reuse_blocks=False).explain(*args)
        whole_s = time.perf_counter() - start
    if cache_dir is not None:
        ea.optimize(forward, cache_dir=cache_dir).explain(*args)
    return {"repeats": repeats, "whole_s": whole_s, "whole_saturated": whole_report.saturated if whole_report else None,
            "whole_cost": whole_report.cost_after if whole_report else None, "cost": steady.cost_after,
            "family": family, "shape": cfg.label(), "xla_compile_s": xla, "import_s": imported,
            "first_s": first_s, "first_timings": first.timings, "steady_s": steady_s,
            "steady_timings": steady.timings, "repeated_blocks": steady.repeated_blocks,
            "egraph_nodes": steady.egraph_nodes, "saturated": steady.saturated,
            "attention": len(steady.attention), "warnings": list(steady.warnings)}


def cached_probe(family: str, cfg: model_zoo.ModelConfig, cache_dir: str) -> dict[str, Any]:
    """Run in a fresh process after `probe` wrote ``cache_dir``: ``import eqsat_attn`` and one
    ``ea.optimize(f, cache_dir=...).explain(...)``, which loads the program from the disk cache
    (issue 22's second process: tracing and a lookup)."""
    built = model_zoo.build(cfg, abstract=True)
    forward = _forward(built)
    args = (built.params, *built.inputs)
    start = time.perf_counter()
    import eqsat_attn as ea

    imported = time.perf_counter() - start
    start = time.perf_counter()
    report = ea.optimize(forward, cache_dir=cache_dir).explain(*args)
    return {"family": family, "import_s": imported, "total_s": time.perf_counter() - start,
            "timings": report.timings, "hit": "disk_cache" in report.timings}


#: the stages of one optimization, by the function that runs each (nested ones indented);
#: a stage's time is that function's cumulative time under cProfile
STAGES: tuple[tuple[str, str, str], ...] = (
    ("imports (eqsat_attn, lazy ones)", "<frozen importlib._bootstrap>", "_find_and_load"),
    ("trace (capture)", "eqsat_attn/capture.py", "capture"),
    ("optimize (pipeline)", "eqsat_attn/pipeline.py", "optimize_program"),
    ("  cut repeated blocks", "eqsat_attn/blocks.py", "split_repeated"),
    ("  rule files (load)", "eqsat_attn/egraph/rulesets.py", "resolve"),
    ("  rule registration", "eqsat_attn/egraph/driver.py", "prepare_rulesets"),
    ("  encoding", "eqsat_attn/egraph/encode.py", "encode"),
    ("  saturation", "eqsat_attn/egraph/driver.py", "run_rulesets"),
    ("  extraction (greedy)", "eqsat_attn/egraph/extract.py", "extract_program"),
    ("  exact neighbourhood (refine)", "eqsat_attn/egraph/refine.py", "refine"),
    ("  program cost", "eqsat_attn/cost/model.py", "program_cost"),
    ("  splice blocks", "eqsat_attn/blocks.py", "splice"),
    ("lower (build + check)", "eqsat_attn/optimize.py", "_lower_checked"),
    ("report: attention", "eqsat_attn/report.py", "attention_infos"),
    ("report: fused regions", "eqsat_attn/report.py", "region_infos"),
    ("report: projections", "eqsat_attn/qkv_layouts.py", "projections"),
)


def profile_stages(family: str, cfg: model_zoo.ModelConfig) -> dict[str, Any]:
    """Run in a fresh process: the first optimization and then a steady-state one, each under
    cProfile; the cumulative seconds of each of `STAGES`' functions in each."""
    import cProfile
    import pstats

    built = model_zoo.build(cfg, abstract=True)
    forward = _forward(built)
    args = (built.params, *built.inputs)
    out: dict[str, Any] = {"family": family, "shape": cfg.label()}
    for run in ("first", "steady"):
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        import eqsat_attn as ea  # the first run: the import too

        ea.optimize(forward).explain(*args)
        profiler.disable()
        out[f"{run}_total_s"] = time.perf_counter() - start
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
        out[run] = {label: sum(v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(path))
                    for label, path, name in STAGES}
    return out


def run_probe_subprocess(mode: str, family: str, cfg: model_zoo.ModelConfig, whole: bool = False,
                         repeats: int = PROBE_REPEATS, cache_dir: str | None = None) -> dict[str, Any]:
    """``probe``, ``cached_probe`` or ``profile_stages`` in a fresh Python process (first-call
    costs included)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--{mode}-one", family,
           "--config", json.dumps(dataclasses.asdict(cfg)), "--probe-repeats", str(repeats),
           *(["--compare-whole"] if whole else []), *(["--cache-dir", cache_dir] if cache_dir else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- forward and training step on the device -------------------------------------------------

def _forward(built: model_zoo.Built) -> Callable[..., jax.Array]:
    apply = built.apply
    return lambda params, *inputs: apply(params, *inputs)


def loss_fn(forward: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Mean token cross-entropy of ``forward``'s logits against ``labels``."""
    import optax

    def loss(params: Any, inputs: tuple[Any, ...], labels: jax.Array) -> jax.Array:
        logits = forward(params, *inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def train_step(loss: Callable[..., jax.Array], tx: Any,
               value_and_grad: Callable[..., tuple[jax.Array, Any]] | None = None) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """params, opt_state, inputs, labels -> new params, new opt_state, loss (one AdamW step);
    ``value_and_grad``: the loss and its gradient (default ``jax.value_and_grad(loss)``; the
    benchmark also passes that function optimized as a whole, its written-out backward raised)."""
    import optax

    value_and_grad = value_and_grad or jax.value_and_grad(loss)

    def step(params: Any, opt_state: Any, inputs: tuple[Any, ...], labels: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = value_and_grad(params, inputs, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def relative_error(got: Any, want: Any) -> float:
    """max|got - want| / max|want| over all the leaves of a pytree together (float32; inf when
    the non-finite entries differ). Normalized by the whole tree, not leaf by leaf: a leaf whose
    gradient is rounding noise (GPT-2's K-projection bias, which softmax ignores; AdamW turns its
    noise into steps of +-lr) has no meaningful error of its own."""
    err, scale = 0.0, 0.0
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        finite = np.isfinite(w)
        if not np.array_equal(np.isfinite(g), finite) or not np.array_equal(np.isnan(g), np.isnan(w)):
            return float("inf")
        if finite.any():
            err = max(err, float(np.max(np.abs(g[finite] - w[finite]))))
            scale = max(scale, float(np.max(np.abs(w)[finite])))
        if not np.array_equal(g[~finite], w[~finite], equal_nan=True):  # +inf where -inf
            return float("inf")
    return err / max(scale, 1e-30)


def step_error(got: tuple[Any, Any, Any], want: tuple[Any, Any, Any]) -> float:
    """The worst `relative_error` of a train step's loss, updated parameters and optimizer
    state, each normalized on its own (the state holds the gradient's moments)."""
    return max(relative_error(g, w) for g, w in zip(got, want, strict=True))


def time_interleaved(rows: Sequence[dict[str, Any]], reps: int, rounds: int, warmup: int = 2) -> None:
    """Time each row's ``call()`` (median of ``reps`` calls after ``warmup``), the rows called
    in turn over ``rounds`` rounds so a drift of the machine reaches them alike; sets ``ms``."""
    for row in rows:
        for _ in range(warmup):
            jax.block_until_ready(row["call"]())
    rounds = max(1, min(rounds, reps))
    times: list[list[float]] = [[] for _ in rows]
    for r in range(rounds):
        calls = reps // rounds + (1 if r < reps % rounds else 0)
        for row, ts in zip(rows, times):
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(row["call"]())
                ts.append(time.perf_counter() - start)
    for row, ts in zip(rows, times):
        row["ms"] = statistics.median(ts) * 1e3


def device_rows(family: str, cfg: model_zoo.ModelConfig, dtype: Any, reps: int, rounds: int,
                attention_impl: str) -> list[dict[str, Any]]:
    """Forward and train-step rows of one model: jax.jit, jax.jit(ea.optimize) and the
    ``attention_impl``-substituted model, each checked against jax.jit."""
    import optax

    import eqsat_attn as ea

    built = model_zoo.build(cfg, dtype)
    substituted = model_zoo.with_attention(built, attention_impl)
    forward, sub_forward = _forward(built), _forward(substituted)
    args = (built.params, *built.inputs)
    tol = TOLERANCE[jnp.dtype(dtype).name]
    optimized = ea.optimize(forward)
    report = optimized.explain(*args)
    fwd = [
        {"variant": "jax.jit", "fn": jax.jit(forward)},
        {"variant": "jax.jit(ea.optimize)", "fn": jax.jit(optimized), "report": report},
        {"variant": f"dot_product_attention({attention_impl}), jax.jit", "fn": jax.jit(sub_forward)},
    ]
    for row in fwd:
        row["call"] = (lambda fn: lambda: fn(*args))(row["fn"])
    time_interleaved(fwd, reps, rounds)
    want = fwd[0]["fn"](*args)
    for row in fwd:
        row["err"] = relative_error(row["fn"](*args), want)

    tx = optax.adamw(LEARNING_RATE)
    opt_state = tx.init(built.params)
    step_args = (built.params, opt_state, built.inputs, built.labels)
    steps = [
        {"variant": "jax.jit", "fn": jax.jit(train_step(loss_fn(forward), tx))},
        {"variant": "jax.jit, grad of ea.optimize(loss)", "fn": jax.jit(train_step(ea.optimize(loss_fn(forward)), tx))},
        {"variant": "jax.jit, ea.optimize(value_and_grad(loss))",
         "fn": jax.jit(train_step(loss_fn(forward), tx, ea.optimize(jax.value_and_grad(loss_fn(forward)))))},
        {"variant": f"dot_product_attention({attention_impl}), jax.jit",
         "fn": jax.jit(train_step(loss_fn(sub_forward), tx))},
    ]
    for row in steps:
        row["call"] = (lambda fn: lambda: fn(*step_args))(row["fn"])
    time_interleaved(steps, reps, rounds)
    want = steps[0]["fn"](*step_args)
    for row in steps:
        row["err"] = step_error(row["fn"](*step_args), want)
    out = []
    for kind, rows in (("forward", fwd), ("train step", steps)):
        base = rows[0]["ms"]
        for row in rows:
            rep = row.get("report")
            out.append({"model": family, "kind": kind, "variant": row["variant"], "ms": row["ms"],
                        "speedup": base / row["ms"], "err": row["err"], "check": "ok" if row["err"] <= tol else "FAIL",
                        "attention": ", ".join(a.v_layout + "/" + a.kernel for a in rep.attention) if rep else "",
                        "optimize_s": sum(rep.timings.values()) if rep else 0.0})
    return out


# --- the page ---------------------------------------------------------------------------------

def render(command: str, optimize_rows: Sequence[dict[str, Any]], profiles: Sequence[dict[str, Any]],
           device: Sequence[dict[str, Any]], note: str = "") -> str:
    lines = header("Real models: optimize time and run time (issue 22)", command)
    if note:
        lines += [note, ""]
    if optimize_rows:
        repeats = optimize_rows[0]["repeats"]
        lines += ["## Optimize time vs XLA compile time", "",
                  "Forward pass at the shape given, abstract inputs; one fresh process per model. XLA: "
                  f"`jax.jit(f).lower(*args).compile()` (trace included; median of {repeats}). "
                  "First: `ea.optimize(f).explain(...)` "
                  "right after `import eqsat_attn` (rule files loaded and registered); steady: a second "
                  f"`ea.optimize` of the same function (median of {repeats}). Target: steady / XLA <= 1.0.", "",
                  "| model | shape | XLA compile s | import eqsat_attn s | first optimize s | steady optimize s "
                  "| steady / XLA | first / XLA | steady: trace / optimize / lower s | repeated blocks | e-nodes "
                  "| attention ops |",
                  "|:---|:---|---:|---:|---:|---:|---:|---:|:---|---:|---:|---:|"]
        for r in optimize_rows:
            t = r["steady_timings"]
            parts = " / ".join(f"{t.get(k, 0.0):.2f}" for k in ("trace", "optimize", "lower"))
            sat = "" if r["saturated"] else " (not saturated)"
            lines.append(
                f"| {r['family']} | {r['shape']} | {r['xla_compile_s']:.2f} | {r['import_s']:.2f} | {r['first_s']:.2f} "
                f"| {r['steady_s']:.2f} | {r['steady_s'] / r['xla_compile_s']:.2f} "
                f"| {r['first_s'] / r['xla_compile_s']:.2f} "
                f"| {parts} | {r['repeated_blocks']} | {r['egraph_nodes']}{sat} | {r['attention']} |")
        lines.append("")
        lines += ["A second process with the disk cache (`ea.optimize(f, cache_dir=...)`; the first process "
                  "wrote the entry): `import eqsat_attn`, then one `explain`, which traces the function and "
                  "loads the optimized program. Target: lookup <= 0.1 s.", "",
                  "| model | import eqsat_attn s | second process s | trace s | lookup s | lower s | loaded from disk |",
                  "|:---|---:|---:|---:|---:|---:|:---|"]
        for r in optimize_rows:
            c = r["cached"]
            t = c["timings"]
            lines.append(f"| {r['family']} | {c['import_s']:.2f} | {c['total_s']:.2f} | {t.get('trace', 0.0):.2f} "
                         f"| {t.get('disk_cache', t.get('optimize', 0.0)):.3f} | {t.get('lower', 0.0):.3f} "
                         f"| {'yes' if c['hit'] else 'no'} |")
        lines.append("")
        whole = [r for r in optimize_rows if r.get("whole_s") is not None]
        if whole:
            lines += ["Repeated layers optimized once vs the whole program in one e-graph "
                      "(`reuse_blocks=False`, steady state, same process):", "",
                      "| model | steady, layers reused s | whole program s | predicted cost, reused | "
                      "predicted cost, whole |", "|:---|---:|---:|---:|---:|"]
            for r in whole:
                sat = "" if r["whole_saturated"] else " (not saturated)"
                lines.append(f"| {r['family']} | {r['steady_s']:.2f} | {r['whole_s']:.2f}{sat} | {r['cost']:.4g} "
                             f"| {r['whole_cost']:.4g} |")
            lines.append("")
    if profiles:
        lines += ["## Where the optimize time goes (cProfile)", "",
                  "Cumulative seconds of each stage's function in the first `ea.optimize(f).explain(...)` of a "
                  "fresh process (`import eqsat_attn` included) and in a steady-state one, each under cProfile "
                  "(which slows Python-heavy stages more than egglog's native ones); indented stages are inside "
                  "the one above.", "",
                  "| stage | " + " | ".join(f"{p['family']} {run} s" for p in profiles for run in ("first", "steady"))
                  + " |",
                  "|:---|" + "---:|" * (2 * len(profiles))]
        for label, _, _ in STAGES:
            cells = " | ".join(f"{p[run][label]:.3f}" for p in profiles for run in ("first", "steady"))
            lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | {cells} |")
        lines.append("| total (under cProfile) | " + " | ".join(
            f"{p[f'{run}_total_s']:.3f}" for p in profiles for run in ("first", "steady")) + " |")
        lines.append("")
    if device:
        lines += ["## Forward and training step on the device", "",
                  "Median of timed calls after warm-up, rows of a model called in interleaved rounds; "
                  "err: max|row - jax.jit| / max|jax.jit| over outputs (train step: the loss and every "
                  "updated parameter and optimizer state, each over its whole tree).", "",
                  "| model | pass | variant | median ms | vs jax.jit | err | check | attention (V layout/kernel) "
                  "| optimize s |", "|:---|:---|:---|---:|---:|---:|:---|:---|---:|"]
        for r in device:
            lines.append(f"| {r['model']} | {r['kind']} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.2f}x "
                         f"| {r['err']:.2e} | {r['check']} | {r['attention'] or '-'} | "
                         f"{r['optimize_s']:.2f} |" if r["optimize_s"] else
                         f"| {r['model']} | {r['kind']} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.2f}x "
                         f"| {r['err']:.2e} | {r['check']} | {r['attention'] or '-'} | - |")
        lines.append("")
    return "\n".join(lines)


def configs(smoke: bool, layers: int | None) -> dict[str, model_zoo.ModelConfig]:
    table = model_zoo.SMOKE if smoke else model_zoo.REAL
    return {k: dataclasses.replace(c, layers=layers) if layers else c for k, c in table.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny f32 shapes on CPU (checks the script only)")
    parser.add_argument("--optimize-time", action="store_true",
                        help="only the optimize-time section, at the real shapes (any device)")
    parser.add_argument("--profile", action="store_true", help="with --optimize-time: the cProfile stage breakdown")
    parser.add_argument("--compare-whole", action="store_true",
                        help="also time each optimization with reuse_blocks=False (the whole program at once)")
    parser.add_argument("--probe-repeats", type=int, default=PROBE_REPEATS,
                        help="XLA compiles and steady-state optimizations timed per model (median)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--layers", type=int, default=None, help="override every model's layer count")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--probe-one", help=argparse.SUPPRESS)
    parser.add_argument("--profile-one", help=argparse.SUPPRESS)
    parser.add_argument("--cached-one", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.probe_one or ns.profile_one or ns.cached_one:  # the fresh process of run_probe_subprocess
        cfg = model_zoo.ModelConfig(**json.loads(ns.config))
        if ns.probe_one:
            result = probe(ns.probe_one, cfg, ns.compare_whole, ns.probe_repeats, ns.cache_dir)
        elif ns.cached_one:
            result = cached_probe(ns.cached_one, cfg, ns.cache_dir)
        else:
            result = profile_stages(ns.profile_one, cfg)
        print(json.dumps(result))
        return 0
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models takes a comma-separated subset of {MODELS}, got {ns.models!r}")
    if ns.layers is not None and ns.layers < 1:
        parser.error(f"--layers must be >= 1, got {ns.layers}")
    if ns.probe_repeats < 1:
        parser.error(f"--probe-repeats must be >= 1, got {ns.probe_repeats}")
    if ns.profile and not ns.optimize_time:
        parser.error("--profile goes with --optimize-time")
    if not ns.optimize_time:
        require_gpu("bench/models.py", ns.cpu_smoke)
    smoke = ns.cpu_smoke and not on_gpu()
    command = ("python bench/models.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    shapes = configs(ns.cpu_smoke, ns.layers)
    # the whole 32-layer Llama in one e-graph would take many minutes: compared for the others only
    optimize_rows = []
    for m in models:
        with tempfile.TemporaryDirectory() as cache_dir:  # the second process reads what the first wrote
            row = run_probe_subprocess("probe", m, shapes[m], ns.compare_whole and m != "llama", ns.probe_repeats,
                                       cache_dir)
            row["cached"] = run_probe_subprocess("cached", m, shapes[m], cache_dir=cache_dir)
        optimize_rows.append(row)
    profiles = [run_probe_subprocess("profile", m, shapes[m]) for m in models if m != "llama"] if ns.profile else []
    device: list[dict[str, Any]] = []
    if not ns.optimize_time:
        dtype = jnp.float32 if ns.cpu_smoke else jnp.bfloat16
        reps, rounds = ns.reps or (6 if ns.cpu_smoke else 30), ns.rounds or 3
        for m in models:
            cfg = shapes[m]
            if m == "llama" and not ns.cpu_smoke and ns.layers is None:  # 32 layers + AdamW state: too big
                cfg = dataclasses.replace(cfg, layers=DEVICE_LLAMA_LAYERS)
            device += device_rows(m, cfg, dtype, reps, rounds, "xla" if smoke else "cudnn")
    note = ("--cpu-smoke: tiny shapes on CPU; the numbers check the script, they measure nothing." if smoke else
            "Optimize time only (no device rows): XLA compiles for this machine's backend." if ns.optimize_time else "")
    text = render(command, optimize_rows, profiles, device, note)
    print(text)
    kind = "models-optimize-time" if ns.optimize_time else "models"
    default = None if ns.cpu_smoke else f"{kind}-{device_tag()}-{time.strftime('%Y-%m-%d')}.md"
    write_results(text, ns.out, default)
    return 1 if any(r["check"] == "FAIL" for r in device) else 0


if __name__ == "__main__":
    sys.exit(main())
