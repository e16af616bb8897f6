"""Decode attention on the Mosaic GPU forward (Hopper): flash-decoding's split over the keys.

A decode step (Sq = 1..16 queries per head against a long KV cache) runs the Mosaic GPU forward
kernel (kernels/mosaic_attention.py) on free views of the cache, so K and V are read in place,
once per kv head:

* rows: a kv head's G query heads and Sq queries become one CTA's rows (row r = g·Sq + i), padded
  to the kernel's ``2·block_q`` (128): the cache is read once per kv head, not once per query head
  (wgmma computes at least 64 rows per warpgroup; at bf16 D128 that keeps a decode step under
  Hopper's ridge point, so memory bound: an estimate until measured);
* splits: the keys of a kv head are cut into ``n`` chunks of ``C = Sk / n`` keys, the chunk index
  taking the kernel's head axis and (batch, kv head) its batch axis: K [B, Hkv, Sk, D] is viewed as
  [B·Hkv, n, C, D], V as [B·Hkv, n, C, Dv] or, transposed, [B·Hkv, Dv, n, C] (layout "BDHS");
  only Q's rows are repeated per chunk (they are small);
* per-batch cache lengths and a key-padding mask ([B or 1, 1, 1, Sk]) become a one-row mask per
  (batch, kv head, chunk): the kernel's tile lists skip key tiles past a cache's length (never
  loaded) and mask the partial one;
* each chunk's (o, lse) comes back (o normalised by its own row sum; a chunk with no kept key has
  lse -inf, its o is zeroed here) and `decode_attention.combine_splits` merges them.

`decode_attention(backend="mosaic_gpu")` runs it inside that function's guard (empty caches, the
op's fills, a fallback to the reference), so the semantics are the op's. Not taken: causal calls,
masks with more than one row per batch or with heads, a cast prologue, key counts not a multiple
of 128 (`mosaic_decode_unsupported` says why; the Triton decode kernel runs those).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .mosaic_attention import COMPUTE_WARPGROUPS, MosaicBlocks, default_blocks, mosaic_attention, mosaic_unsupported

#: CTAs a call aims for (about two per SM of an H100's 132): an estimate, not measured
TARGET_CTAS = 264
#: a chunk holds at least this many keys (fewer make the combine's share grow)
MIN_SPLIT_KEYS = 512
KEY_MULTIPLE = 128  # Sk must be a multiple of this (a chunk is a whole number of key tiles)


def decode_blocks(dtype, head_dim: int, chunk: int) -> MosaicBlocks:
    """The kernel's tiles for a chunk of ``chunk`` keys (attention_mgpu's schedule)."""
    return default_blocks(dtype, head_dim, chunk, overlap=False)


def decode_splits(batch_heads: int, sk: int, block_kv: int = KEY_MULTIPLE, splits: int | None = None) -> int:
    """Chunks per (batch, kv head): the largest divisor of Sk / block_kv up to the number that
    gives `TARGET_CTAS` CTAs with at least `MIN_SPLIT_KEYS` keys each (``splits``: that count,
    checked to divide the key tiles). Deterministic from the shapes."""
    tiles = sk // block_kv
    if splits is not None:
        if not isinstance(splits, int) or splits < 1 or tiles % splits:
            raise ValueError(f"splits={splits!r} must be a positive divisor of Sk / {block_kv} = {tiles}")
        return splits
    want = max(1, min(-(-TARGET_CTAS // batch_heads), sk // MIN_SPLIT_KEYS))
    return max(n for n in range(1, min(want, tiles) + 1) if tiles % n == 0)


def mosaic_decode_unsupported(q, k, v, *, v_layout: str, causal: bool, mask4=None, compute_dtype=None,
                              softcap: float = 0.0, interpret: bool = False,
                              blocks: MosaicBlocks | None = None) -> str | None:
    """Why the Mosaic GPU decode path cannot run this call (canonical q [B,H,Sq,D], k [B,Hkv,Sk,D],
    v "BHSD" or "BHDS"; arrays or ShapeDtypeStructs), or None."""
    if causal:
        return "causal decode (query i sees keys j <= i) runs the Triton decode kernel"
    if compute_dtype is not None:
        return "it has no cast prologue"
    if mask4 is not None and (mask4.shape[1] != 1 or mask4.shape[2] != 1):
        return "only a key-padding mask ([B or 1, 1, 1, Sk]) is a decode input here"
    if v_layout not in ("BHSD", "BHDS"):
        return f"v_layout={v_layout!r}: the cache views need BHSD or BHDS"
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sk % KEY_MULTIPLE:
        return f"Sk={sk} must be a multiple of {KEY_MULTIPLE}"
    rows = (h // max(1, hkv)) * sq
    blocks = blocks or decode_blocks(q.dtype, d, sk)
    n = decode_splits(b * hkv, sk, blocks.block_kv)
    chunk = sk // n
    cta = COMPUTE_WARPGROUPS * blocks.block_q
    q4 = jax.ShapeDtypeStruct((b * hkv, n, -(-rows // cta) * cta, d), q.dtype)
    k4 = jax.ShapeDtypeStruct((b * hkv, n, chunk, d), k.dtype)
    v4 = jax.ShapeDtypeStruct((b * hkv, n, chunk, v.shape[-1]) if v_layout == "BHSD" else
                              (b * hkv, v.shape[2], n, chunk), v.dtype)
    return mosaic_unsupported(q4, k4, v4, v_layout="BHSD" if v_layout == "BHSD" else "BDHS", causal=False,
                              scale=1.0, blocks=blocks, interpret=interpret, softcap=softcap,
                              mask=True if mask4 is not None else None)


def _kept_keys(b: int, sk: int, mask4, kv_lengths) -> jax.Array | None:
    """bool [B or 1, Sk]: the keys a batch keeps (the mask's one row and the cache length)."""
    keep = None if mask4 is None else mask4[:, 0, 0, :]
    if kv_lengths is not None:
        by_length = jnp.arange(sk, dtype=jnp.int32)[None, :] < kv_lengths.astype(jnp.int32)[:, None]
        keep = by_length if keep is None else keep & by_length
    return keep


def mosaic_decode_parts(q, k, v, *, scale: float, v_layout: str, mask4=None, kv_lengths=None,
                        softcap: float = 0.0, interpret: bool = False, blocks: MosaicBlocks | None = None,
                        splits: int | None = None) -> tuple[jax.Array, jax.Array, int]:
    """The chunks' partial results: (o_parts float32 [B, Hkv, n, R, Dv], each chunk's o normalised by
    its own row sum, 0 where the chunk kept no key; lse_parts [B, Hkv, n, R], -inf there; the
    number of real rows G·Sq of the R >= G·Sq computed). q [B,H,Sq,D], k [B,Hkv,Sk,D] canonical; v
    in ``v_layout`` ("BHSD" or "BHDS"). ValueError outside `mosaic_decode_unsupported`'s contract."""
    reason = mosaic_decode_unsupported(q, k, v, v_layout=v_layout, causal=False, mask4=mask4, softcap=softcap,
                                       interpret=interpret, blocks=blocks)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU decode path cannot run this call: {reason}")
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    blocks = blocks or decode_blocks(q.dtype, d, sk)
    n = decode_splits(b * hkv, sk, blocks.block_kv, splits)
    chunk, cta = sk // n, COMPUTE_WARPGROUPS * blocks.block_q
    rows = g * sq
    padded = -(-rows // cta) * cta
    q_rows = jnp.pad(q.reshape(b * hkv, 1, rows, d), ((0, 0), (0, 0), (0, padded - rows), (0, 0)))
    q4 = jnp.broadcast_to(q_rows, (b * hkv, n, padded, d))  # Q repeated per chunk (small)
    k4 = k.reshape(b * hkv, n, chunk, d)  # views of the cache: no copy
    if v_layout == "BHSD":
        v4, v4_layout, dv = v.reshape(b * hkv, n, chunk, v.shape[-1]), "BHSD", v.shape[-1]
    else:
        v4, v4_layout, dv = v.reshape(b * hkv, v.shape[2], n, chunk), "BDHS", v.shape[2]
    keep = _kept_keys(b, sk, mask4, kv_lengths)
    mask = None
    if keep is not None:
        keep = jnp.broadcast_to(keep.reshape(keep.shape[0], 1, n, chunk), (b, hkv, n, chunk))
        mask = keep.reshape(b * hkv, n, 1, chunk)
    o4, lse4 = mosaic_attention(q4, k4, v4, scale=scale, causal=False, v_layout=v4_layout, blocks=blocks,
                                interpret=interpret, mask=mask, softcap=softcap)
    empty = jnp.isneginf(lse4)
    o_parts = jnp.where(empty[..., None], 0.0, o4.astype(jnp.float32))  # a chunk that kept no key: NaN there
    return (o_parts.reshape(b, hkv, n, padded, dv), lse4.reshape(b, hkv, n, padded), rows)

