"""Tile sweep for the Pallas flash-attention forward kernel (issue 5): block_q, block_k, num_warps
and num_stages per head dim, causal flag and V layout, on the GPU.

    python bench/tune_attention.py [--seq 4096] [--out bench/results/tune-attention-<device>-<date>.md]
    python bench/tune_attention.py --fp8 [--quick]   # issue 10: the fp8 kernel, D128, block_k up to 256

Every configuration is compiled ahead of time on a thread pool (compilation dominates a sweep),
checked against the float32 reference on batch 0 heads 0-1, then timed serially: median of
--reps calls after warm-up. The page lists the best configurations per case and the table entry
they imply for `BLOCK_TABLE` in eqsat_attn/kernels/flash_attention.py. ``--fp8`` sweeps the fp8
kernel (q, k, v quantized per tensor to e4m3, both V layouts, D128 causal and not, block_k up to
256: an fp8 tile takes half the shared memory of a bf16 one, so larger key tiles fit), checked against the reference on the dequantized operands with the fp8
tolerance; it feeds `FP8_BLOCK_TABLE` in eqsat_attn/kernels/fp8_attention.py. ``--mosaic``
sweeps the Mosaic GPU (Hopper) kernel's key tile, pipeline depth and schedule (block_q is 64 rows
per compute warpgroup; the "warps" column reads "3 wg": two compute warpgroups and a TMA producer,
"3 wg overlap" with FlashAttention-3's intra-warpgroup overlap, `MosaicBlocks.overlap`);
it feeds `BLOCK_TABLE` in eqsat_attn/kernels/mosaic_attention.py. Tiles over Hopper's shared
memory fail at compile time and are listed as failed.

    python bench/tune_attention.py --mosaic [--fp8] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import concurrent.futures
import functools
import itertools
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attention import (ERR_TOL, Shape, add_fp8_inputs, fp8_reference_subset, make_inputs,  # noqa: E402
                       reference_subset, time_fn)
from common import RESULTS, device_tag, header, require_gpu, write_results  # noqa: E402

from eqsat_attn.kernels import flash_attention  # noqa: E402
from eqsat_attn.kernels.fp8_attention import FP8_ATOL, FP8_RTOL, flash_attention_fp8  # noqa: E402
from eqsat_attn.kernels.mosaic_attention import MosaicBlocks  # noqa: E402

BLOCKS_Q = (64, 128)
BLOCKS_K = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)
FP8_BLOCKS_K = (64, 128, 256)  # fp8 blocks are >= 32; 256-key tiles fit in fp8's shared memory


def fp8_configs(quick: bool) -> list[tuple[int, int, int, int]]:
    stages = (2, 3) if quick else STAGES
    return list(itertools.product(BLOCKS_Q, FP8_BLOCKS_K, WARPS, stages))


MOSAIC_BLOCKS_KV = (64, 128, 256)
MOSAIC_STAGES = (2, 3, 4)


#: the Mosaic kernel's schedules, in the "warps" column: attention_mgpu's, and FlashAttention-3's
#: intra-warpgroup overlap (`MosaicBlocks.overlap`); fp8 also with P kept in registers for P·V
#: ("P regs", `MosaicBlocks.fp8_p_registers`)
MOSAIC_SCHEDULES = ("3 wg", "3 wg overlap")
MOSAIC_FP8_SCHEDULES = MOSAIC_SCHEDULES + ("3 wg, P regs", "3 wg overlap, P regs")


def mosaic_configs(quick: bool, fp8: bool = False, causal: bool = False) -> list[tuple[int, int, str, int]]:
    """Tiles x schedules x stages; with a causal mask each schedule also with the query tiles in
    reverse ("heavy first", `MosaicBlocks.heavy_first`)."""
    stages = (2, 3) if quick else MOSAIC_STAGES
    schedules = MOSAIC_FP8_SCHEDULES if fp8 else MOSAIC_SCHEDULES
    if causal:
        schedules += tuple(f"{name}, heavy first" for name in schedules)
    return [(64, bk, schedule, st)
            for bk, schedule, st in itertools.product(MOSAIC_BLOCKS_KV, schedules, stages)]


def configs(quick: bool) -> list[tuple[int, int, int, int]]:
    ks = (64, 128) if quick else BLOCKS_K
    return list(itertools.product(BLOCKS_Q, ks, WARPS, STAGES))


def sweep_case(shape: Shape, v_layout: str, cfgs, reps: int, fp8: bool = False,
               mosaic: bool = False) -> list[dict]:
    """Compile every config in parallel, then check and time each one."""
    a = make_inputs(shape)
    if fp8:
        a = add_fp8_inputs(a)
        ref, vmax = fp8_reference_subset(shape, a)
        args = (a["q8"], a["k8"], a["v8"] if v_layout == "BHSD" else a["vt8"], *a["scales"])
        kernel = flash_attention_fp8
    else:
        ref = reference_subset(shape, a)
        args = (a["q"], a["k"], a["v"] if v_layout == "BHSD" else a["vt"])
        kernel = flash_attention

    def build(cfg):
        bq, bk, warps, stages = cfg
        if mosaic:
            fn = functools.partial(kernel, scale=shape.d ** -0.5, causal=shape.causal,
                                   v_layout=v_layout, backend="mosaic_gpu",
                                   mosaic_blocks=MosaicBlocks(bq, bk, stages,
                                                              overlap="overlap" in warps,
                                                              fp8_p_registers="P regs" in warps,
                                                              heavy_first="heavy first" in warps))
            return jax.jit(fn).lower(*args).compile()
        fn = functools.partial(kernel, scale=shape.d ** -0.5, causal=shape.causal,
                               v_layout=v_layout, block_q=bq, block_k=bk, num_warps=warps,
                               num_stages=stages)
        return jax.jit(fn).lower(*args).compile()

    def correct(out) -> tuple[bool, float]:
        diff = jnp.abs(out[:1, :2].astype(jnp.float32) - ref)
        if fp8:
            tol = FP8_ATOL * vmax + FP8_RTOL * float(jnp.abs(ref).max())  # as bench/attention.py --fp8
            return float(diff.max()) <= tol, float(diff.max())
        err = float(diff.max())
        return err <= ERR_TOL * (1.0 + float(jnp.abs(ref).max())), err

    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = {cfg: pool.submit(build, cfg) for cfg in cfgs}
    for cfg, fut in futures.items():
        row = {"cfg": cfg}
        try:
            compiled = fut.result()
            out = jax.block_until_ready(compiled(*args))
            ok, err = correct(out)
            if not ok:
                row.update(tflops=None, note=f"wrong (err {err:.2e})")
            else:
                secs = time_fn(lambda _: compiled(*args), None, 2, reps)
                row.update(tflops=shape.flops / secs / 1e12, ms=secs * 1e3, note="ok")
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            row.update(tflops=None, note=f"{type(e).__name__}: {str(e)[:60]}".replace("|", "/"))
        rows.append(row)
    return rows


def render(cases: dict, top: int) -> list[str]:
    lines = ["| case | block_q | block_k | warps | stages | ms | TFLOP/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    best = {}
    for label, rows in cases.items():
        ok = sorted((r for r in rows if r["tflops"]), key=lambda r: -r["tflops"])
        best[label] = ok[0] if ok else None
        for r in ok[:top]:
            bq, bk, w, s = r["cfg"]
            lines.append(f"| {label} | {bq} | {bk} | {w} | {s} | {r['ms']:.3f} | {r['tflops']:.1f} |")
        failed = [r for r in rows if not r["tflops"]]
        if failed:
            lines.append(f"| {label} | {len(failed)} configs failed: "
                         f"{'; '.join(sorted({r['note'] for r in failed}))[:150]} | | | | | |")
    lines += ["", "Best per case:", ""]
    for label, r in best.items():
        lines.append(f"- {label}: {r['cfg'] if r else 'none'}"
                     + (f" at {r['tflops']:.1f} TFLOP/s" if r else ""))
    return lines


def main(argv: list[str] | None = None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="block_k 64 and 128 only (--fp8: stages 2 and 3)")
    p.add_argument("--fp8", action="store_true", help="sweep the fp8 kernel (D128) instead of the bf16 one")
    p.add_argument("--mosaic", action="store_true",
                   help="sweep the Mosaic GPU (Hopper) kernel's block_kv and stages instead")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    require_gpu("bench/tune_attention.py", cpu_smoke=False)
    cases = {}
    head_dims = (128,) if args.fp8 else (128, 64)
    layouts = ("BHDS",) if args.fp8 and args.mosaic else ("BHSD", "BHDS")  # fp8 Mosaic: V^T only
    for d, causal, v_layout in itertools.product(head_dims, (False, True), layouts):
        shape = Shape(4, 32, args.seq, d, causal)
        prefix = ("Mosaic GPU " if args.mosaic else "") + ("fp8 " if args.fp8 else "")
        label = f"{prefix}D{d} {'causal' if causal else 'full'} V {v_layout}"
        cfgs = mosaic_configs(args.quick, args.fp8, causal) if args.mosaic else fp8_configs(args.quick) if args.fp8 \
            else configs(args.quick)
        cases[label] = sweep_case(shape, v_layout, cfgs, args.reps, fp8=args.fp8, mosaic=args.mosaic)
        best = max((r["tflops"] or 0 for r in cases[label]), default=0)
        print(f"{label}: best {best:.1f} TFLOP/s", flush=True)
    title = ("Mosaic GPU " if args.mosaic else "") + (
        "fp8 flash-attention forward tile sweep (issue 10)" if args.fp8 else
        "flash-attention forward tile sweep (issue 5)")
    lines = header(title, "python bench/tune_attention.py " + " ".join(argv))
    operands = "q, k, v float8_e4m3fn (per-tensor scales), bf16 out" if args.fp8 else "bf16"
    lines += [f"- shapes: {operands}, B4 H32 S{args.seq}; median of {args.reps} calls after 2 warm-up", ""]
    lines += render(cases, args.top)
    text = "\n".join(lines) + "\n"
    print(text)
    kind = "tune-attention" + ("-mosaic" if args.mosaic else "") + ("-fp8" if args.fp8 else "")
    default = f"{kind}-{device_tag()}-{dt.date.today().isoformat()}.md"
    write_results(text, args.out, default)
    return args.out or RESULTS / default


if __name__ == "__main__":
    main()
