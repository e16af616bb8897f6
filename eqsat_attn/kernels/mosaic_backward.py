"""Pallas Mosaic GPU flash attention backward for Hopper (sm_90): dQ, dK, dV with wgmma and TMA.

FlashAttention-2's split without atomics, so the result is deterministic: two kernels over the
residuals of either forward (q, k, v, o, the natural-log log-sum-exp) and dO.

* dK/dV: a CTA owns ``2 * block_kv`` keys of one (batch, kv head); each of two compute warpgroups
  keeps its ``block_kv`` K and V rows in shared memory and its dK, dV accumulators in registers,
  while a producer warpgroup streams the query tiles (Q, dO, lse, delta) of every query head in
  the kv head's group through a ring of ``stages`` shared-memory slots. Per query tile, in the
  transposed orientation (keys are wgmma's M): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, Pᵀ = exp2(Sᵀ·c - lse),
  dV += Pᵀ·dO, dSᵀ = Pᵀ ⊙ (dPᵀ - delta), dK += dSᵀ·Q. GQA: the group's heads are summed in the
  registers in a fixed order, so dK and dV need no second pass and no atomics.
* dQ: a CTA owns ``2 * block_q`` query rows of one (batch, head); each warpgroup keeps its Q, dO,
  lse and delta, the producer streams K and V tiles of the kv head. Per key tile: S = Q·Kᵀ and
  dP = dO·Vᵀ, P = exp2(S·c - lse), dS = P ⊙ (dP - delta), dQ += dS·K.

Causal masking (top-left aligned: query i sees keys j <= i) visits only the tiles that intersect
the triangle; the element mask runs only on tiles crossing the diagonal. A warpgroup whose rows
need fewer tiles than its CTA's stream observes and releases the others (every barrier phase is
seen by every warpgroup, as the forward kernel does).

Score modifications (what the forward takes; kernels/mosaic_backward_scores.py): soft-cap (dS
scaled by 1 - tanh² of the capped score), an additive bias (its tile read from global memory per
step, transposed copies for the dK/dV kernel) with dbias (the dQ kernel stores dS on every tile it
visits; hidden positions zeroed and the bias's broadcast axes summed outside, in a fixed order),
and hidden positions from a boolean mask, key lengths, a sliding window and the causal flag,
walked as per-CTA tile lists in both kernels (dQ: the key tiles of its ``2 * block_q`` rows; dK/dV:
the query tiles of its ``2 * block_kv`` keys, per head where the mask has heads): HIDDEN tiles are
never loaded, VISIBLE ones run without masking code, PARTIAL ones apply the mask tile and the
index conditions. Hidden scores get exactly zero weight, as in the forward; a row with no visible
score gets no gradient (flash_attention's guard adds the uniform average's dV of a row that keeps
no key under a finite fill, and runs the reference where a fill is not negligible).

Contract (`mosaic_backward_unsupported` says which part a call misses; flash_attention then runs
the Triton backward): q, k, v all bf16 or all f16 (f32 accumulation), D = Dv in (64, 128), Sq a
multiple of ``2 * block_q`` and Sk of ``2 * block_kv`` (128 with the default tiles), q, k, o (and
dO) with D minor and V with D or S minor (transposed V), in any axis order: read and written in
place as strided TMA boxes. Not covered: cast prologues, fp8 (its straight-through backward stays
on Triton). dbias costs a float32 [B, H, Sq, Sk] array (the FlashAttention-2 way), whatever the
bias's broadcast shape.

Transposed V ([D, block_kv] tiles, dV written in that layout): dP = dO·Vᵀ reads the tile as
stored; the dK/dV kernel reads it transposed as wgmma's A operand for dPᵀ = V·dOᵀ (16-bit wgmma
transposes operands from shared memory) and accumulates dVᵀ = dOᵀ·P (dO transposed as A, Pᵀ
staged in shared memory as B, read transposed), so dVᵀ [D, block_kv] is stored as it lies. The
cost against [B,H,S,D]: one shared-memory store and fence of Pᵀ per query tile.

Nothing here has been timed on a GPU yet: flash_attention's default backward stays Triton's
until a GPU benchmark (bench/gpu_session.sh stages ``mosaic-bwd``, ``mosaic-bwd-masks``) shows this
one ahead.

Interpret mode (``interpret=True``): jax's Mosaic GPU interpreter takes wgmma's A operand only from
shared memory and runs no ``pl.run_state``, so there P and dS are staged through a shared-memory
tile and each product lands in a fresh accumulator that is then added (`_accumulate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .alibi import Alibi
from .masks import mask_4d
from .mosaic_attention import mosaic_gpu_available, plgpu
from .mosaic_backward_scores import bias_gradient, capped_scores, list_tile, prepare_backward
from .mosaic_scores import NONE, ScoreMods, kept
from .reference import MASK_VALUE, check_shapes, kernel_layout_error

__all__ = ["HEAD_DIMS", "MosaicBwdBlocks", "mosaic_attention_backward", "mosaic_backward_unsupported"]

LOG2E: float = math.log2(math.e)
COMPUTE_WARPGROUPS = 2
DTYPES = ("bfloat16", "float16")
#: head dims whose two f32 [block_kv, D] accumulators (dK, dV) fit a warpgroup's registers
HEAD_DIMS = (64, 128)
_CONSUMER_REGISTERS, _PRODUCER_REGISTERS = 232, 40


@dataclasses.dataclass(frozen=True)
class MosaicBwdBlocks:
    """Tiles of the backward kernels: block_q query rows and block_kv keys per warpgroup and step
    (the dQ kernel's CTA covers ``2 * block_q`` rows, the dK/dV kernel's ``2 * block_kv`` keys),
    and ``stages`` shared-memory slots of the streamed operands. Not tuned: no GPU measured them."""

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            if getattr(self, name) <= 0 or getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 64")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be at least 1")


def mosaic_backward_unsupported(q, k, v, *, v_layout: str = "BHSD", q_layout: str = "BHSD",
                                k_layout: str = "BHSD", o_layout: str = "BHSD",
                                blocks: MosaicBwdBlocks | None = None, bias=None, softcap: float = 0.0,
                                mask_fill: float = MASK_VALUE, compute_dtype: str | None = None) -> str | None:
    """Why the Mosaic GPU backward cannot run this call (arrays or ShapeDtypeStructs), or None.
    Masks, key lengths and windows take any shape `masks.mask_4d` takes; ``bias`` is checked for
    rank and broadcasting; ``mask_fill``: the op's fill (NaN and +inf are no kernel fill)."""
    layout_error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if layout_error:
        return layout_error
    if math.isnan(mask_fill) or mask_fill == math.inf:
        return f"mask_fill={mask_fill} is no kernel fill (NaN / +inf hidden scores)"
    if softcap and not softcap > 0:
        return f"softcap={softcap} must be positive (0: none)"
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if compute_dtype is not None and {jnp.dtype(compute_dtype).name} != dtypes:
        return "it has no cast prologue (compute_dtype differs from the operands' dtype)"
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        return f"q, k and v must share one dtype of {DTYPES}; got {sorted(dtypes)}"
    b, h, _, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if d != dv or d not in HEAD_DIMS:
        return f"head dims must be equal and one of {HEAD_DIMS}; got D={d}, Dv={dv}"
    blk = blocks or MosaicBwdBlocks()
    if sq % (COMPUTE_WARPGROUPS * blk.block_q):
        return f"Sq={sq} must be a multiple of {COMPUTE_WARPGROUPS * blk.block_q} (2 * block_q)"
    if sk % (COMPUTE_WARPGROUPS * blk.block_kv):
        return f"Sk={sk} must be a multiple of {COMPUTE_WARPGROUPS * blk.block_kv} (2 * block_kv)"
    if bias is not None:
        shape = (1,) * max(0, 4 - len(bias.shape)) + tuple(bias.shape)
        if len(shape) > 4 or any(n not in (1, want) for n, want in zip(shape, (b, h, sq, sk))):
            return f"bias shape {tuple(bias.shape)} does not broadcast to [B, H, Sq, Sk] = {(b, h, sq, sk)}"
    if not mosaic_gpu_available():  # last: it imports the backend
        return "this jax has no Pallas Mosaic GPU backend"
    if bias is not None and not hasattr(plgpu, "store"):
        return "this jax's Pallas Mosaic GPU backend has no plgpu.store (the dS tiles of dbias)"
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one backward call."""

    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    head_dim: int
    dtype: jnp.dtype
    scale: float
    causal: bool
    layouts: tuple[str, str, str, str]  # q (and dQ), k (dK), v (dV), o (dO): axis orders
    blocks: MosaicBwdBlocks
    interpret: bool
    mods: ScoreMods = NONE  # soft-cap, bias, mask / key lengths / window (mosaic_backward_scores.py)

    @property
    def tiled(self) -> bool:
        """Tiles come from per-CTA lists (VISIBLE, then PARTIAL; HIDDEN ones never)."""
        return self.mods.tiled

    @property
    def has_bias(self) -> bool:
        return self.mods.bias_bh is not None

    def lists(self, counts_ref, index_ref, batch, head, tile):
        """A CTA's counts [4] and tile indices [2, n] (tiled plans); ``head`` a query head."""
        at = (*self.extra_at(self.mods.lists_bh, batch, head), tile)
        return counts_ref.at[at], index_ref.at[at]

    def extra_at(self, bh, batch, head):
        """(batch, head) indices of an operand whose B / H axes may broadcast (``bh``)."""
        return (batch if bh[0] else 0, head if bh[1] else 0)

    def probabilities(self, s, lse, *, transposed: bool, masked: bool, row0, col0, bias=None, mask=None,
                      kv_len=None):
        """P = exp2(scores - lse) of one tile (f32, [rows, keys], or [keys, rows] ``transposed``;
        ``lse`` in log2 units) and d(capped score)/d(scaled score) (None without a soft-cap).
        ``row0``, ``col0``: the tile's first query and key (read only where ``masked``)."""
        rows_axis = 1 if transposed else 0
        x, dcap = capped_scores(s, self.mods, scale=self.scale, bias=bias)
        if masked:
            rows = _iota(s.shape, rows_axis) + row0
            cols = _iota(s.shape, 1 - rows_axis) + col0
            if self.mods.any:
                keep = kept(rows, cols, self.mods, causal=self.causal, mask=mask, kv_len=kv_len)
            else:  # causal only
                keep = rows >= cols
            x = jnp.where(keep, x, -jnp.inf)
        return jnp.exp2(x - lax.broadcast_in_dim(lse, x.shape, [rows_axis])), dcap

    @property
    def v_transposed(self) -> bool:
        """V (and dV) tiles are [D, block_kv] (sequence axis minor)."""
        return self.layouts[2][-1] == "S"

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def stages(self) -> int:
        return self.blocks.stages

    def window(self, operand: str, ref, batch, head, rows):
        """The [rows, D] TMA box of ``operand`` ("q", "k", "v", "o") for one (batch, head); [D, rows]
        for transposed V."""
        at = {"B": batch, "H": head, "S": rows}
        return ref.at[tuple(at.get(a, slice(None)) for a in self.layouts["qkvo".index(operand)])]

    def tile(self, shape):
        """A 16-bit wgmma operand tile in shared memory: rows of 128 bytes, 128-byte swizzle."""
        return plgpu.SMEM(shape, self.dtype, transforms=(
            plgpu.TilingTransform((8, 128 // self.dtype.itemsize)), plgpu.SwizzleTransform(128)))


def _product(a, b, shape):
    """a·b on the tensor cores into a fresh [M, N] f32 accumulator (both operands in shared memory)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _products(pairs, shape):
    """Several a·b issued back to back (one wait), each into its own fresh accumulator."""
    def run(*acc_refs):
        for acc_ref, (a, b) in zip(acc_refs, pairs, strict=True):
            plgpu.wgmma(acc_ref, a, b)
        return tuple(acc_ref[...] for acc_ref in acc_refs)
    return pl.run_scoped(run, *(plgpu.ACC(shape, jnp.float32) for _ in pairs))


def _accumulate(plan: _Plan, acc, a, b, a_smem):
    """acc + a·b with ``a`` (16-bit, WGMMA layout) from registers, or, interpreted, staged through
    ``a_smem`` into a fresh accumulator that is then added (see the module docstring)."""
    if plan.interpret:
        a_smem[...] = a
        plgpu.commit_smem()
        return acc + _product(a_smem, b, acc.shape)
    return _accumulate_smem(plan, acc, a, b)


def _accumulate_smem(plan: _Plan, acc, a, b):
    """acc + a·b, ``a`` and ``b`` wgmma operands (``b`` in shared memory); awaited on return."""
    if plan.interpret:  # no pl.run_state: a fresh accumulator, then added
        return acc + _product(a, b, acc.shape)

    def update(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(update)(plgpu.ACC.init(acc))


def _stream(plan: _Plan, steps, load, free):
    """Producer warpgroup: ``load(step, slot)`` issues step's TMA copies into the ring, a slot
    refilled once both consumers released it; every release is observed, the last ones too."""
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    for i in range(plan.stages):
        pl.when(i < steps)(functools.partial(load, i, i))

    @pl.loop(plan.stages, steps)
    def _(step):
        slot = lax.rem(step, plan.stages)
        plgpu.barrier_wait(free.at[slot])
        load(step, slot)

    @pl.loop(jnp.maximum(steps - plan.stages, 0), steps)
    def _(step):
        plgpu.barrier_wait(free.at[lax.rem(step, plan.stages)])


def _zeros(shape):
    """A zero f32 wgmma accumulator value."""
    return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def _iota(shape, axis):
    return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)


def _wait_all(barriers, slot):
    for barrier in barriers:
        plgpu.barrier_wait(barrier.at[slot])


# --- dQ: per query tile, the key tiles streamed --------------------------------------------------

def _extras(plan: _Plan, refs):
    """(bias, mask, counts, index) refs after the six shared operands (None where absent; a
    bias computed from ALiBi slopes gives the slopes' ref as ``bias``), and the rest (the outputs)."""
    refs = list(refs)
    take = lambda present: refs.pop(0) if present else None  # noqa: E731
    bias, mask = take(plan.has_bias or plan.mods.alibi is not None), take(plan.mods.mask_bh is not None)
    counts, index = take(plan.tiled), take(plan.tiled)
    return (bias, mask, counts, index), refs


def _alibi_tile(plan: _Plan, slopes_ref, batch, head, row_axis: int, row0, col0, shape):
    """ALiBi's bias tile (`alibi.Alibi.tile`) of (batch, head) in wgmma's layout: query indices
    from ``row0`` along ``row_axis``, key indices from ``col0`` along the other axis."""
    slope = slopes_ref[plan.extra_at(plan.mods.alibi_bh, batch, head)]
    return plan.mods.alibi.tile(slope, _iota(shape, row_axis) + row0, _iota(shape, 1 - row_axis) + col0)


def _dq_kernel(plan: _Plan, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    (bias_ref, mask_ref, counts_ref, index_ref), outs = _extras(plan, refs)
    dq_ref, ds_ref = outs[0], (outs[1] if plan.has_bias else None)
    bq, bkv, d = plan.blocks.block_q, plan.blocks.block_kv, plan.head_dim
    v_tile = (d, bkv) if plan.v_transposed else (bkv, d)
    wgs = COMPUTE_WARPGROUPS
    scratch = [plan.tile((wgs, bq, d)), plan.tile((wgs, bq, d)),  # Q (then dQ out), dO
               plgpu.SMEM((wgs, bq), jnp.float32), plgpu.SMEM((wgs, bq), jnp.float32),  # lse, delta
               plan.tile((plan.stages, bkv, d)), plan.tile((plan.stages, *v_tile)),  # K, V ring
               plan.tile((wgs, bq, bkv)) if plan.interpret else None]  # dS staged (interpreter)
    barriers = [plgpu.Barrier(num_barriers=wgs) for _ in range(4)]  # q, dO, lse, delta landed
    barriers += [plgpu.Barrier(num_barriers=plan.stages) for _ in range(2)]  # K, V landed
    barriers.append(plgpu.Barrier(num_arrivals=wgs, num_barriers=plan.stages))  # slot free
    batch, head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
    kv_head = lax.div(head, plan.groups)
    cta_base = tile * wgs * bq
    nk = plan.sk // bkv
    counts, index = plan.lists(counts_ref, index_ref, batch, head, tile) if plan.tiled else (None, None)

    def needed(first_row, rows):  # key tiles up to the diagonal of the last row; tiled: the lists
        if plan.tiled:
            return counts[0] + counts[1]
        return jnp.minimum(pl.cdiv(first_row + rows, bkv), nk) if plan.causal else nk
    cta_steps = needed(cta_base, wgs * bq)

    def kv_tile(j):
        return list_tile(j, counts, index) if plan.tiled else j

    def consumer(scratch, barriers, wg):
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, ds_smem = scratch
        q_ready, do_ready, lse_ready, delta_ready, k_ready, v_ready, free = barriers
        q_smem, do_smem = q_smem.at[wg], do_smem.at[wg]
        ds_smem = None if ds_smem is None else ds_smem.at[wg]
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        q_base = cta_base + wg * bq
        rows = pl.ds(q_base, bq)
        plgpu.copy_gmem_to_smem(plan.window("q", q_ref, batch, head, rows), q_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(plan.window("o", do_ref, batch, head, rows), do_smem, do_ready.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg], lse_ready.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[wg], delta_ready.at[wg])
        _wait_all((q_ready, do_ready, lse_ready, delta_ready), wg)
        row_stat = plgpu.Layout.WGMMA.reduce(1)
        lse = plgpu.load(lse_smem.at[wg], layout=row_stat)  # log2 units
        delta = plgpu.load(delta_smem.at[wg], layout=row_stat)
        steps = needed(q_base, bq)

        def step(j, dq, masked: bool):
            slot = lax.rem(j, plan.stages)
            col0 = kv_tile(j) * bkv
            cols = pl.ds(col0, bkv)
            bias = mask = None  # read before the products are issued, so the loads overlap them
            if plan.has_bias:
                brows = rows if plan.mods.bias_rows else pl.ds(0, bq)
                at = (*plan.extra_at(plan.mods.bias_bh, batch, head), brows, cols)
                bias = plgpu.load(bias_ref.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
            elif plan.mods.alibi is not None:
                bias = _alibi_tile(plan, bias_ref, batch, head, 0, q_base, col0, (bq, bkv))
            if masked and mask_ref is not None:
                mrows = rows if plan.mods.mask_rows else pl.ds(0, bq)
                at = (*plan.extra_at(plan.mods.mask_bh, batch, head), mrows, cols)
                mask = plgpu.load(mask_ref.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
            _wait_all((k_ready, v_ready), slot)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
            vt = v_tile if plan.v_transposed else v_tile.transpose((1, 0))  # Vᵀ [D, block_kv]
            s, dp = _products([(q_smem, k_tile.transpose((1, 0))), (do_smem, vt)], (bq, bkv))
            p, dcap = plan.probabilities(s, lse, transposed=False, masked=masked, row0=q_base, col0=col0,
                                         bias=bias, mask=mask, kv_len=counts[2] if plan.mods.has_lengths else None)
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))  # d loss / d(capped score + bias)
            if plan.has_bias:
                plgpu.store(ds_ref.at[batch, head, rows, cols], ds, optimized=False)
            if dcap is not None:
                ds = ds * dcap
            dq = _accumulate(plan, dq, ds.astype(plan.dtype), k_tile, ds_smem)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = _zeros((bq, d))
        if plan.tiled:  # both warpgroups walk the CTA's lists: VISIBLE tiles, then PARTIAL ones
            below = jnp.minimum(counts[0], steps)
        else:
            below = jnp.minimum(lax.div(q_base, bkv), steps) if plan.causal else steps
        dq = lax.fori_loop(0, below, functools.partial(step, masked=False), dq)
        if plan.tiled or plan.causal:
            dq = lax.fori_loop(below, steps, functools.partial(step, masked=True), dq)

        def release(j, _):  # tiles only the other warpgroup needs
            slot = lax.rem(j, plan.stages)
            _wait_all((k_ready, v_ready), slot)
            plgpu.barrier_arrive(free.at[slot])
        lax.fori_loop(steps, cta_steps, release, None)
        q_smem[...] = (dq * plan.scale).astype(plan.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, plan.window("q", dq_ref, batch, head, rows))
        plgpu.wait_smem_to_gmem(0)

    def producer(scratch, barriers):
        k_smem, v_smem = scratch[4], scratch[5]
        k_ready, v_ready, free = barriers[4:]

        def load(j, slot):
            keys = pl.ds(kv_tile(j) * bkv, bkv)
            plgpu.copy_gmem_to_smem(plan.window("k", k_ref, batch, kv_head, keys), k_smem.at[slot],
                                    k_ready.at[slot])
            plgpu.copy_gmem_to_smem(plan.window("v", v_ref, batch, kv_head, keys), v_smem.at[slot],
                                    v_ready.at[slot])
        _stream(plan, cta_steps, load, free)

    _run_roles(scratch, barriers, consumer, producer)


# --- dK, dV: per key tile, the query tiles of the group's heads streamed -------------------------

def _dkv_kernel(plan: _Plan, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    (bias_ref, mask_ref, counts_ref, index_ref), (dk_ref, dv_ref) = _extras(plan, refs)
    bq, bkv, d = plan.blocks.block_q, plan.blocks.block_kv, plan.head_dim
    wgs = COMPUTE_WARPGROUPS
    v_tile = (d, bkv) if plan.v_transposed else (bkv, d)
    scratch = [plan.tile((wgs, bkv, d)), plan.tile((wgs, *v_tile)),  # K, V (then dK, dV out)
               plan.tile((plan.stages, bq, d)), plan.tile((plan.stages, bq, d)),  # Q, dO ring
               plgpu.SMEM((plan.stages, bq), jnp.float32), plgpu.SMEM((plan.stages, bq), jnp.float32),
               # Pᵀ / dSᵀ staged: interpreted, or Pᵀ as the B operand of dVᵀ (transposed V)
               plan.tile((wgs, bkv, bq)) if plan.interpret or plan.v_transposed else None]
    barriers = [plgpu.Barrier(num_barriers=wgs) for _ in range(2)]  # K, V landed
    barriers += [plgpu.Barrier(num_barriers=plan.stages) for _ in range(4)]  # q, dO, lse, delta
    barriers.append(plgpu.Barrier(num_arrivals=wgs, num_barriers=plan.stages))  # slot free
    batch, kv_head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_tiles")
    cta_base = tile * wgs * bkv
    nq = plan.sq // bq
    # causal: query tiles below the CTA's first key hide every key of it
    cta_first = jnp.minimum(lax.div(cta_base, bq), nq) if plan.causal else 0
    per_head = nq - cta_first  # streamed query tiles per head of the group (untiled)

    def walk(g):
        """Head g of the group: (its query tiles' count, the tile of its i-th step, its VISIBLE
        count) for the stream; tiled, from the CTA's lists (per head where they have H)."""
        if not plan.tiled:
            return per_head, lambda i: cta_first + i, None
        counts, index = plan.lists(counts_ref, index_ref, batch, kv_head * plan.groups + g, tile)
        return counts[0] + counts[1], lambda i: list_tile(i, counts, index), counts

    def consumer(scratch, barriers, wg):
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, stage_smem = scratch
        k_ready, v_ready, q_ready, do_ready, lse_ready, delta_ready, free = barriers
        k_smem, v_smem = k_smem.at[wg], v_smem.at[wg]
        stage_smem = None if stage_smem is None else stage_smem.at[wg]
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        k_base = cta_base + wg * bkv
        keys = pl.ds(k_base, bkv)
        plgpu.copy_gmem_to_smem(plan.window("k", k_ref, batch, kv_head, keys), k_smem, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(plan.window("v", v_ref, batch, kv_head, keys), v_smem, v_ready.at[wg])
        _wait_all((k_ready, v_ready), wg)
        col_stat = plgpu.Layout.WGMMA.reduce(0)

        def step(i, carry, g: int, base, q_tile, counts, masked: bool):
            dk, dv = carry
            slot = lax.rem(base + i, plan.stages)
            head = kv_head * plan.groups + g
            row0 = q_tile(i) * bq
            bias = mask = None  # transposed tiles [block_kv, block_q], read before the products
            if plan.has_bias:
                brows = pl.ds(row0, bq) if plan.mods.bias_rows else pl.ds(0, bq)
                at = (*plan.extra_at(plan.mods.bias_bh, batch, head), keys, brows)
                bias = plgpu.load(bias_ref.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
            elif plan.mods.alibi is not None:
                bias = _alibi_tile(plan, bias_ref, batch, head, 1, row0, k_base, (bkv, bq))
            if masked and mask_ref is not None:
                mrows = pl.ds(row0, bq) if plan.mods.mask_rows else pl.ds(0, bq)
                at = (*plan.extra_at(plan.mods.mask_bh, batch, head), keys, mrows)
                mask = plgpu.load(mask_ref.at[at], layout=plgpu.Layout.WGMMA, optimized=False)
            _wait_all((q_ready, do_ready, lse_ready, delta_ready), slot)
            q_tile_smem, do_tile = q_smem.at[slot], do_smem.at[slot]
            v_rows = v_smem.transpose((1, 0)) if plan.v_transposed else v_smem  # V [block_kv, D]
            st, dpt = _products([(k_smem, q_tile_smem.transpose((1, 0))),
                                 (v_rows, do_tile.transpose((1, 0)))], (bkv, bq))
            lse = plgpu.load(lse_smem.at[slot], layout=col_stat)
            delta = plgpu.load(delta_smem.at[slot], layout=col_stat)
            pt, dcap = plan.probabilities(st, lse, transposed=True, masked=masked, row0=row0, col0=k_base,
                                          bias=bias, mask=mask, kv_len=counts[2] if plan.mods.has_lengths else None)
            if plan.v_transposed:  # dVᵀ += dOᵀ·P: Pᵀ through shared memory, read transposed
                stage_smem[...] = pt.astype(plan.dtype)
                plgpu.commit_smem()
                dv = _accumulate_smem(plan, dv, do_tile.transpose((1, 0)), stage_smem.transpose((1, 0)))
            else:
                dv = _accumulate(plan, dv, pt.astype(plan.dtype), do_tile, stage_smem)
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
            if dcap is not None:
                dst = dst * dcap
            dk = _accumulate(plan, dk, dst.astype(plan.dtype), q_tile_smem, stage_smem)
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        def skip(i, carry, base):  # a tile only the other warpgroup needs
            slot = lax.rem(base + i, plan.stages)
            _wait_all((q_ready, do_ready, lse_ready, delta_ready), slot)
            plgpu.barrier_arrive(free.at[slot])
            return carry

        carry = (_zeros((bkv, d)), _zeros(v_tile))  # dK; dV, or dVᵀ for transposed V
        base = 0  # steps streamed before head g's
        for g in range(plan.groups):  # the group's heads in a fixed order: a deterministic sum
            count, q_tile, counts = walk(g)
            run = functools.partial(step, g=g, base=base, q_tile=q_tile, counts=counts)
            if plan.tiled:  # both warpgroups walk the CTA's lists: VISIBLE tiles, then PARTIAL ones
                carry = lax.fori_loop(0, counts[0], functools.partial(run, masked=False), carry)
                carry = lax.fori_loop(counts[0], count, functools.partial(run, masked=True), carry)
            elif plan.causal:  # tiles hiding all of this warpgroup's keys, those crossing the diagonal
                first = jnp.clip(lax.div(k_base, bq), cta_first, nq) - cta_first
                full = jnp.clip(pl.cdiv(k_base + bkv - 1, bq), cta_first + first, nq) - cta_first
                carry = lax.fori_loop(0, first, functools.partial(skip, base=base), carry)
                carry = lax.fori_loop(first, full, functools.partial(run, masked=True), carry)
                carry = lax.fori_loop(full, count, functools.partial(run, masked=False), carry)
            else:
                carry = lax.fori_loop(0, count, functools.partial(run, masked=False), carry)
            base = base + count
        dk, dv = carry
        k_smem[...] = (dk * plan.scale).astype(plan.dtype)
        v_smem[...] = dv.astype(plan.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, plan.window("k", dk_ref, batch, kv_head, keys))
        plgpu.copy_smem_to_gmem(v_smem, plan.window("v", dv_ref, batch, kv_head, keys))
        plgpu.wait_smem_to_gmem(0)

    def producer(scratch, barriers):
        q_smem, do_smem, lse_smem, delta_smem = scratch[2:6]
        q_ready, do_ready, lse_ready, delta_ready, free = barriers[2:]
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

        def load(head, row0, slot):
            rows = pl.ds(row0, bq)
            plgpu.copy_gmem_to_smem(plan.window("q", q_ref, batch, head, rows), q_smem.at[slot],
                                    q_ready.at[slot])
            plgpu.copy_gmem_to_smem(plan.window("o", do_ref, batch, head, rows), do_smem.at[slot],
                                    do_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                                    delta_ready.at[slot])

        base = 0
        for g in range(plan.groups):  # the consumers' order: head by head
            count, q_tile, _ = walk(g)

            @pl.loop(0, count)
            def _(i, g=g, base=base, q_tile=q_tile):
                slot = lax.rem(base + i, plan.stages)
                # a slot is refilled once both consumers released its previous step
                pl.when(base + i >= plan.stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                load(kv_head * plan.groups + g, q_tile(i) * bq, slot)
            base = base + count

        @pl.loop(jnp.maximum(base - plan.stages, 0), base)  # observe the last releases too
        def _(step):
            plgpu.barrier_wait(free.at[lax.rem(step, plan.stages)])

    _run_roles(scratch, barriers, consumer, producer)


def _run_roles(scratch, barriers, consumer, producer):
    """Allocate the shared memory and barriers; warpgroups 0 and 1 compute, warpgroup 2 loads."""
    def body(scratch_refs, *barrier_refs):
        wg = lax.axis_index("wg")
        pl.when(wg < COMPUTE_WARPGROUPS)(lambda: consumer(scratch_refs, barrier_refs, wg))
        pl.when(wg == COMPUTE_WARPGROUPS)(lambda: producer(scratch_refs, barrier_refs))

    pl.run_scoped(body, scratch, *barriers, collective_axes="wg")


def _launch(plan: _Plan, kernel, grid, grid_names, out_type, operands):
    extra = {"interpret": plgpu.InterpretGPUParams()} if plan.interpret else {}
    return plgpu.kernel(
        functools.partial(kernel, plan),
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **extra,
    )(*operands)


def mosaic_attention_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array, *,
    scale: float, causal: bool, v_layout: str = "BHSD", q_layout: str = "BHSD",
    k_layout: str = "BHSD", o_layout: str = "BHSD", blocks: MosaicBwdBlocks | None = None,
    interpret: bool = False, bias: jax.Array | None = None, mask: jax.Array | None = None,
    kv_lengths: jax.Array | None = None, window: int | None = None, softcap: float = 0.0,
    alibi: Alibi | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """(dq, dk, dv, dbias) of `attention_reference` at (q, k, v, bias) for the cotangent ``do``,
    from the forward's residuals: o (``o_layout``, as is ``do``) and lse [B,H,Sq] float32
    (natural log). Gradients in their operands' layouts and dtypes; dbias (None without a bias)
    in the bias's shape and dtype, summed over its broadcast axes. ValueError outside the
    contract (module docstring). ``interpret``: run jax's Mosaic GPU interpreter instead of
    compiling.

    Score modifications as `mosaic_attention` takes them: ``softcap``, an additive ``bias``
    (broadcastable to [B,H,Sq,Sk]), hidden positions from a boolean ``mask`` (True keeps),
    ``kv_lengths`` (int32 [B]) and ``window`` (keys i - window < j <= i); ``alibi`` (a bias
    computed in the kernels from static slopes: no dbias, the slopes are constants). Hidden positions get
    no weight and no gradient; a row with no visible score (lse -inf, or the 0 flash_attention's
    guard gives a row that keeps no key) gets none either."""
    layouts = dict(q_layout=q_layout, k_layout=k_layout, o_layout=o_layout)
    reason = mosaic_backward_unsupported(q, k, v, v_layout=v_layout, blocks=blocks, bias=bias,
                                         softcap=float(softcap), **layouts)
    if reason is None and alibi is not None and bias is not None:
        reason = "a call takes a bias or ALiBi slopes, not both"
    if reason is not None:
        raise ValueError(f"the Mosaic GPU attention backward cannot run this call: {reason}; "
                         "use the Triton backward (flash_attention(..., backward='pallas')).")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (keys i - window < j <= i), got {window!r}")
    b, h, hkv, sq, sk, d, _ = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if lse.shape != (b, h, sq) or o.shape != q.shape or do.shape != q.shape:
        raise ValueError(f"lse must be [B,H,Sq] = {(b, h, sq)} and o, dO shaped as q {q.shape}; got "
                         f"lse {lse.shape}, o {o.shape}, dO {do.shape}")
    if kv_lengths is not None:
        if jnp.shape(kv_lengths) != (b,) or not jnp.issubdtype(jnp.result_type(kv_lengths), jnp.integer):
            raise ValueError(f"kv_lengths must be an integer array of shape [B] = ({b},), got "
                             f"{jnp.shape(kv_lengths)} {jnp.result_type(kv_lengths)}")
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    blocks = blocks or MosaicBwdBlocks()
    wgs = COMPUTE_WARPGROUPS
    extra = prepare_backward(b=b, h=h, sq=sq, sk=sk, causal=bool(causal), block_q=blocks.block_q,
                             block_kv=blocks.block_kv, cta_rows=wgs * blocks.block_q,
                             cta_keys=wgs * blocks.block_kv, bias=bias,
                             mask4=None if mask is None else mask_4d(mask, (b, h, sq, sk)),
                             kv_lengths=kv_lengths, window=window, softcap=float(softcap), alibi=alibi)
    plan = _Plan(b, h, hkv, sq, sk, d, jnp.dtype(q.dtype), float(scale), bool(causal),
                 (q_layout, k_layout, v_layout, o_layout), blocks, bool(interpret), extra.mods)
    # delta = rowsum(o ⊙ dO), [B,H,Sq] like lse whatever o's layout; lse in log2 units, a row
    # with no visible score at 0 (its scores are all -inf: P = 0, not NaN)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=o_layout.index("D"))
    rest = o_layout.replace("D", "")
    delta = jnp.transpose(delta, [rest.index(a) for a in "BHS"])
    lse2 = lse.astype(jnp.float32) * LOG2E
    if plan.mods.any:
        lse2 = jnp.where(lse2 == -jnp.inf, 0.0, lse2)
    operands = (q, k, v, do.astype(q.dtype), lse2, delta)
    dq_out = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if plan.has_bias:  # dS on every tile the dQ kernel visits: the bias gradient
        dq_out.append(jax.ShapeDtypeStruct((b, h, sq, sk), jnp.float32))
    dq_outs = _launch(plan, _dq_kernel, (h, sq // (wgs * blocks.block_q), b),
                      ("heads", "q_tiles", "batch"), tuple(dq_out), (*operands, *extra.dq))
    dk, dv = _launch(plan, _dkv_kernel, (hkv, sk // (wgs * blocks.block_kv), b),
                     ("heads", "kv_tiles", "batch"),
                     (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                     (*operands, *extra.dkv))
    dbias = bias_gradient(dq_outs[1], extra.keep, bias) if plan.has_bias else None
    return dq_outs[0], dk, dv, dbias
