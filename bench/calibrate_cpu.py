"""Fit the CPU roofline's constants to measured programs (the procedure behind devices.CPU).

    python bench/cost_model_experiment.py --cpu --rounds 61 --inner 5 --dump runA.pkl   # measure
    python bench/calibrate_cpu.py runA.pkl [runB.pkl ...] [--check runC.pkl]           # fit, then check

The dumps must be measured as the CPU row is meant: XLA:CPU single-threaded, timed by process CPU
time (the experiment's defaults; `--multi-thread` or `--clock wall` measure something else).

Reads the programs and median times of one or more ``--dump`` files and fits the free constants
of the CPU `DeviceSpec` (bandwidth, launch overhead, matmul and attention efficiency, the
split-heads attention efficiency, and the bandwidth fractions of transposes and relayout copies)
so that the model's predicted seconds match the measured ones: minimise the mean squared
log(predicted / measured) over the programs, each workload weighted alike (so a ranking error on
a fast workload counts as much as on a slow one). Peak FLOP/s stays the spec arithmetic (the
efficiencies absorb what is reached). Deterministic coordinate descent in log space within
`PARAMETERS`' bounds (fractions at most 1), from the table's current values. ``--check`` prices other dumps under the fit
(measured on another run: a fit that only explains its own noise would not carry over).
Prints the fitted constants, the fit's error and Spearman per workload, fitted and checked.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import pickle
import statistics
import sys
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import spearman  # noqa: E402

from eqsat_attn.cost import RooflineModel, program_cost  # noqa: E402
from eqsat_attn.cost.devices import DeviceSpec, device_spec  # noqa: E402

#: the fitted constants: name -> (lower bound, upper bound)
PARAMETERS = {
    "bandwidth": (1e9, 1e12),
    # a thunk dispatch costs at least ~1 us (assumption): under load the fit cannot resolve the
    # launch cost (anything from 0 to 10 us fitted alike on 2026-12-06) and would drift to 0
    "launch_overhead": (1e-6, 1e-3),
    "matmul_efficiency": (1e-3, 1.0),
    "attention": (1e-3, 1.0),  # every attention_efficiency entry: the reference's two batched per-head GEMMs
    "split_heads_attention_efficiency": (1e-3, 1.0),
    "transpose_bandwidth_fraction": (1e-3, 1.0),
    "copy_bandwidth_fraction": (1e-3, 1.0),
}


def spec_with(base: DeviceSpec, values: dict[str, float]) -> DeviceSpec:
    """``base`` with the fitted constants replaced."""
    fields = {k: v for k, v in values.items() if k != "attention"}
    fields["attention_efficiency"] = {k: values["attention"] for k, _ in base.attention_efficiency}
    return base.replace(**fields)


def current(base: DeviceSpec) -> dict[str, float]:
    values = {k: float(getattr(base, k)) for k in PARAMETERS if k != "attention"}
    values["attention"] = statistics.median(v for _, v in base.attention_efficiency)
    return values


def load(paths: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        for r in pickle.loads(path.read_bytes())["rows"]:
            rows.append({"workload": r["workload"], "label": r["label"], "measured": r["measured"],
                         "program": r["program"], "run": path.name})
    return rows


def loss(rows: list[dict[str, Any]], spec: DeviceSpec) -> float:
    """Mean over workloads of the mean squared log(predicted / measured)."""
    model = RooflineModel(spec, "reference")
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["workload"], []).append(math.log(program_cost(r["program"], model) / r["measured"]) ** 2)
    return statistics.mean(statistics.mean(v) for v in by.values())


def fit(rows: list[dict[str, Any]], base: DeviceSpec, sweeps: int = 12) -> dict[str, float]:
    """Coordinate descent on log(constant): each sweep tries x * step and x / step per constant,
    keeps what lowers the loss, and halves the step (in log) when a sweep finds nothing."""
    values = current(base)
    best = loss(rows, spec_with(base, values))
    step = 2.0
    for _ in range(sweeps * len(PARAMETERS)):
        improved = False
        for name, (low, high) in PARAMETERS.items():
            for factor in (step, 1.0 / step):
                trial = dict(values)
                trial[name] = min(high, max(low, values[name] * factor))
                value = loss(rows, spec_with(base, trial))
                if value < best - 1e-12:
                    values, best, improved = trial, value, True
        if not improved:
            step = math.sqrt(step)
            if step < 1.01:
                break
    return values


def report(rows: list[dict[str, Any]], spec: DeviceSpec, title: str) -> None:
    model = RooflineModel(spec, "reference")
    pred = [program_cost(r["program"], model) for r in rows]
    print(f"{title}: loss {loss(rows, spec):.4f}, Spearman all {spearman(pred, [r['measured'] for r in rows]):.3f}")
    for run in dict.fromkeys(r["run"] for r in rows):
        for name in dict.fromkeys(r["workload"] for r in rows):
            idx = [i for i, r in enumerate(rows) if r["workload"] == name and r["run"] == run]
            rho = spearman([pred[i] for i in idx], [rows[i]["measured"] for i in idx])
            ratio = statistics.median(pred[i] / rows[i]["measured"] for i in idx)
            print(f"  {run} {name}: Spearman {rho:.3f}, predicted/measured {ratio:.2f} ({len(idx)} programs)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", type=pathlib.Path, nargs="+", help="cost_model_experiment.py --cpu --dump files")
    parser.add_argument("--check", type=pathlib.Path, nargs="*", default=[], help="dumps priced under the fit only")
    ns = parser.parse_args(argv)
    base = device_spec("cpu", calibrated=False)
    rows = load(ns.dumps)
    report(rows, base, "table as it is")
    values = fit(rows, base)
    fitted = spec_with(base, values)
    report(rows, fitted, "fitted")
    if ns.check:
        checked = load(ns.check)
        report(checked, base, "check, table as it is")
        report(checked, fitted, "check, fitted")
    print("fitted constants:")
    for name, value in values.items():
        print(f"  {name} = {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
