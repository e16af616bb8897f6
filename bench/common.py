"""Shared helpers of the GPU benchmarks: device check, timing, results header."""

from __future__ import annotations

import datetime as dt
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def require_gpu(script: str, cpu_smoke: bool) -> None:
    """Exit with a clear message on a machine without a GPU, unless this is a --cpu-smoke run."""
    if on_gpu() or cpu_smoke:
        return
    sys.stderr.write(
        f"{script}: no GPU found (jax.devices()[0] is {jax.devices()[0].device_kind!r}).\n"
        "This benchmark measures GPU kernels at production shapes; CPU numbers would mean nothing.\n"
        "Run it on a GPU machine (see bench/results/README.md), or pass --cpu-smoke for a tiny\n"
        "CPU run that only checks the script works.\n"
    )
    raise SystemExit(2)


def median_seconds(fn: Callable[..., Any], args: Sequence[Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def header(title: str, command: str) -> list[str]:
    dev = jax.devices()[0]
    return [
        f"# {title}",
        "",
        f"- device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, Python {platform.python_version()}",
        f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"- command: `{command}`",
        "",
    ]


def device_tag() -> str:
    kind = jax.devices()[0].device_kind.lower()
    for name in ("h200", "h100", "a100"):
        if name in kind:
            return name
    return jax.devices()[0].platform


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), without scipy."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    if len(xs) < 2:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def write_results(text: str, out: pathlib.Path | None, default_name: str | None, console: Any = None) -> None:
    """Write a results page to ``out`` (or ``bench/results/<default_name>``; None: don't write),
    saying so on ``console`` (a rich Console; None: stdout)."""
    path = out or (RESULTS / default_name if default_name else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        (console or _STDOUT).print(f"wrote {path}")


class _Stdout:
    @staticmethod
    def print(message: str) -> None:
        print(message)


_STDOUT = _Stdout()
