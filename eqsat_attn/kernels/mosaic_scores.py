"""Score modifications of the Mosaic GPU forward (kernels/mosaic_attention.py): what the wrapper
computes outside the kernel, and the static facts the kernel is specialised on.

* Soft-cap: scores become ``softcap·tanh(s / softcap)`` before the bias (as `attention_reference`).
* Additive bias, broadcastable to [B, H, Sq, Sk]: its B and H axes stay 1 where they broadcast
  (never materialised); each warpgroup reads its [block_q, block_kv] tile from global memory. A
  bias with one row for every query (key padding as an additive bias [B, 1, 1, Sk], ALiBi's
  ``slope·j``) is kept as that row repeated for one warpgroup's tile, [.., block_q, Sk], as a mask
  with one row is: never materialised over the queries.
* ALiBi from per-head slopes (`alibi.Alibi`): no bias in memory; the kernel reads its (batch,
  head)'s float32 slope and computes each tile's bias from the query and key indices, with the
  same float32 operations as the program (`Alibi.tile`).
* Hidden positions, from a boolean mask (True keeps), per-batch key lengths, a sliding window and
  the causal flag: FlexAttention's block mask (kernels/masks.py) at the kernel's tiling, one row
  of tiles per CTA (``2·block_q`` query rows by ``block_kv`` keys). HIDDEN tiles are never loaded
  (no TMA, no wgmma), VISIBLE ones run without masking code, PARTIAL ones read the mask tile and
  apply it with the index conditions. The kernel walks the compacted lists (`masks.tile_lists`):
  the CTA's VISIBLE tiles, then its PARTIAL ones.

Hidden scores get exactly zero weight in the kernel (-inf with a safe running max); a row with no
visible score ends with l = 0 (o NaN, lse -inf). `flash_attention`'s guard turns that into the
op's values for any fill (kernels/flash_attention.py, `GUARD_MARGIN`), for either backend.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .alibi import Alibi
from .masks import kernel_mask, tile_classes, tile_lists

LOG2E: float = math.log2(math.e)
#: bias dtypes read as stored (anything else is converted to float32 first, exactly)
BIAS_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class ScoreMods:
    """Static facts of a call's score modifications (part of the kernel's plan).

    ``*_bh``: whether that operand has a full B axis and a full H axis (else it broadcasts, and
    the kernel reads index 0); None when the call has no such operand. ``mask_rows``,
    ``bias_rows``: the mask or bias has one row per query (else one row for all queries, e.g.
    key padding [B, 1, 1, Sk], held repeated for a warpgroup's tile). ``alibi``: the bias
    computed in the kernel from slopes (an operand [1 or B, 1 or H]; no bias operand then).
    """

    softcap: float = 0.0
    bias_bh: tuple[bool, bool] | None = None
    mask_bh: tuple[bool, bool] | None = None
    mask_rows: bool = False
    lists_bh: tuple[bool, bool] | None = None
    has_lengths: bool = False
    window: int | None = None
    bias_rows: bool = False
    alibi: Alibi | None = None

    def __post_init__(self):
        if not self.softcap >= 0:
            raise ValueError(f"softcap={self.softcap} must be >= 0 (0: none)")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be a positive number of keys")
        if self.alibi is not None and self.bias_bh is not None:
            raise ValueError("a call takes a bias or ALiBi slopes, not both")

    @property
    def tiled(self) -> bool:
        """The kernel walks per-CTA tile lists instead of a range of key tiles."""
        return self.lists_bh is not None

    @property
    def any(self) -> bool:
        """Some score modification: scores go through `log2 units, cap, bias, mask` per tile."""
        return bool(self.softcap) or self.bias_bh is not None or self.tiled or self.alibi is not None

    @property
    def alibi_bh(self) -> tuple[bool, bool] | None:
        """Whether the slopes have a full B axis and a full H axis (None without ALiBi)."""
        return None if self.alibi is None else (self.alibi.shape[0] > 1, self.alibi.shape[1] > 1)


NONE = ScoreMods()


# --- in the kernel: one [block_q, block_kv] tile of scores ---------------------------------

def log2_scores(s, mods: ScoreMods, *, scale: float, log2_scale, bias=None):
    """q·kᵀ (f32) as the op's scores in log2 units (the kernel's exp2 softmax): soft-capped
    (softcap·tanh(s·scale / softcap)) when the plan has a cap, then plus the bias tile.

    tanh(y) is computed as 1 - 2 / (2^(2y·log2 e) + 1), not with jnp.tanh: the kernel compiles with
    approx_math, where Mosaic GPU lowers tanh to tanh.approx.f32 (relative error about 2^-11, up to
    0.025 logits at a cap of 50), and exp2 and a division keep the capped score within a few f32
    ulps of the cap (±inf go to ±cap, NaN stays NaN)."""
    if mods.softcap:
        t = 1.0 - 2.0 / (jnp.exp2(s * (2.0 * LOG2E * scale / mods.softcap)) + 1.0)
        x = t * (mods.softcap * LOG2E)
    else:
        x = s * log2_scale
    return x if bias is None else x + bias.astype(jnp.float32) * LOG2E


def kept(rows, cols, mods: ScoreMods, *, causal: bool, mask=None, kv_len=None):
    """bool: the positions of a PARTIAL tile that are kept (``rows``, ``cols``: int32 query and
    key indices of the tile): the mask tile (nonzero keeps), causal, the key length, the window."""
    conditions = [] if mask is None else [mask != 0]
    if causal:
        conditions.append(rows >= cols)
    if kv_len is not None:
        conditions.append(cols < kv_len)
    if mods.window is not None:
        conditions.append((cols <= rows) & (cols > rows - mods.window))
    if not conditions:
        raise ValueError("a masked tile needs a mask, causal, key lengths or a window")
    keep = conditions[0]
    for condition in conditions[1:]:
        keep = keep & condition
    return keep


def safe_max(m):
    """The row max to subtract: 0 where every score so far is -inf (a hidden or -inf-biased row),
    so that no -inf - -inf NaN arises and such scores weigh exactly zero."""
    return jnp.where(m == -jnp.inf, 0.0, m)


# --- outside the kernel: its operands ------------------------------------------------------

def _bh(x: jax.Array) -> tuple[bool, bool]:
    return x.shape[0] > 1, x.shape[1] > 1


def bias_operand(bias: jax.Array, shape: tuple[int, int, int, int], block_q: int | None = None) -> jax.Array:
    """The bias as the kernel reads it: rank 4, [B or 1, H or 1, Sq, Sk] (B and H kept at 1 where
    they broadcast), in bf16, f16 or f32 (other dtypes converted to f32). With ``block_q``, a bias
    with one row for all queries is that row repeated ``block_q`` times instead of Sq."""
    if bias.ndim > 4:
        raise ValueError(f"bias rank {bias.ndim} > 4: it must broadcast to [B, H, Sq, Sk] = {shape}")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    for got, want in zip(bias.shape, shape):
        if got not in (1, want):
            raise ValueError(f"bias shape {bias.shape} does not broadcast to [B, H, Sq, Sk] = {shape}")
    if jnp.dtype(bias.dtype).name not in BIAS_DTYPES:
        bias = bias.astype(jnp.float32)
    rows = block_q if block_q is not None and bias.shape[2] == 1 else shape[2]
    return jnp.broadcast_to(bias, bias.shape[:2] + (rows, shape[3]))


def tile_operands(mask4: jax.Array | None, kv_lengths: jax.Array | None, *, sq: int, sk: int, causal: bool,
                  window: int | None, cta_rows: int, block_kv: int, block_q: int,
                  ) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """The tiled kernel's operands: the int8 mask ([Bm, Hm, Sq, Sk], or [Bm, Hm, block_q, Sk] for
    a mask with one row: that row repeated for a warpgroup's tile; None without a mask), per CTA
    the counts int32 [Bt, Ht, nq, 4] (VISIBLE tiles, PARTIAL tiles, the batch's key length, 0)
    and the tile indices int32 [Bt, Ht, nq, 2, n] (`masks.tile_lists`).

    A CTA whose tiles are all HIDDEN still gets one, listed PARTIAL (tile 0, every score hidden
    there): every CTA then runs at least one step, and its rows end with l = 0 like any row that
    keeps no key.
    """
    classes = tile_classes(sq, sk, cta_rows, block_kv, sq, sk, causal=causal, mask4=mask4,
                           kv_lengths=kv_lengths, window=window)
    counts, index = tile_lists(classes)
    empty = (counts[..., 0] + counts[..., 1]) == 0
    counts = counts.at[..., 1].set(jnp.where(empty, 1, counts[..., 1]))
    index = index.at[..., 1, 0].set(jnp.where(empty, 0, index[..., 1, 0]))
    lead = counts.shape[:-1]
    kv_len = jnp.full(lead, sk, jnp.int32) if kv_lengths is None else \
        jnp.broadcast_to(jnp.minimum(kv_lengths.astype(jnp.int32), sk)[:, None, None], lead)
    counts = jnp.concatenate([counts, kv_len[..., None], jnp.zeros(lead + (1,), jnp.int32)], axis=-1)
    if mask4 is None:
        return None, counts, index
    kmask = kernel_mask(mask4, sq, sk)
    if kmask.shape[2] == 1:
        kmask = jnp.broadcast_to(kmask, kmask.shape[:2] + (block_q, sk))
    return kmask, counts, index


def prepare(*, b: int, h: int, sq: int, sk: int, causal: bool, cta_rows: int, block_q: int,
            block_kv: int, bias: jax.Array | None = None, mask4: jax.Array | None = None,
            kv_lengths: jax.Array | None = None, window: int | None = None,
            softcap: float = 0.0, alibi: Alibi | None = None) -> tuple[ScoreMods, list[jax.Array]]:
    """(the plan's `ScoreMods`, the extra kernel operands in order: bias, ALiBi slopes, mask,
    counts, index, each only when the call has it). ``mask4``: bool from `masks.mask_4d`."""
    operands, bias_bh, mask_bh, lists_bh, mask_rows, bias_rows = [], None, None, None, False, False
    if alibi is not None:
        if bias is not None:
            raise ValueError("a call takes a bias or ALiBi slopes, not both")
        alibi.check(b, h, sq, sk)
    if bias is not None:
        bias_rows = bias.ndim >= 2 and bias.shape[-2] > 1  # else one row for all queries
        bias = bias_operand(bias, (b, h, sq, sk), block_q)
        operands.append(bias)
        bias_bh = _bh(bias)
    if alibi is not None:
        operands.append(alibi.slopes_array())
    if mask4 is not None or kv_lengths is not None or window is not None:
        kmask, counts, index = tile_operands(mask4, kv_lengths, sq=sq, sk=sk, causal=causal, window=window,
                                             cta_rows=cta_rows, block_kv=block_kv, block_q=block_q)
        if kmask is not None:
            operands.append(kmask)
            mask_bh, mask_rows = _bh(kmask), mask4.shape[2] > 1
        operands += [counts, index]
        lists_bh = _bh(counts)
    mods = ScoreMods(float(softcap), bias_bh, mask_bh, mask_rows, lists_bh, kv_lengths is not None, window,
                     bias_rows, alibi)
    return mods, operands
