"""Pallas flash attention (forward kernel; backward by blockwise recomputation).

One kernel covers both V layouts of the Attention op:

* ``"BHSD"``: V is [B, Hkv, Sk, Dv]; a key tile of V is [block_k, Dv] and P·V is a plain matmul.
* ``"BHDS"`` (transposed V): V is [B, Hkv, Dv, Sk]; the kernel loads V^T tiles [Dv, block_k]
  straight from that array and computes P·V as a dot_general contracting the sequence axis of
  both operands. V is never transposed in memory.

Online softmax over key tiles (FlashAttention-2), float32 statistics and accumulator, exp2 with
log2(e) folded into the scale. Causal attention (top-left aligned) visits only key tiles that
intersect the causal triangle, and applies the element mask only on tiles crossing the diagonal
or holding padded keys. GQA is expressed in the K/V index maps (kv head = h // groups); K and V
are never repeated. Lengths that are not block multiples are zero-padded internally and the
padded keys are masked with -inf (exactly zero weight). Head dims that are not a power of two
(or below 16) are zero-padded, which changes no score.

The backward pass (jax.custom_vjp) recomputes softmax probabilities from the saved log-sum-exp
in plain JAX, one query chunk at a time, so memory stays O(chunk * Sk) rather than O(Sq * Sk).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .reference import MASK_VALUE, check_shapes

LOG2E: float = math.log2(math.e)

# Forward tile table for the Pallas Triton backend, keyed by padded head dim:
# head_dim -> (block_q, block_k, num_warps, num_stages). 64 and 128 follow the settings of the
# stock jax Pallas Triton kernel (measured at 279-430 TFLOP/s on H100, /work/shared/gpu/README.md);
# 256 halves the tiles so K, V tiles and the accumulator fit in shared memory / registers.
# Blocks are clamped to the (power-of-two rounded) sequence lengths for short sequences.
BLOCK_TABLE: dict[int, tuple[int, int, int, int]] = {
    16: (128, 128, 4, 2),
    32: (128, 128, 4, 2),
    64: (128, 128, 4, 2),
    128: (128, 128, 8, 2),
    256: (64, 64, 8, 2),
}
MIN_BLOCK = 16  # smallest tile Triton's dot accepts
BWD_Q_CHUNK = 256  # query rows per step of the recomputation backward


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    causal: bool
    v_layout: str
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(sq: int, sk: int, head_dim: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) for a shape, from BLOCK_TABLE."""
    dpad = max(MIN_BLOCK, _next_pow2(max(head_dim, 1)))
    bq, bk, warps, stages = BLOCK_TABLE.get(dpad, (32, 32, 8, 1))
    bq = min(bq, max(MIN_BLOCK, _next_pow2(sq)))
    bk = min(bk, max(MIN_BLOCK, _next_pow2(sk)))
    return bq, bk, warps, stages


def _pad_axis(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _bias_4d(bias: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """Bias as rank 4 with full [Sq, Sk] and B/H dims kept at 1 where they broadcast."""
    if bias.ndim > 4:
        raise ValueError(f"bias rank {bias.ndim} > 4")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    b, h, sq, sk = shape
    for got, want in zip(bias.shape, shape):
        if got not in (1, want):
            raise ValueError(f"bias shape {bias.shape} does not broadcast to {shape}")
    return jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], sq, sk))


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x (rank 4) down to a shape it was broadcast from."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config, sk: int, nq: int, has_bias: bool):
    if has_bias:
        bias_ref, o_ref, lse_ref = refs
    else:
        bias_ref, (o_ref, lse_ref) = None, refs
    bq, bk = cfg.block_q, cfg.block_k
    # Causal: walk query blocks heaviest-first so the long rows start early.
    qi = nq - 1 - pl.program_id(0) if cfg.causal else pl.program_id(0)
    q = q_ref[...]
    dv = o_ref.shape[-1]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    nk = -(-sk // bk)  # key tiles holding at least one real key
    n_clean = sk // bk  # key tiles without padding
    if cfg.causal:
        n_full = jnp.minimum(lax.div(qi * bq + 1, bk), n_clean)
        n_end = jnp.minimum(lax.div((qi + 1) * bq + bk - 1, bk), nk)
    else:
        n_full, n_end = n_clean, nk

    def body(j, carry, masked: bool):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        kt = k_ref[pl.ds(start, bk), :]
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        s = s * (cfg.scale * LOG2E)
        if bias_ref is not None:
            s = s + bias_ref[:, pl.ds(start, bk)].astype(jnp.float32) * LOG2E
        if masked:
            cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            if cfg.causal:
                rows = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
                s = jnp.where(rows >= cols, s, MASK_VALUE)
            if sk % bk:
                s = jnp.where(cols < sk, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        if cfg.v_layout == "BHSD":
            vt = v_ref[pl.ds(start, bk), :]
            dims = (((1,), (0,)), ((), ()))
        else:  # V^T tile [Dv, bk]: contract the key axis of both operands.
            vt = v_ref[:, pl.ds(start, bk)]
            dims = (((1,), (1,)), ((), ()))
        pv = lax.dot_general(p.astype(vt.dtype), vt, dims, precision=precision,
                             preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((bq, dv), jnp.float32),
             jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) / LOG2E


def _forward(q, k, v, bias, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """Run the kernel; returns (o [B,H,Sq,Dv] in q.dtype, lse [B,H,Sq] float32)."""
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, cfg.v_layout)
    groups = h // hkv
    bq, bk = cfg.block_q, cfg.block_k
    sq_p, sk_p = _round_up(sq, bq), _round_up(sk, bk)
    d_p, dv_p = max(MIN_BLOCK, _next_pow2(d)), max(MIN_BLOCK, _next_pow2(dv))
    v_seq, v_dim = (2, 3) if cfg.v_layout == "BHSD" else (3, 2)
    qp = _pad_axis(_pad_axis(q, 2, sq_p), 3, d_p)
    kp = _pad_axis(_pad_axis(k, 2, sk_p), 3, d_p)
    vp = _pad_axis(_pad_axis(v, v_seq, sk_p), v_dim, dv_p)
    nq = sq_p // bq
    qblk = (lambda i: nq - 1 - i) if cfg.causal else (lambda i: i)
    v_block = (None, None, sk_p, dv_p) if cfg.v_layout == "BHSD" else (None, None, dv_p, sk_p)
    in_specs = [
        pl.BlockSpec((None, None, bq, d_p), lambda i, bi, hi: (bi, hi, qblk(i), 0)),
        pl.BlockSpec((None, None, sk_p, d_p), lambda i, bi, hi: (bi, hi // groups, 0, 0)),
        pl.BlockSpec(v_block, lambda i, bi, hi: (bi, hi // groups, 0, 0)),
    ]
    args = [qp, kp, vp]
    if bias is not None:
        bias4 = _pad_axis(_pad_axis(_bias_4d(bias, (b, h, sq, sk)), 2, sq_p), 3, sk_p)
        full_b, full_h = bias4.shape[0] > 1, bias4.shape[1] > 1
        in_specs.append(pl.BlockSpec(
            (None, None, bq, sk_p),
            lambda i, bi, hi: (bi if full_b else 0, hi if full_h else 0, qblk(i), 0)))
        args.append(bias4)
    out_specs = [
        pl.BlockSpec((None, None, bq, dv_p), lambda i, bi, hi: (bi, hi, qblk(i), 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qblk(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, h, sq_p, dv_p), q.dtype),
                 jax.ShapeDtypeStruct((b, h, sq_p), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, sk=sk, nq=nq, has_bias=bias is not None)
    params = {}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        name=f"flash_attention_{cfg.v_layout.lower()}",
        **params,
    )(*args)
    return o[:, :, :sq, :dv], lse[:, :, :sq]


def _backward(cfg: _Config, q, k, v, bias, o, lse, do):
    """Gradients by recomputing P from lse, one chunk of query rows at a time (plain JAX)."""
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, cfg.v_layout)
    g = h // hkv
    f32 = jnp.float32
    cq = min(BWD_Q_CHUNK, sq)
    sq_p = _round_up(sq, cq)
    n = sq_p // cq

    def chunks(x: jax.Array, last: int) -> jax.Array:  # [B,H,Sq,last] -> [n,B,Hkv,G,cq,last]
        x = _pad_axis(x.astype(f32), 2, sq_p).reshape(b, hkv, g, n, cq, last)
        return jnp.moveaxis(x, 3, 0)

    qc, doc = chunks(q, d), chunks(do, dv)
    delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1)
    lsec = chunks(lse[..., None], 1)[..., 0]
    deltac = chunks(delta[..., None], 1)[..., 0]
    kf, vf = k.astype(f32), v.astype(f32)
    v_eq = "bksd" if cfg.v_layout == "BHSD" else "bkds"
    if bias is not None:
        biasc = chunks(jnp.broadcast_to(_bias_4d(bias, (b, h, sq, sk)), (b, h, sq, sk)), sk)
    else:
        biasc = jnp.zeros((n,), f32)  # unused placeholder leaf for scan
    cols = jnp.arange(sk)

    def step(carry, xs):
        dk, dvv = carry
        i, qi, doi, lsei, deltai, biasi = xs
        s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kf, precision=lax.Precision.HIGHEST) * cfg.scale
        if bias is not None:
            s = s + biasi
        if cfg.causal:
            rows = i * cq + jnp.arange(cq)
            s = jnp.where(rows[:, None] >= cols[None, :], s, MASK_VALUE)
        p = jnp.exp(s - lsei[..., None])
        dp = jnp.einsum(f"bkgqd,{v_eq}->bkgqs", doi, vf, precision=lax.Precision.HIGHEST)
        ds = p * (dp - deltai[..., None])
        dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds, kf, precision=lax.Precision.HIGHEST) * cfg.scale
        dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, precision=lax.Precision.HIGHEST) * cfg.scale
        dvv = dvv + jnp.einsum(f"bkgqs,bkgqd->{v_eq}", p, doi, precision=lax.Precision.HIGHEST)
        return (dk, dvv), (dqi, ds if bias is not None else jnp.zeros((), f32))

    init = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dk, dvv), (dq, ds) = lax.scan(step, init, (jnp.arange(n), qc, doc, lsec, deltac, biasc))
    dq = jnp.moveaxis(dq, 0, 3).reshape(b, h, sq_p, d)[:, :, :sq]
    dbias = None
    if bias is not None:
        ds = jnp.moveaxis(ds, 0, 3).reshape(b, h, sq_p, sk)[:, :, :sq]
        dbias = _unbroadcast(ds, bias.shape).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dvv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, bias, cfg: _Config):
    return _forward(q, k, v, bias, cfg)[0]


def _flash_fwd(q, k, v, bias, cfg: _Config):
    o, lse = _forward(q, k, v, bias, cfg)
    return o, (q, k, v, bias, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    return _backward(cfg, *res, do)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    bias: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Pallas flash attention with the semantics of `attention_reference` (no bool mask).

    q [B,H,Sq,D]; k [B,Hkv,Sk,D]; v [B,Hkv,Sk,Dv] ("BHSD") or [B,Hkv,Dv,Sk] ("BHDS").
    Returns [B,H,Sq,Dv] in q.dtype. `bias` is additive, broadcastable to [B,H,Sq,Sk], and
    differentiable. block_q / block_k override the table (powers of two, >= 16).
    `interpret=None` runs interpret mode unless the default backend is a GPU.
    """
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout)
    tq, tk, warps, stages = block_sizes(sq, sk, max(d, dv))
    bq, bk = block_q or tq, block_k or tk
    for name, blk in (("block_q", bq), ("block_k", bk)):
        if blk < MIN_BLOCK or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= {MIN_BLOCK}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = _Config(float(scale), bool(causal), v_layout, bq, bk, warps, stages, bool(interpret))
    return _flash(q, k, v, bias, cfg)
