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

Contract (`mosaic_backward_unsupported` says which part a call misses; flash_attention then runs
the Triton backward): q, k, v all bf16 or all f16 (f32 accumulation), D = Dv in (64, 128), Sq a
multiple of ``2 * block_q`` and Sk of ``2 * block_kv`` (128 with the default tiles), q, k, o (and
dO) with D minor and V with D or S minor (transposed V), in any axis order: read and written in
place as strided TMA boxes. Not covered: bias, masks, soft-cap, cast prologues, fp8 (its
straight-through backward stays on Triton).

Transposed V ([D, block_kv] tiles, dV written in that layout): dP = dO·Vᵀ reads the tile as
stored; the dK/dV kernel reads it transposed as wgmma's A operand for dPᵀ = V·dOᵀ (16-bit wgmma
transposes operands from shared memory) and accumulates dVᵀ = dOᵀ·P (dO transposed as A, Pᵀ
staged in shared memory as B, read transposed), so dVᵀ [D, block_kv] is stored as it lies. The
cost against [B,H,S,D]: one shared-memory store and fence of Pᵀ per query tile.

Nothing here has been timed on a GPU yet: flash_attention's default backward stays Triton's
until a GPU benchmark (bench/gpu_session.sh stage ``mosaic-bwd``) shows this one ahead.

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

from .mosaic_attention import mosaic_gpu_available, plgpu
from .reference import check_shapes, kernel_layout_error

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
                                blocks: MosaicBwdBlocks | None = None) -> str | None:
    """Why the Mosaic GPU backward cannot run this call (arrays or ShapeDtypeStructs), or None."""
    layout_error = kernel_layout_error(q_layout, k_layout, v_layout, o_layout)
    if layout_error:
        return layout_error
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        return f"q, k and v must share one dtype of {DTYPES}; got {sorted(dtypes)}"
    _, _, _, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if d != dv or d not in HEAD_DIMS:
        return f"head dims must be equal and one of {HEAD_DIMS}; got D={d}, Dv={dv}"
    blk = blocks or MosaicBwdBlocks()
    if sq % (COMPUTE_WARPGROUPS * blk.block_q):
        return f"Sq={sq} must be a multiple of {COMPUTE_WARPGROUPS * blk.block_q} (2 * block_q)"
    if sk % (COMPUTE_WARPGROUPS * blk.block_kv):
        return f"Sk={sk} must be a multiple of {COMPUTE_WARPGROUPS * blk.block_kv} (2 * block_kv)"
    if not mosaic_gpu_available():  # last: it imports the backend
        return "this jax has no Pallas Mosaic GPU backend"
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

def _dq_kernel(plan: _Plan, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref):
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

    def needed(first_row, rows):  # key tiles up to the diagonal of the last row
        return jnp.minimum(pl.cdiv(first_row + rows, bkv), nk) if plan.causal else nk
    cta_steps = needed(cta_base, wgs * bq)

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
        c = plan.scale * LOG2E

        def step(j, dq, masked: bool):
            slot = lax.rem(j, plan.stages)
            _wait_all((k_ready, v_ready), slot)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
            vt = v_tile if plan.v_transposed else v_tile.transpose((1, 0))  # Vᵀ [D, block_kv]
            s, dp = _products([(q_smem, k_tile.transpose((1, 0))), (do_smem, vt)], (bq, bkv))
            s = s * c
            if masked:
                s = jnp.where(_iota((bq, bkv), 0) + q_base >= _iota((bq, bkv), 1) + j * bkv, s, -jnp.inf)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
            dq = _accumulate(plan, dq, ds.astype(plan.dtype), k_tile, ds_smem)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = _zeros((bq, d))
        below = jnp.minimum(lax.div(q_base, bkv), steps) if plan.causal else steps
        dq = lax.fori_loop(0, below, functools.partial(step, masked=False), dq)
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
            keys = pl.ds(j * bkv, bkv)
            plgpu.copy_gmem_to_smem(plan.window("k", k_ref, batch, kv_head, keys), k_smem.at[slot],
                                    k_ready.at[slot])
            plgpu.copy_gmem_to_smem(plan.window("v", v_ref, batch, kv_head, keys), v_smem.at[slot],
                                    v_ready.at[slot])
        _stream(plan, cta_steps, load, free)

    _run_roles(scratch, barriers, consumer, producer)


# --- dK, dV: per key tile, the query tiles of the group's heads streamed -------------------------

def _dkv_kernel(plan: _Plan, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref):
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
    per_head = nq - cta_first  # streamed query tiles per head of the group

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
        c = plan.scale * LOG2E
        if plan.causal:  # tiles hiding all of this warpgroup's keys, then those crossing the diagonal
            first = jnp.clip(lax.div(k_base, bq), cta_first, nq)
            full = jnp.clip(pl.cdiv(k_base + bkv - 1, bq), first, nq)
        else:
            first = full = 0

        def step(i, carry, g: int, masked: bool):
            dk, dv = carry
            slot = lax.rem(g * per_head + i - cta_first, plan.stages)
            _wait_all((q_ready, do_ready, lse_ready, delta_ready), slot)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            v_rows = v_smem.transpose((1, 0)) if plan.v_transposed else v_smem  # V [block_kv, D]
            st, dpt = _products([(k_smem, q_tile.transpose((1, 0))),
                                 (v_rows, do_tile.transpose((1, 0)))], (bkv, bq))
            lse = plgpu.load(lse_smem.at[slot], layout=col_stat)
            delta = plgpu.load(delta_smem.at[slot], layout=col_stat)
            st = st * c
            if masked:
                st = jnp.where(_iota((bkv, bq), 1) + i * bq >= _iota((bkv, bq), 0) + k_base, st, -jnp.inf)
            pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))
            if plan.v_transposed:  # dVᵀ += dOᵀ·P: Pᵀ through shared memory, read transposed
                stage_smem[...] = pt.astype(plan.dtype)
                plgpu.commit_smem()
                dv = _accumulate_smem(plan, dv, do_tile.transpose((1, 0)), stage_smem.transpose((1, 0)))
            else:
                dv = _accumulate(plan, dv, pt.astype(plan.dtype), do_tile, stage_smem)
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
            dk = _accumulate(plan, dk, dst.astype(plan.dtype), q_tile, stage_smem)
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        def skip(i, carry, g: int):  # a tile only the other warpgroup needs
            slot = lax.rem(g * per_head + i - cta_first, plan.stages)
            _wait_all((q_ready, do_ready, lse_ready, delta_ready), slot)
            plgpu.barrier_arrive(free.at[slot])
            return carry

        carry = (_zeros((bkv, d)), _zeros(v_tile))  # dK; dV, or dVᵀ for transposed V
        for g in range(plan.groups):  # the group's heads in a fixed order: a deterministic sum
            carry = lax.fori_loop(cta_first, first, functools.partial(skip, g=g), carry)
            carry = lax.fori_loop(first, full, functools.partial(step, g=g, masked=True), carry)
            carry = lax.fori_loop(full, nq, functools.partial(step, g=g, masked=False), carry)
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

        def load(step, slot):
            g = lax.div(step, jnp.maximum(per_head, 1))
            head = kv_head * plan.groups + g
            rows = pl.ds((cta_first + step - g * per_head) * bq, bq)
            plgpu.copy_gmem_to_smem(plan.window("q", q_ref, batch, head, rows), q_smem.at[slot],
                                    q_ready.at[slot])
            plgpu.copy_gmem_to_smem(plan.window("o", do_ref, batch, head, rows), do_smem.at[slot],
                                    do_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                                    delta_ready.at[slot])
        _stream(plan, plan.groups * per_head, load, free)

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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `attention_reference` at (q, k, v) for the cotangent ``do``, from the
    forward's residuals: o (``o_layout``, as is ``do``) and lse [B,H,Sq] float32 (natural log).
    Gradients in their operands' layouts and dtypes; ValueError outside the contract (module
    docstring). ``interpret``: run jax's Mosaic GPU interpreter instead of compiling."""
    layouts = dict(q_layout=q_layout, k_layout=k_layout, o_layout=o_layout)
    reason = mosaic_backward_unsupported(q, k, v, v_layout=v_layout, blocks=blocks, **layouts)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU attention backward cannot run this call: {reason}; "
                         "use the Triton backward (flash_attention(..., backward='pallas')).")
    b, h, hkv, sq, sk, d, _ = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    if lse.shape != (b, h, sq) or o.shape != q.shape or do.shape != q.shape:
        raise ValueError(f"lse must be [B,H,Sq] = {(b, h, sq)} and o, dO shaped as q {q.shape}; got "
                         f"lse {lse.shape}, o {o.shape}, dO {do.shape}")
    plan = _Plan(b, h, hkv, sq, sk, d, jnp.dtype(q.dtype), float(scale), bool(causal),
                 (q_layout, k_layout, v_layout, o_layout), blocks or MosaicBwdBlocks(), bool(interpret))
    # delta = rowsum(o ⊙ dO), [B,H,Sq] like lse whatever o's layout; lse in log2 units
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=o_layout.index("D"))
    rest = o_layout.replace("D", "")
    delta = jnp.transpose(delta, [rest.index(a) for a in "BHS"])
    operands = (q, k, v, do.astype(q.dtype), lse.astype(jnp.float32) * LOG2E, delta)
    wgs = COMPUTE_WARPGROUPS
    dq = _launch(plan, _dq_kernel, (h, sq // (wgs * plan.blocks.block_q), b),
                 ("heads", "q_tiles", "batch"), jax.ShapeDtypeStruct(q.shape, q.dtype), operands)
    dk, dv = _launch(plan, _dkv_kernel, (hkv, sk // (wgs * plan.blocks.block_kv), b),
                     ("heads", "kv_tiles", "batch"),
                     (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                     operands)
    return dq, dk, dv
