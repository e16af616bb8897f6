"""`Report`: what the optimizer did to one function, for people and for tests."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .attention_misses import softmax_misses
from .ir import Program, short_dtype
from .kernels.decode_attention import node_takes_decode
from .kernels.flash_attention import pallas_backend
from .kernels.reference import MASK_VALUE, node_takes_pallas
from .mask_kinds import mask_kind
from .nested import NestedCall
from .region import parse, stats


@dataclass(frozen=True)
class AttentionInfo:
    """One attention op of the chosen program: its layouts, masking, grouping and kernel."""

    v_layout: str  # "BHDS" when V is read with its sequence axis minor (transposed-V), else "BHSD"
    causal: bool
    kernel: str
    q_layout: str = "BHSD"
    k_layout: str = "BHSD"
    o_layout: str = "BHSD"
    mask_kind: str = "none"
    groups: int = 1
    v_storage: str = ""  # V's physical axis order, e.g. "HDBS" when its projection writes [H,D,B,S]
    #: a cast prologue folded in (rules/fusion.py): the dtype the kernel casts q, k, v to ("" if none)
    compute_dtype: str = ""
    #: the operands it reads in another dtype and casts in-kernel, e.g. ("q:f32", "k:f32")
    cast_operands: tuple[str, ...] = ()
    #: with kernel "pallas": the backend of its forward, "mosaic_gpu" (Hopper) or "triton", or
    #: "triton decode" (the flash-decoding kernel, kernels/decode_attention.py)
    backend: str = ""
    #: what its mask is (`mask_kinds.mask_kind`): "causal", "sliding window W", "key padding",
    #: "arbitrary", "bias"; "" without a mask tensor (with "bias+bool": its boolean mask's)
    mask_pattern: str = ""
    #: the score a hidden position gets (None: the kernels' own, at or below -0.7 * float32 max)
    mask_fill: float | None = None
    softcap: float = 0.0  # logit soft-cap (scores become softcap * tanh(s / softcap)); 0: none
    #: "dq", "dk", "dv" or "dbias": a gradient of this attention (a jax.grad program's backward raised to
    #: `attention_vjp`; the three of one attention run as one backward call), "" for the forward
    gradient: str = ""
    #: where it runs when not at the top level: the body it sits in, outermost first
    #: ("scan body", "scan body > checkpoint body"; `eqsat_attn.nested`)
    inside: str = ""

    def __str__(self) -> str:
        mask = "causal" if self.causal else "full"
        if self.mask_kind != "none":
            mask += f"+{self.mask_kind}" + (f" ({self.mask_pattern})" if self.mask_pattern else "")
        if self.mask_fill is not None and (self.causal or self.mask_kind in ("bool", "bias+bool")):
            mask += f", fill {self.mask_fill:g}"
        if self.softcap:
            mask += f", soft-cap {self.softcap:g}"
        gqa = f", GQA groups={self.groups}" if self.groups > 1 else ""
        stored = f" (stored {self.v_storage})" if self.v_storage and self.v_storage != self.v_layout else ""
        cast = ""
        if self.compute_dtype:
            read = " ".join(self.cast_operands) or "nothing"
            cast = f", casts {read} to {short_dtype(self.compute_dtype)} in-kernel (cast prologue folded)"
        where = f"in {self.inside}: " if self.inside else ""
        if self.gradient:
            where += f"{self.gradient} of "
        return (
            f"{where}attention q={self.q_layout} k={self.k_layout} v={self.v_layout}{stored} o={self.o_layout}, "
            f"{mask}{gqa}, kernel={self.kernel}{f' ({self.backend})' if self.backend else ''}{cast}"
        )


def optimized_bodies(program: Program, outer: str = "") -> list[tuple[str, Program]]:
    """(where, optimized body) for each scan and checkpoint body of ``program`` that was
    optimized, nested ones after their parent: ("scan body > checkpoint body", program)."""
    out = []
    for node_id in program.live_nodes():
        call = program.nodes[node_id].params.get("call")
        if isinstance(call, NestedCall):
            where = " > ".join(filter(None, (outer, call.where)))
            out.append((where, call.body))
            out.extend(optimized_bodies(call.body, where))
    return out


def _body_hint(where: str, reason: str) -> str:
    """What a body's weights returned as an output are, under jax.grad: a scan's residual."""
    if "scan" in where and reason.startswith("the attention weights are also an output"):
        return (" (a residual the forward scan saves for jax.grad's backward scan: wrap the layer in "
                "jax.checkpoint to have the backward recompute it)")
    return ""


def attention_infos(program: Program, kernel: str) -> list[AttentionInfo]:
    """One `AttentionInfo` per live attention node of ``program``, in program order, including
    those in the optimized bodies of its scan and checkpoint nodes (`AttentionInfo.inside`)."""
    infos = []
    for node_id in program.live_nodes():
        node = program.nodes[node_id]
        if node.op == "opaque" and isinstance(node["call"], NestedCall):
            call = node["call"]
            infos.extend(
                replace(info, inside=" > ".join(filter(None, (call.where, info.inside))))
                for info in attention_infos(call.body, kernel)
            )
            continue
        if node.op == "packed_attention":  # Q, K, V read in place from one packed array
            own = str(node["packed_layout"]).replace("3", "")
            infos.append(AttentionInfo(
                v_layout="BHSD", v_storage=str(node["packed_layout"]), causal=bool(node["causal"]), kernel=kernel,
                q_layout=own, k_layout=own, o_layout=str(node["o_layout"]), mask_kind=str(node["mask_kind"]),
                backend=_packed_backend(program, node) if kernel == "pallas" else "",
            ))
            continue
        if node.op not in ("attention", "attention_fp8", "attention_vjp"):
            continue
        p = node.params
        q_layout, k_layout = str(p["q_layout"]), str(p["k_layout"])
        heads = program.type_of(node.inputs[0]).shape[q_layout.index("H")]
        kv_heads = program.type_of(node.inputs[1]).shape[k_layout.index("H")]
        compute = str(p.get("compute_dtype") or "") if node.op != "attention_fp8" else ""
        cast = tuple(
            f"{n}:{short_dtype(program.type_of(i).dtype)}" for n, i in zip("qkv", node.inputs[:3])
            if compute and program.type_of(i).dtype != compute
        )
        node_kernel = kernel if node.op == "attention_fp8" or node_takes_pallas(p) else "reference"
        gradient = ("dq", "dk", "dv", "dbias")[int(p["wrt"])] if node.op == "attention_vjp" else ""
        infos.append(
            AttentionInfo(
                v_layout="BHDS" if str(p["v_layout"]).endswith("S") else "BHSD",
                v_storage=str(p["v_layout"]),
                causal=bool(p["causal"]),
                kernel=node_kernel,
                q_layout=q_layout,
                k_layout=k_layout,
                o_layout=str(p["o_layout"]),
                mask_kind=str(p.get("mask_kind", "none")),
                groups=max(1, heads // max(1, kv_heads)),
                compute_dtype=compute,
                cast_operands=cast,
                backend=_pallas_backend(program, node) if node_kernel == "pallas" and not gradient else "",
                mask_pattern=_mask_pattern(program, node),
                mask_fill=float(p["mask_fill"]) if "mask_fill" in p.keys() else None,
                softcap=float(p.get("softcap", 0.0)),
                gradient=gradient,
            )
        )
    return infos


def _mask_pattern(program: Program, node) -> str:
    """`mask_kinds.mask_kind` of an attention node's mask operand ("" without one); of its
    boolean mask for "bias+bool" (its last input)."""
    kind = node.params.get("mask_kind", "none")
    position = {"attention": 3, "attention_vjp": 4}.get(node.op)  # the mask follows q, k, v (and do)
    if position is None or kind == "none" or len(node.inputs) <= position:
        return ""
    operand = node.inputs[-1] if kind == "bias+bool" else node.inputs[position]
    return mask_kind(program, operand, additive=kind == "bias")


def _packed_backend(program: Program, node) -> str:
    """The Pallas backend `packed_flash_attention` picks for this packed attention node."""
    import jax

    layout, o_layout = str(node["packed_layout"]), str(node["o_layout"])
    own = layout.replace("3", "")
    if str(node["mask_kind"]) != "none" or own[-1] != "D" or o_layout[-1] != "D":
        return ""  # lower_packed_attention runs the reference
    t = program.type_of(node.inputs[0])
    view = jax.ShapeDtypeStruct(tuple(t.shape[layout.index(a)] for a in own), t.dtype)
    return pallas_backend(view, view, view, v_layout=own, q_layout=own, k_layout=own,
                          o_layout=o_layout, causal=bool(node["causal"]), scale=float(node["scale"]))


def _pallas_backend(program: Program, node) -> str:
    """The Pallas backend `flash_attention` picks for this attention node's operands, or
    "triton decode" where `kernels.attention` runs the decode kernel."""
    import jax
    import jax.numpy as jnp

    p = node.params
    q, k, v = (jax.ShapeDtypeStruct(program.type_of(i).shape, program.type_of(i).dtype)
               for i in node.inputs[:3])
    if node.op == "attention_fp8" and jnp.dtype(q.dtype).name != "float8_e4m3fn":
        return ""  # lower.lower_attention_fp8 runs the reference on these operands
    if node.op == "attention" and node_takes_decode(p, q.shape[str(p["q_layout"]).index("S")],
                                                    k.shape[str(p["k_layout"]).index("S")]):
        return "triton decode"
    return pallas_backend(
        q, k, v, v_layout=str(p["v_layout"]), causal=bool(p["causal"]), scale=float(p["scale"]),
        bias=True if p.get("mask_kind") in ("bias", "bias+bool") else None, compute_dtype=p.get("compute_dtype") or None,
        q_layout=str(p["q_layout"]), k_layout=str(p["k_layout"]), o_layout=str(p["o_layout"]),
        mask=True if p.get("mask_kind") in ("bool", "bias+bool") else None, mask_fill=float(p.get("mask_fill", MASK_VALUE)),
        softcap=float(p.get("softcap", 0.0)))


@dataclass(frozen=True)
class RegionInfo:
    """One fused region of the chosen program (rules/fusion.py): what it computes and reads."""

    ops: tuple[str, ...]  # body ops in evaluation order: elementwise names, T/W (transposes), B, D
    inputs: tuple[str, ...]  # input types, e.g. ("f32[2,16,4,8]", "f32[8]")
    output: str  # output type
    output_layout: str  # "as computed", or the permutation it writes the result in ("W[0,2,3,1]")
    body: str = ""

    def __str__(self) -> str:
        ops = " ".join(self.ops)
        return f"fused region [{ops}] ({', '.join(self.inputs)}) -> {self.output}, layout {self.output_layout}"


def region_infos(program: Program) -> list[RegionInfo]:
    """One `RegionInfo` per live fused node of ``program``, in program order."""
    out = []
    for node_id in program.live_nodes():
        node = program.nodes[node_id]
        if node.op != "fused":
            continue
        body = str(node.params["body"])
        root = parse(body)
        layout = f"W[{root.params[0]}]" if root.name == "W" else "as computed"
        out.append(RegionInfo(
            stats(body).ops, tuple(str(program.type_of(i)) for i in node.inputs), str(node.type), layout, body,
        ))
    return out


def _format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


@dataclass(frozen=True)
class Report:
    """The programs before and after optimization, predicted costs and how the search went."""

    before: Program
    after: Program
    attention: list[AttentionInfo] = field(default_factory=list)
    cost_before: float = 0.0
    cost_after: float = 0.0
    rules_fired: dict[str, int] = field(default_factory=dict)
    egraph_nodes: int = 0
    saturated: bool = True
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    fused_regions: list[RegionInfo] = field(default_factory=list)  # rules/fusion.py regions chosen
    #: merged or split projections in the chosen program (rules/qkv.py), one line each; why the V
    #: layout was chosen over the alternatives: `eqsat_attn.qkv_layouts.layout_decision`
    projections: list[str] = field(default_factory=list)
    #: identical repeated blocks (a model's layers) optimized once and reused (eqsat_attn.blocks)
    repeated_blocks: int = 0
    #: attention the e-graph found but the cost model did not choose, with both predicted costs
    unchosen_attention: tuple[str, ...] = ()
    precision: str = "exact"  # the optimizer's precision policy (what `not_attention` can suggest)

    #: for one attention block whose Q/K/V are projections of one input: a callable returning its
    #: `qkv_layouts.LayoutDecision` (the predicted costs of the rejected layouts), computed on the
    #: first access (`layout_decision`, str, HTML) so optimizing never pays for it
    layout_explainer: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def layout_decision(self):
        """Why the V layout was chosen (`qkv_layouts.LayoutDecision`: which projections were
        merged, the predicted cost of the chosen program and of each rejected alternative), or
        None when the program is not one Q/K/V attention block."""
        return None if self.layout_explainer is None else self.layout_explainer()

    def _layout_lines(self) -> list[str]:
        if self.layout_explainer is None:
            return []
        decision = self.layout_decision
        if decision is None:
            reason = getattr(self.layout_explainer, "error", None) or "unknown reason"
            return [f"V layout decision unavailable ({reason})"]
        return decision.lines(projections=not self.projections)  # else listed above

    @property
    def not_attention(self) -> list[str]:
        """Why each softmax left in the chosen program is not attention: the nearest form it
        missed, or the price of the attention found for it but not chosen on this device; those
        in the optimized bodies of scans and checkpoints too ("in scan body: ...")."""
        misses = [str(miss) for miss in softmax_misses(self.after, self.precision)]
        for where, body in optimized_bodies(self.after):
            misses.extend(f"in {where}: {miss}" + _body_hint(where, miss.reason)
                          for miss in softmax_misses(body, self.precision))
        return list(self.unchosen_attention) + misses

    @property
    def speedup(self) -> float:
        """Predicted cost ratio before/after (1.0 when the cost model priced nothing)."""
        return self.cost_before / self.cost_after if self.cost_after > 0 else 1.0

    def summary(self) -> str:
        lines = [
            f"cost: {_format_seconds(self.cost_before)} -> {_format_seconds(self.cost_after)}"
            f" (predicted x{self.speedup:.3g})",
            f"nodes: {len(self.before.live_nodes())} -> {len(self.after.live_nodes())}; "
            f"e-graph: {self.egraph_nodes} e-nodes, "
            + ("saturated" if self.saturated else "stopped at a limit")
            + (f" ({self.repeated_blocks} identical blocks optimized once)" if self.repeated_blocks else ""),
        ]
        if self.rules_fired:
            fired = sorted(self.rules_fired.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("rules fired: " + ", ".join(f"{name} x{count}" for name, count in fired))
        lines.extend(f"  {info}" for info in self.attention)
        lines.extend(f"  not attention: {why}" for why in self.not_attention)
        lines.extend(f"  {info}" for info in self.fused_regions)
        lines.extend(f"  projection {line}" for line in self.projections)
        lines.extend(self._layout_lines())
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {_format_seconds(v)}" for k, v in self.timings.items()))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        bodies = "".join(f"\n\nafter, {where}:\n{body}" for where, body in optimized_bodies(self.after))
        return f"{self.summary()}\n\nbefore:\n{self.before}\n\nafter:\n{self.after}{bodies}"

    def _repr_html_(self) -> str:
        return (
            f"<pre>{html.escape(self.summary())}</pre>"
            f"<details><summary>before</summary><pre>{html.escape(str(self.before))}</pre></details>"
            f"<details open><summary>after</summary><pre>{html.escape(str(self.after))}</pre></details>"
        )
