"""Boolean masks for the Pallas kernels: the mask as a kernel operand and its per-tile map.

FlexAttention's block-mask idea: from the mask, the causal flag, key lengths and a sliding
window, the wrapper computes for every (query tile, key tile) of one kernel's tiling a class:
HIDDEN (every position hidden: the tile is skipped), VISIBLE (every position kept: computed
without masking) or PARTIAL (the kernel applies the mask tile and the index conditions). The
kernels walk two compacted lists per row of tiles (`tile_lists`): the VISIBLE tiles, then the
PARTIAL ones, so a skipped tile costs nothing. Rows of tiles that are padding only are HIDDEN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import causal_mask

HIDDEN, VISIBLE, PARTIAL = 0, 1, 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def mask_4d(mask: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """``mask`` (broadcastable to ``shape`` = [B, H, Sq, Sk]) as bool [B or 1, H or 1, Sq or 1, Sk]:
    rank 4, the key axis materialised, other broadcast axes kept at 1."""
    mask = jnp.asarray(mask)
    if mask.ndim > 4:
        raise ValueError(f"mask rank {mask.ndim} > 4: it must broadcast to [B, H, Sq, Sk] = {shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape).astype(bool)
    for got, want in zip(mask.shape, shape):
        if got not in (1, want):
            raise ValueError(f"mask shape {mask.shape} does not broadcast to [B, H, Sq, Sk] = {shape}")
    return jnp.broadcast_to(mask, mask.shape[:3] + (shape[3],))


def kernel_mask(mask4: jax.Array, sq_p: int, sk_p: int) -> jax.Array:
    """int8 [Bm, Hm, 1 or sq_p, sk_p]: the mask padded with hidden (0) rows and keys."""
    rows = 1 if mask4.shape[2] == 1 else sq_p
    widths = ((0, 0), (0, 0), (0, rows - mask4.shape[2]), (0, sk_p - mask4.shape[3]))
    return jnp.pad(mask4.astype(jnp.int8), widths)


def tile_map(mask4: jax.Array, sq: int, causal: bool, block_q: int, block_k: int,
             sq_p: int | None = None, sk_p: int | None = None) -> jax.Array:
    """int8 [Bm, Hm, nq, nk]: HIDDEN / VISIBLE / PARTIAL per (query tile, key tile) of the
    positions ``mask4`` (from `mask_4d`, Sq rows or 1) and the causal flag keep. The padded
    lengths ``sq_p``, ``sk_p`` (multiples of the blocks) default to Sq, Sk rounded up.

    Padded keys (past Sk) count as hidden; padded query rows (past Sq) are ignored (their output
    is cropped): they make no tile PARTIAL, and a tile of them only is HIDDEN.
    """
    bm, hm, _, sk = mask4.shape
    keep = jnp.broadcast_to(mask4, (bm, hm, sq, sk))
    if causal:
        keep = keep & causal_mask(sq, sk)
    sq_p = sq_p or -(-sq // block_q) * block_q
    sk_p = sk_p or -(-sk // block_k) * block_k
    nq, nk = sq_p // block_q, sk_p // block_k
    rows, cols = sq_p - sq, sk_p - sk
    any_ = jnp.pad(keep, ((0, 0), (0, 0), (0, rows), (0, cols)), constant_values=False)
    all_ = jnp.pad(keep, ((0, 0), (0, 0), (0, 0), (0, cols)), constant_values=False)
    all_ = jnp.pad(all_, ((0, 0), (0, 0), (0, rows), (0, 0)), constant_values=True)
    tiles = (bm, hm, nq, block_q, nk, block_k)
    any_t = any_.reshape(tiles).any(axis=(3, 5))
    all_t = all_.reshape(tiles).all(axis=(3, 5))
    return jnp.where(any_t, jnp.where(all_t, VISIBLE, PARTIAL), HIDDEN).astype(jnp.int8)


def index_tile_map(sq: int, sk: int, block_q: int, block_k: int, sq_p: int, sk_p: int, *, causal: bool,
                   kv_lengths: jax.Array | None = None, window: int | None = None) -> jax.Array:
    """int8 [B or 1, 1, nq, nk]: the tile classes of the positions kept by index arithmetic alone:
    real keys (j < Sk, and j < kv_lengths[b] when given), causal (j <= i), a sliding window
    (i - window < j <= i). Tiles holding no real query row are HIDDEN."""
    r0 = jnp.arange(sq_p // block_q) * block_q
    r1 = jnp.minimum(r0 + block_q, sq) - 1  # last real row (below r0 when the tile has none)
    c0 = jnp.arange(sk_p // block_k) * block_k
    r0, r1, c0 = r0[:, None], r1[:, None], c0[None, :]
    c1 = c0 + block_k - 1
    end = sk if kv_lengths is None else jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), sk)[:, None, None]
    # the keys some row of the tile keeps form one interval [lo, hi]: exact HIDDEN tiles
    hi = end - 1
    visible = c1 < end
    if causal or window is not None:
        hi, visible = jnp.minimum(hi, r1), visible & (c1 <= r0)
    lo = c0
    if window is not None:
        lo, visible = r0 - window + 1, visible & (c0 >= r1 - window + 1)
    hidden = (jnp.maximum(c0, lo) > jnp.minimum(c1, hi)) | (r1 < r0)
    classes = jnp.where(hidden, HIDDEN, jnp.where(visible, VISIBLE, PARTIAL)).astype(jnp.int8)
    return classes.reshape((-1, 1) + classes.shape[-2:])


def tile_classes(sq: int, sk: int, block_q: int, block_k: int, sq_p: int, sk_p: int, *, causal: bool,
                 mask4: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                 window: int | None = None) -> jax.Array:
    """int8 [B or 1, H or 1, nq, nk]: the class of each tile under every condition at once
    (HIDDEN if any hides it all, VISIBLE if all keep it all, else PARTIAL)."""
    classes = index_tile_map(sq, sk, block_q, block_k, sq_p, sk_p, causal=causal, kv_lengths=kv_lengths,
                             window=window)
    if mask4 is None:
        return classes
    masked = tile_map(mask4, sq, causal, block_q, block_k, sq_p, sk_p)
    hidden = (classes == HIDDEN) | (masked == HIDDEN)
    visible = (classes == VISIBLE) & (masked == VISIBLE)
    return jnp.where(hidden, HIDDEN, jnp.where(visible, VISIBLE, PARTIAL)).astype(jnp.int8)


def index_keep(sq: int, sk: int, *, kv_lengths: jax.Array | None = None, window: int | None = None) -> jax.Array | None:
    """bool [B or 1, 1, Sq, Sk]: the positions `kv_lengths` and `window` keep, as a boolean mask
    (what the reference is given in their place), or None when both are None."""
    if kv_lengths is None and window is None:
        return None
    i, j = jnp.arange(sq)[:, None], jnp.arange(sk)[None, :]
    keep = jnp.ones((1, sq, sk), bool)
    if kv_lengths is not None:
        keep = keep & (j < jnp.asarray(kv_lengths, jnp.int32)[:, None, None])
    if window is not None:
        keep = keep & (j <= i) & (j > i - window)
    return keep[:, None]


def tile_lists(classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The compacted lists a kernel walks, per row of ``classes`` [..., n] (its last axis the
    tiles one program visits): counts int32 [..., 2] (VISIBLE, PARTIAL tiles) and indices int32
    [..., 2, n rounded up to a power of two] (those tiles first, in order; the rest unused)."""
    n = classes.shape[-1]
    counts, indices = [], []
    for cls in (VISIBLE, PARTIAL):
        hit = classes == cls
        counts.append(hit.sum(axis=-1, dtype=jnp.int32))
        indices.append(jnp.argsort(~hit, axis=-1, stable=True).astype(jnp.int32))
    idx = jnp.stack(indices, axis=-2)
    idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, _next_pow2(n) - n)])
    return jnp.stack(counts, axis=-1), idx
