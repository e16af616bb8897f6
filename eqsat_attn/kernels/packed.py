"""Packed-QKV attention: Q, K and V are the three entries of one packed array.

A fused QKV projection writes one array, e.g. [B, S, 3, H, D] ("BS3HD") or [B, S, H, 3, D]
("BSH3D"): the packed layout is a permutation of "BHSD3" ("3" the packed axis, Q/K/V at index
0/1/2). The Pallas forward passes that array three times to one `pallas_call`, with index maps
that fix the packed axis to 0, 1 and 2, so every Q, K and V tile is read straight from it: no
split copy. It reuses the flash-attention kernel body and BlockSpec builder
(`flash_attention._fwd_kernel`, `_spec`). The backward pass runs the flash-attention backward
kernels on the three entries and stacks dQ, dK, dV back into the packed layout. On Hopper the
forward is the Mosaic GPU kernel (`mosaic_attention.mosaic_packed_attention`, TMA boxes at the
three entries) when the call is inside its contract. Elsewhere (CPU, or a bias) the reference
attention runs on the three entries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .dispatch import chosen_kernel
from .flash_attention import (
    MIN_BLOCK, _backward_pallas, _compiler_params, _Config, _crop, _fwd_kernel, _next_pow2, _pad_to, _round_up,
    _spec, block_sizes, bwd_block_sizes, pallas_backend,
)
from .mosaic_attention import mosaic_packed_attention
from .partitioned import shard_packed_attention
from .reference import attention_reference, layout_shape

PACKED = "3"


def check_packed_layout(packed_layout: str) -> str:
    """The per-operand layout ("BS3HD" -> "BSHD"); ValueError unless a permutation of "BHSD3"."""
    if sorted(packed_layout) != sorted("BHSD" + PACKED):
        raise ValueError(f"packed_layout {packed_layout!r} must be a permutation of 'BHSD3' ('3': the Q/K/V axis)")
    return packed_layout.replace(PACKED, "")


def split_packed(qkv: jax.Array, packed_layout: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v), each in the packed layout without its packed axis (copies: the reference path)."""
    check_packed_layout(packed_layout)
    axis = packed_layout.index(PACKED)
    if qkv.shape[axis] != 3:
        raise ValueError(f"the packed axis of {packed_layout!r} has size {qkv.shape[axis]}, expected 3")
    return tuple(jax.lax.index_in_dim(qkv, i, axis, keepdims=False) for i in range(3))  # type: ignore[return-value]


def packed_attention_reference(qkv, *, packed_layout: str, scale: float, causal: bool, o_layout: str = "BHSD",
                               bias=None):
    """Attention over the packed array's entries with plain JAX (semantics of the packed op)."""
    own = check_packed_layout(packed_layout)
    q, k, v = split_packed(qkv, packed_layout)
    return attention_reference(q, k, v, scale=scale, causal=causal, bias=bias, q_layout=own, k_layout=own,
                               v_layout=own, o_layout=o_layout)


def _config(qkv_shape: Sequence[int], packed_layout: str, o_layout: str, scale: float, causal: bool,
            interpret: bool) -> _Config:
    own = packed_layout.replace(PACKED, "")
    sizes = dict(zip(packed_layout, qkv_shape))
    bq, bk, warps, stages = block_sizes(sizes["S"], sizes["S"], sizes["D"])
    bq1, bk1, bq2, bk2, bwarps, bstages = bwd_block_sizes(sizes["S"], sizes["S"], sizes["D"])
    return _Config(float(scale), bool(causal), own, bq, bk, warps, stages, bool(interpret), "pallas",
                   (bq1, bk1, bq2, bk2), bwarps, bstages, q_layout=own, k_layout=own, o_layout=o_layout)


def _forward(qkv: jax.Array, packed_layout: str, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """One pallas_call reading Q, K, V tiles from ``qkv`` (passed three times); (o, lse)."""
    if cfg.backend == "mosaic_gpu":
        return mosaic_packed_attention(qkv, packed_layout=packed_layout, scale=cfg.scale,
                                       causal=cfg.causal, o_layout=cfg.o_layout,
                                       interpret=cfg.interpret)
    sizes = dict(zip(packed_layout, qkv.shape))
    b, h, s, d = (sizes[c] for c in "BHSD")
    bq, bk = cfg.block_q, cfg.block_k
    sq_p, sk_p = _round_up(s, bq), _round_up(s, bk)
    s_p, d_p = max(sq_p, sk_p), max(MIN_BLOCK, _next_pow2(d))
    qkv_p = _pad_to(qkv, packed_layout, {"S": s_p, "D": d_p})  # a no-op for tile-multiple shapes
    nq = sq_p // bq
    qblk = (lambda i: nq - 1 - i) if cfg.causal else (lambda i: i)

    def entry(index: int) -> dict:
        return {PACKED: lambda i, bi, hi: index}

    q_idx = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi, "S": lambda i, bi, hi: qblk(i)}
    kv_idx = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi}
    in_specs = [
        _spec(packed_layout, {"S": bq, "D": d_p}, {**q_idx, **entry(0)}),
        _spec(packed_layout, {"S": s_p, "D": d_p}, {**kv_idx, **entry(1)}),
        _spec(packed_layout, {"S": s_p, "D": d_p}, {**kv_idx, **entry(2)}),
    ]
    ol = cfg.o_layout
    out_specs = [_spec(ol, {"S": bq, "D": d_p}, q_idx), _spec("BHS", {"S": bq}, q_idx)]
    out_shape = [jax.ShapeDtypeStruct(layout_shape(ol, {"B": b, "H": h, "S": sq_p, "D": d_p}), qkv.dtype),
                 jax.ShapeDtypeStruct((b, h, sq_p), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, sk=s, nq=nq, has_bias=False)
    o, lse = pl.pallas_call(
        kernel, grid=(nq, b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, name=f"flash_attention_packed_{packed_layout.lower()}",
        **_compiler_params(cfg, cfg.num_warps, cfg.num_stages),
    )(qkv_p, qkv_p, qkv_p)
    return _crop(o, ol, {"S": s, "D": d}), lse[:, :, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _packed(qkv, packed_layout: str, cfg: _Config):
    return _forward(qkv, packed_layout, cfg)[0]


def _packed_fwd(qkv, packed_layout: str, cfg: _Config):
    o, lse = _forward(qkv, packed_layout, cfg)
    return o, (qkv, o, lse)


def _packed_bwd(packed_layout: str, cfg: _Config, res, do):
    qkv, o, lse = res
    q, k, v = split_packed(qkv, packed_layout)
    dq, dk, dv = _backward_pallas(cfg, q, k, v, o, lse, do)
    return (jnp.stack([dq, dk, dv], axis=packed_layout.index(PACKED)),)


_packed.defvjp(_packed_fwd, _packed_bwd)


def packed_flash_attention(qkv: jax.Array, *, packed_layout: str, scale: float, causal: bool,
                           o_layout: str = "BHSD", interpret: bool | None = None,
                           backend: str = "auto") -> jax.Array:
    """Pallas flash attention over a packed Q/K/V array, read in place (D must be its minor axis).

    ``qkv``: one array in ``packed_layout`` (e.g. "BS3HD": [B, S, 3, H, D]); returns [B,H,S,D]
    placed by ``o_layout`` (D minor), in qkv's dtype. Differentiable (flash backward kernels).
    ``backend``: the forward on "triton", "mosaic_gpu" (Hopper: `mosaic_packed_attention`) or
    "auto", as in `flash_attention`.
    """
    own = check_packed_layout(packed_layout)
    if own[-1] != "D" or o_layout[-1] != "D":
        raise ValueError(f"the packed kernel needs D minor in packed_layout ({packed_layout!r}) and o_layout "
                         f"({o_layout!r}); transpose the packed array first or use the reference")
    if qkv.shape[packed_layout.index(PACKED)] != 3:
        raise ValueError(f"the packed axis of {packed_layout!r} has size {qkv.shape[packed_layout.index(PACKED)]}, "
                         "expected 3")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = _config(qkv.shape, packed_layout, o_layout, scale, causal, interpret)
    view = jax.ShapeDtypeStruct(layout_shape(own, dict(zip(packed_layout, qkv.shape))), qkv.dtype)
    chosen = pallas_backend(view, view, view, backend=backend, interpret=interpret, v_layout=own,
                            q_layout=own, k_layout=own, o_layout=o_layout, causal=bool(causal),
                            scale=float(scale))
    return _packed(qkv, packed_layout, dataclasses.replace(cfg, backend=chosen))


def lower_packed_attention(node: Any, args: Sequence[Any], attention_kernel: str = "auto") -> Any:
    """Lower an IR ``packed_attention`` node: the packed Pallas kernel where it can read the layout
    in place (GPU, no bias), else the reference on the three entries."""
    p = node.params
    layout, o_layout = str(p["packed_layout"]), str(p["o_layout"])
    bias = args[1] if str(p.get("mask_kind", "none")) == "bias" else None
    kernel = chosen_kernel(attention_kernel)
    readable = layout[-1] == "D" and o_layout[-1] == "D"
    if kernel == "pallas" and bias is None and readable:
        return shard_packed_attention(  # split over batch and heads under a device mesh
            lambda qkv: packed_flash_attention(qkv, packed_layout=layout, scale=float(p["scale"]),
                                               causal=bool(p["causal"]), o_layout=o_layout),
            args[0], packed_layout=layout, o_layout=o_layout)
    return packed_attention_reference(args[0], packed_layout=layout, scale=float(p["scale"]),
                                      causal=bool(p["causal"]), o_layout=o_layout, bias=bias)
