"""Boolean masks for the Pallas kernels: the mask as a kernel operand and its per-tile map.

FlexAttention's block-mask idea: from the mask (and the causal flag) the wrapper computes, for
every (query tile, key tile) of one kernel's tiling, a class: HIDDEN (every position hidden: the
tile is skipped), VISIBLE (every position visible: computed without masking) or PARTIAL (the
kernel loads the mask tile and applies it). The kernels walk two compacted lists per row of tiles
(`tile_lists`): the VISIBLE tiles, then the PARTIAL ones, so a skipped tile costs nothing.
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

    Padded keys (past Sk) count as hidden; padded query rows (past Sq) are ignored: their output
    is cropped, so they make no tile PARTIAL nor VISIBLE.
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
    return jnp.where(all_t, VISIBLE, jnp.where(any_t, PARTIAL, HIDDEN)).astype(jnp.int8)


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
