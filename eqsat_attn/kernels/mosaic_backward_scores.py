"""Score modifications of the Mosaic GPU backward (kernels/mosaic_backward.py): its extra operands,
the per-tile score math with the soft-cap's derivative, and the bias gradient.

The backward takes what the forward takes (kernels/mosaic_scores.py, the same `ScoreMods`):

* dQ kernel (a CTA: ``2·block_q`` query rows, key tiles streamed): the forward's operands at its
  tiling (`mosaic_scores.tile_operands`): bias [B|1, H|1, Sq, Sk], the int8 mask, per CTA the
  VISIBLE and PARTIAL key tiles. It also writes dS (float32 [B, H, Sq, Sk], the gradient of the
  loss w.r.t. the capped score plus bias) on every tile it visits: the bias gradient.
* dK/dV kernel (a CTA: ``2·block_kv`` keys, query tiles streamed): the bias and mask transposed
  ([.., Sk, Sq]: a transposed tile is no global-memory load Mosaic GPU lowers for wgmma's
  accumulator layout, so the copies are made here) and per CTA the VISIBLE and PARTIAL query
  tiles (`key_tile_operands`).

Hidden positions get exactly zero weight (-inf before exp2), as in the forward; a row whose keys
are all hidden (lse 0 from flash_attention's guard) contributes nothing: the guard adds its
uniform average's dV. dbias = dS where kept, else 0 (the op's ``where(keep, s, fill)`` passes no
gradient to hidden scores), summed over the bias's broadcast axes one slice after another, in a
fixed order (`bias_gradient`): no atomics, no reduction order left to the compiler.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .alibi import Alibi
from .masks import index_keep, tile_classes, tile_lists
from .mosaic_scores import LOG2E, ScoreMods, prepare
from .reference import causal_mask

__all__ = ["BackwardOperands", "bias_gradient", "capped_scores", "fixed_order_sum", "key_tile_operands",
           "list_tile", "prepare_backward", "unbroadcast"]


def capped_scores(s, mods: ScoreMods, *, scale: float, bias=None):
    """q·kᵀ (f32) as the op's scores in log2 units, as `mosaic_scores.log2_scores` computes them
    (the same operations, so the forward's lse matches), and d(capped score)/d(scaled score):
    1 - tanh² with a soft-cap, else None."""
    dcap = None
    if mods.softcap:
        t = 1.0 - 2.0 / (jnp.exp2(s * (2.0 * LOG2E * scale / mods.softcap)) + 1.0)
        x = t * (mods.softcap * LOG2E)
        dcap = 1.0 - t * t
    else:
        x = s * (scale * LOG2E)
    return (x if bias is None else x + bias.astype(jnp.float32) * LOG2E), dcap


def list_tile(step, counts, index):
    """The tile of a step through a CTA's lists: its VISIBLE tiles, then its PARTIAL ones."""
    n, visible = index.shape[1], counts[0]
    first = index[0, jnp.minimum(step, n - 1)]
    second = index[1, jnp.clip(step - visible, 0, n - 1)]
    return lax.select(step < visible, first, second)


def key_tile_operands(mask4, kv_lengths, *, sq: int, sk: int, causal: bool, window: int | None,
                      cta_keys: int, block_q: int) -> tuple[jax.Array, jax.Array]:
    """The dK/dV kernel's lists: per CTA of ``cta_keys`` keys, counts int32 [Bt, Ht, nk, 4]
    (VISIBLE query tiles, PARTIAL ones, the batch's key length, 0) and indices [Bt, Ht, nk, 2, n].
    A CTA whose query tiles are all HIDDEN gets none (its dK, dV are zero)."""
    classes = tile_classes(sq, sk, block_q, cta_keys, sq, sk, causal=causal, mask4=mask4,
                           kv_lengths=kv_lengths, window=window)
    counts, index = tile_lists(jnp.swapaxes(classes, 2, 3))
    lead = counts.shape[:-1]
    kv_len = jnp.full(lead, sk, jnp.int32) if kv_lengths is None else \
        jnp.broadcast_to(jnp.minimum(kv_lengths.astype(jnp.int32), sk)[:, None, None], lead)
    return jnp.concatenate([counts, kv_len[..., None], jnp.zeros(lead + (1,), jnp.int32)], axis=-1), index


@dataclasses.dataclass(frozen=True)
class BackwardOperands:
    """The extra operands of both kernels, in their order: bias, mask, counts, index (each only
    when the call has it); ``keep``: bool positions dbias keeps (None: every position)."""

    mods: ScoreMods
    dq: list
    dkv: list
    keep: jax.Array | None


def prepare_backward(*, b: int, h: int, sq: int, sk: int, causal: bool, block_q: int, block_kv: int,
                     cta_rows: int, cta_keys: int, bias=None, mask4=None, kv_lengths=None,
                     window: int | None = None, softcap: float = 0.0, alibi: Alibi | None = None) -> BackwardOperands:
    """Both kernels' extra operands (module docstring). ``mask4``: bool from `masks.mask_4d`;
    ``alibi``: the slopes [1 or B, 1 or H] are both kernels' operand (in the bias's place)."""
    mods, dq = prepare(b=b, h=h, sq=sq, sk=sk, causal=causal, cta_rows=cta_rows, block_q=block_q,
                       block_kv=block_kv, bias=bias, mask4=mask4, kv_lengths=kv_lengths, window=window,
                       softcap=softcap, alibi=alibi)
    rest = list(dq)
    dkv = []
    if mods.bias_bh is not None:
        dkv.append(jnp.swapaxes(rest.pop(0), 2, 3))
    if mods.alibi is not None:
        dkv.append(rest.pop(0))
    if mods.mask_bh is not None:
        dkv.append(jnp.swapaxes(rest.pop(0), 2, 3))
    if mods.tiled:
        dkv += key_tile_operands(mask4, kv_lengths, sq=sq, sk=sk, causal=causal, window=window,
                                 cta_keys=cta_keys, block_q=block_q)
    keep = None
    if bias is not None:
        keep = index_keep(sq, sk, kv_lengths=kv_lengths, window=window)
        if mask4 is not None:
            keep = mask4 if keep is None else keep & mask4
        if causal:
            keep = causal_mask(sq, sk) if keep is None else keep & causal_mask(sq, sk)
    return BackwardOperands(mods, dq, dkv, keep)


def fixed_order_sum(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """x summed over ``axis`` one slice after another, in index order: the same bits on every run
    and device (a reduction's order is the compiler's; this one is not)."""
    x = jnp.moveaxis(x, axis, 0)
    total = lax.fori_loop(1, x.shape[0], lambda i, acc: acc + x[i], x[0])
    return jnp.expand_dims(total, axis) if keepdims else total


def unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x (rank 4) summed down to ``shape``, the shape it was broadcast from (as jax's VJP of a
    broadcast sums): leading axes dropped, axes of size 1 kept; in a fixed order."""
    for _ in range(x.ndim - len(shape)):
        x = fixed_order_sum(x, 0)
    for i, n in enumerate(shape):
        if n == 1 and x.shape[i] != 1:
            x = fixed_order_sum(x, i, keepdims=True)
    return x


def bias_gradient(ds: jax.Array, keep: jax.Array | None, bias) -> jax.Array:
    """dbias from the dQ kernel's dS (float32 [B, H, Sq, Sk], written on the tiles it visited):
    zero where hidden (and on the tiles never visited), summed to the bias's shape, its dtype."""
    if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
    return unbroadcast(ds, jnp.shape(bias)).astype(jnp.result_type(bias))
