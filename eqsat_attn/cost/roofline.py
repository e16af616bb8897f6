"""Roofline cost model: predicted seconds per node on one device (`devices.DeviceSpec`).

time = max(flops / (peak[dtype] x efficiency), bytes / bandwidth) + launch overhead, with:

- free (views, leaves, values produced elsewhere): input, literal, constant, iota, reshape,
  stop_gradient, opaque, opaque_output, identity transposes; and transposes that move only
  length-1 axes (the bytes stay where they are: XLA makes them bitcasts) but for a 1 ns
  tie-break (``BITCAST_TIE_BREAK``) that keeps a reshape saying the same; an attention operand
  whose D is minor up to length-1 axes is read in place for the same reason. (Opaque nodes are never rewritten,
  so they cost the same in every candidate program.)
- elementwise ops, converts, selects and broadcasts: XLA fuses them into their consumers and
  producers, so each is priced as writing its output once (output bytes / bandwidth) and no
  launch: the reads of its inputs are assumed to be fused with whatever produced them.
  Except a broadcast of a one-element value (a scalar splat: a clip bound, a per-tensor scale):
  free, since each consumer's fusion recomputes it per element and never writes it. (Priced as
  a write, one splat shared by the Q, K and V quantizes of one layout outweighed fp8
  transposed-V attention, whose V quantize needs its own splats in V's transposed layout.)
- a materialised transpose: reading and writing its output (2 x bytes) at the device's
  transpose bandwidth (a fraction of peak when the minor axis moves, measured on H100; full
  bandwidth when the minor axis stays) plus one launch.
- reductions: reading the input and writing the output, plus one launch.
- dot_general: 2 x batch x M x N x K FLOPs at ``matmul_efficiency`` of the operands' peak;
  bytes = both inputs + output; plus one launch. Operand orientation is not priced (BLAS and
  cuBLAS take transposed operands by flag), but it breaks ties: ``ORIENTATION_TIE_BREAK`` (1 ns)
  per operand not in the row-major form [batch, M, K] x [batch, K, N]. Without it, equal-cost
  programs were chosen by e-node order, and the built-in block's MLP came out weight-first
  ([512, B, S] hidden): 0.88x of the block as written on a 2-core CPU (bench/results/
  rule-ablation-cpu-2026-11-26-before.md), where XLA's CPU GEMMs are slower on transposed operands.
- slice: a view its consumer reads when that consumer is an XLA fusion; before a kernel (a
  matmul, attention) XLA materialises it: priced as writing its output once, no launch, like an
  elementwise op. Packed attention reads its Q, K, V slices in place, so it has no slice nodes.
- concatenate: a real copy (read and write its output) plus one launch; concatenating weights
  that are function arguments is paid on every call.
- dot_general tile utilisation (devices with ``multiprocessors``): the output is cut into
  ``matmul_tile_m x matmul_tile_n`` tiles (M and N rounded up to them) run in waves over the
  SMs; a last, partial wave leaves SMs idle, and a GEMM with less than one wave of tiles splits
  K to fill it (at most K / 512 ways). Merging sibling projections into one matmul changes
  exactly this utilisation (and saves launches and re-reading the shared input).
- packed_attention: priced as attention with Q, K, V read from the packed array in place
  (standard V: V shares Q's layout, D minor).
- a fused region (``fused``, rules/fusion.py): its inputs read and its output written once, one
  launch; a transpose inside that moves the minor axis adds what that transpose costs
  materialised (without its launch), one that keeps it is free; a matmul inside (the region is
  its epilogue) adds its FLOPs at ``matmul_efficiency``.
- attention: 4 x B x H x Sq x Sk x D FLOPs (2 for Q.K^T with D, 2 for P.V with Dv; halved
  when causal; Sq and Sk rounded up to the kernel's tile (`ATTENTION_TILE`: 16 to 64 rows), since
  a flash kernel computes whole tiles: a 1-row query block costs a full tile) at the efficiency of its variant (dtype, "standard" V with D minor or
  "transposed" V with S minor, causal); bytes = q + k + v (+ mask, bias or both) + o, each read or written
  once (GQA reads K/V at their own, smaller, head count: no repeat); plus one launch. The
  Pallas kernel reads and writes any layout with D minor in q, k and o, and D or S minor in v
  (B and H anywhere: its index maps address them), so those cost nothing extra. Exactly the
  operands lowering transposes (`lower.lower_attention`) are charged an extra transpose: q, k, o
  without D minor, and v with neither D nor S minor (relaid to the faster of the two V layouts,
  `relaid_v_layout`). The reference path is charged the same way (XLA relays such operands).
  Boolean masks, soft-caps and exact fills run on the kernel too (its mask bytes counted; a
  fill it cannot honour, NaN or +inf, runs the reference), and all attentions of a model built
  with ``attention_kernel="reference"`` run the reference (XLA) attention. An attention with a ``compute_dtype`` (a cast of Q, K or V
  folded in, rules/fusion.py) reads its operands in their own (wider) dtypes, once, and computes
  at the compute dtype's rate: the converts it replaces (each writing its output) are gone. The
  in-kernel tile casts are assumed free (ALU work hidden under the matmuls; not measured).
  On a device without an attention kernel (``einsum_attention``: the CPU, where XLA runs the
  reference einsums) sequence lengths are not rounded to tiles, and a Q or output layout without
  H directly before S runs at ``split_heads_attention_efficiency``: measured on a 2-core CPU (bench/results/cost-model-cpu-2026-12-06.md).
- decode attention (an attention `kernels.decode_attention.takes_decode` sends to the decode
  kernel: Sq <= 16, Sk >= 1024, no bias, on a device with ``decode_bandwidth_fraction`` > 0):
  memory bound, it reads the KV cache once per kv head (GQA: not once per query head), so
  bytes = q + k + v (+ mask) + o + the per-split partial outputs and log-sum-exps (written by the
  kernel, read by the combine), at ``decode_bandwidth_fraction`` of the bandwidth; causal reads
  only the first tile of keys (top-left aligned: query i sees keys j <= i); cache lengths and
  masks are run-time values, so the whole cache is counted (an upper bound). FLOPs count the
  kernel's padded rows (group heads x queries, at least 16). Two launches (kernel, combine).
  An ESTIMATE until `bench/attention.py --decode` measures the kernel on a GPU.
- XLA:CPU's operand copies (``relayouts_dot_operands``, the CPU): its dot emitter takes an
  operand only batch-major with its contracting axes one block at either end (`dot_ready`), and
  copies any other first, into the GEMM's canonical form (lhs [batch, free, contract], rhs
  [batch, contract, free]: `gemm_copy_keeps_minor`); so a dot_general pays a copy (2 x bytes at
  ``copy_bandwidth_fraction`` of bandwidth when the copy keeps the operand's minor axis, at
  ``transpose_bandwidth_fraction`` when it moves it, plus a launch) per such operand, and the
  reference attention one per Q or output without B then H major (any minor axis: the kernels'
  D-minor rule does not apply), a split Q or output excepted (priced by its rate, above). The
  reference attention's K and V go to its GEMMs' forms (`reference_gemm_form`: V [B, H, S, D];
  K [B, H, D, S] when q has H before S, its (kv head, group) split making K q·Kᵀ's rhs, else
  [B, H, S, D]; HLO), by one copy that XLA merges with the transpose that laid the operand out
  (`RooflineModel._gemm_form_seconds`; bench/results/cost-model-cpu-2026-12-07.md).
  A slice that is not one contiguous block
  (`contiguous_slice`: a weight's column block, a cache's head) is such a copy too. Fitted with
  the rest of the CPU row (devices.py; bench/results/cost-model-cpu-2026-12-07.md).
- softmax on a device without an attention kernel (``einsum_attention``, the CPU): a ``softmax``
  node, and the softmax inside the reference attention (with its scale), cost what
  jax.nn.softmax's nodes written out cost (`softmax_passes_seconds`: reduce_max, sub, exp,
  reduce_sum, div over the f32 scores), so the three forms of one softmax are priced alike (XLA
  runs the same passes for each). On devices with ``broadcasts_fuse`` (the CPU) every broadcast
  is free, not only a scalar splat: XLA fuses it into each consumer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ir
from ..region import dot_flops, dot_operand_types, stats, transposed_bytes
from .devices import DeviceSpec, device_name_of_kind, device_spec
from ..kernels.decode_attention import decode_tiles, node_takes_decode
from ..kernels.reference import node_takes_pallas
from .model import OpView

FREE = frozenset({
    "input", "literal", "constant", "iota", "reshape", "stop_gradient", "opaque", "opaque_output",
})
FUSED_ELEMENTWISE = ir.ELEMENTWISE_OPS | {"broadcast_in_dim"}
#: seconds per dot_general operand not in row-major GEMM form: a tie-break, not a cost
ORIENTATION_TIE_BREAK = 1e-9
#: seconds of a transpose that moves only length-1 axes (a bitcast): a tie-break, so that a reshape
#: saying the same is kept where the e-graph has both
BITCAST_TIE_BREAK = 1e-9


def _prod(values) -> int:
    return int(math.prod(int(v) for v in values))


ATTENTION_TILE = (16, 64)  # the kernels' tiles: at least 16 rows, 64 once the sequence is that long


def moves_only_unit_axes(shape: tuple[int, ...], perm: tuple[int, ...]) -> bool:
    """Whether a transpose of ``shape`` by ``perm`` keeps every axis longer than 1 in its order: the
    bytes do not move (XLA makes it a bitcast), e.g. [B, 64, 4, 1, D] -> [B, 4, 1, 64, D] does not."""
    moved = [a for a in perm if shape[a] != 1]
    return moved == sorted(moved)


def _layout_is_view(shape: tuple[int, ...], layout: str, minors: str) -> bool:
    """Whether an operand in ``layout`` is already in a layout with one of ``minors`` minor up to
    unit axes: the axes after that one are all of length 1 (its relayout is a bitcast)."""
    return any(all(shape[i] == 1 for i in range(layout.index(m) + 1, len(layout))) for m in minors)


def _heads_before_seq(layout: str, shape: tuple[int, ...]) -> bool:
    """Whether H sits directly before S in a layout once length-1 axes are dropped (or either is
    length 1): the reference attention's split of H into (kv head, group) stays a GEMM batch."""
    kept = [c for c, n in zip(layout, shape) if n != 1]
    return "H" not in kept or "S" not in kept or kept.index("S") == kept.index("H") + 1


def dot_ready(shape: tuple[int, ...], batch: tuple[int, ...], contract: tuple[int, ...]) -> bool:
    """Whether a dot operand is in the form XLA:CPU's dot emitter takes in place, ignoring length-1
    axes: its batch axes major (in order), then its contracting axes as one block (in order) first
    or last, the free axes the other block."""
    kept = [i for i, n in enumerate(shape) if n != 1]
    kb = [i for i in batch if shape[i] != 1]
    kc = [i for i in contract if shape[i] != 1]
    rest = kept[len(kb):]
    return kept[:len(kb)] == kb and (rest[:len(kc)] == kc or rest[len(rest) - len(kc):] == kc)


def gemm_copy_keeps_minor(shape: tuple[int, ...], batch: tuple[int, ...], contract: tuple[int, ...], rhs: bool) -> bool:
    """Whether XLA:CPU's copy of a dot operand it cannot take in place keeps the operand's minor
    axis (ignoring length-1 axes). The copy goes to the GEMM's canonical form: the lhs as
    [batch, free, contract], the rhs as [batch, contract, free] (HLO of a decode step: a K cache
    [B, S, H, D] read by q.Kᵀ is copied to [B, H, D, S], D no longer minor)."""
    kept = [i for i, n in enumerate(shape) if n != 1]
    if not kept:
        return True
    contracting = [i for i in contract if shape[i] != 1]
    free = [i for i in kept if i not in batch and i not in contract]
    last = (free or contracting) if rhs else (contracting or free)
    return not last or last[-1] == kept[-1]


def contiguous_slice(shape: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether a slice of ``shape`` giving ``out`` is one contiguous block of the row-major input:
    at most one axis cut, every axis before it of length 1 in the output, every axis after it whole."""
    cut = [i for i, (a, b) in enumerate(zip(shape, out)) if a != b]
    return not cut or (len(cut) == 1 and all(out[j] == 1 for j in range(cut[0])))


def _batch_major(layout: str, shape: tuple[int, ...]) -> bool:
    """Whether B then H lead a layout once length-1 axes are dropped: the reference attention's
    einsums read K or V in place as a batched GEMM operand."""
    kept = [c for c, n in zip(layout, shape) if n != 1]
    lead = [c for c in "BH" if c in kept]
    return kept[:len(lead)] == lead


#: the layout K and V are produced in: a projection's [B, S, E] split into heads, a KV cache
SOURCE_LAYOUT = "BSHD"


def reference_gemm_form(name: str, q_layout: str) -> str:
    """The layout XLA:CPU's reference attention GEMMs read K or V in (HLO): V as P.V's rhs
    [B, H, S, D]; K as q.Kᵀ's rhs [B, H, D, S] when q's layout puts H before S, else (XLA swaps
    the operands) as its lhs [B, H, S, D]."""
    return "BHDS" if name == "k" and q_layout.index("H") < q_layout.index("S") else "BHSD"


def _tiled(length: int) -> int:
    """A sequence length rounded up to the attention kernel's tile for it."""
    low, high = ATTENTION_TILE
    tile = min(high, max(low, 1 << max(0, length - 1).bit_length()))
    return -(-length // tile) * tile


@dataclass(frozen=True)
class Breakdown:
    """The parts of one node's predicted time (seconds), for reports and tests."""

    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    launch_s: float
    extra_s: float = 0.0  # layout changes the node needs first (attention operands); dots: the orientation tie-break
    variant: str = ""

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s + self.extra_s


_ZERO = Breakdown(0.0, 0.0, 0.0, 0.0, 0.0)
BACKWARD_FLOPS_RATIO = 2.5  # flash attention's backward: five matmuls of the forward's size, against two


class RooflineModel:
    """Predicted seconds of a node on ``device``; ``attention_kernel``: "pallas" or "reference"."""

    def __init__(self, device: DeviceSpec, attention_kernel: str = "pallas") -> None:
        if attention_kernel not in ("pallas", "reference"):
            raise ValueError(f"attention_kernel must be 'pallas' or 'reference', got {attention_kernel!r}")
        self.device = device
        self.attention_kernel = attention_kernel
        self.name = f"roofline-{device.name}" + ("" if attention_kernel == "pallas" else "-reference")

    def __repr__(self) -> str:
        return f"RooflineModel({self.device.name!r}, attention_kernel={self.attention_kernel!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RooflineModel) and self.device == other.device
                and self.attention_kernel == other.attention_kernel)

    def __hash__(self) -> int:
        return hash((self.device, self.attention_kernel))

    def with_attention_efficiency(self, dtype: str, variant: str, causal: bool, value: float) -> RooflineModel:
        """A copy whose device has one attention efficiency replaced."""
        return RooflineModel(self.device.with_attention_efficiency(dtype, variant, causal, value), self.attention_kernel)

    # ------------------------------------------------------------------ pricing
    def node_cost(self, node: OpView) -> float:
        return self.breakdown(node).seconds

    def breakdown(self, node: OpView) -> Breakdown:
        d = self.device
        op, out = node.op, node.output
        if op in FREE:
            return _ZERO
        if op == "transpose":
            perm = tuple(node.params["perm"])
            if perm == tuple(range(len(perm))):
                return _ZERO
            if moves_only_unit_axes(node.inputs[0].shape, perm):  # a bitcast: only length-1 axes move
                return Breakdown(0.0, 0.0, 0.0, 0.0, 0.0, BITCAST_TIE_BREAK)
            return Breakdown(0.0, 2.0 * out.nbytes, 0.0, self._transpose_seconds(out.nbytes, perm), d.launch_overhead)
        if op == "broadcast_in_dim" and node.inputs and (node.inputs[0].size == 1 or d.broadcasts_fuse):
            return _ZERO  # a scalar splat (or any broadcast, where they fuse): recomputed in each consumer
        if op == "softmax" and d.einsum_attention:  # XLA runs jax.nn.softmax's passes (devices.py)
            return Breakdown(0.0, 0.0, 0.0, 0.0, 0.0, self.softmax_passes_seconds(out))
        if op in FUSED_ELEMENTWISE:
            nbytes = float(out.nbytes)
            return Breakdown(float(out.size), nbytes, 0.0, nbytes / d.bandwidth, 0.0)
        if op in ir.REDUCE_OPS:
            nbytes = float(sum(t.nbytes for t in node.inputs) + out.nbytes)
            return Breakdown(float(node.inputs[0].size), nbytes, 0.0, nbytes / d.bandwidth, d.launch_overhead)
        if op == "dot_general":
            return self._dot(node)
        if op in ("attention", "attention_fp8"):  # fp8: q.dtype picks the fp8 efficiencies
            return self._attention(node)
        if op == "attention_vjp":
            return self._attention_vjp(node)
        if op == "packed_attention":
            return self._packed_attention(node)
        if op == "slice":
            nbytes = float(out.nbytes)
            if d.relayouts_dot_operands and not contiguous_slice(node.inputs[0].shape, out.shape):
                return Breakdown(0.0, 2.0 * nbytes, 0.0, 0.0, 0.0, self._relayout_seconds(out))  # a strided copy
            return Breakdown(0.0, nbytes, 0.0, nbytes / d.bandwidth, 0.0)
        if op == "concatenate":
            nbytes = 2.0 * out.nbytes
            return Breakdown(0.0, nbytes, 0.0, nbytes / d.bandwidth, d.launch_overhead)
        if op == "fused":
            return self._fused(node)
        # anything else the model does not know: a kernel that reads its inputs and writes its output
        nbytes = float(sum(t.nbytes for t in node.inputs) + out.nbytes)
        return Breakdown(0.0, nbytes, 0.0, nbytes / d.bandwidth, d.launch_overhead)

    def softmax_passes_seconds(self, scores: ir.TensorType, scaled: bool = False) -> float:
        """What the nodes of ``jax.nn.softmax`` over the last axis of ``scores`` cost as this model
        prices them one by one (reduce_max, max, sub, exp, reduce_sum, div; the row broadcasts as
        broadcasts are priced), after a multiply by the scale when ``scaled``: a `softmax` node and
        the reference attention's softmax cost what the same passes cost written out."""
        rows = ir.TensorType(scores.shape[:-1], scores.dtype)
        column = ir.TensorType(scores.shape[:-1] + (1,), scores.dtype)
        views = [OpView("reduce_max", {"axes": (scores.rank - 1,)}, (scores,), rows),
                 OpView("max", {}, (rows, rows), rows),  # jnp.max's clamp of the row maxima at -inf
                 OpView("broadcast_in_dim", {}, (column,), scores),
                 OpView("sub", {}, (scores, scores), scores), OpView("exp", {}, (scores,), scores),
                 OpView("reduce_sum", {"axes": (scores.rank - 1,)}, (scores,), rows),
                 OpView("broadcast_in_dim", {}, (column,), scores), OpView("div", {}, (scores, scores), scores)]
        if scaled:
            views.append(OpView("mul", {}, (scores, scores), scores))
        return sum(self.breakdown(v).seconds for v in views)

    def _transpose_seconds(self, nbytes: float, perm: tuple[int, ...] | None = None) -> float:
        d = self.device
        keeps_minor = perm is not None and len(perm) > 0 and perm[-1] == len(perm) - 1
        fraction = d.copy_bandwidth_fraction if keeps_minor else d.transpose_bandwidth_fraction
        return 2.0 * nbytes / (d.bandwidth * fraction)

    def _dot(self, node: OpView) -> Breakdown:
        d = self.device
        a, b = node.inputs[:2]
        p = node.params
        lc, rc, lb, rb = (tuple(p[k]) for k in ("lhs_contract", "rhs_contract", "lhs_batch", "rhs_batch"))
        batch = _prod(a.shape[i] for i in lb)
        k = _prod(a.shape[i] for i in lc)
        m = _prod(a.shape[i] for i in range(a.rank) if i not in lc and i not in lb)
        n = _prod(b.shape[i] for i in range(b.rank) if i not in rc and i not in rb)
        flops = 2.0 * batch * m * n * k
        peak = min(d.matmul_peak(a.dtype, p.get("precision")), d.matmul_peak(b.dtype, p.get("precision")))
        peak *= d.matmul_efficiency
        nbytes = float(a.nbytes + b.nbytes + node.output.nbytes)
        compute = flops / peak / self.tile_utilisation(batch, m, n, k) if d.multiprocessors else flops / peak
        row_major = (tuple(lb) == tuple(range(len(lb))) and tuple(lc) == tuple(range(a.rank - len(lc), a.rank)),
                     tuple(rb) == tuple(range(len(rb))) and tuple(rc) == tuple(range(len(rb), len(rb) + len(rc))))
        extra = ORIENTATION_TIE_BREAK * row_major.count(False)
        if d.relayouts_dot_operands:  # XLA:CPU copies an operand it cannot take in place (devices.py)
            for t, batch, contract, rhs in ((a, lb, lc, False), (b, rb, rc, True)):
                if not dot_ready(t.shape, batch, contract):
                    extra += self._relayout_seconds(t, gemm_copy_keeps_minor(t.shape, batch, contract, rhs))
        return Breakdown(flops, nbytes, compute, nbytes / d.bandwidth, d.launch_overhead, extra)

    def _relayout_seconds(self, t: ir.TensorType, keeps_minor: bool = True) -> float:
        """A copy of ``t`` into another axis order, plus its launch: at the copy rate when it keeps
        the minor axis, else at the transpose rate."""
        d = self.device
        fraction = d.copy_bandwidth_fraction if keeps_minor else d.transpose_bandwidth_fraction
        return 2.0 * t.nbytes / (d.bandwidth * fraction) + d.launch_overhead

    def tile_utilisation(self, batch: int, m: int, n: int, k: int) -> float:
        """Useful fraction of the tensor-core work a GEMM of this shape issues: M, N rounded up
        to the tile, and the last wave of tiles over the SMs (split-K when under one wave)."""
        d = self.device
        tm, tn, sms = d.matmul_tile_m, d.matmul_tile_n, d.multiprocessors
        tiles = batch * -(-m // tm) * -(-n // tn)
        split = max(1, min(sms // tiles, k // 512)) if tiles < sms else 1
        work = tiles * split
        waves = -(-work // sms)
        padding = (m * n) / (-(-m // tm) * tm * -(-n // tn) * tn)
        return padding * work / (waves * sms)

    def _attention_vjp(self, node: OpView) -> Breakdown:
        """One of the three gradients of an attention. Lowering runs them as one call: the forward
        (for its output and row statistics) and the flash backward, whose five matmuls are 2.5x
        the forward's two; each gradient carries a third of that, at the forward kernel's rates
        (an estimate until the backward is measured per row; bench/tune_backward.py)."""
        params = {k: v for k, v in node.params.items() if k != "wrt"}
        q, k, v, do, *mask = node.inputs
        forward = self._attention(OpView("attention", params, (q, k, v, *mask), do))
        share = (1.0 + BACKWARD_FLOPS_RATIO) / 3.0
        nbytes = (forward.bytes + q.nbytes + k.nbytes + v.nbytes + do.nbytes) / 3.0
        written = node.output.nbytes if int(node.params["wrt"]) == 3 else 0.0  # dbias: the scores' size
        return Breakdown(
            forward.flops * share, nbytes + written, forward.compute_s * share,
            forward.memory_s * share + written / self.device.bandwidth, forward.launch_s, forward.extra_s,
            forward.variant,
        )

    def _packed_attention(self, node: OpView) -> Breakdown:
        """Attention over the three entries of a packed Q/K/V array, each read in place."""
        packed, out = node.inputs[0], node.output
        layout = str(node.params["packed_layout"])
        one = ir.TensorType(tuple(n for c, n in zip(layout, packed.shape) if c != "3"), packed.dtype)
        own = layout.replace("3", "")
        params = {
            "q_layout": own, "k_layout": own, "v_layout": own, "o_layout": node.params["o_layout"],
            "scale": node.params["scale"], "causal": node.params["causal"], "mask_kind": node.params["mask_kind"],
        }
        assert sorted(own) == sorted(ir.ATTENTION_AXES)
        return self._attention(OpView("attention", params, (one, one, one, *node.inputs[1:]), out))

    def _fused(self, node: OpView) -> Breakdown:
        """A fused region (issue 7): one kernel reading its inputs and writing its output once.
        A transpose inside that moves the minor axis costs what it costs materialised (less its
        launch), so a region never makes a transpose cheaper, only saves the launches and
        intermediate writes around it. A matmul inside adds its FLOPs (the region is its
        epilogue) and its own launch when a region holds several."""
        d = self.device
        body = str(node.params["body"])
        info = stats(body)
        nbytes = float(sum(t.nbytes for t in node.inputs) + node.output.nbytes)
        flops = float(node.output.size * sum(1 for op in info.ops if op not in ("T", "W", "B", "D")))
        compute = 0.0
        for op, a, b in dot_operand_types(body, node.inputs) if info.dots else ():
            f = dot_flops(op, a, b)
            flops += f
            precision = op.params[5] if len(op.params) > 5 else ""
            compute += f / (min(d.matmul_peak(a.dtype, precision), d.matmul_peak(b.dtype, precision)) * d.matmul_efficiency)
        launches = max(1, info.dots)
        extra = self._transpose_seconds(transposed_bytes(body, node.inputs)) if info.transposes else 0.0
        return Breakdown(flops, nbytes, compute, nbytes / d.bandwidth, d.launch_overhead * launches, extra)

    def attention_variant(self, node: OpView) -> str:
        """"standard" | "transposed" | "reference": which kernel runs this attention node."""
        if self.attention_kernel == "reference" or not node_takes_pallas(node.params):
            return "reference"
        minor = str(node.params["v_layout"])[-1]
        if minor == "D":
            return "standard"
        if minor == "S":
            return "transposed"
        # V must be relaid first; it is made whichever of the two the kernel runs faster
        relaid = self.relaid_v_layout(compute_dtype(node), bool(node.params.get("causal")))
        return "transposed" if relaid == "BHDS" else "standard"

    def relaid_v_layout(self, dtype: str, causal: bool) -> str:
        """"BHDS" or "BHSD": where a V the kernel cannot read in place is copied to (lowering
        asks the current device's model the same question)."""
        std = self.device.attention_eff(dtype, "standard", causal)
        tv = self.device.attention_eff(dtype, "transposed", causal)
        return "BHDS" if tv > std else "BHSD"

    def _attention(self, node: OpView) -> Breakdown:
        d = self.device
        p = node.params
        q, k, v = node.inputs[:3]
        out = node.output
        ql, kl, vl, ol = (str(p[n]) for n in ("q_layout", "k_layout", "v_layout", "o_layout"))
        batch, heads, sq, dk = (q.shape[ql.index(c)] for c in "BHSD")
        sk = k.shape[kl.index("S")]
        dv = v.shape[vl.index("D")]
        causal = bool(p.get("causal"))
        variant = self.attention_variant(node)
        if node.op == "attention" and variant != "reference" and d.decode_bandwidth_fraction > 0 \
                and node_takes_decode(p, sq, sk):  # fp8 attention runs the flash fp8 kernel
            return self._decode_attention(node)
        # the kernel computes whole tiles: sequence lengths count rounded up to its tile
        sq_t, sk_t = (sq, sk) if d.einsum_attention else (_tiled(sq), _tiled(sk))
        flops = 2.0 * batch * heads * sq_t * sk_t * (dk + dv)
        if causal:
            flops *= 0.5
        nbytes = float(sum(t.nbytes for t in node.inputs) + out.nbytes)
        # a folded cast prologue: the kernel reads q, k, v in their own dtypes (the bytes above)
        # and runs its matmuls in the compute dtype (the efficiency and peak of that dtype)
        cdt = compute_dtype(node)
        eff = d.attention_eff(cdt, variant, causal)
        if d.einsum_attention and not (_heads_before_seq(ql, q.shape) and _heads_before_seq(ol, out.shape)):
            eff = min(eff, d.split_heads_attention_efficiency)  # XLA einsums that loop (devices.py)
        peak = d.peak(cdt) * eff
        extra = self._attention_relayouts(node)
        if d.einsum_attention:  # the reference's scale and softmax over the f32 scores, as XLA runs them
            heads_k = k.shape[kl.index("H")]
            scores = ir.TensorType((batch, heads_k, heads // max(1, heads_k), sq, sk), "float32")
            extra += self.softmax_passes_seconds(scores, scaled=True)
        return Breakdown(flops, nbytes, flops / peak, nbytes / d.bandwidth, d.launch_overhead, extra, variant)

    def _attention_relayouts(self, node: OpView) -> float:
        """Seconds of the transposes lowering puts around an attention kernel: operands it cannot
        read in place (q, k, o without D minor, v with neither D nor S minor), exactly as
        lower_attention does; B and H may sit anywhere in every layout. On XLA:CPU
        (``relayouts_dot_operands``) the reference's einsums copy a Q or output without B, H major,
        and K and V into their GEMM forms (`_gemm_form_seconds`)."""
        p, (q, k, v), out = node.params, node.inputs[:3], node.output
        extra = 0.0
        d = self.device
        for name, t, minors in (("q", q, "D"), ("k", k, "D"), ("v", v, "DS"), ("o", out, "D")):
            layout = str(p[f"{name}_layout"])
            if d.relayouts_dot_operands and d.einsum_attention and name in "kv":
                extra += self._gemm_form_seconds(t, layout, reference_gemm_form(name, str(p["q_layout"])))
            elif d.relayouts_dot_operands:  # XLA's einsums: any minor axis, B and H major (else copied)
                split = name in "qo" and d.einsum_attention and not _heads_before_seq(layout, t.shape)
                if not split and not _batch_major(layout, t.shape):  # (a split is priced by its rate)
                    extra += self._relayout_seconds(t)
            elif not _layout_is_view(t.shape, layout, minors):
                extra += self._transpose_seconds(t.nbytes) + d.launch_overhead
        return extra

    def _gemm_form_seconds(self, t: ir.TensorType, layout: str, form: str) -> float:
        """XLA:CPU's copy of the reference attention's K or V, laid out ``layout``, into its GEMM
        ``form`` (`reference_gemm_form`). XLA folds a transpose that feeds the GEMM into that copy
        (HLO: one copy; measured: decode steps reading K or V through a transpose to [B, H, S, D]
        or [B, H, D, S] run with those reading the cache as stored). So an operand with B then H
        major, the layouts the e-graph's transposes lay K and V out in, costs one copy from the
        layout they are produced in (`SOURCE_LAYOUT`) into ``form``, less what the program paid
        to lay it out: zero in ``form``; negative where a transpose that moved D from minor laid
        it out and ``form`` keeps D minor (the two copies are one that keeps it). Any other
        layout is taken as its producer wrote it (a weight-first projection's [H, D, B, S]) and
        copied as it is. Assumes a batch-major operand was laid out by a transpose: one its
        producer wrote so (Kᵀ from a weight-first projection, then a transpose that keeps S
        minor) is priced low (bench/results/cost-model-cpu-2026-12-07.md)."""
        length = dict(zip(layout, t.shape))
        kept = lambda order: [c for c in order if length[c] != 1]  # noqa: E731

        def from_source(target: str) -> float:
            if kept(target) == kept(SOURCE_LAYOUT):
                return 0.0
            return self._relayout_seconds(t, kept(target)[-1:] == kept(SOURCE_LAYOUT)[-1:])

        if kept(layout) == kept(form):
            return 0.0
        if not _batch_major(layout, t.shape):  # as its producer wrote it: copied as it is
            return self._relayout_seconds(t, kept(form)[-1:] == kept(layout)[-1:])
        return from_source(form) - from_source(layout)

    def _decode_attention(self, node: OpView) -> Breakdown:
        """The decode kernel (module docstring): memory bound, KV cache read once. An estimate
        until measured on a GPU (``decode_bandwidth_fraction`` is an assumption)."""
        d = self.device
        p = node.params
        q, k, v = node.inputs[:3]
        out = node.output
        ql, kl, vl = (str(p[n]) for n in ("q_layout", "k_layout", "v_layout"))
        batch, heads, sq, dk = (q.shape[ql.index(c)] for c in "BHSD")
        kv_heads, sk = k.shape[kl.index("H")], k.shape[kl.index("S")]
        dv = v.shape[vl.index("D")]
        rows = heads // max(1, kv_heads) * sq
        tiles = decode_tiles(batch, kv_heads, rows, sk, max(dk, dv))
        keys = min(sk, _tiled(sq)) if p.get("causal") else sk  # causal: only keys j < Sq are kept
        rows_t = -(-rows // tiles.block_rows) * tiles.block_rows
        keys_t = -(-keys // tiles.block_k) * tiles.block_k
        flops = 2.0 * batch * kv_heads * rows_t * keys_t * (dk + dv)
        kv_bytes = (k.nbytes + v.nbytes) * keys / sk
        partials = 2.0 * batch * kv_heads * tiles.splits * rows_t * (dv + 1) * 4  # written, then read
        nbytes = float(q.nbytes + kv_bytes + sum(t.nbytes for t in node.inputs[3:]) + out.nbytes + partials)
        cdt = compute_dtype(node)
        compute = flops / (d.peak(cdt) * d.attention_eff(cdt, "standard", False))
        memory = nbytes / (d.bandwidth * d.decode_bandwidth_fraction)
        return Breakdown(flops, nbytes, compute, memory, 2 * d.launch_overhead, self._attention_relayouts(node),
                         "decode")


def compute_dtype(node: OpView) -> str:
    """The dtype an attention node's matmuls run in: its compute dtype (a folded cast), else q's."""
    return str(node.params.get("compute_dtype") or node.inputs[0].dtype)


def for_device(name: str, attention_kernel: str = "pallas") -> RooflineModel:
    """The roofline model of "h100", "h200" or "cpu" (calibration file applied if present)."""
    return RooflineModel(device_spec(name), attention_kernel)


def current_device_name() -> str:
    """Table name of the device JAX runs on: "h100" / "h200" by ``device_kind``, else "cpu"."""
    try:
        import jax

        kind = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - no backend at all: price as CPU
        return "cpu"
    return device_name_of_kind(kind)


def current_device_model(attention_kernel: str = "pallas") -> RooflineModel:
    """The roofline model of ``jax.devices()[0]``."""
    return for_device(current_device_name(), attention_kernel)
