"""Cost-model experiment (issue 6): does the cost model rank equivalent programs as the device does?

    python bench/cost_model_experiment.py                    # GPU: >= 20 variants of a bf16 attention block
    python bench/cost_model_experiment.py --calibrate        # ... and fit device parameters, write the calibration JSON
    python bench/cost_model_experiment.py --cpu-smoke [--calibrate --calibration-out F]   # tiny, CPU: checks the script
    eqsat-attn bench cost-model [...]

Variants: the e-graph of an attention block whose Q/K/V come from projections
(`examples.attention_vt_example`: both the standard and the transposed-V program are in it) is
saturated once; equivalent programs are extracted under randomly perturbed cost models
(each op kind and attention variant priced with a random factor), de-duplicated, until
--variants distinct programs exist. Each variant is predicted by the model under test (the
device's roofline, calibration applied) and measured (jax.jit of its lowering, median of --reps).
Output: Spearman rank correlation, the table, and the worst mispredictions (largest
|log(predicted / measured)| after removing the median ratio).

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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import device_tag, header, median_seconds, require_gpu, spearman, write_results  # noqa: E402

import eqsat_attn as ea  # noqa: E402
from eqsat_attn import examples, ir  # noqa: E402
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny f32 shapes on CPU (checks the script only)")
    parser.add_argument("--variants", type=int, default=None, help="distinct equivalent programs (default 24; smoke 4)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--calibrate", action="store_true", help="fit device parameters and write the calibration JSON")
    parser.add_argument("--calibration-out", type=pathlib.Path, default=None,
                        help="where --calibrate writes (default: eqsat_attn.cost.calibration_path(<device>))")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    ns = parser.parse_args(argv)
    require_gpu("bench/cost_model_experiment.py", ns.cpu_smoke)
    if ns.cpu_smoke:
        kw, dtype, want, reps = dict(batch=1, heads=2, seq=16, head_dim=8), jnp.float32, ns.variants or 4, ns.reps or 3
    else:
        kw, dtype, want, reps = dict(batch=4, heads=32, seq=4096, head_dim=128), jnp.bfloat16, ns.variants or 24, ns.reps or 10
    device = current_device_name()
    model = for_device(device)
    command = "python bench/cost_model_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
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
