"""fp8 attention: per-tensor quantization helpers, the reference semantics and the Pallas kernel.

Conventions (those of flax's fp8 ops and cuDNN): a tensor ``x`` is stored as ``x8`` in an fp8
dtype with a float32 per-tensor *descale* ``s`` such that ``x ≈ x8.astype(f32) * s``;
``quantize(x, s) = clip(x / s, -max, max).astype(fp8)``, ``dequantize(x8, s) = x8 * s``.

The fp8 Attention op means attention over the dequantized operands (`attention_reference_fp8`):
softmax(scale · (q8·sq)(k8·sk)^T) (v8·sv), output in bf16. The Pallas kernel
(`flash_attention_fp8`, the forward kernel of flash_attention.py with ``descaled=True``) runs both
matmuls on fp8 operands with float32 accumulation: q8·k8^T is exact in float32 and multiplied by
``scale·sq·sk``; the probabilities come out of exp2 as 256·P (``P_FP8_SCALE``, exact) and are cast
to V's fp8 dtype for P·V; the output is multiplied by ``sv``, divided by the float32 row sum
(of the unquantized 256·P, so the factor cancels) and written in bf16. Against the float64 reference on the
dequantized operands the only extra error is P's rounding to e4m3 (relative 2^-4 per entry, in
random directions; its effect weighs V's entries) plus the bf16 output: tests allow
``FP8_ATOL``·max|v| + ``FP8_RTOL``·|ref| elementwise (measured: about half of that).

V may be [B,H,S,D] ("BHSD") or, the layout fp8 wants on Hopper, [B,H,D,S] ("BHDS"): the fp8
matrix instructions take both operands K-major, and for P·V the reduction runs over keys, so a
Vᵀ tile [D, block_k] read from a [B,H,D,S] array is K-major with no shuffle.

Backward (``backward="pallas"``, the default): FlashAttention-3's recipe, an fp8 forward with a
bf16 backward. The custom_vjp's backward dequantizes q, k and v to bfloat16 (``x8 · s`` in float32,
rounded once to bf16) and runs the bf16 Pallas backward kernels of flash_attention.py (one over
key tiles for dK and dV, one over query tiles for dQ; both V layouts, causal, GQA) on them, with
the forward's bf16 output and float32 log-sum-exp as residuals and dO in bf16. Inside the kernels
the matmuls take bf16 operands with float32 accumulation, P and dS are recomputed in float32
and cast to bf16 for their matmuls, and dQ, dK, dV (gradients w.r.t. the dequantized operands)
are written in bf16. Cotangents of the fp8 operands are then ``g · s`` in their fp8 dtype (JAX's
rule: a cotangent has its primal's dtype, so they carry e4m3's 3-bit mantissa and underflow
below 2^-9), those of the descales ``sum(g · x8)`` in float32. ``backward="jax"``: the float32
plain-JAX recomputation (chunked over queries) on the float32-dequantized operands instead.
Extra error of the Pallas backward vs the float64 gradients on the dequantized operands: the
forward's o (P rounded to e4m3, through delta = rowsum(o·dO)) and the bf16 roundings of the
operands, which shift the recomputed scores by about |s|·2^-8 against the forward's lse.

Speed: on a Hopper GPU "auto" runs transposed-V fp8 calls on the Mosaic GPU kernel
(kernels/mosaic_attention.py: 583-743 TFLOP/s on an H200, bench/results/attention-fp8-nvidia-
h200-2026-11-26.md); this Triton kernel serves the standard layout, which Hopper's fp8 wgmma
cannot read (201-219 TFLOP/s there; 261-289 with transposed V), and other GPUs. Its Triton IR
has fp8 operands in both dots, the transposed-V P·V reads K-major Vᵀ tiles and P is cast to
e4m3 before P·V; the standard layout's N-major V tiles are not fp8-wgmma operands.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .flash_attention import (BACKWARDS, LOG2E, _backward, _backward_pallas, _Config, _crop,
                              _forward, _next_pow2, _pad_to, block_sizes, bwd_block_sizes,
                              pallas_backend)
from .mosaic_attention import MosaicBlocks
from .reference import attention_reference, check_shapes, kernel_layout_error

#: fp8 dtypes of the op; e4m3 for the forward operands, e5m2 where a backward wants range.
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
#: Tolerance of the fp8 kernel vs the float64 reference on dequantized operands:
#: |o - ref| <= FP8_ATOL·max|v| + FP8_RTOL·|ref|. P's e4m3 rounding (3 mantissa bits, 2^-4
#: relative) perturbs the weights of V's rows; bf16 output adds 2^-8 relative.
FP8_ATOL = 2e-2
FP8_RTOL = 3e-2
FP8_MIN_BLOCK = 32  # Hopper's fp8 wgmma reduces over 32 elements; keep tiles and D at least that
#: fp8 forward tiles by padded head dim: (block_q, block_k, num_warps, num_stages). D128 measured on
#: H100 (bench/results/fp8-kernel-h100-2026-11-25.md, transposed V, non-causal S4096): 128/128/8/3
#: 270 TFLOP/s, 128/128/8/2 256, 64/128/4/3 240, 128/64/4/3 225, 128/128/4/3 121; other head
#: dims use the bf16 table (BLOCK_TABLE), not tuned for fp8.
FP8_BLOCK_TABLE: dict[int, tuple[int, int, int, int]] = {128: (128, 128, 8, 3)}
OUT_DTYPE = "bfloat16"


def fp8_max(dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(jnp.dtype(dtype)).max)


def check_fp8_dtype(name: str, dtype) -> jnp.dtype:
    dt = jnp.dtype(dtype)
    if dt.name not in FP8_DTYPES:
        raise ValueError(f"{name} must be one of {FP8_DTYPES}, got {dt.name}; quantize it first "
                         "(eqsat_attn.kernels.fp8_attention.quantize)")
    return dt


def compute_scale(x: jax.Array, dtype="float8_e4m3fn") -> jax.Array:
    """Per-tensor descale that maps max|x| onto the fp8 dtype's largest value (float32 scalar)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return jnp.where(amax > 0, amax / fp8_max(dtype), 1.0).astype(jnp.float32)


def quantize(x: jax.Array, scale, dtype="float8_e4m3fn") -> jax.Array:
    """clip(x / scale, ±max).astype(dtype): the fp8 tensor whose dequantization approximates x."""
    dt = check_fp8_dtype("dtype", dtype)
    y = x.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
    return jnp.clip(y, -fp8_max(dt), fp8_max(dt)).astype(dt)


def dequantize(x8: jax.Array, scale, dtype=jnp.float32) -> jax.Array:
    """x8 · scale in ``dtype``."""
    return (x8.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


def attention_reference_fp8(q, k, v, q_scale, k_scale, v_scale, *, scale: float, causal: bool,
                            v_layout: str = "BHSD", q_layout: str = "BHSD", k_layout: str = "BHSD",
                            o_layout: str = "BHSD", out_dtype=OUT_DTYPE,
                            compute_dtype=jnp.float32) -> jax.Array:
    """The fp8 Attention op's meaning: attention over the dequantized operands, in ``out_dtype``."""
    deq = [dequantize(x, s, compute_dtype) for x, s in ((q, q_scale), (k, k_scale), (v, v_scale))]
    o = attention_reference(*deq, scale=scale, causal=causal, v_layout=v_layout, q_layout=q_layout,
                            k_layout=k_layout, o_layout=o_layout)
    return o.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_fp8(q, k, v, q_scale, k_scale, v_scale, cfg: _Config):
    return _flash_fp8_fwd(q, k, v, q_scale, k_scale, v_scale, cfg)[0]


def _descales(q_scale, k_scale, v_scale, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    return (cfg.scale * LOG2E * q_scale * k_scale, v_scale)


def _flash_fp8_fwd(q, k, v, q_scale, k_scale, v_scale, cfg: _Config):
    o, lse = _forward(q, k, v, None, cfg, descales=_descales(q_scale, k_scale, v_scale, cfg))
    return o, (q, k, v, q_scale, k_scale, v_scale, o, lse)


def _flash_fp8_bwd(cfg: _Config, res, do):
    q, k, v, q_scale, k_scale, v_scale, o, lse = res
    grads = dequantized_grads(cfg, q, k, v, q_scale, k_scale, v_scale, o, lse, do)
    f32 = jnp.float32
    out = []
    for x8, s, g in zip((q, k, v), (q_scale, k_scale, v_scale), grads):
        out.append((g.astype(f32) * s).astype(x8.dtype))
    for x8, s, g in zip((q, k, v), (q_scale, k_scale, v_scale), grads):
        out.append(jnp.sum(g.astype(f32) * x8.astype(f32)).reshape(jnp.shape(s)).astype(f32))
    return tuple(out)


def dequantized_grads(cfg: _Config, q, k, v, q_scale, k_scale, v_scale, o, lse, do):
    """dQ, dK, dV w.r.t. the dequantized operands (q8·sq, k8·sk, v8·sv), in their layouts: the
    bf16 Pallas backward kernels on bf16-dequantized operands, or (cfg.backward == "jax") the
    float32 plain-JAX recomputation."""
    plain = dataclasses.replace(cfg, descaled=False, out_dtype=None)
    if cfg.backward == "jax":
        deq = [dequantize(x, s) for x, s in ((q, q_scale), (k, k_scale), (v, v_scale))]
        return _backward(plain, *deq, None, o.astype(jnp.float32), lse, do.astype(jnp.float32))[:3]
    deq = [dequantize(x, s, jnp.bfloat16) for x, s in ((q, q_scale), (k, k_scale), (v, v_scale))]
    return _backward_pallas(plain, *deq, o.astype(jnp.bfloat16), lse, do.astype(jnp.bfloat16))


_flash_fp8.defvjp(_flash_fp8_fwd, _flash_fp8_bwd)


def flash_attention_fp8(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_scale=1.0,
    k_scale=1.0,
    v_scale=1.0,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    out_dtype=OUT_DTYPE,
    backward: str = "pallas",
    backend: str = "auto",
    mosaic_blocks: MosaicBlocks | None = None,
) -> jax.Array:
    """Pallas fp8 flash attention; semantics of `attention_reference_fp8`.

    q, k, v in float8_e4m3fn (or e5m2; q and k the same dtype), shapes and layouts as in
    `flash_attention` (v "BHSD" or transposed "BHDS", or any layout with D or S minor);
    ``*_scale`` their per-tensor float32 descales (scalars, traced values allowed). Output
    [B,H,Sq,Dv] in ``out_dtype`` (bf16). Float32 accumulation in both matmuls; P is cast to V's
    fp8 dtype with a fixed power-of-two scale. Differentiable: ``backward="pallas"`` runs the
    bf16 Pallas backward kernels on bf16-dequantized operands, ``"jax"`` a float32 plain-JAX
    recomputation (module docstring). block_q / block_k (powers of two >= 32) also set the
    backward's tiles; num_warps / num_stages override the forward's Triton settings
    (bench/tune_attention.py --fp8 sweeps all four). ``backend``: the forward on "triton",
    "mosaic_gpu" (Hopper; transposed V only, see `mosaic_attention.mosaic_unsupported`) or
    "auto" (Mosaic GPU on a Hopper GPU when the call is in its contract and
    `flash_attention.auto_takes_mosaic`), as in `flash_attention`.
    """
    q, k, v, scales, cfg, (_, dv) = _prepare(
        q, k, v, q_scale, k_scale, v_scale, scale=scale, causal=causal, v_layout=v_layout,
        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, q_layout=q_layout,
        k_layout=k_layout, o_layout=o_layout, out_dtype=out_dtype, backward=backward,
        backend=backend, mosaic_blocks=mosaic_blocks)
    o = _flash_fp8(q, k, v, *scales, cfg)
    return _crop(o, o_layout, {"D": dv})


def flash_attention_fp8_vjp(q, k, v, q_scale, k_scale, v_scale, do, **kwargs):
    """(o, (dq, dk, dv)): `flash_attention_fp8`'s output and its backward's gradients of
    ``sum(o · do)`` w.r.t. the *dequantized* operands (q8·sq, k8·sk, v8·sv), in their layouts,
    before the custom_vjp turns them into fp8 cotangents (bf16 with the Pallas backward,
    float32 with ``backward="jax"``). Keyword arguments as in `flash_attention_fp8`."""
    q, k, v, scales, cfg, (d, dv) = _prepare(q, k, v, q_scale, k_scale, v_scale, **kwargs)
    o, res = _flash_fp8_fwd(q, k, v, *scales, cfg)
    do = _pad_to(jnp.asarray(do, o.dtype), cfg.o_layout, {"D": o.shape[cfg.o_layout.index("D")]})
    dq, dk, dvv = dequantized_grads(cfg, *res, do)
    return _crop(o, cfg.o_layout, {"D": dv}), (
        _crop(dq, cfg.q_layout, {"D": d}), _crop(dk, cfg.k_layout, {"D": d}), _crop(dvv, cfg.v_layout, {"D": dv}))


def _prepare(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_scale=1.0,
    k_scale=1.0,
    v_scale=1.0,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    out_dtype=OUT_DTYPE,
    backward: str = "pallas",
    backend: str = "auto",
    mosaic_blocks: MosaicBlocks | None = None,
):
    """Checked, padded operands, float32 scales, the kernel config and the unpadded (D, Dv)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_fp8_dtype(f"{name}.dtype", x.dtype)
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share one fp8 dtype, got {q.dtype} and {k.dtype}")
    error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if error is not None:
        raise ValueError(error)
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    tq, tk, warps, stages = block_sizes(sq, sk, max(d, dv))
    dpad = _next_pow2(max(d, dv, 1))
    if dpad in FP8_BLOCK_TABLE:
        tq, tk, warps, stages = FP8_BLOCK_TABLE[dpad]
        tq, tk = (min(t, max(FP8_MIN_BLOCK, _next_pow2(n))) for t, n in ((tq, sq), (tk, sk)))
    bq = block_q or max(tq, FP8_MIN_BLOCK)
    bk = block_k or max(tk, FP8_MIN_BLOCK)
    for name, blk in (("block_q", bq), ("block_k", bk)):
        if blk < FP8_MIN_BLOCK or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= {FP8_MIN_BLOCK} for fp8")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # fp8 dots reduce over >= 32 elements: zero-pad small head dims (no score or output changes)
    d_min = max(FP8_MIN_BLOCK, _next_pow2(d))
    dv_min = max(FP8_MIN_BLOCK, _next_pow2(dv))
    q = _pad_to(q, q_layout, {"D": d_min})
    k = _pad_to(k, k_layout, {"D": d_min})
    v = _pad_to(v, v_layout, {"D": dv_min})
    bq1, bk1, bq2, bk2, bwarps, bstages = bwd_block_sizes(sq, sk, max(d_min, dv_min))
    bwd_blocks = (block_q or bq1, block_k or bk1, block_q or bq2, block_k or bk2)
    warps, stages = num_warps or warps, num_stages or stages
    chosen = pallas_backend(
        q, k, v, backend=backend, interpret=bool(interpret),
        tiles_given=any(x is not None for x in (block_q, block_k, num_warps, num_stages)),
        v_layout=v_layout, causal=bool(causal), scale=float(scale), q_layout=q_layout,
        k_layout=k_layout, o_layout=o_layout, blocks=mosaic_blocks)
    cfg = _Config(float(scale), bool(causal), v_layout, bq, bk, warps, stages, bool(interpret),
                  backward, bwd_blocks, bwarps, bstages, q_layout=q_layout, k_layout=k_layout,
                  o_layout=o_layout, descaled=True, out_dtype=jnp.dtype(out_dtype).name,
                  backend=chosen, mosaic_blocks=mosaic_blocks)
    scales = [jnp.asarray(s, jnp.float32) for s in (q_scale, k_scale, v_scale)]
    for name, s in zip(("q_scale", "k_scale", "v_scale"), scales):
        if s.size != 1:
            raise ValueError(f"{name} must be a per-tensor scalar, got shape {s.shape}")
    return q, k, v, scales, cfg, (d, dv)
