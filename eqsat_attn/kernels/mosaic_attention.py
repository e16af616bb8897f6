"""Pallas Mosaic GPU flash attention for Hopper (sm_90): the fast forward path.

FlashAttention-3's structure written with Pallas's Mosaic GPU backend. A CTA owns ``2 * block_q``
query rows of one (batch, head): two compute warpgroups take ``block_q`` rows each and a third,
producer warpgroup streams K and V tiles into shared memory with TMA, ``stages`` slots deep, each
slot signalled on a barrier when it lands and released by both consumers when they are done with
it. The consumers run Q·Kᵀ and P·V on the tensor cores with wgmma (accumulators in registers, P
fed from registers) and the online softmax in between (exp2 with ``scale * log2(e)`` folded in);
a scheduling barrier staggers the two warpgroups so that one's softmax overlaps the other's
matmuls. Two schedules (`MosaicBlocks.overlap`, chosen per shape by bench/tune_attention.py):

* attention_mgpu's (default): per key tile Q·Kᵀ, softmax, P·V, the warpgroups meeting at one
  rendezvous barrier (`_Warpgroup.alternating_loop`).
* FlashAttention-3's intra-warpgroup overlap: Q·Kᵀ of tile j and P·V of tile j-1 are issued as two
  wgmma groups, the scores awaited alone (``wgmma_wait 1``) so tile j's softmax runs while P·V is
  on the tensor cores; the warpgroups take strict turns issuing, each waiting on its own barrier
  and arriving on the other's (`_Warpgroup.overlapped_loop`).

Both V layouts of the Attention op are read in place:

* ``"BHSD"``: V is [B, Hkv, Sk, D]; a [block_kv, D] tile is wgmma's B operand as stored
  (sequence-major, which the tensor core reads with a transposing load for 16-bit types).
* ``"BHDS"`` (transposed V): V is [B, Hkv, D, Sk]; the producer loads a [D, block_kv] box of that
  array (TMA over its last two axes) and wgmma reads it transposed, i.e. K-major, the operand order
  the tensor core takes natively, the same as K's in Q·Kᵀ. Nothing is transposed in memory.

More generally every operand has its own layout (a permutation of "BHSD"), read and written in
place as strided TMA boxes (`_Plan.window`): D minor for q, k and o, D or S minor for v; so
[B,S,H,D] operands (Flax, `jax.nn.dot_product_attention`) need no copies either.

Contract (`mosaic_unsupported` says which part a call misses; callers then use the Triton
kernel): q, k, v all bf16 or all f16 (or fp8 with transposed V, below), D = Dv in `BLOCK_TABLE`
(64, 128, 256), Sq a multiple of ``2 * block_q`` (128), Sk of 64 (`default_blocks` fits the key
tile to it; fp8: of 128), no cast prologue, positive scale.
Causal masking is top-left aligned (query i sees keys j <= i) and visits only the key tiles that
intersect the triangle. GQA reads the kv head ``h // (H / Hkv)``; K and V are never repeated.
Score modifications (16-bit operands; kernels/mosaic_scores.py): a soft-cap, an additive bias (its
[block_q, block_kv] tile read from global memory per key tile), and hidden positions (a boolean
mask, key lengths, a sliding window) walked as per-CTA tile lists: HIDDEN tiles are never loaded,
VISIBLE ones run without masking code, PARTIAL ones apply the mask tile
(`_Warpgroup.tile_extras`, `_Warpgroup.modified_softmax`).
Returns o [B,H,Sq,D] (in ``o_layout``) in q's dtype and the natural-log log-sum-exp [B,H,Sq]
float32: the residuals of the Triton forward, so jax.grad runs the shared backward kernels.

fp8 (e4m3/e5m2 operands with runtime descales, output bf16) needs transposed V: Hopper's fp8
wgmma reads both operands K-major only (Mosaic GPU refuses a sequence-major V tile). P is
computed as 256·P and staged through shared memory as fp8 for P·V, or, with
``MosaicBlocks(fp8_p_registers=True)``, kept in registers and relaid into wgmma's 8-bit operand
layout by quad shuffles and byte permutes (`_quad_exchange_to_8bit`; its compiled GPU tests pass
on an H200; off by default: its speed against the shared-memory path was -13% to +3% across rows).

Interpret mode (``interpret=True``, any backend): jax's Mosaic GPU interpreter simulates the
warpgroups, TMA copies and barriers, but (jax 0.11/0.12) takes wgmma's A operand only from shared
memory and does not run ``pl.run_state``. There P is staged through a shared-memory tile and each
P·V lands in a fresh accumulator that is then added: `_accumulate_pv` and `_scores_and_pv` are the
places where the interpreted and the compiled kernels differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .alibi import Alibi
from .masks import mask_4d
from .mosaic_scores import NONE, ScoreMods, kept, log2_scores, prepare, safe_max
from .reference import MASK_VALUE, check_shapes, kernel_layout_error, layout_shape

try:  # jaxlib's MLIR bindings (the Mosaic GPU backend needs them; absent from some minimal builds)
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
except ImportError:  # pragma: no cover - exercised only on such builds
    ir = arith = None


class OnFirstUse:
    """A module imported on its first attribute access. Pallas's Mosaic GPU backend takes ~0.2 s
    to import, and only a Hopper GPU or its interpreter runs it: ``import eqsat_attn`` (and a
    CPU user's first call) does not pay for it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


plgpu = OnFirstUse("jax.experimental.pallas.mosaic_gpu")
mgpu_fa = OnFirstUse("jax.experimental.mosaic.gpu.fragmented_array")
mgpu_utils = OnFirstUse("jax.experimental.mosaic.gpu.utils")


@functools.cache
def mosaic_gpu_available() -> bool:
    """Whether this jax has the Pallas Mosaic GPU backend (jax >= 0.4.3x; absent from some
    minimal builds). Imports it."""
    if ir is None:
        return False
    try:
        importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except ImportError:  # pragma: no cover - exercised only on such builds
        return False
    return True

__all__ = ["BLOCK_TABLE", "FP8_BLOCK_TABLE", "MosaicBlocks", "OnFirstUse", "TUNED_BLOCKS", "default_blocks",
           "hopper_gpu", "mosaic_attention", "mosaic_gpu_available", "mosaic_packed_attention", "mosaic_unsupported"]

LOG2E: float = math.log2(math.e)
LN2: float = math.log(2.0)
COMPUTE_WARPGROUPS = 2
DTYPES = ("bfloat16", "float16")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
#: fp8 probabilities are computed as P_FP8_SCALE·P before their cast (exp2 with a shifted
#: exponent, no multiply), keeping small weights in e4m3's normal range; the row sum carries the
#: same factor, so it cancels in acc / l (as in the Triton fp8 kernel).
P_FP8_SCALE = 256.0
# Two warpgroups of softmax math want more registers than the producer, which only issues TMAs.
_CONSUMER_REGISTERS, _PRODUCER_REGISTERS = 232, 40
# cuda runtimes whose ptxas miscompiles the causal kernel (as jax's attention_mgpu notes)
_BAD_CAUSAL_CUDA = range(12080, 12091)


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Mosaic GPU kernel.

    block_q: query rows per compute warpgroup (a CTA covers ``2 * block_q``); block_kv: keys per
    step; stages: K/V shared-memory slots in flight. Both blocks are multiples of 64 (the 128-byte
    swizzled tile of a 16-bit row). overlap: FlashAttention-3's intra-warpgroup pipelining (each
    warpgroup issues Q·Kᵀ of tile j and P·V of tile j-1 together and runs tile j's softmax while
    the P·V is on the tensor cores; the two warpgroups strictly alternate issuing), else
    attention_mgpu's schedule (softmax, then P·V of the same tile). fp8_p_registers: fp8 only,
    P reaches the P·V wgmma in registers, relaid into its 8-bit operand layout by quad shuffles
    and byte permutes (`_fp8_p_operand`, FlashAttention-3's way), instead of through a
    shared-memory tile (a store and a fence per key tile). Right on an H200, not faster there:
    +2.3-2.8% at S4096, S8192 and S8192 causal, -12.8% at S4096 causal, in one interleaved run
    (bench/results/attention-fp8-nvidia-h200-2026-11-26-run2.md), so off by default.
    heavy_first: causal only, the query tiles run in reverse, so the CTAs with the most key tiles
    start first and the last wave holds the shortest (FlashAttention-3's order against the tail
    of a causal grid). Right on an H200, not faster there: -4% to +4% at D128, up to -9% at D64
    (tune-mosaic-nvidia-h200-2026-11-26-run2.md), so off by default.
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    overlap: bool = False
    fp8_p_registers: bool = False
    heavy_first: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            if getattr(self, name) <= 0 or getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 64")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be at least 1")


# head_dim -> tiles, attention_mgpu's schedule: the configurations jax's own attention_mgpu reaches
# 558 (D128) and 384 (D64) TFLOP/s with in f16 on an H100 (../shared/gpu/README.md), the largest
# key tile that fits shared memory (D128: 2 x [128, 128] K and V slots + the Q/O tiles; D64:
# 2 x [256, 64]). Measured on an H200 (bench/results/tune-mosaic-nvidia-h200-2026-11-26.md): the
# best of the sweep for every causal row and for D64; `TUNED_BLOCKS` has the rows where it is not.
BLOCK_TABLE: dict[int, MosaicBlocks] = {
    64: MosaicBlocks(block_q=64, block_kv=256, stages=2),
    128: MosaicBlocks(block_q=64, block_kv=128, stages=2),
    # the largest key tile whose two K and V slots fit beside the Q/O tiles (192 KiB of 227)
    256: MosaicBlocks(block_q=64, block_kv=64, stages=2),
}
# fp8 (transposed V only), by head dim: an fp8 tile takes half a bf16 tile's shared memory.
FP8_BLOCK_TABLE: dict[int, MosaicBlocks] = {
    128: MosaicBlocks(block_q=64, block_kv=128, stages=2),
}
# (fp8, head_dim, causal) -> tiles where an H200 sweep's best (B4 H32 S4096, median of 10) beat the
# table by more than its run-to-run spread (bench/results/tune-mosaic-nvidia-h200-2026-11-26.md,
# tune-mosaic-fp8-nvidia-h200-2026-11-26.md). The overlapped schedule wins without a causal mask
# at D128 (577 vs 546 TFLOP/s, V [B,H,S,D]; 549 vs 522, V [B,H,D,S]) and loses with one (295 vs
# 418; 316 vs 464) and at D64 (bench/results/attention-nvidia-h200-2026-11-26.md); fp8 without a
# causal mask ran fastest with 256-key tiles (682 vs 634); a second sweep the same day put them
# level with 128 keys and 4 stages (686.8 vs 692.6, tune-mosaic-fp8-nvidia-h200-2026-11-26-run2.md).
TUNED_BLOCKS: dict[tuple[bool, int, bool], MosaicBlocks] = {
    (False, 128, False): MosaicBlocks(block_q=64, block_kv=128, stages=2, overlap=True),
    (True, 128, False): MosaicBlocks(block_q=64, block_kv=256, stages=2),
}


#: the overlapped schedule holds two score tiles' worth of registers at once (S_j and the P_{j-1}
#: being multiplied, beside the accumulator): its key tile is capped so that a warpgroup's
#: [block_q, block_kv] f32 scores take 64 registers a thread, as in FlashAttention-3
OVERLAP_MAX_BLOCK_KV = 128


def default_blocks(dtype, head_dim: int, sk: int, overlap: bool | None = None,
                   causal: bool = False) -> MosaicBlocks:
    """The tiles for this dtype, head dim and mask: `TUNED_BLOCKS` where it has the row, else the
    table's, the key tile shrunk (in steps of one 128-byte swizzle row: 64 16-bit or 128 fp8
    elements) to the largest that divides ``sk``, so short or odd key lengths still run
    (KeyError: no table row). ``overlap``: None takes the measured schedule; True or False ask for
    the overlapped one (key tile at most `OVERLAP_MAX_BLOCK_KV`) or attention_mgpu's."""
    fp8 = jnp.dtype(dtype).name in FP8_DTYPES
    blk = (FP8_BLOCK_TABLE if fp8 else BLOCK_TABLE)[head_dim]
    tuned = TUNED_BLOCKS.get((fp8, head_dim, bool(causal)))
    if tuned is not None and overlap in (None, tuned.overlap):
        blk = tuned
    if overlap and not blk.overlap:
        blk = dataclasses.replace(blk, block_kv=min(blk.block_kv, OVERLAP_MAX_BLOCK_KV), overlap=True)
    step = 128 // jnp.dtype(dtype).itemsize
    fits = [n for n in range(blk.block_kv, 0, -step) if n % 64 == 0 and sk % n == 0]
    return dataclasses.replace(blk, block_kv=fits[0]) if fits else blk


def hopper_gpu() -> bool:
    """True when the default device is an NVIDIA Hopper GPU (compute capability 9.x)."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "")
    return str(capability).startswith("9")


def _cuda_runtime_version() -> int | None:
    try:
        from jax._src.lib import cuda_versions
    except ImportError:  # pragma: no cover - jaxlib layout differs
        return None
    return None if cuda_versions is None else cuda_versions.cuda_runtime_get_version()


def mosaic_unsupported(
    q, k, v, *, v_layout: str = "BHSD", causal: bool = False, scale: float = 1.0,
    bias=None, compute_dtype: str | None = None, q_layout: str = "BHSD", k_layout: str = "BHSD",
    o_layout: str = "BHSD", blocks: MosaicBlocks | None = None, interpret: bool = False,
    mask=None, mask_fill: float = MASK_VALUE, softcap: float = 0.0,
) -> str | None:
    """Why the Mosaic GPU kernel cannot run this call (arrays or ShapeDtypeStructs), or None.

    fp8 operands (all of one fp8 dtype, descales passed to `mosaic_attention`) need transposed V:
    Hopper's fp8 wgmma reads both operands K-major, and P·V reduces over keys.
    """
    layout_error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if layout_error:
        return layout_error
    if math.isnan(mask_fill) or mask_fill == math.inf:
        return f"mask_fill={mask_fill} is no kernel fill (NaN / +inf hidden scores)"
    if softcap and not softcap > 0:
        return f"softcap={softcap} must be positive (0: none)"
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if (bias is not None or mask is not None or softcap) and dtypes <= set(FP8_DTYPES):
        return "fp8 operands take no bias, mask or soft-cap here (the Triton fp8 kernel does)"
    if compute_dtype is not None and {jnp.dtype(compute_dtype).name} != dtypes:
        return "it has no cast prologue (compute_dtype differs from the operands' dtype)"
    if len(dtypes) != 1 or not dtypes <= set(DTYPES + FP8_DTYPES):
        return f"q, k and v must share one dtype of {DTYPES + FP8_DTYPES}; got {sorted(dtypes)}"
    fp8 = dtypes <= set(FP8_DTYPES)
    if fp8 and v_layout[-1] != "S":
        return ("fp8 P·V needs V K-major, i.e. transposed V (S minor, e.g. [B,H,D,S]): Hopper's "
                "fp8 wgmma takes no sequence-major V tile")
    table = FP8_BLOCK_TABLE if fp8 else BLOCK_TABLE
    _, _, _, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if d != dv or d not in table:
        return f"head dims must be equal and one of {sorted(table)}; got D={d}, Dv={dv}"
    blk = blocks or default_blocks(q.dtype, d, sk, causal=causal)
    if sq % (COMPUTE_WARPGROUPS * blk.block_q):
        return f"Sq={sq} must be a multiple of {COMPUTE_WARPGROUPS * blk.block_q} (2 * block_q)"
    if sk % blk.block_kv:
        return f"Sk={sk} must be a multiple of block_kv={blk.block_kv}"
    if not scale > 0:
        return f"scale={scale} must be positive"
    if causal and not interpret and _cuda_runtime_version() in _BAD_CAUSAL_CUDA:
        return "causal masking is miscompiled by the ptxas of CUDA 12.8.0-12.9.0"
    if not mosaic_gpu_available():  # last: it imports the backend
        return "this jax has no Pallas Mosaic GPU backend"
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one kernel instance."""

    batch: int
    heads: int
    groups: int  # query heads per kv head
    sq: int
    sk: int
    head_dim: int
    dtype: jnp.dtype
    scale: float
    causal: bool
    layouts: tuple[str, str, str, str]  # q, k, v, o: physical axis orders (permutations of BHSD)
    blocks: MosaicBlocks
    interpret: bool
    out_dtype: jnp.dtype  # q's dtype, or bf16 for fp8 operands
    mods: ScoreMods = NONE  # soft-cap, bias, mask / key lengths / window (kernels/mosaic_scores.py)

    @property
    def tiled(self) -> bool:
        """Key tiles come from per-CTA lists (VISIBLE, then PARTIAL; HIDDEN ones never)."""
        return self.mods.tiled

    @property
    def stage_p(self) -> bool:
        """P goes to wgmma through shared memory, else from registers. The interpreter takes A
        only from shared memory; fp8 stages it unless ``blocks.fp8_p_registers`` (Mosaic GPU has
        no relayout of the f32 accumulator's fragments into wgmma's 8-bit A-operand layout:
        `_fp8_p_operand` does it by hand)."""
        return self.interpret or (self.fp8 and not self.blocks.fp8_p_registers)

    @property
    def fp8(self) -> bool:
        """fp8 operands: runtime descales, P scaled by P_FP8_SCALE, output in out_dtype."""
        return self.dtype.name in FP8_DTYPES

    @property
    def v_transposed(self) -> bool:
        """V tiles are [D, block_kv] (sequence axis minor), read K-major by wgmma."""
        return self.layouts[2][-1] == "S"

    def window(self, operand: str, ref, batch, head, rows):
        """The TMA box of ``operand`` ("q", "k", "v", "o") for one (batch, head) and a row range:
        [rows, D], or [D, rows] for transposed V, whatever the array's axis order. A packed
        Q/K/V array (a layout with the axis "3") is indexed at the operand's entry, 0, 1 or 2."""
        index = "qkvo".index(operand)
        at = {"B": batch, "H": head, "S": rows, "3": index}
        return ref.at[tuple(at.get(a, slice(None)) for a in self.layouts[index])]

    def scores_acc(self):
        """A warpgroup's wgmma accumulator for one tile's scores, [block_q, block_kv] f32."""
        return plgpu.ACC((self.blocks.block_q, self.blocks.block_kv), jnp.float32)

    def output_acc(self):
        """A warpgroup's wgmma accumulator for P·V, [block_q, D] f32."""
        return plgpu.ACC((self.blocks.block_q, self.head_dim), jnp.float32)

    @property
    def kv_steps(self) -> int:
        return self.sk // self.blocks.block_kv

    @property
    def stages(self) -> int:
        return min(self.blocks.stages, self.kv_steps)

    @property
    def cta_rows(self) -> int:
        return COMPUTE_WARPGROUPS * self.blocks.block_q

    def list_at(self, refs, batch, head, q_tile):
        """This CTA's counts [4] and tile indices [2, n] (tiled plans)."""
        full_b, full_h = self.mods.lists_bh
        at = (batch if full_b else 0, head if full_h else 0, q_tile)
        return refs.counts.at[at], refs.index.at[at]

    def kv_tile(self, kv_step, counts, index):
        """The key tile of a step: the step itself, or (tiled) its entry in the CTA's lists (the
        VISIBLE tiles, then the PARTIAL ones), read by the producer and both consumers alike."""
        if not self.tiled:
            return kv_step
        n, visible = index.shape[1], counts[0]
        first = index[0, jnp.minimum(kv_step, n - 1)]
        second = index[1, jnp.clip(kv_step - visible, 0, n - 1)]
        return lax.select(kv_step < visible, first, second)

    def q_tile(self):
        """This CTA's query tile: its grid index, or (causal, ``blocks.heavy_first``) counted from
        the last tile, the one with the most key tiles."""
        index = lax.axis_index("q_tiles")
        if self.causal and self.blocks.heavy_first:
            return self.sq // self.cta_rows - 1 - index
        return index

    def cta_kv_steps(self, q_tile, counts=None):
        """Key tiles the CTA's rows need: all, (causal) up to its last row's diagonal, or (tiled)
        its VISIBLE and PARTIAL ones."""
        if self.tiled:
            return counts[0] + counts[1]
        if not self.causal:
            return self.kv_steps
        return jnp.minimum(pl.cdiv((q_tile + 1) * self.cta_rows, self.blocks.block_kv),
                           self.kv_steps)


#: `_quad_exchange_to_8bit`'s plan for quad lane t = 0..3: the xor distances of the two lanes
#: whose words it reads, and the byte permute that keeps their first (0x5410) or second (0x7632)
#: 2-column pair (tests/test_mosaic_kernels.py replays it on every lane of a warpgroup)
QUAD_EXCHANGE_DISTANCES = ((0, 1), (3, 2), (2, 3), (1, 0))
QUAD_EXCHANGE_HALVES = (0x5410, 0x5410, 0x7632, 0x7632)


def _quad_exchange_to_8bit(p):
    """An 8-bit [64, n] fragmented array from the WGMMA layout (two consecutive columns a
    register) into WGMMA_8BIT (four; wgmma's 8-bit A operand), within each quad of lanes (the
    four lanes that hold a row pair). In a 16-column block, quad lane t holds columns 2t, 2t+1
    and 8+2t, 8+2t+1, and must end with 4t..4t+3: the pairs of quad lanes 2(t%2) and 2(t%2)+1,
    from the block's first half (t < 2) or its second (t >= 2). Each lane packs its two pairs
    into one 32-bit word, reads the two words it needs with butterfly shuffles (a xor distance of
    its own) and keeps their low or high halves with one byte permute."""
    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: arith.constant(i32, v)  # noqa: E731
    t = arith.remui(mgpu_utils.thread_idx(), c(4))

    def per_lane(table):  # table[t] as an i32 value
        value = c(table[0])
        for lane in (1, 2, 3):
            value = arith.select(arith.cmpi(arith.CmpIPredicate.eq, t, c(lane)), c(table[lane]), value)
        return value
    dist0 = per_lane([d[0] for d in QUAD_EXCHANGE_DISTANCES])
    dist1 = per_lane([d[1] for d in QUAD_EXCHANGE_DISTANCES])
    halves = per_lane(QUAD_EXCHANGE_HALVES)
    regs = p.registers  # [1, n/8, 1, 1, 2 (row halves), 1, 1, 1, 1] of vector<2 x 8-bit>
    registers = np.empty(mgpu_fa.WGMMA_LAYOUT_8BIT.registers_shape(p.shape), dtype=object)
    vec4 = ir.VectorType.get((4,), p.mlir_dtype)
    for k in range(registers.shape[1]):  # 16-column blocks
        for h in range(2):
            pairs = [regs[0, 2 * k, 0, 0, h, 0, 0, 0, 0], regs[0, 2 * k + 1, 0, 0, h, 0, 0, 0, 0]]
            word = mgpu_utils.bitcast(mgpu_utils.vector_concat(pairs), i32)
            mine = mgpu_utils.prmt(mgpu_utils.shfl_bfly(word, dist0),
                                   mgpu_utils.shfl_bfly(word, dist1), halves)
            registers[0, k, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(mine, vec4)
    return mgpu_fa.FragmentedArray(_registers=registers, _layout=mgpu_fa.WGMMA_LAYOUT_8BIT,
                                   _is_signed=None)


def _fp8_p_operand(p8):
    """fp8 P, [block_q, block_kv] in the accumulator's WGMMA layout, as wgmma's 8-bit A operand in
    registers (`_quad_exchange_to_8bit`)."""
    relayout = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(p8.shape, p8.dtype, layout=plgpu.Layout.WGMMA_8BIT),
    )(lambda _ctx, p: _quad_exchange_to_8bit(p))
    return relayout(p8)


def _p_operand(plan: _Plan, p, p_smem):
    """wgmma's A operand for P: the registers, or a shared-memory copy (`_Plan.stage_p`; the last
    wgmma that read that tile has completed)."""
    if not plan.stage_p:
        return _fp8_p_operand(p) if plan.fp8 else p
    p_smem[...] = p
    plgpu.commit_smem()
    return p_smem


def _accumulate_pv(plan: _Plan, acc, p, v_operand, p_smem, after):
    """acc + P·V on the tensor cores; ``after()`` runs while the wgmma is in flight."""
    a_operand = _p_operand(plan, p, p_smem)
    if plan.interpret:  # the interpreter runs no pl.run_state: a fresh accumulator, then add
        def product(acc_ref):
            plgpu.wgmma(acc_ref, a_operand, v_operand)
            after()
            return acc_ref[...]
        return acc + pl.run_scoped(product, plan.output_acc())

    def update(acc_ref):
        plgpu.wgmma(acc_ref, a_operand, v_operand)
        after()
    return pl.run_state(update)(plgpu.ACC.init(acc))  # awaits the wgmma before returning


def _scores_and_pv(plan: _Plan, acc, carry, q_smem, k_operand, v_operand, p_smem, after_issue,
                   on_scores):
    """Q·Kᵀ of one key tile and acc + P·V of the previous one (P is ``carry[-1]``), issued back to
    back; ``after_issue()`` runs once both are issued, ``on_scores(s, carry) -> carry`` as soon as
    the scores land, while P·V is still on the tensor cores. Returns (acc + P·V, the new carry)."""
    if plan.interpret:  # no pl.run_state: P·V into a fresh accumulator, then added
        def products(s_ref, pv_ref):
            a_operand = _p_operand(plan, carry[-1], p_smem)
            plgpu.wgmma(s_ref, q_smem, k_operand)
            plgpu.wgmma(pv_ref, a_operand, v_operand)
            after_issue()
            return s_ref[...], pv_ref[...]
        s, pv = pl.run_scoped(products, plan.scores_acc(), plan.output_acc())
        return acc + pv, on_scores(s, carry)

    def products(refs):
        acc_ref, *carry_refs = refs
        a_operand = _p_operand(plan, carry_refs[-1][...], p_smem)

        def scores(s_ref):
            plgpu.wgmma(s_ref, q_smem, k_operand)
            plgpu.wgmma(acc_ref, a_operand, v_operand)
            after_issue()
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P·V may stay in flight
        new = on_scores(pl.run_scoped(scores, plan.scores_acc()), tuple(ref[...] for ref in carry_refs))
        for ref, value in zip(carry_refs, new, strict=True):
            ref[...] = value
    acc, *carry = pl.run_state(products)((plgpu.ACC.init(acc), *carry))  # awaits P·V
    return acc, tuple(carry)


class _Warpgroup:
    """One compute warpgroup: its ``block_q`` query rows against the streamed key tiles."""

    def __init__(self, plan: _Plan, refs, scratch, barriers, wg):
        self.plan, self.wg = plan, wg
        self.refs, self.descale_ref, self.o_ref, self.lse_ref = refs, refs.descale, refs.o, refs.lse
        q_smem2, o_smem2, self.k_smem, self.v_smem, lse_smem2, p_smem2 = scratch
        (self.k_ready, self.v_ready, self.q_ready, self.k_free, self.v_free,
         self.schedule) = barriers
        bq, bkv = plan.blocks.block_q, plan.blocks.block_kv
        self.batch, self.head = lax.axis_index("batch"), lax.axis_index("heads")
        q_tile = plan.q_tile()
        self.q_smem, self.o_smem, self.lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]
        self.p_smem = None if p_smem2 is None else p_smem2.at[wg]
        self.q_base = q_tile * plan.cta_rows + wg * bq
        self.counts, self.index = plan.list_at(refs, self.batch, self.head, q_tile) if plan.tiled else (None, None)
        self.cta_steps = plan.cta_kv_steps(q_tile, self.counts)
        if plan.tiled:  # both warpgroups walk the CTA's lists
            self.steps = self.cta_steps
        elif plan.causal:
            self.steps = jnp.minimum(pl.cdiv(self.q_base + bq, bkv), plan.kv_steps)
        else:
            self.steps = plan.kv_steps
        # scores are kept in log2 units (exp2 is one instruction): s · scale · log2(e), where fp8
        # operands also carry their descales (computed outside: scale·log2(e)·q_descale·k_descale)
        self.log2_scale = self.descale_ref[0] if plan.fp8 else plan.scale * LOG2E
        self.p_shift = math.log2(P_FP8_SCALE) if plan.fp8 else 0.0  # exp2 gives 2^shift · P
        self.q_window = plan.window("q", refs.q, self.batch, self.head, pl.ds(self.q_base, bq))

    def run(self):
        plan, bq, d = self.plan, self.plan.blocks.block_q, self.plan.head_dim
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        plgpu.copy_gmem_to_smem(self.q_window, self.q_smem, self.q_ready.at[self.wg])
        plgpu.barrier_wait(self.q_ready.at[self.wg])
        row_stat = plgpu.Layout.WGMMA.reduce(1)
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_stat)
        l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_stat)
        acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        loop = self.overlapped_loop if plan.blocks.overlap else self.alternating_loop
        self.finish(*loop(acc, m, l))

    def k_operand(self, slot):
        return self.k_smem.at[slot].transpose((1, 0))

    def v_operand(self, slot):
        tile = self.v_smem.at[slot]
        return tile.transpose((1, 0)) if self.plan.v_transposed else tile

    def softmax(self, s, m, kv_step, masked: bool, extras=None):
        """One key tile of the online softmax: (new row max, its rescale of the old sums, the
        unnormalised probabilities 2^shift · exp(s - max), f32). ``extras``: this tile's
        `tile_extras` (score modifications)."""
        if self.plan.mods.any:
            return self.modified_softmax(s, m, masked, extras)
        bq, bkv = self.plan.blocks.block_q, self.plan.blocks.block_kv
        if masked:
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(rows + self.q_base >= cols + kv_step * bkv, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * self.log2_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * self.log2_scale - lax.broadcast_in_dim(m_new - self.p_shift, s.shape, [0]))
        return m_new, alpha, p

    # --- score modifications (kernels/mosaic_scores.py) ---------------------------------------

    def tile_extras(self, kv_step, masked: bool):
        """What a key tile's score modifications read, loaded before its Q·Kᵀ is issued so the
        loads overlap it: (first key index, bias tile or None, mask tile or None). The bias and
        mask tiles come straight from global memory in wgmma's accumulator layout; the mask tile
        only for PARTIAL tiles. ALiBi's bias tile is computed from the slope and the indices."""
        plan, bq, bkv = self.plan, self.plan.blocks.block_q, self.plan.blocks.block_kv
        col0 = plan.kv_tile(kv_step, self.counts, self.index) * bkv
        cols = pl.ds(col0, bkv)
        bias = mask = None
        if plan.mods.alibi is not None:
            full_b, full_h = plan.mods.alibi_bh
            slope = self.refs.alibi[self.batch if full_b else 0, self.head if full_h else 0]
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA) + self.q_base
            keys = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA) + col0
            bias = plan.mods.alibi.tile(slope, rows, keys)
        if plan.mods.bias_bh is not None:
            full_b, full_h = plan.mods.bias_bh
            rows = pl.ds(self.q_base, bq) if plan.mods.bias_rows else pl.ds(0, bq)
            at = (self.batch if full_b else 0, self.head if full_h else 0, rows, cols)
            bias = plgpu.load(self.refs.bias.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
        if masked and plan.mods.mask_bh is not None:
            full_b, full_h = plan.mods.mask_bh
            rows = pl.ds(self.q_base, bq) if plan.mods.mask_rows else pl.ds(0, bq)
            at = (self.batch if full_b else 0, self.head if full_h else 0, rows, cols)
            mask = plgpu.load(self.refs.mask.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
        return col0, bias, mask

    def modified_softmax(self, s, m, masked: bool, extras):
        """`softmax` with the score modifications (`mosaic_scores.log2_scores`, then hidden
        positions at -inf on masked tiles) and a safe running max, so hidden scores get exactly
        zero weight and a row with no visible score ends with l = 0."""
        plan, bq, bkv = self.plan, self.plan.blocks.block_q, self.plan.blocks.block_kv
        col0, bias, mask = extras
        x = log2_scores(s, plan.mods, scale=plan.scale, log2_scale=self.log2_scale, bias=bias)
        if masked:
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA) + self.q_base
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA) + col0
            kv_len = self.counts[2] if plan.mods.has_lengths else None
            x = jnp.where(kept(rows, cols, plan.mods, causal=plan.causal, mask=mask, kv_len=kv_len), x, -jnp.inf)
        m_new = jnp.maximum(m, x.max(axis=1))
        m_use = self.safe_max(m_new)
        p = jnp.exp2(x - lax.broadcast_in_dim(m_use, x.shape, [0]))
        return m_new, jnp.exp2(m - m_use), p

    def safe_max(self, m_new):
        """The max to subtract (`mosaic_scores.safe_max` with score modifications)."""
        return safe_max(m_new) if self.plan.mods.any else m_new

    def release_unneeded(self, take_turns):
        """Causal: the tiles only the other warpgroup needs. Observe their arrival and release
        them (every barrier phase is seen by every warpgroup) and take this warpgroup's turns."""
        def release(kv_step, _):
            slot = lax.rem(kv_step, self.plan.stages)
            plgpu.barrier_wait(self.k_ready.at[slot])
            plgpu.barrier_wait(self.v_ready.at[slot])
            plgpu.barrier_arrive(self.k_free.at[slot])
            plgpu.barrier_arrive(self.v_free.at[slot])
            take_turns()
        lax.fori_loop(self.steps, self.cta_steps, release, None)

    def masked_split(self, start, step, carry):
        """Run ``step`` over key tiles [start, steps): without the causal mask below the
        diagonal, with it on the tiles that cross it; tiled, the VISIBLE tiles unmasked, then
        the PARTIAL ones masked."""
        if self.plan.tiled:
            visible = jnp.clip(self.counts[0], start, self.steps)
            carry = lax.fori_loop(start, visible, functools.partial(step, masked=False), carry)
            return lax.fori_loop(visible, self.steps, functools.partial(step, masked=True), carry)
        if not self.plan.causal:
            return lax.fori_loop(start, self.steps, functools.partial(step, masked=False), carry)
        below = jnp.clip(lax.div(self.q_base, self.plan.blocks.block_kv), start, self.steps)
        carry = lax.fori_loop(start, below, functools.partial(step, masked=False), carry)
        return lax.fori_loop(below, self.steps, functools.partial(step, masked=True), carry)

    # --- attention_mgpu's schedule: one rendezvous barrier staggers the warpgroups ------------

    def take_turn(self):
        plgpu.barrier_arrive(self.schedule)
        plgpu.barrier_wait(self.schedule)

    def alternating_loop(self, acc, m, l):
        """Per tile: Q·Kᵀ, softmax, P·V; the schedule barrier hands the tensor cores to the
        other warpgroup during each softmax."""
        plan, d = self.plan, self.plan.head_dim
        plgpu.barrier_wait(self.k_ready.at[0])
        pl.when(self.wg == 1)(self.take_turn)  # stagger: warpgroup 1 starts one turn behind

        def step(kv_step, carry, masked: bool):
            acc, m, l = carry
            slot = lax.rem(kv_step, plan.stages)
            extras = self.tile_extras(kv_step, masked) if plan.mods.any else None

            def scores(s_ref):
                plgpu.wgmma(s_ref, self.q_smem, self.k_operand(slot))
                self.take_turn()
                return s_ref[...]
            s = pl.run_scoped(scores, plan.scores_acc())
            plgpu.barrier_arrive(self.k_free.at[slot])
            m_new, alpha, p = self.softmax(s, m, kv_step, masked, extras)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p_lo = p.astype(plan.dtype)
            if d <= 128 and not plan.fp8:  # ordering that measured fastest in jax's attention_mgpu
                acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
            elif d <= 128:  # (Mosaic GPU's optimization barrier takes no 8-bit fragments)
                acc, l, m_new = lax.optimization_barrier((acc, l, m_new))
            plgpu.barrier_arrive(self.schedule)  # softmax done
            plgpu.barrier_wait(self.v_ready.at[slot])
            plgpu.barrier_wait(self.schedule)  # the tensor cores are ours again

            def prefetch_wait():
                @pl.when(kv_step + 1 < self.steps)
                def _():
                    plgpu.barrier_wait(self.k_ready.at[lax.rem(kv_step + 1, plan.stages)])
            acc = _accumulate_pv(plan, acc, p_lo, self.v_operand(slot), self.p_smem, prefetch_wait)
            plgpu.barrier_arrive(self.v_free.at[slot])
            return acc, m_new, l

        acc, m, l = self.masked_split(0, step, (acc, m, l))
        if plan.causal and not plan.tiled:
            self.release_unneeded(lambda: (self.take_turn(), self.take_turn()))
        pl.when(self.wg == 0)(self.take_turn)
        return acc, m, l

    # --- FlashAttention-3's intra-warpgroup overlap: strict ping-pong of wgmma issues ---------

    def wait_turn(self):
        plgpu.barrier_wait(self.schedule.at[self.wg])

    def pass_turn(self):
        plgpu.barrier_arrive(self.schedule.at[1 - self.wg])

    def overlapped_loop(self, acc, m, l):
        """Tile 0's scores, then per tile j: Q·Kᵀ_j and P_{j-1}·V_{j-1} issued together, tile j's
        softmax while P·V runs, the accumulator rescaled once P·V has landed; the last P·V after
        the loop. The warpgroups take strict turns issuing (one barrier each: wait on one's own,
        arrive on the other's), so one's softmax runs beside the other's matmuls."""
        plan = self.plan
        pl.when(self.wg == 1)(self.pass_turn)  # warpgroup 0 issues first
        plgpu.barrier_wait(self.k_ready.at[0])
        self.wait_turn()
        # tiled: the first tile is masked whatever its class (its mask is exact either way)
        first_masked = plan.causal or plan.tiled
        first_extras = self.tile_extras(0, first_masked) if plan.mods.any else None

        def first_scores(s_ref):
            plgpu.wgmma(s_ref, self.q_smem, self.k_operand(0))
            self.pass_turn()
            return s_ref[...]
        s = pl.run_scoped(first_scores, plan.scores_acc())
        plgpu.barrier_arrive(self.k_free.at[0])
        m, _, p = self.softmax(s, m, 0, first_masked, first_extras)  # the sums start at zero
        l = p.sum(axis=1)

        def step(kv_step, carry, masked: bool):
            acc, m, l, p_lo = carry
            slot, prev = lax.rem(kv_step, plan.stages), lax.rem(kv_step - 1, plan.stages)
            plgpu.barrier_wait(self.k_ready.at[slot])
            plgpu.barrier_wait(self.v_ready.at[prev])
            self.wait_turn()
            extras = self.tile_extras(kv_step, masked) if plan.mods.any else None

            def on_scores(s, carry):
                m, l, _ = carry
                plgpu.barrier_arrive(self.k_free.at[slot])
                m_new, alpha, p = self.softmax(s, m, kv_step, masked, extras)
                return m_new, l * alpha + p.sum(axis=1), p.astype(plan.dtype)
            acc, (m_new, l, p_lo) = _scores_and_pv(
                plan, acc, (m, l, p_lo), self.q_smem, self.k_operand(slot), self.v_operand(prev),
                self.p_smem, self.pass_turn, on_scores)
            plgpu.barrier_arrive(self.v_free.at[prev])
            acc = acc * lax.broadcast_in_dim(jnp.exp2(m - self.safe_max(m_new)), acc.shape, [0])
            return acc, m_new, l, p_lo

        acc, m, l, p_lo = self.masked_split(1, step, (acc, m, l, p.astype(plan.dtype)))
        last = lax.rem(self.steps - 1, plan.stages)
        plgpu.barrier_wait(self.v_ready.at[last])
        self.wait_turn()
        acc = _accumulate_pv(plan, acc, p_lo, self.v_operand(last), self.p_smem, self.pass_turn)
        plgpu.barrier_arrive(self.v_free.at[last])
        if plan.causal and not plan.tiled:
            self.release_unneeded(lambda: (self.wait_turn(), self.pass_turn()))
        pl.when(self.wg == 0)(self.wait_turn)  # observe warpgroup 1's last pass
        return acc, m, l

    def finish(self, acc, m, l):
        """Normalise and write this warpgroup's rows of o and lse."""
        plan, bq, d = self.plan, self.plan.blocks.block_q, self.plan.head_dim
        acc = acc / lax.broadcast_in_dim(l, (bq, d), [0])
        if plan.fp8:
            acc = acc * self.descale_ref[1]  # V's descale
        self.o_smem[...] = acc.astype(plan.out_dtype)
        self.lse_smem[...] = (m - self.p_shift) * LN2 + jnp.log(l)  # natural log: m in log2 units
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(self.o_smem, plan.window("o", self.o_ref, self.batch, self.head,
                                                         pl.ds(self.q_base, bq)))
        plgpu.copy_smem_to_gmem(self.lse_smem, self.lse_ref.at[self.batch, self.head,
                                                                pl.ds(self.q_base, bq)])
        plgpu.wait_smem_to_gmem(0)


def _producer(plan: _Plan, refs, scratch, barriers):
    """The TMA warpgroup: K and V tiles into the ring of shared-memory slots."""
    _, _, k_smem, v_smem, _, _ = scratch
    k_ready, v_ready, _, k_free, v_free, _ = barriers
    bkv = plan.blocks.block_kv
    batch, head, q_tile = lax.axis_index("batch"), lax.axis_index("heads"), plan.q_tile()
    kv_head = lax.div(head, plan.groups)
    counts, index = plan.list_at(refs, batch, head, q_tile) if plan.tiled else (None, None)
    cta_steps = plan.cta_kv_steps(q_tile, counts)

    def load(operand: str, kv_step, slot):
        ref, smem, ready = (refs.k, k_smem, k_ready) if operand == "k" else (refs.v, v_smem, v_ready)
        tile = plan.window(operand, ref, batch, kv_head, pl.ds(plan.kv_tile(kv_step, counts, index) * bkv, bkv))
        plgpu.copy_gmem_to_smem(tile, smem.at[slot], ready.at[slot])

    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    for i in range(plan.stages):
        @pl.when(i < cta_steps)
        def _():
            load("k", i, i)
            load("v", i, i)

    @pl.loop(plan.stages, cta_steps)
    def _(kv_step):
        # K and V slots are refilled separately: a consumer waits for the next K while it still
        # holds this step's V, so one combined wait would deadlock a single-slot ring
        slot = lax.rem(kv_step, plan.stages)
        plgpu.barrier_wait(k_free.at[slot])  # both consumers are done with the K in this slot
        load("k", kv_step, slot)
        plgpu.barrier_wait(v_free.at[slot])
        load("v", kv_step, slot)

    # observe the last releases too: no barrier phase completes unseen (jax 0.11's interpreter
    # checks this when the barriers are deallocated)
    @pl.loop(jnp.maximum(cta_steps - plan.stages, 0), cta_steps)
    def _(kv_step):
        slot = lax.rem(kv_step, plan.stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _swizzled(dtype) -> tuple:
    """Shared-memory transforms of a wgmma operand tile: rows of 128 bytes, 128-byte swizzle."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class _Refs:
    """The kernel's operands in global memory (None where the plan has no such operand)."""

    q: object
    k: object
    v: object
    descale: object
    bias: object
    alibi: object
    mask: object
    counts: object
    index: object
    o: object
    lse: object

    @classmethod
    def unpack(cls, plan: _Plan, refs) -> _Refs:
        """From `_launch`'s operand order: q, k, v, [descales], [bias], [ALiBi slopes], [mask],
        [counts, index], o, lse."""
        refs = list(refs)
        take = lambda present: refs.pop(0) if present else None  # noqa: E731
        q, k, v = refs.pop(0), refs.pop(0), refs.pop(0)
        descale, bias = take(plan.fp8), take(plan.mods.bias_bh is not None)
        alibi = take(plan.mods.alibi is not None)
        mask, counts, index = take(plan.mods.mask_bh is not None), take(plan.tiled), take(plan.tiled)
        o, lse = refs
        return cls(q, k, v, descale, bias, alibi, mask, counts, index, o, lse)


def _kernel(plan: _Plan, *refs):
    refs = _Refs.unpack(plan, refs)
    bq, bkv, d = plan.blocks.block_q, plan.blocks.block_kv, plan.head_dim
    v_tile = (d, bkv) if plan.v_transposed else (bkv, d)
    tile = functools.partial(plgpu.SMEM, dtype=plan.dtype, transforms=_swizzled(plan.dtype))
    scratch = [
        tile((COMPUTE_WARPGROUPS, bq, d)),  # Q in (and O out when they share a dtype)
        plgpu.SMEM((COMPUTE_WARPGROUPS, bq, d), plan.out_dtype, transforms=_swizzled(plan.out_dtype))
        if plan.out_dtype != plan.dtype else None,
        tile((plan.stages, bkv, d)),
        tile((plan.stages, *v_tile)),
        plgpu.SMEM((COMPUTE_WARPGROUPS, bq), jnp.float32),
        # P staged in shared memory: only the interpreter needs it (see the module docstring)
        tile((COMPUTE_WARPGROUPS, bq, bkv)) if plan.stage_p else None,
    ]
    barriers = (
        plgpu.Barrier(num_barriers=plan.stages),  # k_ready
        plgpu.Barrier(num_barriers=plan.stages),  # v_ready
        plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),  # q_ready
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=plan.stages),  # k_free
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=plan.stages),  # v_free
        # schedule: one rendezvous of both warpgroups, or (overlap) a turn barrier for each
        plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS) if plan.blocks.overlap
        else plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
    )

    def body(scratch_refs, *barrier_refs):
        if scratch_refs[1] is None:  # O written through Q's tile
            scratch_refs = (scratch_refs[0], scratch_refs[0], *scratch_refs[2:])
        wg = lax.axis_index("wg")
        pl.when(wg < COMPUTE_WARPGROUPS)(
            lambda: _Warpgroup(plan, refs, scratch_refs, barrier_refs, wg).run())
        pl.when(wg == COMPUTE_WARPGROUPS)(lambda: _producer(plan, refs, scratch_refs, barrier_refs))

    pl.run_scoped(body, scratch, *barriers, collective_axes="wg")


def mosaic_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool,
    v_layout: str = "BHSD", blocks: MosaicBlocks | None = None, interpret: bool = False,
    descales: tuple[jax.Array, jax.Array] | None = None, out_dtype=jnp.bfloat16,
    q_layout: str = "BHSD", k_layout: str = "BHSD", o_layout: str = "BHSD",
    bias: jax.Array | None = None, mask: jax.Array | None = None, softcap: float = 0.0,
    kv_lengths: jax.Array | None = None, window: int | None = None, alibi: Alibi | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Forward attention on Hopper: (o [B,H,Sq,D] in ``o_layout``, lse [B,H,Sq] float32).

    Each operand is read in place in its own layout (a permutation of "BHSD": D minor for q, k,
    o; D or S minor, i.e. transposed, for v), as TMA boxes of the strided array.

    Semantics of `attention_reference` within the contract above (ValueError naming what is
    outside it); o in q's dtype. fp8 operands (transposed V) take ``descales`` = (score
    multiplier ``scale·log2(e)·q_descale·k_descale``, V's descale), float32 scalars that may be
    traced, as the Triton fp8 kernel's; ``scale`` is then only checked, and o is in ``out_dtype``.
    ``interpret``: run jax's Mosaic GPU interpreter instead of compiling (CPU tests).

    Score modifications (16-bit operands; kernels/mosaic_scores.py): ``softcap`` (> 0: scores
    become softcap·tanh(s / softcap), before the bias), an additive ``bias`` broadcastable to
    [B,H,Sq,Sk] or ``alibi`` (`alibi.Alibi`: that bias computed in the kernel from per-head
    slopes, no bias read), and hidden positions from a boolean ``mask`` (True keeps, broadcastable to
    [B,H,Sq,Sk]), ``kv_lengths`` (int32 [B]: keys j < kv_lengths[b]) and ``window`` (keys
    i - window < j <= i), walked as per-tile lists (HIDDEN tiles skipped, VISIBLE ones unmasked).
    Hidden scores get exactly zero weight (the op with fill -inf); a row with no visible score
    has lse -inf and o NaN: `flash_attention` (``backend="mosaic_gpu"``) guards the call and
    gives the op's values for any fill.
    """
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (keys i - window < j <= i), got {window!r}")
    layouts = dict(q_layout=q_layout, k_layout=k_layout, o_layout=o_layout)
    hides = mask is not None or kv_lengths is not None or window is not None
    reason = mosaic_unsupported(q, k, v, v_layout=v_layout, causal=causal, scale=scale,
                                blocks=blocks, interpret=interpret, bias=True if alibi is not None else bias,
                                mask=True if hides else None, softcap=float(softcap), **layouts)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU attention kernel cannot run this call: {reason}; "
                         "use the Triton kernel (flash_attention(..., backend='triton')).")
    b, h, hkv, sq, sk, d, _ = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    fp8 = jnp.dtype(q.dtype).name in FP8_DTYPES
    if fp8 != (descales is not None):
        raise ValueError("descales go with fp8 operands (and only with them)")
    out = jnp.dtype(out_dtype) if fp8 else jnp.dtype(q.dtype)
    blocks = blocks or default_blocks(q.dtype, d, sk, causal=causal)
    if kv_lengths is not None:
        if jnp.shape(kv_lengths) != (b,) or not jnp.issubdtype(jnp.result_type(kv_lengths), jnp.integer):
            raise ValueError(f"kv_lengths must be an integer array of shape [B] = ({b},), got "
                             f"{jnp.shape(kv_lengths)} {jnp.result_type(kv_lengths)}")
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    mods, extra = prepare(b=b, h=h, sq=sq, sk=sk, causal=bool(causal), cta_rows=COMPUTE_WARPGROUPS * blocks.block_q,
                          block_q=blocks.block_q, block_kv=blocks.block_kv, bias=bias,
                          mask4=None if mask is None else mask_4d(mask, (b, h, sq, sk)),
                          kv_lengths=kv_lengths, window=window, softcap=float(softcap), alibi=alibi)
    plan = _Plan(b, h, h // hkv, sq, sk, d, jnp.dtype(q.dtype), float(scale), bool(causal),
                 (q_layout, k_layout, v_layout, o_layout), blocks, bool(interpret), out, mods)
    operands = [q, k, v]
    if fp8:
        operands.append(jnp.stack([jnp.asarray(x, jnp.float32).reshape(()) for x in descales]))
    operands += extra
    return _launch(plan, operands, layout_shape(o_layout, {"B": b, "H": h, "S": sq, "D": d}))


def mosaic_packed_attention(
    qkv: jax.Array, *, packed_layout: str, scale: float, causal: bool, o_layout: str = "BHSD",
    blocks: MosaicBlocks | None = None, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Forward attention over one packed Q/K/V array (e.g. [B,S,3,H,D], "BS3HD"), every tile read
    in place at its entry of the packed axis: (o in ``o_layout``, lse [B,H,S] float32)."""
    own = packed_layout.replace("3", "")
    sizes = {a: qkv.shape[packed_layout.index(a)] for a in "BHSD"}
    view = jax.ShapeDtypeStruct(layout_shape(own, sizes), qkv.dtype)
    reason = mosaic_unsupported(view, view, view, v_layout=own, causal=causal, scale=scale,
                                blocks=blocks, interpret=interpret, q_layout=own, k_layout=own,
                                o_layout=o_layout)
    if reason is None and jnp.dtype(qkv.dtype).name in FP8_DTYPES:
        reason = "packed fp8 attention is not a kernel input"
    if reason is not None:
        raise ValueError(f"the Mosaic GPU attention kernel cannot run this call: {reason}; "
                         "use the Triton kernel (packed_flash_attention(..., backend='triton')).")
    b, h, s, d = (sizes[a] for a in "BHSD")
    blocks = blocks or default_blocks(qkv.dtype, d, s, causal=causal)
    plan = _Plan(b, h, 1, s, s, d, jnp.dtype(qkv.dtype), float(scale), bool(causal),
                 (packed_layout,) * 3 + (o_layout,), blocks, bool(interpret), jnp.dtype(qkv.dtype))
    return _launch(plan, [qkv, qkv, qkv], layout_shape(o_layout, sizes))


def _launch(plan: _Plan, operands: list, o_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Run the kernel over the grid (heads, query tiles, batch); (o, lse)."""
    out_type = (jax.ShapeDtypeStruct(o_shape, plan.out_dtype),
                jax.ShapeDtypeStruct((plan.batch, plan.heads, plan.sq), jnp.float32))
    extra = {"interpret": plgpu.InterpretGPUParams()} if plan.interpret else {}
    o, lse = plgpu.kernel(
        functools.partial(_kernel, plan),
        out_type=out_type,
        grid=(plan.heads, plan.sq // plan.cta_rows, plan.batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **extra,
    )(*operands)
    return o, lse
