"""Pallas flash attention: forward and backward kernels.

Two Pallas backends run the forward (`flash_attention(..., backend=...)`, `pallas_backend`): this
module's Triton kernel, for any GPU and every layout below, and on Hopper the Mosaic GPU kernel of
mosaic_attention.py (wgmma, TMA, warp specialisation) for the calls inside its contract. Both
return the same residuals, so the backward kernels here serve both.

One Triton kernel covers both V layouts of the Attention op:

* ``"BHSD"``: V is [B, Hkv, Sk, Dv]; a key tile of V is [block_k, Dv] and P·V is a plain matmul.
* ``"BHDS"`` (transposed V): V is [B, Hkv, Dv, Sk]; the kernel loads V^T tiles [Dv, block_k]
  straight from that array and computes P·V as a dot_general contracting the sequence axis of
  both operands. V is never transposed in memory.

More generally every operand has its own layout (a permutation of "BHSD", the physical axis
order), and the BlockSpecs are built from the layout strings (`_spec`: B and H squeezed and
addressed by the index maps, S tiled, D whole): q, k and o (and dq, dk, dO) need D minor; V needs
D minor (standard) or S minor (transposed V), e.g. V as [H, Dv, B, Sk] ("HDBS") is read in
place. So an attention whose operands are laid out as [B, S, H, D] needs no copies at all; tiles
are then strided loads and stores. Gradients come back in their operands' layouts; the
log-sum-exp residual is [B, H, Sq] whatever the layouts.

Online softmax over key tiles (FlashAttention-2), float32 statistics and accumulator, exp2 with
log2(e) folded into the scale. Causal attention (top-left aligned) visits only key tiles that
intersect the causal triangle, and applies the element mask only on tiles crossing the diagonal
or holding padded keys. GQA is expressed in the K/V index maps (kv head = h // groups); K and V
are never repeated. Lengths that are not block multiples are zero-padded internally and the
padded keys are masked with -inf (exactly zero weight). Head dims that are not a power of two
(or below 16) are zero-padded, which changes no score.

The backward pass (jax.custom_vjp, residuals q, k, v, o and the log-sum-exp) has two Pallas
kernels, FlashAttention-2 style without atomics: one per key tile accumulating dK and dV over the
query tiles of every head in the kv head's group (dV comes out directly in V's layout; for BHDS
that is dV^T = dO^T·P), one per query tile accumulating dQ. With a bias, or backward="jax", a
plain-JAX recomputation runs instead, one query chunk at a time (memory O(chunk * Sk)), which
also gives the bias gradient. Opt-in, backward="mosaic_gpu" (or EQSAT_ATTN_MOSAIC_BWD=1 with the
forward on Mosaic GPU) runs the same split as Hopper kernels (kernels/mosaic_backward.py, wgmma
and TMA; masks, key lengths, windows, soft-cap and a bias with its gradient included); calls
outside their contract fall back to the Triton kernels with a warning saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .mosaic_attention import (FP8_DTYPES, MosaicBlocks, hopper_gpu, mosaic_attention,
                               mosaic_unsupported)
from .mosaic_backward import mosaic_attention_backward, mosaic_backward_unsupported
from .alibi import Alibi
from .masks import index_keep, kernel_mask, mask_4d, tile_classes, tile_lists
from .reference import (CANONICAL, MASK_VALUE, attention_reference, causal_mask, check_shapes, kernel_layout_error,
                        layout_shape)

LOG2E: float = math.log2(math.e)

# Forward tile table for the Pallas Triton backend, keyed by padded head dim:
# head_dim -> (block_q, block_k, num_warps, num_stages). Measured on an H100 (jax 0.11.2, bf16
# B4 H32 S4096; bench/results/tune-attention-h100-2026-11-25.md): with 2-3 pipeline stages the
# 64/128 rows reach 433-443 TFLOP/s (D128) and 333 (D64), against 364 for the stock kernel's
# settings (128, 128, 8, 2). TUNED_BLOCKS refines a row per causal flag and V layout where the
# sweep found a better tile. 256 halves the tiles so K, V tiles and the accumulator fit in shared
# memory. Blocks are clamped to the (power-of-two rounded) sequence lengths for short sequences.
BLOCK_TABLE: dict[int, tuple[int, int, int, int]] = {
    16: (128, 128, 4, 2),
    32: (128, 128, 4, 2),
    64: (64, 128, 4, 2),
    128: (128, 64, 4, 2),
    256: (64, 64, 8, 2),
}
# (head_dim, causal, transposed V) -> tiles, where the sweep's best differs from BLOCK_TABLE.
TUNED_BLOCKS: dict[tuple[int, bool, bool], tuple[int, int, int, int]] = {
    (64, True, True): (64, 64, 4, 3),  # 282 TFLOP/s; (64, 128, 4, 2) is under 257 here
}
# Backward tiles, keyed by padded head dim:
# head_dim -> (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, num_warps, num_stages).
# The dK/dV kernel keeps two [block_k, D] float32 accumulators live and streams query tiles; the
# dQ kernel keeps one [block_q, D] accumulator and streams key tiles. D128 measured on an H100
# (bench/results/tune-backward-h100-2026-11-25.md): (64, 64, 64, 64, 4, 2) runs at 370 TFLOP/s
# (345 with transposed V); the earlier 8-warp (32, 64, 64, 32) row ran at 132 and gave a wrong
# dK with transposed V. D64 passes the GPU tests; other rows untuned.
BWD_BLOCK_TABLE: dict[int, tuple[int, int, int, int, int, int]] = {
    16: (64, 64, 64, 64, 4, 2),
    32: (64, 64, 64, 64, 4, 2),
    64: (64, 64, 64, 64, 4, 2),
    128: (64, 64, 64, 64, 4, 2),
    256: (32, 32, 32, 32, 8, 1),
}
MIN_BLOCK = 16  # smallest tile Triton's dot accepts
#: fp8 forward: P (in [0, 1]) is computed as P_FP8_SCALE·P (exp2 with the exponent shifted by
#: log2 of it, no extra multiply) before its cast to fp8, so small probabilities keep e4m3's normal
#: range (max 448); the row sum carries the same factor, so it cancels exactly in acc / l.
P_FP8_SCALE = 256.0
_P_FP8_SHIFT = math.log2(P_FP8_SCALE)
BWD_Q_CHUNK = 256  # query rows per step of the plain-JAX recomputation backward
BACKWARDS = ("pallas", "jax")  # fp8_attention's too
#: flash_attention's backwards: BACKWARDS and the Hopper kernels of kernels/mosaic_backward.py.
#: "mosaic_gpu" is opt-in, and so is the environment switch EQSAT_ATTN_MOSAIC_BWD=1 (it turns the
#: default "pallas" into "mosaic_gpu" when the forward runs on Mosaic GPU): the Mosaic GPU backward
#: is checked in interpret mode only and nothing has been measured on a GPU yet, so the Triton
#: backward stays the default; the default flips only after a GPU benchmark shows it ahead
#: (bench/gpu_session.sh stage mosaic-bwd).
FLASH_BACKWARDS = BACKWARDS + ("mosaic_gpu",)
MOSAIC_BWD_ENV = "EQSAT_ATTN_MOSAIC_BWD"
#: Pallas backends of the forward kernel: Triton (any GPU, interpret mode anywhere) and Mosaic GPU
#: (Hopper: wgmma, TMA, warp specialisation; kernels/mosaic_attention.py). Both share the backward.
BACKENDS = ("auto", "triton", "mosaic_gpu")
#: "auto" picks the Mosaic GPU kernel on a Hopper GPU, for 16-bit and for fp8 operands: on an H200
#: (2026-11-26, jax 0.11.2) its 38 compiled GPU tests passed and it outran our Triton kernel on
#: every benchmark row, 16-bit by 1.02-1.58x (same V layout, the measured schedule), fp8 (transposed
#: V) by 2.2-2.6x (bench/results/attention-nvidia-h200-2026-11-26.md, attention-fp8-nvidia-h200-*).
#: The environment variable EQSAT_ATTN_AUTO_MOSAIC overrides both: "0" keeps "auto" on Triton,
#: "1" takes Mosaic GPU; backend="mosaic_gpu" or "triton" forces one per call.
AUTO_MOSAIC = True
AUTO_MOSAIC_FP8 = True
#: Masks, key lengths, windows, bias and soft-cap on Mosaic GPU (kernels/mosaic_scores.py) pass
#: in jax's Mosaic GPU interpreter and lower for Hopper, but the compiled kernel has not run on a
#: GPU yet: "auto" keeps such calls on the Triton kernel (measured) until a lease runs
#: `bash bench/gpu_session.sh mosaic-masks`; EQSAT_ATTN_AUTO_MOSAIC=1 (or backend="mosaic_gpu")
#: takes them to Mosaic GPU now.
AUTO_MOSAIC_SCORE_MODS = False
AUTO_MOSAIC_ENV = "EQSAT_ATTN_AUTO_MOSAIC"


def auto_takes_mosaic(fp8: bool, score_mods: bool = False) -> bool:
    """Whether "auto" may pick the Mosaic GPU kernel (for a Hopper call inside its contract);
    ``score_mods``: the call has a mask, key lengths, a window, a bias or a soft-cap."""
    override = os.environ.get(AUTO_MOSAIC_ENV)
    if override in ("0", "1"):
        return override == "1"
    if score_mods and not AUTO_MOSAIC_SCORE_MODS:
        return False
    return AUTO_MOSAIC_FP8 if fp8 else AUTO_MOSAIC


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
    backward: str = "pallas"  # "pallas" (Triton), "mosaic_gpu" or "jax" (`backward_kernels`)
    bwd_blocks: tuple[int, int, int, int] = (64, 64, 64, 64)  # q_dkv, k_dkv, q_dq, k_dq
    bwd_warps: int = 4
    bwd_stages: int = 2
    q_layout: str = CANONICAL
    k_layout: str = CANONICAL
    o_layout: str = CANONICAL
    # fp8 forward: q·k^T is multiplied by a runtime descale operand (not `scale`), P is scaled by
    # P_FP8_SCALE and cast to V's dtype for P·V, and the output is multiplied by a second runtime
    # descale and written in out_dtype. None: the kernel's dtypes as given, output in q.dtype.
    descaled: bool = False
    out_dtype: str | None = None
    # a folded cast prologue: q, k, v (and dO) tiles are cast to this dtype right after each load,
    # before any matmul; the output is written in it (gradients in their operands' dtypes)
    compute_dtype: str | None = None
    # which Pallas backend runs the forward ("triton" or "mosaic_gpu"); `backward` picks the backward
    backend: str = "triton"
    mosaic_blocks: MosaicBlocks | None = None
    # score modifications: soft-cap (0 = none), the op's fill for hidden scores, and whether a
    # boolean mask (tile lists + mask tiles, kernels/masks.py) is a kernel input
    softcap: float = 0.0
    mask_fill: float = MASK_VALUE
    has_mask: bool = False
    # key lengths per batch (an int32 [B] operand) and a sliding window: positions kept by index
    # arithmetic, in the kernels' tile lists and partial-tile masks like a boolean mask's
    has_lengths: bool = False
    window: int | None = None
    # ALiBi computed in the Mosaic GPU kernels from static slopes (kernels/alibi.py); the other
    # kernels get it materialised (`flash_attention`), so only a Mosaic GPU forward carries it
    alibi: Alibi | None = None

    @property
    def tiled(self) -> bool:
        """The kernels walk per-tile lists (masks.py) instead of ranges of key / query tiles."""
        return self.has_mask or self.has_lengths or self.window is not None

    @property
    def guarded(self) -> bool:
        """The result is checked at run time (`_needs_reference`): tile lists (a mask, key lengths,
        a window), or a causal fill above the kernels' own. The kernels then give hidden scores
        exactly zero weight (-inf, with a safe running max) and a row with no visible key an lse
        of -inf."""
        return self.tiled or (self.causal and self.mask_fill > MASK_VALUE)

    @property
    def hidden_score(self) -> float:
        """What a causally hidden score becomes inside the kernels (log2 units)."""
        return -jnp.inf if self.guarded else MASK_VALUE

    def cast(self, x):
        """A loaded tile in the compute dtype (unchanged without a cast prologue)."""
        return x if self.compute_dtype is None else x.astype(self.compute_dtype)

    @property
    def v_transposed(self) -> bool:
        """V tiles are V^T [Dv, block_k] (sequence axis minor)."""
        return self.v_layout[-1] == "S"

    @property
    def canonical(self) -> bool:
        return (self.q_layout, self.k_layout, self.o_layout) == (CANONICAL,) * 3 and \
            self.v_layout in ("BHSD", "BHDS")

    def name(self, prefix: str) -> str:
        tail = "" if (self.q_layout, self.k_layout, self.o_layout) == (CANONICAL,) * 3 else \
            f"_q{self.q_layout}_k{self.k_layout}_o{self.o_layout}".lower()
        fp8 = "_fp8" if self.descaled else ""
        return f"{prefix}{fp8}_{self.v_layout.lower()}{tail}"


def pallas_backend(q, k, v, *, backend: str = "auto", interpret: bool | None = None,
                   tiles_given: bool = False, **call) -> str:
    """The Pallas backend that runs this forward: "mosaic_gpu" or "triton".

    q, k, v: arrays or ShapeDtypeStructs; ``call``: the other `mosaic_unsupported` arguments
    (layouts, causal, scale, bias, compute_dtype, blocks, mask, mask_fill, softcap). "auto" takes Mosaic GPU when
    `auto_takes_mosaic`, compiling for a Hopper GPU, the call is inside its contract and no Triton
    tiles were given; else Triton. Forcing "mosaic_gpu" on a call outside its contract raises
    ValueError saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if backend == "triton":
        return "triton"
    reason = mosaic_unsupported(q, k, v, interpret=interpret, **call)
    if backend == "mosaic_gpu":
        if reason is not None:
            raise ValueError(f"backend='mosaic_gpu' cannot run this call: {reason}; "
                             "use backend='triton' or 'auto'.")
        return "mosaic_gpu"
    fp8 = jnp.dtype(q.dtype).name in FP8_DTYPES
    score_mods = any(call.get(name) is not None for name in ("mask", "bias", "kv_lengths", "window")) \
        or bool(call.get("softcap"))
    auto = reason is None and not interpret and not tiles_given and hopper_gpu() and \
        auto_takes_mosaic(fp8, score_mods)
    return "mosaic_gpu" if auto else "triton"


def backward_kernels(q, k, v, *, backward: str, forward_backend: str, bias=None, masked: bool = False,
                     softcap: float = 0.0, compute_dtype: str | None = None, guarded: bool = False,
                     v_layout: str = "BHSD", q_layout: str = "BHSD", k_layout: str = "BHSD",
                     o_layout: str = "BHSD", interpret: bool = False) -> tuple[str, str | None]:
    """The backward that runs this call and, when the Mosaic GPU backward was asked for (by
    ``backward="mosaic_gpu"``, or by EQSAT_ATTN_MOSAIC_BWD=1 with the forward on Mosaic GPU) but
    cannot run it, the reason: then the Triton backward ("pallas") runs instead. Compiled (not
    ``interpret``), it needs a Hopper GPU."""
    if backward not in FLASH_BACKWARDS:
        raise ValueError(f"backward must be one of {FLASH_BACKWARDS}, got {backward!r}")
    wanted = backward == "mosaic_gpu" or (
        backward == "pallas" and forward_backend == "mosaic_gpu" and os.environ.get(MOSAIC_BWD_ENV) == "1")
    if not wanted:
        return backward, None
    del masked, guarded  # masks, key lengths, windows and the guard's fills are its inputs too
    if not interpret and not hopper_gpu():
        reason = "it is compiled for Hopper GPUs only (wgmma, TMA) and none is the default device"
    else:
        reason = mosaic_backward_unsupported(q, k, v, v_layout=v_layout, q_layout=q_layout,
                                             k_layout=k_layout, o_layout=o_layout, bias=bias,
                                             softcap=softcap, compute_dtype=compute_dtype)
    return ("pallas", reason) if reason is not None else ("mosaic_gpu", None)


def _spec(layout: str, tiles: dict, index: dict) -> pl.BlockSpec:
    """BlockSpec of an array stored in ``layout`` (e.g. "BSHD", or "BHS" for lse).

    ``tiles[axis]``: block size along that axis; axes left out are squeezed (block dim None).
    ``index[axis]``: the block index along that axis as a function of the grid ids; axes left
    out get block 0.
    """
    shape = tuple(tiles.get(a) for a in layout)
    fns = tuple(index.get(a) for a in layout)

    def index_map(*ids):
        return tuple(0 if f is None else f(*ids) for f in fns)

    return pl.BlockSpec(shape, index_map)


def _pad_to(x: jax.Array, layout: str, sizes: dict[str, int]) -> jax.Array:
    """Zero-pad the axes of ``x`` (stored in ``layout``) named in ``sizes`` up to those sizes."""
    for axis, size in sizes.items():
        x = _pad_axis(x, layout.index(axis), size)
    return x


def _crop(x: jax.Array, layout: str, sizes: dict[str, int]) -> jax.Array:
    """The leading ``sizes[axis]`` entries of the named axes (a no-op when nothing was padded)."""
    if all(x.shape[layout.index(a)] == n for a, n in sizes.items()):
        return x
    return x[tuple(slice(0, sizes.get(a, n)) for a, n in zip(layout, x.shape))]


def _relayout(x: jax.Array, source: str, target: str) -> jax.Array:
    perm = tuple(source.index(a) for a in target)
    return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def _group_rows(ref, g: int, rows, h_first: bool):
    """ref[g, rows, ...] or ref[rows, g, ...]: one head of a [groups, S, ...] / [S, groups, ...] block."""
    idx = (g, rows) if h_first else (rows, g)
    return ref[idx + (slice(None),) * (len(ref.shape) - 2)]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(sq: int, sk: int, head_dim: int, causal: bool = False,
                v_transposed: bool = False) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) for a shape, from TUNED_BLOCKS or BLOCK_TABLE."""
    dpad = max(MIN_BLOCK, _next_pow2(max(head_dim, 1)))
    row = TUNED_BLOCKS.get((dpad, causal, v_transposed)) or BLOCK_TABLE.get(dpad, (32, 32, 8, 1))
    bq, bk, warps, stages = row
    bq = min(bq, max(MIN_BLOCK, _next_pow2(sq)))
    bk = min(bk, max(MIN_BLOCK, _next_pow2(sk)))
    return bq, bk, warps, stages


def bwd_block_sizes(sq: int, sk: int, head_dim: int) -> tuple[int, int, int, int, int, int]:
    """Backward (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, num_warps, num_stages)."""
    dpad = max(MIN_BLOCK, _next_pow2(max(head_dim, 1)))
    bq1, bk1, bq2, bk2, warps, stages = BWD_BLOCK_TABLE.get(dpad, (16, 16, 16, 16, 8, 1))
    cq, ck = max(MIN_BLOCK, _next_pow2(sq)), max(MIN_BLOCK, _next_pow2(sk))
    return min(bq1, cq), min(bk1, ck), min(bq2, cq), min(bk2, ck), warps, stages


def _pad_axis(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _bias_4d(bias: jax.Array, shape: tuple[int, int, int, int], one_row: bool = False) -> jax.Array:
    """Bias as rank 4 with full [Sq, Sk] and B/H dims kept at 1 where they broadcast; with
    ``one_row``, a bias with one row for all queries keeps that one row ([.., 1, Sk])."""
    if bias.ndim > 4:
        raise ValueError(f"bias rank {bias.ndim} > 4")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    b, h, sq, sk = shape
    for got, want in zip(bias.shape, shape):
        if got not in (1, want):
            raise ValueError(f"bias shape {bias.shape} does not broadcast to {shape}")
    rows = 1 if one_row and bias.shape[2] == 1 else sq
    return jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], rows, sk))


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x (rank 4) down to a shape it was broadcast from."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _scores(raw, cfg: _Config, qk_scale):
    """Scores in log2 units from q·kᵀ (float32), and tanh of the soft-capped score (None
    without a soft-cap: its derivative 1 - tanh² scales dS in the backward)."""
    if cfg.softcap:
        t = jnp.tanh(raw * (cfg.scale / cfg.softcap))
        return t * (cfg.softcap * LOG2E), t
    return raw * qk_scale, None


def _tile_keep(cfg: _Config, rows, cols, sk: int, mask_tile, kv_len):
    """bool [bq, bk]: the positions of a PARTIAL tile that are kept (tiled kernels)."""
    keep = mask_tile != 0 if cfg.has_mask else cols < sk  # the mask hides padded keys itself
    if cfg.causal:
        keep = keep & (rows >= cols)
    if cfg.has_lengths:
        keep = keep & (cols < kv_len)
    if cfg.window is not None:
        keep = keep & (cols <= rows) & (cols > rows - cfg.window)
    return keep


def _at(ref, g: int | None, *idx):
    """ref[g, *idx] for a block holding a kv group's heads (g given), else ref[*idx]."""
    return ref[idx if g is None else (g,) + idx]


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config, sk: int, nq: int, has_bias: bool):
    refs = list(refs)
    bias_ref = refs.pop(0) if has_bias else None
    # a boolean mask: its [bq or 1, Sk] rows, and this query tile's key-tile lists (masks.py)
    mask_ref = refs.pop(0) if cfg.has_mask else None
    count_ref, index_ref = (refs.pop(0), refs.pop(0)) if cfg.tiled else (None, None)
    # fp8: two [1, 1] float32 operands, the score descale (scale * log2 e * q_scale * k_scale)
    # and the output descale (v_scale); both loaded once, outside the key loop
    qk_ref, ov_ref = (refs.pop(0), refs.pop(0)) if cfg.descaled else (None, None)
    qk_scale = qk_ref[...] if cfg.descaled else cfg.scale * LOG2E
    # fp8: P is computed as P_FP8_SCALE·P (shifted exponent), and so is the row sum l
    shift = _P_FP8_SHIFT if cfg.descaled else 0.0
    o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    # Causal: walk query blocks heaviest-first so the long rows start early.
    qi = nq - 1 - pl.program_id(0) if cfg.causal else pl.program_id(0)
    q = cfg.cast(q_ref[...])
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
        kt = cfg.cast(k_ref[pl.ds(start, bk), :])
        raw = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)
        s, _ = _scores(raw, cfg, qk_scale)
        if bias_ref is not None:
            s = s + bias_ref[:, pl.ds(start, bk)].astype(jnp.float32) * LOG2E
        if masked and cfg.tiled:
            rows = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask_tile = mask_ref[:, pl.ds(start, bk)] if cfg.has_mask else None
            s = jnp.where(_tile_keep(cfg, rows, cols, sk, mask_tile, count_ref[2]), s, -jnp.inf)
        elif masked:
            cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            if cfg.causal:
                rows = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
                s = jnp.where(rows >= cols, s, cfg.hidden_score)
            if sk % bk:
                s = jnp.where(cols < sk, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        # guarded: hidden scores are -inf, so a row may still have no finite score
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if cfg.guarded else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - (m_use[:, None] - shift) if cfg.descaled else s - m_use[:, None])
        l = alpha * l + p.sum(axis=1)
        if not cfg.v_transposed:
            vt = cfg.cast(v_ref[pl.ds(start, bk), :])
            dims = (((1,), (0,)), ((), ()))
        else:  # V^T tile [Dv, bk]: contract the key axis of both operands.
            vt = cfg.cast(v_ref[:, pl.ds(start, bk)])
            dims = (((1,), (1,)), ((), ()))
        pv = lax.dot_general(p.astype(vt.dtype), vt, dims, precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((bq, dv), jnp.float32),
             jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    if cfg.tiled:  # the VISIBLE key tiles unmasked, then the PARTIAL ones; HIDDEN ones never
        carry = lax.fori_loop(0, count_ref[0], lambda t, c: body(index_ref[0, t], c, masked=False), carry)
        acc, m, l = lax.fori_loop(0, count_ref[1], lambda t, c: body(index_ref[1, t], c, masked=True), carry)
    else:
        carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    if cfg.descaled:
        acc = acc * ov_ref[...]
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l) - shift) / LOG2E


def _tile_operands(cfg: _Config, mask4, kv_lengths, sq: int, sk: int, block_rows: int, block_cols: int,
                   sq_p: int, sk_p: int, by_key: bool) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """A tiled kernel's operands: the padded int8 mask (None without one), and per program's row
    of tiles the counts [..., 4] (VISIBLE tiles, PARTIAL tiles, the batch's key length, 0) and the
    tile indices [..., 2, n]. ``by_key``: rows of tiles per key tile (the dK/dV kernel)."""
    classes = tile_classes(sq, sk, block_rows, block_cols, sq_p, sk_p, causal=cfg.causal, mask4=mask4,
                           kv_lengths=kv_lengths, window=cfg.window)
    counts, index = tile_lists(jnp.swapaxes(classes, 2, 3) if by_key else classes)
    lead = counts.shape[:-1]
    kv_len = jnp.full(lead, sk, jnp.int32) if kv_lengths is None else \
        jnp.broadcast_to(jnp.minimum(kv_lengths.astype(jnp.int32), sk)[:, None, None], lead)
    counts = jnp.concatenate([counts, kv_len[..., None], jnp.zeros(lead + (1,), jnp.int32)], axis=-1)
    return (None if mask4 is None else kernel_mask(mask4, sq_p, sk_p)), counts, index


def _bh(shape) -> Callable:
    """(bi, hi) -> block indices of the B and H axes of an array whose B / H may be 1."""
    full_b, full_h = shape[0] > 1, shape[1] > 1
    return lambda bi, hi: (bi if full_b else 0, hi if full_h else 0)


def _forward(q, k, v, bias, cfg: _Config, descales: tuple[jax.Array, jax.Array] | None = None,
             mask: jax.Array | None = None, kv_lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Run the kernel; returns (o in cfg.o_layout and cfg.out_dtype or q.dtype, lse [B,H,Sq] float32).

    ``descales`` (with cfg.descaled): float32 scalars (score descale in log2 units, output descale).
    ``mask`` (with cfg.has_mask): bool from `masks.mask_4d`; ``kv_lengths`` (cfg.has_lengths): int32 [B].
    """
    if cfg.backend == "mosaic_gpu":
        return mosaic_attention(q, k, v, scale=cfg.scale, causal=cfg.causal, v_layout=cfg.v_layout,
                                blocks=cfg.mosaic_blocks, interpret=cfg.interpret,
                                descales=descales if cfg.descaled else None,
                                out_dtype=cfg.out_dtype or "bfloat16", q_layout=cfg.q_layout,
                                k_layout=cfg.k_layout, o_layout=cfg.o_layout, bias=bias, mask=mask,
                                softcap=cfg.softcap, kv_lengths=kv_lengths, window=cfg.window,
                                alibi=cfg.alibi)
    ql, kl, vl, ol = cfg.q_layout, cfg.k_layout, cfg.v_layout, cfg.o_layout
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, vl, q_layout=ql, k_layout=kl)
    groups = h // hkv
    bq, bk = cfg.block_q, cfg.block_k
    sq_p, sk_p = _round_up(sq, bq), _round_up(sk, bk)
    d_p, dv_p = max(MIN_BLOCK, _next_pow2(d)), max(MIN_BLOCK, _next_pow2(dv))
    qp = _pad_to(q, ql, {"S": sq_p, "D": d_p})
    kp = _pad_to(k, kl, {"S": sk_p, "D": d_p})
    vp = _pad_to(v, vl, {"S": sk_p, "D": dv_p})
    nq = sq_p // bq
    qblk = (lambda i: nq - 1 - i) if cfg.causal else (lambda i: i)
    # grid (query block i, batch bi, head hi)
    q_idx = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi, "S": lambda i, bi, hi: qblk(i)}
    kv_idx = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi // groups}
    in_specs = [
        _spec(ql, {"S": bq, "D": d_p}, q_idx),
        _spec(kl, {"S": sk_p, "D": d_p}, kv_idx),
        _spec(vl, {"S": sk_p, "D": dv_p}, kv_idx),
    ]
    args = [qp, kp, vp]
    if bias is not None:  # one row for all queries (key padding, ALiBi's slope·j): read as that row
        bias4 = _bias_4d(bias, (b, h, sq, sk), one_row=True)
        bias_rows = bias4.shape[2] > 1
        bias4 = _pad_axis(_pad_axis(bias4, 2, sq_p), 3, sk_p) if bias_rows else _pad_axis(bias4, 3, sk_p)
        full_b, full_h = bias4.shape[0] > 1, bias4.shape[1] > 1
        in_specs.append(pl.BlockSpec(
            (None, None, bq if bias_rows else 1, sk_p),
            lambda i, bi, hi: (bi if full_b else 0, hi if full_h else 0, qblk(i) if bias_rows else 0, 0)))
        args.append(bias4)
    if cfg.tiled:
        kmask, counts, index = _tile_operands(cfg, mask, kv_lengths, sq, sk, bq, bk, sq_p, sk_p, by_key=False)
        if kmask is not None:
            mbh, rows = _bh(kmask.shape), kmask.shape[2] > 1
            in_specs.append(pl.BlockSpec((None, None, bq if rows else 1, sk_p),
                                         lambda i, bi, hi: mbh(bi, hi) + (qblk(i) if rows else 0, 0)))
            args.append(kmask)
        tbh = _bh(counts.shape)
        in_specs += [pl.BlockSpec((None, None, None, 4), lambda i, bi, hi: tbh(bi, hi) + (qblk(i), 0)),
                     pl.BlockSpec((None, None, None, 2, index.shape[-1]),
                                  lambda i, bi, hi: tbh(bi, hi) + (qblk(i), 0, 0))]
        args += [counts, index]
    if cfg.descaled:
        for x in descales:
            in_specs.append(pl.BlockSpec((1, 1), lambda i, bi, hi: (0, 0)))
            args.append(jnp.asarray(x, jnp.float32).reshape(1, 1))
    out_dtype = cfg.out_dtype or cfg.compute_dtype or q.dtype
    out_specs = [_spec(ol, {"S": bq, "D": dv_p}, q_idx), _spec("BHS", {"S": bq}, q_idx)]
    out_shape = [jax.ShapeDtypeStruct(layout_shape(ol, {"B": b, "H": h, "S": sq_p, "D": dv_p}), out_dtype),
                 jax.ShapeDtypeStruct((b, h, sq_p), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, sk=sk, nq=nq, has_bias=bias is not None)
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        name=cfg.name("flash_attention"),
        **_compiler_params(cfg, cfg.num_warps, cfg.num_stages),
    )(*args)
    return _crop(o, ol, {"S": sq, "D": dv}), lse[:, :, :sq]


def _backward(cfg: _Config, q, k, v, bias, o, lse, do, mask=None):
    """Plain-JAX recomputation backward for any layouts: runs in BHSD / BHDS order (this
    fallback, used with a bias or backward="jax", may transpose; the Pallas backward does not).
    ``mask``: bool from `masks.mask_4d` (logical order, whatever the layouts)."""
    if cfg.canonical:
        return _backward_canonical(cfg, q, k, v, bias, o, lse, do, mask)
    vc = "BHDS" if cfg.v_transposed else "BHSD"
    ccfg = dataclasses.replace(cfg, q_layout=CANONICAL, k_layout=CANONICAL, o_layout=CANONICAL, v_layout=vc)
    dq, dk, dv, dbias = _backward_canonical(
        ccfg, _relayout(q, cfg.q_layout, CANONICAL), _relayout(k, cfg.k_layout, CANONICAL),
        _relayout(v, cfg.v_layout, vc), bias, _relayout(o, cfg.o_layout, CANONICAL), lse,
        _relayout(do, cfg.o_layout, CANONICAL), mask)
    return (_relayout(dq, CANONICAL, cfg.q_layout), _relayout(dk, CANONICAL, cfg.k_layout),
            _relayout(dv, vc, cfg.v_layout), dbias)


def _backward_canonical(cfg: _Config, q, k, v, bias, o, lse, do, mask=None):
    """Gradients by recomputing P from lse, one chunk of query rows at a time (plain JAX).
    Hidden positions (mask, causal) get exactly zero weight, as in the kernels."""
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
    placeholder = jnp.zeros((n,), f32)  # unused leaf for scan
    biasc = placeholder if bias is None else \
        chunks(jnp.broadcast_to(_bias_4d(bias, (b, h, sq, sk)), (b, h, sq, sk)), sk)
    maskc = placeholder if mask is None else chunks(jnp.broadcast_to(mask, (b, h, sq, sk)), sk)
    cols = jnp.arange(sk)
    hp = lax.Precision.HIGHEST

    def step(carry, xs):
        dk, dvv = carry
        i, qi, doi, lsei, deltai, biasi, maski = xs
        s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kf, precision=hp) * cfg.scale
        t = None
        if cfg.softcap:
            t = jnp.tanh(s / cfg.softcap)
            s = cfg.softcap * t
        if bias is not None:
            s = s + biasi
        p = jnp.exp(s - lsei[..., None])
        if mask is not None:
            p = jnp.where(maski > 0.5, p, 0.0)
        if cfg.causal:
            rows = i * cq + jnp.arange(cq)
            p = jnp.where(rows[:, None] >= cols[None, :], p, 0.0)
        dp = jnp.einsum(f"bkgqd,{v_eq}->bkgqs", doi, vf, precision=hp)
        ds = p * (dp - deltai[..., None])  # d(loss)/d(capped score + bias): the bias gradient
        dsr = ds if t is None else ds * (1.0 - t * t)  # d(loss)/d(scaled q·kᵀ)
        dqi = jnp.einsum("bkgqs,bksd->bkgqd", dsr, kf, precision=hp) * cfg.scale
        dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", dsr, qi, precision=hp) * cfg.scale
        dvv = dvv + jnp.einsum(f"bkgqs,bkgqd->{v_eq}", p, doi, precision=hp)
        return (dk, dvv), (dqi, ds if bias is not None else jnp.zeros((), f32))

    init = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dk, dvv), (dq, ds) = lax.scan(step, init, (jnp.arange(n), qc, doc, lsec, deltac, biasc, maskc))
    dq = jnp.moveaxis(dq, 0, 3).reshape(b, h, sq_p, d)[:, :, :sq]
    dbias = None
    if bias is not None:
        ds = jnp.moveaxis(ds, 0, 3).reshape(b, h, sq_p, sk)[:, :, :sq]
        dbias = _unbroadcast(ds, bias.shape).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dvv.astype(v.dtype), dbias


def _compiler_params(cfg: _Config, warps: int, stages: int) -> dict:
    if cfg.interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return {"compiler_params": plgpu.CompilerParams(num_warps=warps, num_stages=stages)}


def _dot(a, b, ca: int, cb: int, precision):
    """2-D dot_general contracting axis ca of a with axis cb of b, float32 result."""
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                    cfg: _Config, sk: int, nq: int, groups: int, mask_heads: bool = False,
                    list_heads: bool = False):
    """dK, dV for one key tile of one kv head: stream query tiles of all heads in its group.
    ``mask_heads`` / ``list_heads``: the mask / tile-list blocks hold the group's heads (else one
    for all)."""
    refs = list(refs)
    mask_ref = refs.pop(0) if cfg.has_mask else None
    count_ref, index_ref = (refs.pop(0), refs.pop(0)) if cfg.tiled else (None, None)
    dk_ref, dv_ref = refs
    bq, bk = cfg.bwd_blocks[0], cfg.bwd_blocks[1]
    kj = pl.program_id(0)
    k = cfg.cast(k_ref[...])
    v = cfg.cast(v_ref[...])  # [bk, Dv] (D minor) or V^T [Dv, bk] (S minor)
    # q / dO / delta blocks hold the group's heads: [groups, Sq, ...] or [Sq, groups, ...]
    q_h_first = cfg.q_layout.index("H") < cfg.q_layout.index("S")
    o_h_first = cfg.o_layout.index("H") < cfg.o_layout.index("S")
    precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
    qk_scale = cfg.scale * LOG2E
    if cfg.causal:
        i0 = jnp.minimum(lax.div(kj * bk, bq), nq)
        i_full = jnp.minimum(lax.div((kj + 1) * bk - 1 + bq - 1, bq), nq)
    else:
        i0, i_full = 0, jnp.int32(0)
    # A tile holding padded keys (kj >= sk // bk) masks every query tile. Integer arithmetic
    # rather than a scalar select, which the Triton lowering mistypes.
    has_pad = jnp.clip(kj - sk // bk + 1, 0, 1)
    i_full = jnp.minimum(i_full + has_pad * nq, nq)

    def body(i, carry, g: int, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(start, bq)
        q = cfg.cast(_group_rows(q_ref, g, rows, q_h_first))
        do = _group_rows(do_ref, g, rows, o_h_first)
        lse = lse_ref[g, rows]  # log2 units
        delta = _group_rows(delta_ref, g, rows, o_h_first)
        s, t = _scores(_dot(q, k, 1, 1, precision), cfg, qk_scale)
        p = jnp.exp2(s - lse[:, None])
        if masked:
            rid = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            cols = kj * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            if cfg.tiled:
                mask_tile = None
                if cfg.has_mask:
                    mrows = rows if mask_ref.shape[-2] > 1 else pl.ds(0, 1)
                    mask_tile = _at(mask_ref, g if mask_heads else None, mrows, slice(None))
                kv_len = _at(count_ref, g if list_heads else None, 2)
                keep = _tile_keep(cfg, rid, cols, sk, mask_tile, kv_len)
            else:
                keep = cols < sk
                if cfg.causal:
                    keep = keep & (rid >= cols)
            p = jnp.where(keep, p, 0.0)
        if not cfg.v_transposed:
            dp = _dot(do, v, 1, 1, precision)
            dv = dv + _dot(p.astype(do.dtype), do, 0, 0, precision)  # [bk, Dv]
        else:
            dp = _dot(do, v, 1, 0, precision)
            dv = dv + _dot(do, p.astype(do.dtype), 0, 0, precision)  # dV^T [Dv, bk]
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, precision)
        return dk, dv

    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    for g in range(groups):
        if cfg.tiled:  # this key tile's VISIBLE query tiles, then its PARTIAL ones
            mg = g if list_heads else None
            for cls, masked in ((0, False), (1, True)):
                carry = lax.fori_loop(
                    0, _at(count_ref, mg, cls),
                    lambda t, c, cls=cls, masked=masked, g=g, mg=mg: body(
                        _at(index_ref, mg, cls, t), c, g=g, masked=masked), carry)
            continue
        if cfg.causal or sk % bk:
            carry = lax.fori_loop(i0, i_full, functools.partial(body, g=g, masked=True), carry)
        carry = lax.fori_loop(i_full, nq, functools.partial(body, g=g, masked=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, sk: int):
    """dQ for one query tile of one head: stream its kv head's key tiles."""
    refs = list(refs)
    mask_ref = refs.pop(0) if cfg.has_mask else None
    count_ref, index_ref = (refs.pop(0), refs.pop(0)) if cfg.tiled else (None, None)
    (dq_ref,) = refs
    bq, bk = cfg.bwd_blocks[2], cfg.bwd_blocks[3]
    qi = pl.program_id(0)
    q, do = cfg.cast(q_ref[...]), do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qk_scale = cfg.scale * LOG2E
    nk, n_clean = -(-sk // bk), sk // bk
    if cfg.causal:
        n_full = jnp.minimum(lax.div(qi * bq + 1, bk), n_clean)
        n_end = jnp.minimum(lax.div((qi + 1) * bq + bk - 1, bk), nk)
    else:
        n_full, n_end = n_clean, nk

    def body(j, dq, masked: bool):
        start = pl.multiple_of(j * bk, bk)
        k = cfg.cast(k_ref[pl.ds(start, bk), :])
        s, t = _scores(_dot(q, k, 1, 1, precision), cfg, qk_scale)
        p = jnp.exp2(s - lse[:, None])
        if masked:
            rows = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            if cfg.tiled:
                mask_tile = mask_ref[:, pl.ds(start, bk)] if cfg.has_mask else None
                keep = _tile_keep(cfg, rows, cols, sk, mask_tile, count_ref[2])
            else:
                keep = cols < sk
                if cfg.causal:
                    keep = keep & (rows >= cols)
            p = jnp.where(keep, p, 0.0)
        if not cfg.v_transposed:
            dp = _dot(do, cfg.cast(v_ref[pl.ds(start, bk), :]), 1, 1, precision)
        else:
            dp = _dot(do, cfg.cast(v_ref[:, pl.ds(start, bk)]), 1, 0, precision)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, precision)

    dq = jnp.zeros(dq_ref.shape, jnp.float32)
    if cfg.tiled:
        dq = lax.fori_loop(0, count_ref[0], lambda t, c: body(index_ref[0, t], c, masked=False), dq)
        dq = lax.fori_loop(0, count_ref[1], lambda t, c: body(index_ref[1, t], c, masked=True), dq)
    else:
        dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
        dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward_pallas(cfg: _Config, q, k, v, o, lse, do, mask=None, kv_lengths=None):
    """dQ, dK, dV with two Pallas kernels (no atomics): one over key tiles, one over query tiles.
    Every operand and gradient stays in its own layout. ``mask``: bool from `masks.mask_4d`;
    ``kv_lengths``: int32 [B] (with cfg.has_lengths)."""
    ql, kl, vl, ol = cfg.q_layout, cfg.k_layout, cfg.v_layout, cfg.o_layout
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, vl, q_layout=ql, k_layout=kl)
    groups = h // hkv
    bq1, bk1, bq2, bk2 = cfg.bwd_blocks
    sq_p, sk_p = _round_up(sq, max(bq1, bq2)), _round_up(sk, max(bk1, bk2))
    d_p, dv_p = max(MIN_BLOCK, _next_pow2(d)), max(MIN_BLOCK, _next_pow2(dv))
    dl = ol.replace("D", "")  # delta = rowsum(o * dO) keeps o's order of B, H, S
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=ol.index("D"))
    qp = _pad_to(q, ql, {"S": sq_p, "D": d_p})
    kp = _pad_to(k, kl, {"S": sk_p, "D": d_p})
    vp = _pad_to(v, vl, {"S": sk_p, "D": dv_p})
    dop = _pad_to(do.astype(cfg.compute_dtype or q.dtype), ol, {"S": sq_p, "D": dv_p})
    lse2 = _pad_axis(lse * LOG2E, 2, sq_p)
    deltap = _pad_to(delta, dl, {"S": sq_p})
    args = (qp, kp, vp, dop, lse2, deltap)

    # dK / dV: grid (key block j, batch bi, kv head hi); query-side blocks hold the whole group
    nk1 = sk_p // bk1
    grp = {"B": lambda j, bi, hi: bi, "H": lambda j, bi, hi: hi}
    key = {**grp, "S": lambda j, bi, hi: j}
    k_spec = _spec(kl, {"S": bk1, "D": d_p}, key)
    v_spec = _spec(vl, {"S": bk1, "D": dv_p}, key)
    mask_specs, mask_args, mask_heads, list_heads = [], [], False, False
    if cfg.tiled:  # blocks of the group's heads where the mask / lists have H, else the one head
        kmask, counts, index = _tile_operands(cfg, mask, kv_lengths, sq, sk, bq1, bk1, sq_p, sk_p, by_key=True)
        if kmask is not None:
            mbh, mask_heads, rows = _bh(kmask.shape), kmask.shape[1] > 1, kmask.shape[2] > 1
            mask_specs.append(pl.BlockSpec((None, groups if mask_heads else None, sq_p if rows else 1, bk1),
                                           lambda j, bi, hi: mbh(bi, hi) + (0, j)))
            mask_args.append(kmask)
        tbh, list_heads = _bh(counts.shape), counts.shape[1] > 1
        hb = groups if list_heads else None
        mask_specs += [pl.BlockSpec((None, hb, None, 4), lambda j, bi, hi: tbh(bi, hi) + (j, 0)),
                       pl.BlockSpec((None, hb, None, 2, index.shape[-1]), lambda j, bi, hi: tbh(bi, hi) + (j, 0, 0))]
        mask_args += [counts, index]
    dk, dvv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, sk=sk, nq=sq_p // bq1, groups=groups,
                          mask_heads=mask_heads, list_heads=list_heads),
        grid=(nk1, b, hkv),
        in_specs=[
            _spec(ql, {"H": groups, "S": sq_p, "D": d_p}, grp),
            k_spec,
            v_spec,
            _spec(ol, {"H": groups, "S": sq_p, "D": dv_p}, grp),
            _spec("BHS", {"H": groups, "S": sq_p}, grp),
            _spec(dl, {"H": groups, "S": sq_p}, grp),
        ] + mask_specs,
        out_specs=[k_spec, v_spec],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        interpret=cfg.interpret,
        name=cfg.name("flash_attention_bwd_dkv"),
        **_compiler_params(cfg, cfg.bwd_warps, cfg.bwd_stages),
    )(*args, *mask_args)

    # dQ: grid (query block i, batch bi, head hi)
    qrow = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi, "S": lambda i, bi, hi: i}
    kvh = {"B": lambda i, bi, hi: bi, "H": lambda i, bi, hi: hi // groups}
    q_spec = _spec(ql, {"S": bq2, "D": d_p}, qrow)
    mask_specs, mask_args = [], []
    if cfg.tiled:
        kmask, counts, index = _tile_operands(cfg, mask, kv_lengths, sq, sk, bq2, bk2, sq_p, sk_p, by_key=False)
        if kmask is not None:
            mbh, rows = _bh(kmask.shape), kmask.shape[2] > 1
            mask_specs.append(pl.BlockSpec((None, None, bq2 if rows else 1, sk_p),
                                           lambda i, bi, hi: mbh(bi, hi) + (i if rows else 0, 0)))
            mask_args.append(kmask)
        tbh = _bh(counts.shape)
        mask_specs += [pl.BlockSpec((None, None, None, 4), lambda i, bi, hi: tbh(bi, hi) + (i, 0)),
                       pl.BlockSpec((None, None, None, 2, index.shape[-1]), lambda i, bi, hi: tbh(bi, hi) + (i, 0, 0))]
        mask_args += [counts, index]
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg, sk=sk),
        grid=(sq_p // bq2, b, h),
        in_specs=[
            q_spec,
            _spec(kl, {"S": sk_p, "D": d_p}, kvh),
            _spec(vl, {"S": sk_p, "D": dv_p}, kvh),
            _spec(ol, {"S": bq2, "D": dv_p}, qrow),
            _spec("BHS", {"S": bq2}, qrow),
            _spec(dl, {"S": bq2}, qrow),
        ] + mask_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        interpret=cfg.interpret,
        name=cfg.name("flash_attention_bwd_dq"),
        **_compiler_params(cfg, cfg.bwd_warps, cfg.bwd_stages),
    )(*args, *mask_args)
    return (_crop(dq, ql, {"S": sq, "D": d}), _crop(dk, kl, {"S": sk, "D": d}),
            _crop(dvv, vl, {"S": sk, "D": dv}))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, bias, mask, kv_lengths, cfg: _Config):
    return _forward(q, k, v, bias, cfg, mask=mask, kv_lengths=kv_lengths)[0]


def _flash_fwd(q, k, v, bias, mask, kv_lengths, cfg: _Config):
    o, lse = _forward(q, k, v, bias, cfg, mask=mask, kv_lengths=kv_lengths)
    return o, (q, k, v, bias, mask, kv_lengths, o, lse)


def _reference_mask(cfg: _Config, mask, kv_lengths, sq: int, sk: int) -> jax.Array | None:
    """The boolean mask (causal aside) that gives the reference this call's hidden positions."""
    keep = index_keep(sq, sk, kv_lengths=kv_lengths, window=cfg.window)
    if keep is None or mask is None:
        return mask if keep is None else keep
    return mask & keep


def _alibi_bias(cfg: _Config, lse: jax.Array, k: jax.Array) -> jax.Array:
    """The call's ALiBi materialised (for the kernels and the reference that read a bias)."""
    return cfg.alibi.bias(lse.shape[2], k.shape[cfg.k_layout.index("S")])


def _kernel_grads(cfg: _Config, q, k, v, bias, mask, kv_lengths, o, lse, do):
    """dq, dk, dv, dbias of the kernels (dbias None without a bias; ALiBi slopes are constants)."""
    if cfg.backward == "mosaic_gpu":  # `backward_kernels` took it only inside its contract
        return mosaic_attention_backward(
            q, k, v, o, lse, do, scale=cfg.scale, causal=cfg.causal, v_layout=cfg.v_layout,
            q_layout=cfg.q_layout, k_layout=cfg.k_layout, o_layout=cfg.o_layout,
            interpret=cfg.interpret, bias=bias, mask=mask, kv_lengths=kv_lengths, window=cfg.window,
            softcap=cfg.softcap, alibi=cfg.alibi)
    if cfg.alibi is not None:  # the other backwards read the bias: the plain-JAX recomputation
        plain = dataclasses.replace(cfg, alibi=None, backward="jax")
        return (*_kernel_grads(plain, q, k, v, _alibi_bias(cfg, lse, k), mask, kv_lengths, o, lse, do)[:3], None)
    if cfg.backward == "pallas" and bias is None:
        return (*_backward_pallas(cfg, q, k, v, o, lse, do, mask=mask, kv_lengths=kv_lengths), None)
    keep = _reference_mask(cfg, mask, kv_lengths, lse.shape[2], k.shape[cfg.k_layout.index("S")])
    if cfg.compute_dtype is None:
        return _backward(cfg, q, k, v, bias, o, lse, do, keep)
    # plain-JAX recomputation: on the cast operands, gradients cast back (as the unfused cast's vjp)
    dq, dk, dv, dbias = _backward(cfg, *(cfg.cast(x) for x in (q, k, v)), bias, o, lse, do, keep)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _flash_bwd(cfg: _Config, res, do):
    return (*_kernel_grads(cfg, *res, do), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

#: The guarded fast path's margin (natural-log units): its result stands when, in every row,
#: log-sum-exp of the visible scores exceeds the fill by more than this plus log(Sk). Then the
#: skipped hidden scores, whose total weight is at most Sk·exp(fill - lse) < exp(-110) ≈ 1.7e-48,
#: are below float32's smallest denormal relative to the row, so giving them exactly zero weight
#: (as the kernels do) changes no float32 result.
GUARD_MARGIN = 110.0


def _needs_reference(cfg: _Config, o: jax.Array, lse: jax.Array, sk: int, empty: jax.Array | None) -> jax.Array:
    """Scalar bool: the kernels' result may differ from the op's (`GUARD_MARGIN`), a row other
    than the ``empty`` ones (no key kept; their result is set apart) has no visible score (lse
    -inf), or the result is not finite (NaN / Inf inputs)."""
    margin = lse - jnp.float32(math.log(sk)) - jnp.float32(cfg.mask_fill)  # +inf for a -inf fill
    ok = jnp.isfinite(lse) & (margin > GUARD_MARGIN)
    if empty is not None:
        ok = ok | empty
    return jnp.logical_not(jnp.all(ok) & jnp.all(jnp.isfinite(o)))


def _empty_rows(cfg: _Config, mask, kv_lengths, b: int, h: int, sq: int, sk: int) -> jax.Array | None:
    """bool [B, H, Sq]: rows in which the mask, key lengths, window and causal flag keep no key,
    for a finite fill (their output is the uniform average of V); None for a -inf fill (such rows
    are NaN: the reference runs the call) or when no row can be empty."""
    if not math.isfinite(cfg.mask_fill) or not cfg.tiled:
        return None  # causal alone keeps key 0 in every row
    keep = _reference_mask(cfg, mask, kv_lengths, sq, sk)
    if cfg.causal:
        keep = keep & causal_mask(sq, sk)
    return jnp.broadcast_to(~jnp.any(keep, axis=-1), (b, h, sq))


def _uniform_rows(cfg: _Config, o: jax.Array, v: jax.Array, empty: jax.Array) -> jax.Array:
    """o with its ``empty`` rows replaced by the mean of V over every key (in o's layout)."""
    b, h, sq = empty.shape
    vm = jnp.mean(cfg.cast(v).astype(jnp.float32), axis=cfg.v_layout.index("S"), keepdims=True)
    vm = _relayout(vm, cfg.v_layout, CANONICAL)  # [B, Hkv, 1, Dv]
    vm = jnp.repeat(vm, h // vm.shape[1], axis=1)
    fill = _relayout(vm.astype(o.dtype), CANONICAL, cfg.o_layout)
    return jnp.where(_relayout(empty[..., None], CANONICAL, cfg.o_layout), fill, o)


def _uniform_rows_dv(cfg: _Config, do: jax.Array, empty: jax.Array, hkv: int, sk: int) -> jax.Array:
    """The gradient w.r.t. V (float32, V's layout) of the uniform average in the ``empty`` rows:
    each key gets dO / Sk of every such row of its query heads."""
    b, h, _ = empty.shape
    d = _relayout(do, cfg.o_layout, CANONICAL).astype(jnp.float32)
    w = jnp.sum(jnp.where(empty[..., None], d, 0.0), axis=2) / sk  # [B, H, Dv]
    w = w.reshape(b, hkv, h // hkv, -1).sum(axis=2)[:, :, None, :]
    return _relayout(jnp.broadcast_to(w, (b, hkv, sk, w.shape[-1])), CANONICAL, cfg.v_layout)


def _reference(cfg: _Config, mask, q, k, v, bias):
    if cfg.alibi is not None:
        bias = cfg.alibi.bias(q.shape[cfg.q_layout.index("S")], k.shape[cfg.k_layout.index("S")])
    return attention_reference(q, k, v, scale=cfg.scale, causal=cfg.causal, v_layout=cfg.v_layout,
                               bias=bias, mask=mask, q_layout=cfg.q_layout, k_layout=cfg.k_layout,
                               o_layout=cfg.o_layout, compute_dtype=cfg.compute_dtype,
                               mask_fill=cfg.mask_fill, softcap=cfg.softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _guarded(q, k, v, bias, mask, kv_lengths, cfg: _Config):
    return _guarded_fwd(q, k, v, bias, mask, kv_lengths, cfg)[0]


def _guarded_fwd(q, k, v, bias, mask, kv_lengths, cfg: _Config):
    o, lse = _forward(q, k, v, bias, cfg, mask=mask, kv_lengths=kv_lengths)
    b, h, sq = lse.shape
    sk = k.shape[cfg.k_layout.index("S")]
    empty = _empty_rows(cfg, mask, kv_lengths, b, h, sq, sk)
    if empty is not None:  # rows that keep no key: every score is the fill, a uniform average
        o, lse = _uniform_rows(cfg, o, v, empty), jnp.where(empty, 0.0, lse)
    use_reference = _needs_reference(cfg, o, lse, sk, empty)
    keep = lambda: _reference_mask(cfg, mask, kv_lengths, sq, sk)  # noqa: E731 - only if taken
    o = lax.cond(use_reference, lambda: _reference(cfg, keep(), q, k, v, bias), lambda: o)
    return o, (q, k, v, bias, mask, kv_lengths, o, lse, use_reference, empty)


def _guarded_bwd(cfg: _Config, res, do):
    q, k, v, bias, mask, kv_lengths, o, lse, use_reference, empty = res
    sk = k.shape[cfg.k_layout.index("S")]

    def reference_grads():
        keep = _reference_mask(cfg, mask, kv_lengths, lse.shape[2], sk)
        if bias is None:
            return (*jax.vjp(lambda q, k, v: _reference(cfg, keep, q, k, v, None), q, k, v)[1](do), None)
        return jax.vjp(functools.partial(_reference, cfg, keep), q, k, v, bias)[1](do)

    def kernel_grads():  # the empty rows' weights are zero in the kernels (lse 0 there, all masked)
        dq, dk, dv, dbias = _kernel_grads(cfg, q, k, v, bias, mask, kv_lengths, o, lse, do)
        if empty is not None:
            hkv = k.shape[cfg.k_layout.index("H")]
            dv = (dv.astype(jnp.float32) + _uniform_rows_dv(cfg, do, empty, hkv, sk)).astype(dv.dtype)
        return dq, dk, dv, dbias

    grads = lax.cond(use_reference, reference_grads, kernel_grads)
    return (*grads, None, None)


_guarded.defvjp(_guarded_fwd, _guarded_bwd)


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
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    backward: str = "pallas",
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    compute_dtype: str | None = None,
    backend: str = "auto",
    mosaic_blocks: MosaicBlocks | None = None,
    mask: jax.Array | None = None,
    mask_fill: float = MASK_VALUE,
    softcap: float = 0.0,
    kv_lengths: jax.Array | None = None,
    window: int | None = None,
    alibi: Alibi | None = None,
) -> jax.Array:
    """Pallas flash attention with the semantics of `attention_reference`.

    q [B,H,Sq,D]; k [B,Hkv,Sk,D]; v [B,Hkv,Sk,Dv] ("BHSD") or [B,Hkv,Dv,Sk] ("BHDS").
    Returns [B,H,Sq,Dv] in q.dtype. Other physical layouts are read and written in place:
    ``q_layout``, ``k_layout``, ``o_layout`` any permutation of "BHSD" with D last (e.g. "BSHD"),
    ``v_layout`` any with D last or S last (transposed V, e.g. "HDBS"); gradients come back in
    the operands' layouts (see `kernel_supports_layouts`). `bias` is additive, broadcastable to
    [B,H,Sq,Sk] (logical order), and differentiable. block_q / block_k override the tables
    (powers of two, >= 16) for the forward and both backward kernels; num_warps / num_stages
    override the forward kernel's Triton settings (bench/tune_attention.py sweeps all four). `interpret=None` runs
    interpret mode unless the default backend is a GPU. `backward`: "pallas" (dK/dV and dQ
    Triton kernels), "mosaic_gpu" (the same split on Hopper, kernels/mosaic_backward.py; opt-in,
    as is EQSAT_ATTN_MOSAIC_BWD=1 with the forward on Mosaic GPU; a call outside its contract
    warns with the reason and runs "pallas", see `backward_kernels`) or "jax" (blockwise
    recomputation in plain JAX); calls with a bias use "jax", which also yields the bias
    gradient, unless the Mosaic GPU backward runs them (it gives dbias too). ``compute_dtype`` (a folded cast prologue): the
    kernels read q, k, v in their own dtypes and cast every loaded tile to it before the matmuls
    (the values of ``flash_attention(q.astype(dt), ...)``, without the converted copies); the
    output is in it, the gradients in q's, k's and v's own dtypes. ``backend`` (`pallas_backend`):
    the forward on "triton", on "mosaic_gpu" (Hopper; ``mosaic_blocks`` overrides its
    `mosaic_attention.BLOCK_TABLE` tiles) or "auto" (Mosaic GPU on a Hopper GPU when the call is
    in its contract and `auto_takes_mosaic`, else Triton); the backward kernels are Triton's
    either way.

    Score modifications (both forward backends; on Mosaic GPU see kernels/mosaic_scores.py,
    16-bit operands): ``softcap`` (> 0: scores become
    softcap·tanh(s / softcap) before the bias, in every kernel), a boolean ``mask`` (True keeps,
    broadcastable to [B,H,Sq,Sk]; its per-tile map lets the kernels skip hidden tiles and mask
    only partial ones, kernels/masks.py) and the fill ``mask_fill`` hidden scores get. With a
    mask, or causal with a fill above MASK_VALUE, the call is guarded: the kernels give hidden
    scores zero weight; a row that keeps no key at all is, with a finite fill, set to the
    uniform average of V (its value in the op; dV gets dO / Sk); and where any other row's
    visible log-sum-exp is not `GUARD_MARGIN` (110) above fill + log(Sk) (or is -inf: e.g.
    every kept score -inf, or a -inf fill with a row that keeps no key), or the result is not
    finite, `lax.cond` runs `attention_reference` on the whole call instead (forward and
    gradients). So the result is the op's, and the fast path is taken whenever every row that
    keeps a key has a visible score at least 110 above the fill (always for fill -inf or
    MASK_VALUE and finite inputs).
    Two kernel-level forms of a mask, computed from indices in the kernels (no mask array), with
    the semantics of `attention_reference` given the equivalent boolean mask (`masks.index_keep`):
    ``kv_lengths`` (int32 [B]: query rows of batch b see keys j < kv_lengths[b]) and ``window``
    (a sliding window: row i sees keys i - window < j <= i). Both are guarded like a mask.
    ``alibi`` (`alibi.Alibi`, static slopes; not with ``bias``): the bias
    slope·(row_coef·i + col_coef·j + offset), computed in the kernels on Mosaic GPU (forward and
    backward; no bias read), materialised for Triton (one row [.., 1, Sk] when it has no query
    term) and the reference; the slopes get no gradient.
    """
    if backward not in FLASH_BACKWARDS:
        raise ValueError(f"backward must be one of {FLASH_BACKWARDS}, got {backward!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (keys i - window < j <= i), got {window!r}")
    if math.isnan(mask_fill) or mask_fill == math.inf:
        raise ValueError(f"mask_fill={mask_fill} is not a kernel fill (NaN / +inf hidden scores); "
                         "run attention_reference (kernel='reference') instead")
    error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if error is not None:
        raise ValueError(error)
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if kv_lengths is not None:
        if jnp.shape(kv_lengths) != (b,) or not jnp.issubdtype(jnp.result_type(kv_lengths), jnp.integer):
            raise ValueError(f"kv_lengths must be an integer array of shape [B] = ({b},), got "
                             f"{jnp.shape(kv_lengths)} {jnp.result_type(kv_lengths)}")
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if alibi is not None:
        if bias is not None:
            raise ValueError("pass a bias or ALiBi slopes (alibi=), not both")
        alibi.check(b, h, sq, sk)
    # what the backends' contracts see of ALiBi: a bias with one row (Mosaic GPU computes it)
    bias_like = bias if alibi is None else jax.ShapeDtypeStruct((1, 1, 1, sk), jnp.float32)
    tq, tk, warps, stages = block_sizes(sq, sk, max(d, dv), bool(causal), v_layout[-1] == "S")
    bq, bk = block_q or tq, block_k or tk
    for name, blk in (("block_q", bq), ("block_k", bk)):
        if blk < MIN_BLOCK or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= {MIN_BLOCK}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bq1, bk1, bq2, bk2, bwarps, bstages = bwd_block_sizes(sq, sk, max(d, dv))
    bwd_blocks = (block_q or bq1, block_k or bk1, block_q or bq2, block_k or bk2)
    warps, stages = num_warps or warps, num_stages or stages
    chosen = pallas_backend(
        q, k, v, backend=backend, interpret=bool(interpret),
        tiles_given=any(x is not None for x in (block_q, block_k, num_warps, num_stages)),
        v_layout=v_layout, causal=bool(causal), scale=float(scale), bias=bias_like,
        compute_dtype=compute_dtype, q_layout=q_layout, k_layout=k_layout, o_layout=o_layout,
        blocks=mosaic_blocks, mask=True if mask is not None or kv_lengths is not None or window else None,
        mask_fill=float(mask_fill), softcap=float(softcap))
    masked = mask is not None or kv_lengths is not None or window is not None
    if alibi is not None and chosen != "mosaic_gpu":  # the other kernels read a bias
        bias = bias_like = alibi.bias(sq, sk)
        alibi = None
    backward, refused = backward_kernels(
        q, k, v, backward=backward, forward_backend=chosen, bias=bias_like, masked=masked,
        softcap=float(softcap), compute_dtype=compute_dtype,
        guarded=bool(causal) and float(mask_fill) > MASK_VALUE, v_layout=v_layout,
        q_layout=q_layout, k_layout=k_layout, o_layout=o_layout, interpret=bool(interpret))
    if refused is not None:
        warnings.warn(f"the Mosaic GPU attention backward cannot run this call: {refused}; the "
                      "Triton backward runs instead", stacklevel=2)
    cfg = _Config(float(scale), bool(causal), v_layout, bq, bk, warps, stages, bool(interpret),
                  backward, bwd_blocks, bwarps, bstages, q_layout=q_layout, k_layout=k_layout,
                  o_layout=o_layout,
                  compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype).name,
                  backend=chosen, mosaic_blocks=mosaic_blocks, softcap=float(softcap),
                  mask_fill=float(mask_fill), has_mask=mask is not None, has_lengths=kv_lengths is not None,
                  window=window, alibi=alibi)
    mask4 = None if mask is None else mask_4d(mask, (b, h, sq, sk))
    return (_guarded if cfg.guarded else _flash)(q, k, v, bias, mask4, kv_lengths, cfg)
