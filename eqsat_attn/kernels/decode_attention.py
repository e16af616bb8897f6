"""Pallas (Triton) decode attention: a few queries against a long KV cache (flash-decoding).

A decode step has Sq = 1..16 queries per head and Sk in the thousands. The flash kernel's grid
(query tile, batch, head) then has one query tile per head, a program per query head walks the
whole cache alone, and every head of a GQA group reads its kv head's K and V again. This kernel:

* batches a kv head's G query heads into one program's rows (row r = g * Sq + i: query head
  kv·G + g, position i), so K and V are read once per kv head, not once per query head;
* splits the keys into chunks processed in parallel: grid (batch, kv head, row block, split);
  each program writes a partial output (normalised by its own row sums) and its log-sum-exp;
* combines the splits in plain JAX (a small rescale-and-sum over [splits, rows, Dv]);
* walks only the key tiles below a batch's cache length and its mask's last kept key.

Semantics are `attention_reference`'s: scores in float32 (natural units, ``s = (q·k)·scale``, as
the reference computes them), the soft-cap, causal top-left aligned (query i sees keys j <= i,
as `causal_mask` defines it for any Sq, Sk), a boolean ``mask`` broadcastable to [B,H,Sq,Sk],
per-batch cache lengths ``kv_lengths`` (keys j < kv_lengths[b] are kept), both V layouts, any
q/k/o layout with D minor for K (V: D or S minor), GQA, a folded cast (``compute_dtype``).

Hidden positions (mask, lengths, causal) get zero weight, guarded exactly as `flash_attention`
guards them: a row that keeps no key is the uniform average of V (its value in the op with a
finite fill); and where some other row's log-sum-exp is not `GUARD_MARGIN` above fill + log(Sk),
or any result is not finite (NaN / Inf inputs, scores overflowing), `lax.cond` runs
`attention_reference` on the whole call instead. So the result is the op's up to float
reassociation. Gradients (decode is inference) are `flash_attention`'s: the backward recomputes
through it. ``backend="mosaic_gpu"`` runs the forward's partial results on the Mosaic GPU kernel
instead (kernels/mosaic_decode.py: the same rows and key splits, inside the same guard and combine).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .flash_attention import GUARD_MARGIN, MIN_BLOCK, flash_attention
from .masks import index_keep, mask_4d
from .mosaic_attention import MosaicBlocks, hopper_gpu
from .mosaic_decode import mosaic_decode_parts, mosaic_decode_unsupported
from .reference import CANONICAL, MASK_VALUE, attention_reference, check_shapes, kernel_layout_error

#: Lowering sends an attention to this kernel (on the Pallas backend) when it has at most
#: DECODE_MAX_QUERIES queries and at least DECODE_MIN_KEYS keys and no additive bias (a fill the
#: Pallas kernels cannot honour, NaN or +inf, already sent the call to the reference). 16
#: queries: one Triton dot tile of rows (speculative decoding's few tokens); with more, the flash
#: kernel's query tiles already fill the GPU. 1024 keys (16 key tiles of 64):
#: below that a program's walk over the cache is short, and splitting it buys less than the
#: combine step's launch costs. ESTIMATE until `bench/attention.py --decode` measures it on a GPU.
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS = 1024
#: Programs the split aims for (about 4 per SM of an H100, 132 SMs): estimate, not measured.
TARGET_PROGRAMS = 512
MIN_BLOCKS_PER_SPLIT = 4  # a split walks at least this many key tiles (the combine stays small)
MAX_BLOCK_ROWS = 64  # rows (group heads x queries) per program; more rows make more row blocks
#: "0" keeps every call on the flash kernel (lowering and pricing alike): the compiled decode
#: kernel has not run on a GPU yet, so its first lease can compare it with routing off.
DECODE_ENV = "EQSAT_ATTN_DECODE"
#: "1": backend="auto" runs decode steps inside its contract on the Mosaic GPU path on a Hopper
#: GPU (off by default: that path has not run compiled on a GPU yet)
MOSAIC_DECODE_ENV = "EQSAT_ATTN_MOSAIC_DECODE"
DECODE_BACKENDS = ("auto", "triton", "mosaic_gpu")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _relayout(x: jax.Array, source: str, target: str) -> jax.Array:
    perm = tuple(source.index(a) for a in target)
    return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def _pad_to(x: jax.Array, layout: str, sizes: dict[str, int]) -> jax.Array:
    """Zero-pad the axes of ``x`` (stored in ``layout``) named in ``sizes`` up to those sizes."""
    widths = [(0, sizes.get(a, n) - n) for a, n in zip(layout, x.shape)]
    return x if not any(w for _, w in widths) else jnp.pad(x, widths)


def _cache_spec(layout: str, sk_p: int, d_p: int) -> pl.BlockSpec:
    """A program's whole [Sk, D] (or [D, Sk]) slab of K or V, stored in ``layout``: B and H
    squeezed and addressed by the grid's batch and kv head ids, S and D whole."""
    shape = tuple({"S": sk_p, "D": d_p}.get(a) for a in layout)

    def index_map(bi, hi, ri, si):
        return tuple({"B": bi, "H": hi}.get(a, 0) for a in layout)

    return pl.BlockSpec(shape, index_map)


def takes_decode(sq: int, sk: int, *, has_bias: bool = False) -> bool:
    """Whether lowering runs an attention of this shape on the decode kernel (see
    DECODE_MAX_QUERIES): a static decision from the shapes (and `DECODE_ENV`), so deterministic."""
    if os.environ.get(DECODE_ENV) == "0":
        return False
    return 1 <= sq <= DECODE_MAX_QUERIES and sk >= DECODE_MIN_KEYS and not has_bias


def node_takes_decode(params, sq: int, sk: int) -> bool:
    """`takes_decode` of an IR attention node's params and sequence lengths."""
    return takes_decode(sq, sk, has_bias=params.get("mask_kind") == "bias")


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """How one call is cut: rows per program, keys per tile, key tiles per split, splits."""

    block_rows: int
    block_k: int
    blocks_per_split: int
    splits: int


def decode_tiles(b: int, hkv: int, rows: int, sk: int, head_dim: int, *, block_k: int | None = None,
                 splits: int | None = None) -> DecodeTiles:
    """The tiling of a call with ``rows`` = groups x Sq rows per kv head (deterministic)."""
    block_rows = min(MAX_BLOCK_ROWS, max(MIN_BLOCK, _next_pow2(rows)))
    bk = block_k or (64 if max(MIN_BLOCK, _next_pow2(head_dim)) <= 128 else 32)
    if bk < MIN_BLOCK or bk & (bk - 1):
        raise ValueError(f"block_k={bk} must be a power of two >= {MIN_BLOCK}")
    bk = min(bk, max(MIN_BLOCK, _next_pow2(sk)))
    n_blocks = -(-sk // bk)
    programs = b * hkv * -(-rows // block_rows)
    if splits is None:
        splits = min(max(1, n_blocks // MIN_BLOCKS_PER_SPLIT), max(1, -(-TARGET_PROGRAMS // programs)))
    elif not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    per_split = -(-n_blocks // min(splits, n_blocks))
    return DecodeTiles(block_rows, bk, per_split, -(-n_blocks // per_split))


@dataclasses.dataclass(frozen=True)
class _Config:
    """A call's static parameters (hashable: a custom_vjp nondiff argument and the kernel's)."""

    scale: float
    causal: bool
    sq: int
    sk: int
    tiles: DecodeTiles
    v_transposed: bool
    softcap: float
    has_mask: bool
    compute_dtype: str | None
    interpret: bool
    backend: str = "triton"  # "triton" or "mosaic_gpu" (kernels/mosaic_decode.py)
    mosaic_blocks: MosaicBlocks | None = None
    mosaic_splits: int | None = None

    def cast(self, x):
        return x if self.compute_dtype is None else x.astype(self.compute_dtype)


def _decode_kernel(q_ref, k_ref, v_ref, info_ref, *refs, cfg: _Config):
    """One (batch, kv head, row block, split): its key tiles, then its partial o and lse."""
    mask_ref = refs[0] if cfg.has_mask else None
    o_ref, lse_ref = refs[-2:]
    t = cfg.tiles
    br, bk = t.block_rows, t.block_k
    rb, split = pl.program_id(2), pl.program_id(3)
    q = cfg.cast(q_ref[...])
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    end = info_ref[0]  # keys j < end may be kept (cache length, and causal: j < Sq)
    first = split * t.blocks_per_split
    last = jnp.minimum(first + t.blocks_per_split, lax.div(end + bk - 1, bk))
    query = lax.rem(rb * br + lax.broadcasted_iota(jnp.int32, (br, bk), 0), cfg.sq)  # row g*Sq + i -> i

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        kt = cfg.cast(k_ref[pl.ds(start, bk), :])
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * jnp.float32(cfg.scale)
        if cfg.softcap:
            s = jnp.float32(cfg.softcap) * jnp.tanh(s / jnp.float32(cfg.softcap))
        cols = start + lax.broadcasted_iota(jnp.int32, (br, bk), 1)
        keep = cols < end
        if cfg.causal:
            keep = keep & (query >= cols)
        if mask_ref is not None:
            keep = keep & (mask_ref[:, pl.ds(start, bk)] != 0)
        s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no kept score yet
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = alpha * l + p.sum(axis=1)
        if cfg.v_transposed:  # V^T tile [Dv, bk]: contract the key axis of both
            vt = cfg.cast(v_ref[:, pl.ds(start, bk)])
            dims = (((1,), (1,)), ((), ()))
        else:
            vt = cfg.cast(v_ref[pl.ds(start, bk), :])
            dims = (((1,), (0,)), ((), ()))
        pv = lax.dot_general(p.astype(vt.dtype), vt, dims, precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    dv = o_ref.shape[-1]
    carry = (jnp.zeros((br, dv), jnp.float32), jnp.full((br,), -jnp.inf, jnp.float32), jnp.zeros((br,), jnp.float32))
    acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, carry)
    empty = l == 0.0  # no kept key in this split (or every kept score -inf)
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def combine_splits(o_parts: jax.Array, lse_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge partial results over axis -3 / -2: o_parts [..., splits, R, Dv] (each normalised by
    its own row sum) and lse_parts [..., splits, R] -> (o [..., R, Dv], lse [..., R]).
    A row no split kept anything of gets o = 0 and lse = -inf."""
    top = jnp.max(lse_parts, axis=-2, keepdims=True)
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    w = jnp.exp(lse_parts - top)  # exactly 0 for an empty split
    total = jnp.sum(w, axis=-2)
    o = jnp.sum(w[..., None] * o_parts, axis=-3) / jnp.where(total == 0.0, 1.0, total)[..., None]
    lse = jnp.where(total == 0.0, -jnp.inf, top[..., 0, :] + jnp.log(jnp.where(total == 0.0, 1.0, total)))
    return o, lse


def _key_end(b: int, sq: int, sk: int, causal: bool, kv_lengths: jax.Array | None,
             mask4: jax.Array | None) -> jax.Array:
    """int32 [B]: the keys below which some row of batch b may keep a key (the programs skip the
    key tiles past it): the cache length, the last key the mask keeps in any row (a cache's
    padding given as a mask), and under the causal flag Sq."""
    end = jnp.full((b,), sk, jnp.int32) if kv_lengths is None else jnp.clip(kv_lengths, 0, sk)
    if mask4 is not None:
        kept = jnp.any(mask4, axis=(1, 2))  # [B or 1, Sk]
        last = jnp.where(jnp.any(kept, axis=-1), sk - jnp.argmax(kept[:, ::-1], axis=-1), 0)
        end = jnp.minimum(end, last.astype(jnp.int32))
    return jnp.minimum(end, sq) if causal else end


def _rows(x: jax.Array, hkv: int, n_rows: int) -> jax.Array:
    """[B', H, Sq, ...] -> [B', Hkv, G*Sq, ...] (row g*Sq + i), rows padded to ``n_rows``."""
    b, h, sq = x.shape[:3]
    x = x.reshape((b, hkv, (h // hkv) * sq) + x.shape[3:])
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, n_rows - x.shape[2])
    return jnp.pad(x, widths)


def _forward(q, k, v, mask4, kv_lengths, cfg: _Config, layouts: dict) -> tuple[jax.Array, jax.Array]:
    """(o [B,H,Sq,Dv] float32, lse [B,H,Sq]) of the kernel and the combine; hidden keys weigh 0."""
    ql, kl, vl = layouts["q_layout"], layouts["k_layout"], layouts["v_layout"]
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, vl, q_layout=ql, k_layout=kl)
    if cfg.backend == "mosaic_gpu":
        return _mosaic_forward(q, k, v, mask4, kv_lengths, cfg, layouts)
    t = cfg.tiles
    rows = (h // hkv) * sq
    n_rows = _round_up(rows, t.block_rows)
    sk_p = _round_up(sk, t.block_k)
    d_p, dv_p = max(MIN_BLOCK, _next_pow2(d)), max(MIN_BLOCK, _next_pow2(dv))
    qr = _rows(_pad_to(_relayout(q, ql, CANONICAL), CANONICAL, {"D": d_p}), hkv, n_rows)  # q is small
    kp = _pad_to(k, kl, {"S": sk_p, "D": d_p})  # copies only for Sk / D off the tiles
    vp = _pad_to(v, vl, {"S": sk_p, "D": dv_p})
    info = jnp.zeros((b, 4), jnp.int32).at[:, 0].set(_key_end(b, sq, sk, cfg.causal, kv_lengths, mask4))
    in_specs = [
        pl.BlockSpec((None, None, t.block_rows, d_p), lambda bi, hi, ri, si: (bi, hi, ri, 0)),
        _cache_spec(kl, sk_p, d_p),
        _cache_spec(vl, sk_p, dv_p),
        pl.BlockSpec((None, 4), lambda bi, hi, ri, si: (bi, 0)),
    ]
    args = [qr, kp, vp, info]
    if cfg.has_mask:
        bm, hm, sqm, _ = mask4.shape
        if hm == 1 and sqm == 1:  # one key row per batch (key padding): every row reads it
            kmask = mask4[:, :, :, :]
            row_block, row_idx = 1, (lambda ri: 0)
        else:
            kmask = _rows(jnp.broadcast_to(mask4, (bm, h, sq, sk)), hkv, n_rows)
            row_block, row_idx = t.block_rows, (lambda ri: ri)
        kmask = jnp.pad(kmask.astype(jnp.int8), ((0, 0), (0, 0), (0, 0), (0, sk_p - sk)))
        full_b, full_h = kmask.shape[0] > 1, kmask.shape[1] > 1
        in_specs.append(pl.BlockSpec((None, None, row_block, sk_p), lambda bi, hi, ri, si: (
            bi if full_b else 0, hi if full_h else 0, row_idx(ri), 0)))
        args.append(kmask)
    out_idx = lambda bi, hi, ri, si: (bi, hi, si, ri)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, None, t.block_rows, dv_p), lambda *ids: out_idx(*ids) + (0,)),
                 pl.BlockSpec((None, None, None, t.block_rows), out_idx)]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, t.splits, n_rows, dv_p), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, t.splits, n_rows), jnp.float32)]
    params = {} if cfg.interpret else {"compiler_params": _triton_params()}
    o_parts, lse_parts = pl.pallas_call(
        functools.partial(_decode_kernel, cfg=cfg),
        grid=(b, hkv, n_rows // t.block_rows, t.splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        name="decode_attention" + ("_bhds" if cfg.v_transposed else "_bhsd"),
        **params,
    )(*args)
    o, lse = combine_splits(o_parts, lse_parts)
    o = o[:, :, :rows, :dv].reshape(b, h, sq, dv)
    return o, lse[:, :, :rows].reshape(b, h, sq)


def _canonical_operands(q, k, v, layouts: dict) -> tuple[jax.Array, jax.Array, jax.Array, str]:
    """q, k in BHSD and v in BHSD or BHDS (whichever keeps its minor axis): views where the
    layouts already are, copies otherwise."""
    vl = layouts["v_layout"]
    v_target = "BHDS" if vl[-1] == "S" else CANONICAL
    return (_relayout(q, layouts["q_layout"], CANONICAL), _relayout(k, layouts["k_layout"], CANONICAL),
            _relayout(v, vl, v_target), v_target)


def _mosaic_forward(q, k, v, mask4, kv_lengths, cfg: _Config, layouts: dict) -> tuple[jax.Array, jax.Array]:
    """`_forward` on the Mosaic GPU path (kernels/mosaic_decode.py), then the same combine."""
    q, k, v, v_layout = _canonical_operands(q, k, v, layouts)
    b, h, sq, _ = q.shape
    o_parts, lse_parts, rows = mosaic_decode_parts(
        q, k, v, scale=cfg.scale, v_layout=v_layout, mask4=mask4, kv_lengths=kv_lengths, softcap=cfg.softcap,
        interpret=cfg.interpret, blocks=cfg.mosaic_blocks, splits=cfg.mosaic_splits)
    o, lse = combine_splits(o_parts, lse_parts)
    dv = o.shape[-1]
    return o[:, :, :rows].reshape(b, h, sq, dv), lse[:, :, :rows].reshape(b, h, sq)


def decode_backend(q, k, v, *, backend: str, layouts: dict, causal: bool, mask4, compute_dtype, softcap: float,
                   interpret: bool, blocks: MosaicBlocks | None = None) -> str:
    """"triton" or "mosaic_gpu" for this call: "auto" takes Mosaic GPU only with
    `MOSAIC_DECODE_ENV` = 1, compiling for a Hopper GPU, inside its contract; forcing
    "mosaic_gpu" outside it raises ValueError saying why."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "triton":
        return "triton"
    if backend == "auto" and (interpret or os.environ.get(MOSAIC_DECODE_ENV) != "1" or not hopper_gpu()):
        return "triton"
    view = lambda x, layout, target: jax.ShapeDtypeStruct(  # noqa: E731
        tuple(x.shape[layout.index(a)] for a in target), x.dtype)
    vl = layouts["v_layout"]
    v_target = "BHDS" if vl[-1] == "S" else CANONICAL
    reason = mosaic_decode_unsupported(
        view(q, layouts["q_layout"], CANONICAL), view(k, layouts["k_layout"], CANONICAL), view(v, vl, v_target),
        v_layout=v_target, causal=causal, mask4=mask4, compute_dtype=compute_dtype, softcap=softcap,
        interpret=interpret, blocks=blocks)
    if reason is None:
        return "mosaic_gpu"
    if backend == "mosaic_gpu":
        raise ValueError(f"backend='mosaic_gpu' cannot run this decode call: {reason}; use 'triton' or 'auto'")
    return "triton"


def _triton_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _empty_rows(cfg: _Config, mask4, kv_lengths, b: int, h: int, mask_fill: float) -> jax.Array | None:
    """bool [B,H,Sq]: rows that keep no key, for a finite fill (their value is V's uniform
    average); None when no row can be empty or the fill is -inf (such rows are NaN in the op)."""
    if not math.isfinite(mask_fill) or (mask4 is None and kv_lengths is None):
        return None  # causal alone keeps key 0 in every row
    if mask4 is None:
        return jnp.broadcast_to((kv_lengths <= 0)[:, None, None], (b, h, cfg.sq))
    keep = mask4 & index_keep(cfg.sq, cfg.sk, kv_lengths=kv_lengths) if kv_lengths is not None else mask4
    if cfg.causal:
        keep = keep & (jnp.arange(cfg.sq)[:, None] >= jnp.arange(cfg.sk)[None, :])
    return jnp.broadcast_to(~jnp.any(keep, axis=-1), (b, h, cfg.sq))


def _uniform_rows(cfg: _Config, o: jax.Array, v: jax.Array, v_layout: str, empty: jax.Array) -> jax.Array:
    """o [B,H,Sq,Dv] with its ``empty`` rows replaced by the mean of V over every key; the mean
    (a read of all of V) is computed only when some row is empty."""
    b, h, sq = empty.shape

    def fill():
        vm = jnp.mean(cfg.cast(v).astype(jnp.float32), axis=v_layout.index("S"), keepdims=True)
        vm = _relayout(vm, v_layout, CANONICAL)  # [B, Hkv, 1, Dv]
        return jnp.where(empty[..., None], jnp.repeat(vm, h // vm.shape[1], axis=1), o)

    return lax.cond(jnp.any(empty), fill, lambda: o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _decode(q, k, v, mask4, kv_lengths, cfg: _Config, call: tuple):
    return _decode_fwd(q, k, v, mask4, kv_lengths, cfg, call)[0]


def _decode_fwd(q, k, v, mask4, kv_lengths, cfg: _Config, call: tuple):
    kw = dict(call)
    layouts = {n: kw[n] for n in ("q_layout", "k_layout", "v_layout")}
    o, lse = _forward(q, k, v, mask4, kv_lengths, cfg, layouts)
    b, h, sq = lse.shape
    fill = kw["mask_fill"]
    empty = _empty_rows(cfg, mask4, kv_lengths, b, h, fill)
    if empty is not None:
        o, lse = _uniform_rows(cfg, o, v, kw["v_layout"], empty), jnp.where(empty, 0.0, lse)
    ok = jnp.isfinite(lse)
    if cfg.causal or mask4 is not None or kv_lengths is not None:  # hidden keys were skipped
        ok = ok & (lse - jnp.float32(math.log(cfg.sk)) - jnp.float32(fill) > GUARD_MARGIN)
    if empty is not None:
        ok = ok | empty
    use_reference = jnp.logical_not(jnp.all(ok) & jnp.all(jnp.isfinite(o)))
    out_dtype = cfg.compute_dtype or q.dtype
    o = _relayout(o.astype(out_dtype), CANONICAL, kw["o_layout"])
    o = lax.cond(use_reference, lambda: _reference(q, k, v, mask4, kv_lengths, cfg, kw), lambda: o)
    return o, (q, k, v, mask4, kv_lengths)


def _keep(mask4, kv_lengths, sq: int, sk: int) -> jax.Array | None:
    keep = index_keep(sq, sk, kv_lengths=kv_lengths)
    if keep is None or mask4 is None:
        return mask4 if keep is None else keep
    return mask4 & keep


def _reference(q, k, v, mask4, kv_lengths, cfg: _Config, kw: dict) -> jax.Array:
    return attention_reference(q, k, v, scale=cfg.scale, causal=cfg.causal,
                               mask=_keep(mask4, kv_lengths, cfg.sq, cfg.sk), compute_dtype=cfg.compute_dtype,
                               softcap=cfg.softcap, **kw)


def _decode_bwd(cfg: _Config, call: tuple, res, do):
    q, k, v, mask4, kv_lengths = res
    flash = lambda q, k, v: flash_attention(  # noqa: E731 - the flash kernels' gradients
        q, k, v, scale=cfg.scale, causal=cfg.causal, mask=mask4, kv_lengths=kv_lengths, softcap=cfg.softcap,
        compute_dtype=cfg.compute_dtype, interpret=cfg.interpret, backend="triton", **dict(call))
    return (*jax.vjp(flash, q, k, v)[1](do), None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    mask: jax.Array | None = None,
    mask_fill: float = MASK_VALUE,
    softcap: float = 0.0,
    kv_lengths: jax.Array | None = None,
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    compute_dtype: str | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    interpret: bool | None = None,
    backend: str = "auto",
    mosaic_blocks: MosaicBlocks | None = None,
) -> jax.Array:
    """Decode attention with the semantics of `attention_reference` (see the module docstring).

    q [B,H,Sq,D], k [B,Hkv,Sk,D], v [B,Hkv,Sk,Dv] ("BHSD") or [B,Hkv,Dv,Sk] ("BHDS"), or any
    layouts `kernel_supports_layouts` accepts (q and o are small and relaid in the wrapper; K
    and V are read in place). Made for Sq <= 16 and long Sk, correct for any. ``kv_lengths``:
    int [B], keys j < kv_lengths[b] kept in batch b (clamped to [0, Sk]). ``block_k`` (keys per
    tile) and ``splits`` (key chunks run in parallel) override `decode_tiles`. Returns
    [B,H,Sq,Dv] in ``o_layout``, in q.dtype (``compute_dtype`` when given). ``backend``
    (`decode_backend`): "triton", "mosaic_gpu" (kernels/mosaic_decode.py: no causal flag, masks
    of one key row, Sk a multiple of 128; ``splits`` then counts its key chunks and must divide
    the key tiles; ``mosaic_blocks`` its tiles) or "auto" (Triton unless
    EQSAT_ATTN_MOSAIC_DECODE=1 on a Hopper GPU).
    """
    if math.isnan(mask_fill) or mask_fill == math.inf:
        raise ValueError(f"mask_fill={mask_fill} is not a kernel fill (NaN / +inf hidden scores); "
                         "run attention_reference (kernel='reference') instead")
    error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if error is not None:
        raise ValueError(error)
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if sq < 1 or sk < 1:
        raise ValueError(f"decode_attention needs Sq >= 1 and Sk >= 1, got Sq={sq}, Sk={sk}; "
                         "run attention_reference (kernel='reference') instead")
    if kv_lengths is not None:
        if jnp.shape(kv_lengths) != (b,) or not jnp.issubdtype(jnp.result_type(kv_lengths), jnp.integer):
            raise ValueError(f"kv_lengths must be an integer array of shape [B] = ({b},), got "
                             f"{jnp.shape(kv_lengths)} {jnp.result_type(kv_lengths)}")
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    mask4 = None if mask is None else mask_4d(mask, (b, h, sq, sk))
    layouts = dict(q_layout=q_layout, k_layout=k_layout, v_layout=v_layout)
    chosen = decode_backend(q, k, v, backend=backend, layouts=layouts, causal=bool(causal), mask4=mask4,
                            compute_dtype=compute_dtype, softcap=float(softcap), interpret=bool(interpret),
                            blocks=mosaic_blocks)
    mosaic = chosen == "mosaic_gpu"
    tiles = decode_tiles(b, hkv, (h // hkv) * sq, sk, max(d, dv), block_k=block_k,
                         splits=None if mosaic else splits)
    cfg = _Config(float(scale), bool(causal), sq, sk, tiles, v_layout[-1] == "S", float(softcap),
                  mask is not None, None if compute_dtype is None else jnp.dtype(compute_dtype).name,
                  bool(interpret), chosen, mosaic_blocks if mosaic else None, splits if mosaic else None)
    call = (("q_layout", q_layout), ("k_layout", k_layout), ("v_layout", v_layout), ("o_layout", o_layout),
            ("mask_fill", float(mask_fill)))
    return _decode(q, k, v, mask4, kv_lengths, cfg, call)
