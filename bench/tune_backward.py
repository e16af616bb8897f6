"""Backward flash-attention kernels on the GPU (issue 5): correctness and speed per tile config.

    python bench/tune_backward.py [--out bench/results/tune-backward-<device>-<date>.md]
    python bench/tune_backward.py --mosaic   # the Mosaic GPU backward beside the Triton one

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
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attention import Shape, time_fn  # noqa: E402
from common import RESULTS, device_tag, header, require_gpu, write_results  # noqa: E402

from eqsat_attn.kernels import attention_reference, flash_attention  # noqa: E402

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
    args = p.parse_args(argv)
    require_gpu("bench/tune_backward.py", cpu_smoke=False)
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


if __name__ == "__main__":
    main()
