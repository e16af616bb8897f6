"""Backward flash-attention kernels on the GPU (issue 5): correctness and speed per tile config.

    python bench/tune_backward.py [--out bench/results/tune-backward-<device>-<date>.md]
    python bench/tune_backward.py --mosaic   # the Mosaic GPU backward beside the Triton one
    python bench/tune_backward.py --mosaic-masks [--quick]   # issue 21: its masked, biased and
                                             # soft-capped rows beside the default backward

For each head dim and V layout, every candidate row of `BWD_BLOCK_TABLE` (block_q_dkv,
block_k_dkv, block_q_dq, block_k_dq, num_warps, num_stages) is checked against float32
autodiff of the reference on a ragged GQA shape (B2 H8 Hkv2 S1000, bf16; relative error of dq,
dk, dv) and, when correct, timed on bf16 B4 H32 S4096: median of --reps calls of the backward
alone (jax.vjp's pullback, jitted). TFLOP/s counts 2.5x the forward's flops (the FlashAttention-2
convention: five matmuls against the forward's two).

``--mosaic`` (Hopper): per head dim, causal flag and V layout, two rows on the same Mosaic GPU
forward's residuals: the Triton backward (its table tiles) and the Mosaic GPU backward
(kernels/mosaic_backward.py, ``backward="mosaic_gpu"``; a fallback to Triton is an error here, so
a row is never mislabelled), checked on B2 H8 Hkv2 S1024 (its contract: multiples of 128), timed
as above. The measurement that decides whether flash_attention's default backward flips.

``--mosaic-masks`` (Hopper): the variants of bench/attention.py --masks (key padding: half the keys
in half the batch; sliding window 1024, causal rows only; a [1, H, S, S] bf16 bias, its gradient
taken; soft-cap 50; ALiBi slope·(j - i) from its slopes, which the Mosaic GPU kernels compute and
the default backward reads materialised) plus causal key padding, per head dim: the default backward (Triton, or with
a bias the plain-JAX recomputation, which gives dbias) and the Mosaic GPU backward, both on the
Mosaic GPU forward's residuals. Each row is checked first (relative L2 error of dq, dk, dv, and
dbias, against float32 autodiff of the reference given the equivalent boolean mask, on B2 H8
S1024 with the variant's masks scaled to it) and timed only if right, on bf16 B4 H32 S4096
(S8192 too without --quick; the bias at S4096 only: dS is float32 [B, H, S, S]). TFLOP/s: 2.5x the forward's flops on the (query, key) pairs kept,
and for the Mosaic GPU rows also on the tiles its dQ kernel computes (128 rows x 64 keys).
``--cpu-smoke``: tiny shapes in interpret mode, to check the script only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import pathlib
import re
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attention import SOFTCAP, Shape, add_mask_inputs, alibi_of_shape, kept_flops, make_inputs, time_fn  # noqa: E402
from common import RESULTS, device_tag, header, require_gpu, write_results  # noqa: E402

from eqsat_attn.kernels import attention_reference, flash_attention  # noqa: E402
from eqsat_attn.kernels.masks import HIDDEN, index_keep, tile_classes  # noqa: E402
from eqsat_attn.kernels.mosaic_backward import COMPUTE_WARPGROUPS, MosaicBwdBlocks  # noqa: E402

fa = sys.modules["eqsat_attn.kernels.flash_attention"]
CANDIDATES = [
    (32, 64, 64, 32, 8, 2),
    (32, 64, 64, 32, 4, 2),
    (64, 64, 64, 64, 4, 2),
    (64, 64, 64, 64, 8, 2),
    (64, 128, 128, 64, 8, 2),
    (64, 64, 64, 64, 4, 3),
]
REL_TOL = 2e-2  # bf16 inputs: relative L2 error of each gradient


def _inputs(shape_q, shape_k, v_layout, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], shape_q, dtype)
    k = jax.random.normal(keys[1], shape_k, dtype)
    b, hkv, s, d = shape_k
    v = jax.random.normal(keys[2], shape_k if v_layout == "BHSD" else (b, hkv, d, s), dtype)
    do = jax.random.normal(keys[3], shape_q, dtype)
    return q, k, v, do


def grads(fn, q, k, v, do):
    _, pull = jax.vjp(fn, q, k, v)
    return pull(do)


def check(d: int, causal: bool, v_layout: str, s: int = 1000, **call) -> dict[str, float]:
    """Relative errors of dq, dk, dv against float32 autodiff of the reference (``call``: more
    flash_attention arguments, e.g. the backend and backward)."""
    q, k, v, do = _inputs((2, 8, s, d), (2, 2, s, d), v_layout, jnp.bfloat16, seed=d + causal)
    kw = dict(scale=d ** -0.5, causal=causal, v_layout=v_layout)
    got = jax.jit(lambda *a: grads(lambda q, k, v: flash_attention(q, k, v, **kw, **call), *a))(q, k, v, do)
    with jax.default_matmul_precision("float32"):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        want = jax.jit(lambda *a: grads(lambda q, k, v: attention_reference(q, k, v, **kw), *a))(*f32)
    return {name: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
            for name, g, w in zip(("dq", "dk", "dv"), got, want)}


def time_backward(shape: Shape, v_layout: str, reps: int, **call) -> float:
    q, k, v, do = _inputs((shape.b, shape.h, shape.s, shape.d), (shape.b, shape.h, shape.s, shape.d),
                          v_layout, jnp.bfloat16, seed=0)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=shape.d ** -0.5, causal=shape.causal,  # noqa: E731
                                         v_layout=v_layout, **call)
    _, pull = jax.vjp(fn, q, k, v)
    jpull = jax.jit(pull)
    return time_fn(lambda _: jpull(do), None, 2, reps)


def main(argv: list[str] | None = None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--mosaic", action="store_true",
                   help="the Mosaic GPU backward beside the Triton one (Hopper), not the tile sweep")
    p.add_argument("--mosaic-masks", action="store_true",
                   help="issue 21: the masked / biased / soft-capped Mosaic GPU backward rows (Hopper)")
    p.add_argument("--quick", action="store_true", help="--mosaic-masks: S4096 only")
    p.add_argument("--window", type=int, default=1024, help="--mosaic-masks: the sliding window's keys")
    p.add_argument("--match", default=None,
                   help="--mosaic-masks: only rows whose 'variant / backward' matches this regex")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="--mosaic-masks: tiny shapes in interpret mode on CPU (checks the script only)")
    args = p.parse_args(argv)
    require_gpu("bench/tune_backward.py", cpu_smoke=args.cpu_smoke and args.mosaic_masks)
    if args.mosaic_masks:
        return masked_mosaic_rows(args, argv)
    if args.mosaic:
        return mosaic_rows(args, argv)
    lines = header("Flash-attention backward: correctness and tiles (issue 5)",
                   "python bench/tune_backward.py " + " ".join(argv))
    lines += ["| D | causal | V | bwd tiles (q_dkv, k_dkv, q_dq, k_dq, warps, stages) | rel err dq / dk / dv | "
              "ms (B4 H32 S4096) | TFLOP/s |", "|---:|---|---|---|---|---:|---:|"]
    saved = dict(fa.BWD_BLOCK_TABLE)
    default = f"tune-backward-{device_tag()}-{dt.date.today().isoformat()}.md"  # rewritten after every row
    for d, causal, v_layout in itertools.product(args.head_dims, (False, True), ("BHSD", "BHDS")):
        for cand in CANDIDATES:
            fa.BWD_BLOCK_TABLE[d] = cand
            cells = f"| {d} | {causal} | {v_layout} | {cand} |"
            try:
                errs = check(d, causal, v_layout)
                ok = all(e <= REL_TOL for e in errs.values())
                err_txt = " / ".join(f"{e:.1e}" for e in errs.values()) + ("" if ok else " WRONG")
                if ok:
                    shape = Shape(4, 32, 4096, d, causal)
                    secs = time_backward(shape, v_layout, args.reps)
                    lines.append(f"{cells} {err_txt} | {secs * 1e3:.3f} | {2.5 * shape.flops / secs / 1e12:.1f} |")
                else:
                    lines.append(f"{cells} {err_txt} | – | – |")
            except Exception as e:  # noqa: BLE001 - a config that fails is a result
                msg = f"{type(e).__name__}: {str(e)[:80]}".replace("|", "/").replace("\n", " ")
                lines.append(f"{cells} {msg} | – | – |")
            print(lines[-1], flush=True)
            write_results("\n".join(lines) + "\n", args.out, default)  # a page even if cut short
        fa.BWD_BLOCK_TABLE.update(saved)
    return args.out or RESULTS / default


def mosaic_rows(args, argv: list[str]) -> pathlib.Path:
    """The Triton and the Mosaic GPU backward on the Mosaic GPU forward's residuals."""
    lines = header("Flash-attention backward: Mosaic GPU vs Triton (issue 21)",
                   "python bench/tune_backward.py " + " ".join(argv))
    lines += ["| D | causal | V | backward | rel err dq / dk / dv | ms (B4 H32 S4096) | TFLOP/s |",
              "|---:|---|---|---|---|---:|---:|"]
    default = f"tune-backward-mosaic-{device_tag()}-{dt.date.today().isoformat()}.md"
    for d, causal, v_layout in itertools.product(args.head_dims, (False, True), ("BHSD", "BHDS")):
        for name, call in (("Triton", dict(backend="mosaic_gpu")),
                           ("Mosaic GPU", dict(backend="mosaic_gpu", backward="mosaic_gpu"))):
            cells = f"| {d} | {causal} | {v_layout} | {name} |"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # a refused Mosaic GPU backward is a failed row
                    errs = check(d, causal, v_layout, s=1024, **call)
                    ok = all(e <= REL_TOL for e in errs.values())
                    err_txt = " / ".join(f"{e:.1e}" for e in errs.values()) + ("" if ok else " WRONG")
                    if ok:
                        shape = Shape(4, 32, 4096, d, causal)
                        secs = time_backward(shape, v_layout, args.reps, **call)
                        lines.append(f"{cells} {err_txt} | {secs * 1e3:.3f} | "
                                     f"{2.5 * shape.flops / secs / 1e12:.1f} |")
                    else:
                        lines.append(f"{cells} {err_txt} | – | – |")
            except Exception as e:  # noqa: BLE001 - a failure is a result
                msg = f"{type(e).__name__}: {str(e)[:120]}".replace("|", "/").replace("\n", " ")
                lines.append(f"{cells} {msg} | – | – |")
            print(lines[-1], flush=True)
            write_results("\n".join(lines) + "\n", args.out, default)
    return args.out or RESULTS / default


# --- issue 21: the masked, biased and soft-capped Mosaic GPU backward (--mosaic-masks) ---------

MASKED_VARIANTS = ("key padding", "causal key padding", "sliding window", "bias", "soft-cap", "alibi")


def variant_call(variant: str, shape: Shape, window: int, a: dict) -> tuple[dict, jax.Array | None, bool]:
    """(flash_attention's score arguments, the reference's boolean mask, causal) of a variant on
    ``shape`` (``a`` from `attention.add_mask_inputs`)."""
    if variant in ("key padding", "causal key padding"):
        return dict(mask=a["pad"]), a["pad"], variant.startswith("causal") or shape.causal
    if variant == "sliding window":
        return dict(window=window), index_keep(shape.s, shape.s, window=window), True
    if variant == "soft-cap":
        return dict(softcap=SOFTCAP), None, shape.causal
    if variant == "alibi":  # computed from its slopes in both Mosaic GPU kernels (no dbias)
        return dict(alibi=alibi_of_shape(shape)), None, shape.causal
    return {}, None, shape.causal  # bias: a differentiable operand


def masked_grads(shape: Shape, variant: str, window: int, a: dict, interpret: bool, **call):
    """jax.vjp's pullback (jitted) of one variant's call and its cotangent: grads of q, k, v
    (and the bias for the bias variant)."""
    mods, _, causal = variant_call(variant, shape, window, a)
    base = dict(scale=shape.d ** -0.5, causal=causal, backend="mosaic_gpu", interpret=interpret, **mods, **call)
    if variant == "bias":
        fn = lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, **base)  # noqa: E731
        operands = (a["q"], a["k"], a["v"], a["bias"])
    else:
        fn = lambda q, k, v: flash_attention(q, k, v, **base)  # noqa: E731
        operands = (a["q"], a["k"], a["v"])
    _, pull = jax.vjp(fn, *operands)
    return jax.jit(pull), jax.random.normal(jax.random.key(3), a["q"].shape, a["q"].dtype)


def masked_errors(shape: Shape, variant: str, window: int, a: dict, pull, do) -> dict[str, float]:
    """Relative L2 errors of dq, dk, dv (and dbias) of ``pull(do)`` (`masked_grads`) against float32
    autodiff of the reference."""
    got = pull(do)
    mods, keep, causal = variant_call(variant, shape, window, a)
    kw = dict(scale=shape.d ** -0.5, causal=causal, mask=keep, softcap=mods.get("softcap", 0.0))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("float32"):
        operands = [f32(a[n]) for n in ("q", "k", "v")] + ([f32(a["bias"])] if variant == "bias" else [])
        fixed = f32(a["alibi_bias"]) if variant == "alibi" else None  # ALiBi: the same values, a constant
        fn = lambda q, k, v, *bias: attention_reference(q, k, v, bias=bias[0] if bias else fixed, **kw)  # noqa: E731
        want = jax.jit(lambda *x: jax.vjp(fn, *x)[1](f32(do)))(*operands)
    return {name: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
            for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want)}


def backward_tile_flops(shape: Shape, variant: str, window: int, a: dict) -> float:
    """2.5 x 4·D times the (query, key) pairs of the tiles the Mosaic GPU backward's dQ kernel
    computes (a CTA's 128 rows by 64 keys; the dK/dV kernel computes the same positions)."""
    blocks = MosaicBwdBlocks()
    rows = COMPUTE_WARPGROUPS * blocks.block_q
    mods, _, causal = variant_call(variant, shape, window, a)
    lengths = a["lengths"] if "mask" in mods else None
    classes = tile_classes(shape.s, shape.s, rows, blocks.block_kv, shape.s, shape.s, causal=causal,
                           kv_lengths=lengths, window=mods.get("window"))
    computed = int((classes != HIDDEN).sum()) * (shape.b // classes.shape[0]) * shape.h
    return 2.5 * 4.0 * shape.d * computed * rows * blocks.block_kv


def masked_mosaic_rows(args, argv: list[str]) -> pathlib.Path:
    """Per head dim and variant, the default backward and the Mosaic GPU one: checked, then timed."""
    smoke = args.cpu_smoke and jax.default_backend() != "gpu"
    lines = header("Flash-attention backward with masks, bias and soft-cap: Mosaic GPU vs default (issue 21)",
                   "python bench/tune_backward.py " + " ".join(argv))
    lines += ["| shape | causal | variant | backward | rel err dq / dk / dv (/ dbias) | ms | TFLOP/s (kept) | "
              "TFLOP/s (computed tiles) |", "|---|---|---|---|---|---:|---:|---:|"]
    default = None if smoke else f"tune-backward-mosaic-masks-{device_tag()}-{dt.date.today().isoformat()}.md"
    check_shape = Shape(2, 2, 128, 64, False) if smoke else None
    timed = [Shape(2, 2, 128, 64, c) for c in (False,)] if smoke else         [Shape(4, 32, s, d, c) for s in ((4096,) if args.quick else (4096, 8192)) for d in args.head_dims
         for c in (False, True)]
    window = 32 if smoke else args.window
    reps = 1 if smoke else args.reps
    for shape in timed:
        small = check_shape or Shape(2, 8, 1024, shape.d, shape.causal)
        checked = add_mask_inputs(small, make_inputs(small, seed=1))
        big = add_mask_inputs(shape, make_inputs(shape)) if not smoke else checked
        for variant in MASKED_VARIANTS:
            if variant in ("sliding window", "causal key padding") and shape.causal:
                continue  # their rows are causal already: listed with the non-causal shape
            if variant == "bias" and shape.s > 4096:
                continue  # dS for dbias is float32 [B, H, S, S]: 34 GB at B4 H32 S8192
            for name, call in (("default", {}), ("Mosaic GPU", dict(backward="mosaic_gpu"))):
                if args.match and not re.search(args.match, f"{variant} / {name}"):
                    continue
                causal = variant_call(variant, shape, window, big)[2]
                cells = f"| {shape.label()} | {causal} | {variant} | {name} |"
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # a refused Mosaic GPU backward is a failed row
                        pull, do = masked_grads(small, variant, window, checked, smoke, **call)
                        errs = masked_errors(small, variant, window, checked, pull, do)
                        ok = all(e <= REL_TOL for e in errs.values())
                        err_txt = " / ".join(f"{e:.1e}" for e in errs.values()) + ("" if ok else " WRONG")
                        if not ok:
                            lines.append(f"{cells} {err_txt} | – | – | – |")
                        else:
                            if shape != small:
                                pull, do = masked_grads(shape, variant, window, big, smoke, **call)
                            secs = time_fn(lambda _, pull=pull, do=do: pull(do), None, 0 if smoke else 2, reps)
                            kept = 2.5 * kept_flops(dataclasses.replace(shape, causal=causal),
                                                    "key padding" if "padding" in variant else variant, window)
                            tiles = backward_tile_flops(shape, variant, window, big) if name == "Mosaic GPU" else None
                            lines.append(f"{cells} {err_txt} | {secs * 1e3:.3f} | {kept / secs / 1e12:.1f} | "
                                         + (f"{tiles / secs / 1e12:.1f} |" if tiles else "– |"))
                except Exception as e:  # noqa: BLE001 - a failure is a result
                    msg = f"{type(e).__name__}: {str(e)[:120]}".replace("|", "/").replace("\n", " ")
                    lines.append(f"{cells} {msg} | – | – | – |")
                print(lines[-1], flush=True)
                write_results("\n".join(lines) + "\n", args.out, default)
    return args.out or RESULTS / default


if __name__ == "__main__":
    main()
