"""Cost-model experiment (issue 6): does the cost model rank equivalent programs as the device does?

    python bench/cost_model_experiment.py                    # GPU: >= 20 variants of a bf16 attention block
    python bench/cost_model_experiment.py --calibrate        # ... and fit device parameters, write the calibration JSON
    python bench/cost_model_experiment.py --cpu-smoke [--calibrate --calibration-out F]   # tiny, CPU: checks the script
    python bench/cost_model_experiment.py --cpu [--rounds N] [--dump F | --refit F]  # CPU fidelity, >= 30 programs
    eqsat-attn bench cost-model [...]

Variants: the e-graph of an attention block whose Q/K/V come from projections
(`examples.attention_vt_example`: both the standard and the transposed-V program are in it) is
saturated once; equivalent programs are extracted under randomly perturbed cost models
(each op kind and attention variant priced with a random factor), de-duplicated, until
--variants distinct programs exist. Each variant is predicted by the model under test (the
device's roofline, calibration applied) and measured (jax.jit of its lowering, median of --reps).
Output: Spearman rank correlation, the table, and the worst mispredictions (largest
|log(predicted / measured)| after removing the median ratio).

--cpu measures this CPU (XLA:CPU, the reference attention) on three workloads of the same
block: prefill (S256), long prefill (S512) and decode (one new token's query against a 1024-token
cache); for each, the variants above, the captured (unfused) program, and the captured programs
of hand-written equivalents that really differ in work and data movement
(`cpu_formulations.py`). --dump keeps programs and timings; --refit DUMP prices them again under
today's model without measuring (bench/calibrate_cpu.py fits the CPU row from such dumps). XLA:CPU
runs single-threaded (`SINGLE_THREAD_FLAGS`, set before jax is imported; --multi-thread leaves it
alone), the setting the CPU row is calibrated for. Programs are timed in interleaved rounds (every
round visits every program of a workload in a fresh random order, each run --inner times after
warm-up); a round's time is its fastest run by the process's CPU time (--clock wall: by wall
clock), and a program's time the median over rounds; the spread is the interquartile range over
rounds relative to the median. On a shared machine CPU time does not count the waits for a core,
and the minimum drops the runs that load disturbed (cache evictions): spreads of 4-20% at load 4,
against 30-99% for the mean by wall clock of a multi-threaded XLA at load 8. Spearman is reported
pooled and per workload (equivalent programs are only compared within one workload).

--calibrate fits measured = sum over categories of coefficient x predicted seconds of the nodes
in that category (matmul, attention per variant, memory-bound ops, transposes, launches),
non-negative least squares, and scales the device's parameters by the fitted coefficients:
matmul_efficiency, attention_efficiency[dtype/variant/causal], bandwidth,
transpose_bandwidth_fraction and launch_overhead. It writes a JSON file in
`eqsat_attn.cost.DeviceSpec` field names (only the fitted fields, plus "fitted" and "source"
notes) to `eqsat_attn.cost.calibration_path(<device>)`, which `device_spec()` reads over the
built-in table (`EQSAT_ATTN_CALIBRATION_DIR` moves it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

#: --cpu runs XLA:CPU on one thread (unless --multi-thread): on a shared machine a multi-threaded
#: program waits for whichever of its threads was preempted, one thread only for itself; the CPU
#: row of the cost model (eqsat_attn/cost/devices.py) is calibrated for this setting. XLA reads the
#: flags when its CPU client starts, so they are set before jax is imported.
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def single_threaded(argv: Sequence[str]) -> bool:
    """Whether this run measures XLA:CPU single-threaded (``--cpu`` without ``--multi-thread``)."""
    return "--cpu" in argv and "--multi-thread" not in argv


if __name__ == "__main__" and single_threaded(sys.argv[1:]):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cpu_formulations import decode_formulations, prefill_formulations  # noqa: E402
from common import device_tag, header, median_seconds, require_gpu, spearman, write_results  # noqa: E402

import eqsat_attn as ea  # noqa: E402
from eqsat_attn import examples, ir  # noqa: E402
from eqsat_attn.capture import capture  # noqa: E402
from eqsat_attn.cost import RooflineModel, calibration_path, current_device_name, for_device, program_cost  # noqa: E402
from eqsat_attn.cost.model import OpView, view_of  # noqa: E402
from eqsat_attn.explore import program_summary  # noqa: E402
from eqsat_attn.lower import lower  # noqa: E402

CATEGORIES = ("matmul", "attention/standard", "attention/transposed", "attention/reference", "memory", "transpose",
              "launch")


class Jittered:
    """A cost model pricing each (op, attention variant) with a random factor: explores the e-graph."""

    def __init__(self, base: RooflineModel, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.factors: dict[str, float] = {}
        self.name = f"jitter{seed}"

    def node_cost(self, node: OpView) -> float:
        key = node.op
        if node.op == "attention":
            key += "/" + "".join(str(node.params[k]) for k in ("q_layout", "k_layout", "v_layout", "o_layout"))
        if key not in self.factors:
            self.factors[key] = math.exp(self.rng.uniform(-2.5, 2.5))
        return self.base.node_cost(node) * self.factors[key]


def variants(fn: Any, args: tuple, model: RooflineModel, want: int, max_tries: int) -> tuple[ea.Exploration, list[ir.Program]]:
    ex = ea.explore(fn, *args)
    ex.run(limits=ea.Limits(iterations=30))
    seen: dict[str, ir.Program] = {str(ex.program): ex.program}
    for chosen in (model, "bytes"):
        p = ex.extract(chosen).program
        seen.setdefault(str(p), p)
    for seed in range(max_tries):
        if len(seen) >= want:
            break
        p = ex.extract(Jittered(model, seed)).program
        seen.setdefault(str(p), p)
    return ex, list(seen.values())


def features(program: ir.Program, model: RooflineModel) -> dict[str, float]:
    """Predicted seconds of the program split by category (what --calibrate fits)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for i in program.live_nodes():
        view = view_of(program, i)
        if view is None:
            continue
        b = model.breakdown(view)
        out["launch"] += b.launch_s
        if view.op == "dot_general":
            out["matmul" if b.compute_s >= b.memory_s else "memory"] += max(b.compute_s, b.memory_s)
            out["transpose"] += b.extra_s  # operand copies (CPU), else the orientation tie-break
        elif view.op == "attention":
            out[f"attention/{b.variant}" if b.compute_s >= b.memory_s else "memory"] += max(b.compute_s, b.memory_s)
            out["transpose"] += b.extra_s
        elif view.op == "transpose":
            out["transpose"] += b.memory_s
        else:
            out["memory"] += max(b.compute_s, b.memory_s)
    return out


def nnls(a: np.ndarray, y: np.ndarray, iters: int = 5000) -> np.ndarray:
    """Non-negative least squares by projected gradient (small problems; no scipy needed)."""
    scale = np.maximum(a.max(axis=0), 1e-30)
    an = a / scale
    x = np.ones(a.shape[1])
    step = 1.0 / max(np.linalg.norm(an, 2) ** 2, 1e-30)
    for _ in range(iters):
        x = np.maximum(0.0, x - step * an.T @ (an @ x - y))
    return x / scale


def calibrate(rows: list[dict[str, Any]], model: RooflineModel, dtype: str, causal: bool) -> dict[str, Any]:
    used = [c for c in CATEGORIES if any(r["features"][c] > 0 for r in rows)]
    a = np.array([[r["features"][c] for c in used] for r in rows])
    y = np.array([r["measured"] for r in rows])
    coef = dict(zip(used, nnls(a, y)))
    d = model.device
    fitted: dict[str, Any] = {}

    def ok(c: str) -> bool:
        return c in coef and coef[c] > 1e-6

    if ok("matmul"):
        fitted["matmul_efficiency"] = d.matmul_efficiency / coef["matmul"]
    if ok("memory"):
        fitted["bandwidth"] = d.bandwidth / coef["memory"]
    if ok("transpose") and ok("memory"):
        fitted["transpose_bandwidth_fraction"] = min(1.0, d.transpose_bandwidth_fraction * coef["memory"] / coef["transpose"])
    if ok("launch"):
        fitted["launch_overhead"] = d.launch_overhead * coef["launch"]
    eff = {}
    for variant in ("standard", "transposed", "reference"):
        c = f"attention/{variant}"
        if ok(c):
            eff[f"{dtype}/{variant}/{'causal' if causal else 'full'}"] = min(1.0, d.attention_eff(dtype, variant, causal) / coef[c])
    if eff:
        fitted["attention_efficiency"] = eff
    return {**fitted, "fitted": {k: float(v) for k, v in coef.items()},
            "source": f"bench/cost_model_experiment.py --calibrate on {jax.devices()[0].device_kind}, "
                      f"{time.strftime('%Y-%m-%d')}, {len(rows)} programs"}


def decode_example(batch: int = 4, heads: int = 8, seq: int = 1024, head_dim: int = 32, seed: int = 0,
                   dtype: Any = jnp.float32) -> tuple[Any, tuple]:
    """One decoding step: the new token's projected query against a ``seq``-token K/V cache kept
    as [B, S, H, D] (as decoders keep it). (fn, (x_new, k_cache, v_cache, wq))."""
    embed = heads * head_dim

    def step(x_new: jax.Array, k_cache: jax.Array, v_cache: jax.Array, wq: jax.Array) -> jax.Array:
        b = x_new.shape[0]
        q = (x_new @ wq).reshape(b, 1, heads, head_dim).transpose(0, 2, 1, 3)
        k, v = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
        sc = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(head_dim)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(sc, axis=-1), v)

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x_new = jax.random.normal(keys[0], (batch, 1, embed)).astype(dtype)
    k_cache, v_cache = (jax.random.normal(kk, (batch, seq, heads, head_dim)).astype(dtype) for kk in keys[1:3])
    wq = (jax.random.normal(keys[3], (embed, embed)) / np.sqrt(embed)).astype(dtype)
    return step, (x_new, k_cache, v_cache, wq)


#: --cpu workloads: name -> (example, its keyword arguments, its hand-written equivalents); float32
CPU_WORKLOADS = {
    "prefill S256": (examples.attention_vt_example, dict(batch=2, heads=4, seq=256, head_dim=32), prefill_formulations),
    "prefill S512": (examples.attention_vt_example, dict(batch=1, heads=8, seq=512, head_dim=32), prefill_formulations),
    "decode S1024": (decode_example, dict(batch=4, heads=8, seq=1024, head_dim=32), decode_formulations),
}


def cpu_programs(name: str, model: RooflineModel, want: int) -> tuple[list[tuple[str, ir.Program, list]], np.ndarray]:
    """One workload's equivalent programs as (label, program, flat arguments): the e-graph's
    variants ("captured", "eN") and the captured programs of its hand-written formulations
    (`cpu_formulations`); and the block's output (the reference the programs are checked against)."""
    example, kw, formulations = CPU_WORKLOADS[name]
    fn, args = example(**kw)
    ex, programs = variants(fn, args, model, want, max_tries=400)
    flat = ex.captured.flat_args(*args)
    named = [("captured" if k == 0 else f"e{k}", p, flat) for k, p in enumerate(programs)]
    seen = {str(p) for _, p, _ in named}
    for label, form in formulations(kw["heads"], kw["head_dim"]).items():
        captured = capture(form, *args)
        if str(captured.program) not in seen:
            seen.add(str(captured.program))
            named.append((label, captured.program, captured.flat_args(*args)))
    return named, np.asarray(jax.jit(fn)(*args), dtype=np.float32)


def interleaved_runs(calls: list[tuple[Any, tuple]], rounds: int, inner: int, seed: int = 0
                     ) -> list[list[list[tuple[float, float]]]]:
    """Per call, per round, its ``inner`` runs as (wall seconds, process CPU seconds): every round
    times every call in a fresh random order, so load on the machine falls on all of them alike."""
    for fn, args in calls:  # warm-up: compile and run twice
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    rng = random.Random(seed)
    out: list[list[list[tuple[float, float]]]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            fn, args = calls[i]
            runs = []
            for _ in range(inner):
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(*args))
                runs.append((time.perf_counter() - wall, time.process_time() - cpu))
            out[i].append(runs)
    return out


def round_seconds(runs: list[list[tuple[float, float]]], clock: str = "cpu") -> list[float]:
    """A program's time in each round: the fastest of the round's runs, by the process's CPU time
    (``clock="cpu"``, every thread's; XLA:CPU runs independent thunks on a small thread pool, so
    this is the work done, what a sum of node costs predicts) or by wall clock (``"wall"``).
    CPU time does not count the time the process waits for a core another process holds; and load
    only ever adds time (a preempted thread, an evicted cache), so the minimum of a few
    back-to-back runs is the run least disturbed. The median over rounds is the program's time."""
    k = {"wall": 0, "cpu": 1}[clock]
    return [min(run[k] for run in r) for r in runs]


def interleaved_seconds(calls: list[tuple[Any, tuple]], rounds: int, inner: int, seed: int = 0) -> list[list[float]]:
    """Per call, its seconds in each round (`round_seconds` of `interleaved_runs`)."""
    return [round_seconds(r) for r in interleaved_runs(calls, rounds, inner, seed)]


def quartiles(times: list[float]) -> tuple[float, float]:
    """The first and third quartiles of a program's per-round times."""
    q = statistics.quantiles(times, n=4)
    return q[0], q[2]


def resolved_pairs(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Pairs of programs the measurement tells apart (their interquartile ranges do not overlap),
    and how many of them the prediction orders the same way (a predicted tie counts half)."""
    right, pairs = 0.0, 0
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["iqr"][1] < b["iqr"][0] or b["iqr"][1] < a["iqr"][0]:
                pairs += 1
                same = (a["predicted"] - b["predicted"]) * (a["measured"] - b["measured"])
                right += 1.0 if same > 0 else 0.5 if a["predicted"] == b["predicted"] else 0.0
    return right, pairs


def spread(times: list[float]) -> float:
    """Interquartile range over rounds relative to the median."""
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)


def cpu_measure(ns: argparse.Namespace, model: RooflineModel) -> list[dict[str, Any]]:
    """--cpu: every workload's programs, measured in interleaved rounds (one row each)."""
    rows: list[dict[str, Any]] = []
    for name in CPU_WORKLOADS:
        named, reference = cpu_programs(name, model, ns.variants or 14)
        calls = [(jax.jit(lower(p, attention_kernel="reference")), flat) for _, p, flat in named]
        runs = interleaved_runs(calls, ns.rounds, ns.inner)
        for (label, prog, flat), (call, _), r in zip(named, calls, runs):
            out = np.asarray(call(*flat)[0], dtype=np.float32)
            t = round_seconds(r, ns.clock)
            rows.append({"workload": name, "label": label, "measured": statistics.median(t), "times": t, "runs": r,
                         "spread": spread(t), "iqr": quartiles(t), "err": float(np.max(np.abs(out - reference))),
                         "program": prog})
        sys.stderr.write(f"{name}: {len(named)} programs measured\n")
    return rows


def price(rows: list[dict[str, Any]], model: RooflineModel) -> None:
    """Add (or replace) each row's prediction under ``model``."""
    for r in rows:
        r.update(predicted=program_cost(r["program"], model), summary=program_summary(r["program"]),
                 features=features(r["program"], model))


def cpu_name() -> str:
    """This CPU's model name (`lscpu`), else what `platform` says."""
    import platform
    import subprocess

    try:
        return next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        return platform.processor() or "unknown"


def measure_of(meta: dict[str, Any]) -> str:
    """What a round's time is, as the page says it (dumps before 2026-12-07 kept the mean)."""
    if meta.get("statistic") == "min":
        clock = "process CPU time" if meta.get("clock") == "cpu" else "wall clock"
        return f"the fastest of the round's runs by {clock}"
    return "the mean of the round's runs"


def cpu_main(ns: argparse.Namespace, command: str) -> int:
    """--cpu: predicted vs measured on this CPU over the workloads of `CPU_WORKLOADS`; with
    --refit DUMP, the measurements of an earlier --dump priced again under today's model."""
    import pickle
    import platform

    model = for_device("cpu")
    if ns.refit:
        saved = pickle.loads(ns.refit.read_bytes())
        rows, meta = saved["rows"], saved["meta"]
    else:
        load_begin = os.getloadavg()
        rows = cpu_measure(ns, model)
        load_end = os.getloadavg()
        meta = {"device": f"{cpu_name()}, {os.cpu_count()} cores (`lscpu` model name; jax {jax.devices()[0].platform}), "
                          f"jax {jax.__version__}, Python {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d %H:%M"), "command": command.strip(), "rounds": ns.rounds,
                "inner": ns.inner, "load": load_begin, "load_end": load_end,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "statistic": "min", "clock": ns.clock}
        if ns.dump:  # the programs and their timings, to price them again without measuring (--refit)
            ns.dump.write_bytes(pickle.dumps({"rows": rows, "meta": meta}))
    price(rows, model)
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    lines = header("Cost-model experiment (CPU)", command.strip())
    lines[2] = f"- device: {meta['device']}"
    if ns.refit:
        lines[3:4] = [f"- measured: {meta['date']}, `{meta['command']}`", f"- priced: {time.strftime('%Y-%m-%d %H:%M')}"]
    names = list(dict.fromkeys(r["workload"] for r in rows))
    lines += [f"model {model.name}; {len(rows)} programs over {len(names)} workloads (float32, reference "
              f"attention); {meta['rounds']} interleaved rounds of {meta['inner']} runs each; a program's time is "
              f"the median over rounds of {measure_of(meta)} (load average when measuring began: "
              f"{', '.join(f'{x:.2f}' for x in meta['load'])}; when it ended: "
              f"{', '.join(f'{x:.2f}' for x in meta.get('load_end', meta['load']))})",
              f"- XLA_FLAGS: `{meta.get('xla_flags') or '(none: XLA:CPU multi-threaded)'}`", "",
              f"**Spearman (predicted vs measured), all programs: {rho:.3f}**", "",
              "Per workload (equivalent programs); *resolved pairs*: pairs whose interquartile ranges over the rounds "
              "do not overlap, and the share of them the prediction orders as measured; *predicted/measured*: the "
              "median ratio:", "",
              "| workload | programs | Spearman | resolved pairs ordered right | measured span (max/min) "
              "| predicted/measured | median spread (IQR/median) | worst spread |",
              "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        sub = [r for r in rows if r["workload"] == name]
        r_w = spearman([r["predicted"] for r in sub], [r["measured"] for r in sub])
        ms = [r["measured"] for r in sub]
        right, pairs = resolved_pairs(sub)
        share = f"{right:g} of {pairs} ({right / pairs:.0%})" if pairs else "none resolved"
        ratio = statistics.median(r["predicted"] / r["measured"] for r in sub)
        lines.append(f"| {name} | {len(sub)} | {r_w:.3f} | {share} | {max(ms) / min(ms):.2f}x | {ratio:.2f} | "
                     f"{statistics.median(r['spread'] for r in sub):.1%} | {max(r['spread'] for r in sub):.1%} |")
    lines += ["", "Programs: *captured* is the block as written, *eN* the e-graph's variants (extracted under "
              "randomly perturbed cost models), the others hand-written equivalents (`bench/cpu_formulations.py`).", "",
              "| workload | program | nodes | dots | attention | transposes | predicted ms | measured ms | spread | max err |",
              "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (names.index(r["workload"]), r["measured"])):
        s = r["summary"]
        lines.append(f"| {r['workload']} | {r['label']} | {s['nodes']} | {s['dots']} | {s['attention']} | "
                     f"{s['transposes']} | {r['predicted'] * 1e3:.4f} | {r['measured'] * 1e3:.4f} | "
                     f"{r['spread']:.1%} | {r['err']:.2g} |")
    if ns.calibrate:
        fitted = calibrate(rows, model, "float32", causal=False)
        lines += ["", "Fitted (non-negative least squares of measured seconds over the predicted seconds by category; "
                  "`--calibration-out` writes it):", "", "```json", json.dumps(fitted, indent=2, sort_keys=True), "```"]
        if ns.calibration_out:
            ns.calibration_out.parent.mkdir(parents=True, exist_ok=True)
            ns.calibration_out.write_text(json.dumps(fitted, indent=2, sort_keys=True) + "\n")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(text, ns.out, None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny f32 shapes on CPU (checks the script only)")
    parser.add_argument("--cpu", action="store_true", help="CPU fidelity: prefill and decode workloads (module doc)")
    parser.add_argument("--rounds", type=int, default=31, help="--cpu: interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=5, help="--cpu: runs per program per round")
    parser.add_argument("--multi-thread", action="store_true",
                        help="--cpu: leave XLA:CPU multi-threaded (default: one thread, SINGLE_THREAD_FLAGS)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="--cpu: time runs by the process's CPU time (default) or by wall clock")
    parser.add_argument("--dump", type=pathlib.Path, default=None, help="--cpu: pickle the programs and timings here")
    parser.add_argument("--refit", type=pathlib.Path, default=None,
                        help="--cpu: price the programs of an earlier --dump under today's model (no measuring)")
    parser.add_argument("--variants", type=int, default=None, help="distinct equivalent programs (default 24; smoke 4)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--calibrate", action="store_true", help="fit device parameters and write the calibration JSON")
    parser.add_argument("--calibration-out", type=pathlib.Path, default=None,
                        help="where --calibrate writes (default: eqsat_attn.cost.calibration_path(<device>))")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    ns = parser.parse_args(argv)
    command = "python bench/cost_model_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if ns.cpu:
        return cpu_main(ns, command)
    require_gpu("bench/cost_model_experiment.py", ns.cpu_smoke)
    if ns.cpu_smoke:
        kw, dtype, want, reps = dict(batch=1, heads=2, seq=16, head_dim=8), jnp.float32, ns.variants or 4, ns.reps or 3
    else:
        kw, dtype, want, reps = dict(batch=4, heads=32, seq=4096, head_dim=128), jnp.bfloat16, ns.variants or 24, ns.reps or 10
    device = current_device_name()
    model = for_device(device)
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    fn, args = examples.attention_vt_example(**kw, dtype=dtype)
    with console.status("saturating and extracting equivalent variants..."):
        ex, programs = variants(fn, args, model, want, max_tries=40 * want)
    flat = ex.captured.flat_args(*args)
    reference = np.asarray(jax.jit(fn)(*args), dtype=np.float32)
    rows = []
    kernel = "reference" if ns.cpu_smoke else "auto"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring variants", total=len(programs))
        for k, prog in enumerate(programs):
            call = jax.jit(lower(prog, attention_kernel=kernel))
            measured = median_seconds(call, flat, reps)
            out = np.asarray(call(*flat)[0], dtype=np.float32)
            s = program_summary(prog)
            rows.append({"k": k, "predicted": program_cost(prog, model), "measured": measured,
                         "err": float(np.max(np.abs(out - reference))), "summary": s, "features": features(prog, model)})
            progress.advance(task)
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    ratio = statistics.median(r["predicted"] / r["measured"] for r in rows)
    for r in rows:
        r["mis"] = abs(math.log(r["predicted"] / r["measured"] / ratio))
    lines = header("Cost-model experiment", command.strip())
    lines += [f"workload: attention block with Q/K/V projections, {'x'.join(map(str, args[0].shape))} "
              f"heads {kw['heads']} {jnp.dtype(dtype).name}; model {model.name}; {len(rows)} equivalent programs", "",
              f"**Spearman rank correlation (predicted vs measured): {rho:.3f}**; median predicted/measured {ratio:.3g}", "",
              "| # | nodes | attention V layouts | transposes | predicted ms | measured ms | max err |",
              "|---:|---:|:---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["measured"]):
        s = r["summary"]
        lines.append(f"| {r['k']} | {s['nodes']} | {', '.join(s['v_layouts']) or '-'} | {s['transposes']} | "
                     f"{r['predicted'] * 1e3:.4f} | {r['measured'] * 1e3:.4f} | {r['err']:.2g} |")
    lines += ["", "Worst mispredictions (|log(predicted/measured / median ratio)|):", ""]
    for r in sorted(rows, key=lambda r: -r["mis"])[:5]:
        lines.append(f"- #{r['k']}: predicted {r['predicted'] * 1e3:.4f} ms, measured {r['measured'] * 1e3:.4f} ms "
                     f"(off by x{math.exp(r['mis']):.2f})")
    if ns.calibrate:
        fitted = calibrate(rows, model, jnp.dtype(dtype).name, causal=False)
        path = ns.calibration_out or calibration_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fitted, indent=2, sort_keys=True) + "\n")
        lines += ["", f"Calibration written to `{path}`:", "", "```json", json.dumps(fitted, indent=2, sort_keys=True), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    default = None if ns.cpu_smoke else f"cost-model-{device_tag()}-{time.strftime('%Y-%m-%d')}.md"
    write_results(text, ns.out, default, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
