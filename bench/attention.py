"""Forward attention benchmark (issue 5): our Pallas kernels (standard and transposed-V) against
the stock Pallas Triton kernel, cuDNN and XLA, side by side on one GPU.

    python bench/attention.py [--quick] [--out bench/results/attention-<device>-<date>.md]
    python bench/attention.py --cpu-smoke --out /tmp/smoke.md   # tiny interpret-mode run on CPU

TFLOP/s counts 4*B*H*Sq*Sk*D flops (halved when causal); time is the median of --reps timed
calls after warm-up. Each row's output is checked against the plain-JAX reference on batch 0,
heads 0-1 (the "max err" column).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import pathlib
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eqsat_attn.kernels import attention_reference, flash_attention  # noqa: E402

ERR_TOL = 2e-2  # bf16 outputs: max abs error allowed, relative to 1 + max |reference|


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    h: int
    s: int
    d: int
    causal: bool
    dtype: str = "bfloat16"

    @property
    def flops(self) -> float:
        f = 4.0 * self.b * self.h * self.s * self.s * self.d
        return f / 2 if self.causal else f

    def label(self) -> str:
        return f"{self.dtype} B{self.b} H{self.h} S{self.s} D{self.d}"


def gpu_shapes(quick: bool) -> list[Shape]:
    out = []
    for s, d in [(4096, 128), (8192, 128), (4096, 64)]:
        if quick and s != 4096:
            continue
        for causal in (False, True):
            out.append(Shape(4, 32, s, d, causal))
    return out


SMOKE_SHAPES = [Shape(1, 2, 64, 32, True)]


def _stock_mha() -> Callable | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as stock
        return stock
    except Exception:  # noqa: BLE001 - module absent in some jax builds
        return None


def implementations(shape: Shape, interpret: bool, blocks: tuple[int | None, int | None]):
    """name -> (fn over (q, k, v_bhsd, v_bhds, q_bshd, k_bshd, v_bshd), how to read its output)."""
    scale = shape.d ** -0.5
    ours = functools.partial(flash_attention, scale=scale, causal=shape.causal,
                             block_q=blocks[0], block_k=blocks[1], interpret=interpret)
    impls: dict[str, tuple[Callable, str]] = {
        "ours standard (V [B,H,S,D])":
            (lambda a: ours(a["q"], a["k"], a["v"], v_layout="BHSD"), "BHSD"),
        "ours transposed-V (V [B,H,D,S])":
            (lambda a: ours(a["q"], a["k"], a["vt"], v_layout="BHDS"), "BHSD"),
        "materialise V^T + ours transposed-V":
            (lambda a: ours(a["q"], a["k"], jnp.swapaxes(a["v"], 2, 3), v_layout="BHDS"), "BHSD"),
        "materialise V from V^T + ours standard":
            (lambda a: ours(a["q"], a["k"], jnp.swapaxes(a["vt"], 2, 3), v_layout="BHSD"), "BHSD"),
    }
    stock = _stock_mha()
    if stock is not None:
        bs = stock.BlockSizes(block_q=min(128, shape.s), block_k=min(128, shape.s))
        impls["stock Pallas Triton mha"] = (
            lambda a: stock.mha(a["q_bshd"], a["k_bshd"], a["v_bshd"], None, sm_scale=scale,
                                causal=shape.causal, block_sizes=bs, interpret=interpret),
            "BSHD")
    for impl in ("cudnn", "xla"):
        impls[f"jax.nn.dot_product_attention {impl}"] = (
            functools.partial(
                lambda a, impl: jax.nn.dot_product_attention(
                    a["q_bshd"], a["k_bshd"], a["v_bshd"], scale=scale, is_causal=shape.causal,
                    implementation=impl), impl=impl),
            "BSHD")
    return impls


def make_inputs(shape: Shape, seed: int = 0) -> dict[str, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dims = (shape.b, shape.h, shape.s, shape.d)
    dtype = jnp.dtype(shape.dtype)
    q, k, v = (jax.random.normal(key, dims, dtype) for key in (kq, kk, kv))
    a = {"q": q, "k": k, "v": v, "vt": jnp.swapaxes(v, 2, 3)}
    for name in ("q", "k", "v"):
        a[f"{name}_bshd"] = jnp.swapaxes(a[name], 1, 2)
    return jax.block_until_ready(a)


def time_fn(fn: Callable, args, warmup: int, reps: int) -> float:
    """Median seconds per call of a jitted fn."""
    for _ in range(warmup):
        jax.block_until_ready(fn(args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_subset(shape: Shape, a: dict[str, jax.Array]) -> jax.Array:
    """Reference output for batch 0, heads 0-1, float32, [1, 2, S, D]."""
    sub = {n: a[n][:1, :2].astype(jnp.float32) for n in ("q", "k", "v")}
    return attention_reference(sub["q"], sub["k"], sub["v"], scale=shape.d ** -0.5,
                               causal=shape.causal)


def run_row(name: str, fn: Callable, layout: str, shape: Shape, a, ref, warmup: int,
            reps: int) -> dict:
    row = {"shape": shape.label(), "causal": shape.causal, "kernel": name}
    try:
        jfn = jax.jit(fn)
        out = jax.block_until_ready(jfn(a))
        if layout == "BSHD":
            out = jnp.swapaxes(out, 1, 2)
        err = float(jnp.abs(out[:1, :2].astype(jnp.float32) - ref).max())
        ok = err <= ERR_TOL * (1.0 + float(jnp.abs(ref).max()))
        secs = time_fn(jfn, a, warmup, reps)
        row.update(ms=secs * 1e3, tflops=shape.flops / secs / 1e12, err=err,
                   check="ok" if ok else "FAIL")
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result, not a crash
        msg = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}")[:120].replace("|", "/")
        row.update(ms=None, tflops=None, err=None, check=f"n/a ({msg})")
    return row


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def render(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| shape | causal | kernel | ms | TFLOP/s | max err | check |",
                      "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "–"
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else "–"
        err = f"{r['err']:.2e}" if r["err"] is not None else "–"
        lines.append(f"| {r['shape']} | {r['causal']} | {r['kernel']} | {ms} | {tf} | {err} | "
                     f"{r['check']} |")
    # Side-by-side summary: TFLOP/s per kernel (columns) and shape (rows).
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines += ["", "TFLOP/s side by side:", "",
              "| shape | causal | " + " | ".join(kernels) + " |",
              "|---|---|" + "---:|" * len(kernels)]
    for key in dict.fromkeys((r["shape"], r["causal"]) for r in rows):
        cells = []
        for kname in kernels:
            hit = [r for r in rows if (r["shape"], r["causal"]) == key and r["kernel"] == kname]
            cells.append(f"{hit[0]['tflops']:.1f}" if hit and hit[0]["tflops"] else "–")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S4096 shapes only, 5 repetitions")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="markdown file (default bench/results/attention-<device>-<date>.md)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes in Pallas interpret mode (tests the script on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-q", type=int, default=None, help="override our kernel's block_q")
    p.add_argument("--block-k", type=int, default=None, help="override our kernel's block_k")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.cpu_smoke:
        raise SystemExit(
            f"bench/attention.py needs a GPU (jax default backend is {jax.default_backend()!r}); "
            "pass --cpu-smoke for a tiny interpret-mode run that only tests the script.")
    smoke = args.cpu_smoke and not on_gpu
    shapes = SMOKE_SHAPES if args.cpu_smoke else gpu_shapes(args.quick)
    reps = args.reps or (2 if args.cpu_smoke else 5 if args.quick else 20)
    warmup = 1 if args.cpu_smoke else args.warmup
    kind = jax.devices()[0].device_kind
    today = dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"attention-{device_slug(kind)}-{today}.md"

    rows = []
    for shape in shapes:
        a = make_inputs(shape)
        ref = reference_subset(shape, a)
        impls = implementations(shape, interpret=smoke, blocks=(args.block_q, args.block_k))
        for name, (fn, layout) in impls.items():
            row = run_row(name, fn, layout, shape, a, ref, warmup, reps)
            rows.append(row)
            print(f"{row['shape']} causal={shape.causal} {name}: "
                  f"{row['tflops'] and round(row['tflops'], 1)} TFLOP/s {row['check']}", flush=True)
        del a

    header = [
        "# Attention forward benchmark (issue 5)" + (" — CPU smoke run, not a measurement"
                                                     if smoke else ""),
        "",
        f"- device: {kind} ({jax.default_backend()}, {jax.device_count()} device(s))",
        f"- date: {today}",
        f"- jax {jax.__version__}",
        f"- command: `python bench/attention.py {' '.join(argv)}`".replace("  ", " "),
        f"- timing: median of {reps} calls after {warmup} warm-up, jax.block_until_ready;"
        " TFLOP/s = 4·B·H·S²·D (÷2 causal) / time",
        f"- max err: vs attention_reference in float32 on batch 0, heads 0-1; ok if ≤ {ERR_TOL}·(1+max|ref|)",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, header))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
