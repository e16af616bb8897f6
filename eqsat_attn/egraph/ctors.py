"""How each `Term` constructor maps to an IR op: its argument kinds and static parameters.

Shared by decoding, the extraction cost adapters and the ILP extractor, so a constructor's
meaning is written down once.
"""

from __future__ import annotations

from typing import Any

from ..region import lone_matmul
from .encode import axes_to_layout, axes_to_packed_layout
from .language import KERNEL_FILL

# Argument kinds per constructor: "T" a tensor (Term), "L" an operand list, else a primitive.
ARG_KINDS: dict[str, tuple[str, ...]] = {
    "input": ("i64",), "literal": ("f64", "str"), "constant": ("i64",), "iota": ("str", "vec", "i64"),
    "unary": ("str", "T"), "binary": ("str", "T", "T"), "integer_pow": ("T", "i64"), "convert": ("T", "str"),
    "select": ("T", "T", "T"), "softmax": ("T",), "transpose": ("T", "vec"), "reshape": ("T", "vec"),
    "broadcast": ("T", "vec", "vec"), "reduce": ("str", "T", "vec"),
    "dot": ("T", "T", "vec", "vec", "vec", "vec", "str", "str"),
    "attention": ("T", "T", "T", "T", "vec", "vec", "vec", "vec", "f64", "i64", "str", "str", "f64", "f64"),
    "attention_vjp": ("T", "T", "T", "T", "T", "vec", "vec", "vec", "vec", "f64", "i64", "str", "str", "f64", "f64",
                      "i64"),
    "no_mask": (), "mask_pair": ("T", "T"), "opaque": ("i64", "L"), "output": ("T", "i64"),
    "attention_fp8": ("T", "T", "T", "T", "T", "T", "vec", "vec", "vec", "vec", "f64", "i64", "str"),
    "slice": ("T", "vec", "vec"), "concat": ("L", "i64"),
    "packed_attention": ("T", "T", "vec", "vec", "f64", "i64", "str"),
}
# fused regions (issue 7): a body text, then the region's inputs
ARG_KINDS.update({f"fused{n}": ("str",) + ("T",) * n for n in range(7)})

# Position of the mask kind among `Term.attention`'s statics (the compute dtype follows it).
ATTENTION_MASK_KIND = 6

# Constructors that cost nothing to extract: leaves, and nodes that only name other values
# (`Term.mask_pair` names an attention's bias and boolean mask, which the attention prices).
FREE_CTORS = frozenset({"no_mask", "mask_pair", "opaque", "output", "input", "literal", "constant", "iota"})


def split_args(ctor: str, args: list[Any]) -> tuple[list[Any], list[Any]]:
    """(tensor operands, static parameters) of a constructor's arguments, in order.

    An attention without a mask tensor (mask kind "none") has three operands; one with a bias
    and a boolean mask ("bias+bool") has four, the fourth their `Term.mask_pair`.
    """
    kinds = ARG_KINDS[ctor]
    tensors = [a for k, a in zip(kinds, args, strict=True) if k == "T"]
    statics = [a for k, a in zip(kinds, args, strict=True) if k not in ("T", "L")]
    if ctor == "attention" and statics[ATTENTION_MASK_KIND] == "none":
        tensors = tensors[:3]
    if ctor == "attention_vjp" and statics[ATTENTION_MASK_KIND] == "none":
        tensors = tensors[:4]
    if ctor == "packed_attention" and statics[-1] == "none":
        tensors = tensors[:1]
    return tensors, statics


def score_mod_params(fill: float, softcap: float) -> dict[str, Any]:
    """IR params of attention's fill and soft-cap, each absent at its default (the kernels' fill,
    no soft-cap) so attention without them reads as before."""
    out: dict[str, Any] = {}
    if float(fill) != KERNEL_FILL:
        out["mask_fill"] = float(fill)
    if float(softcap) != 0.0:
        out["softcap"] = float(softcap)
    return out


def _attention_params(qa, ka, va, oa, scale, causal) -> dict[str, Any]:
    """The IR parameters both attention constructors share: layouts, scale, causality."""
    return {
        "q_layout": axes_to_layout(tuple(qa)), "k_layout": axes_to_layout(tuple(ka)),
        "v_layout": axes_to_layout(tuple(va)), "o_layout": axes_to_layout(tuple(oa)),
        "scale": float(scale), "causal": bool(causal),
    }


def op_params(ctor: str, statics: list[Any]) -> tuple[str, dict[str, Any]]:
    """The IR op and its params for a modelled (non-leaf) constructor's static arguments.

    ``reshape`` and ``broadcast`` carry their output shape as their first static; callers
    read it from there (it is not an IR parameter).
    """
    if ctor in ("unary", "binary"):
        return statics[0], {}
    if ctor == "reduce":
        return statics[0], {"axes": tuple(statics[1])}
    if ctor == "transpose":
        return "transpose", {"perm": tuple(statics[0])}
    if ctor == "reshape":
        return "reshape", {}
    if ctor == "broadcast":
        return "broadcast_in_dim", {"broadcast_dimensions": tuple(statics[1])}
    if ctor == "dot":
        lc, rc, lb, rb, out_dtype, precision = statics
        return "dot_general", {
            "lhs_contract": tuple(lc), "rhs_contract": tuple(rc), "lhs_batch": tuple(lb), "rhs_batch": tuple(rb),
            "preferred_element_type": out_dtype or None, **({"precision": precision} if precision else {}),
        }
    if ctor == "attention":
        params = {**_attention_params(*statics[:6]), "mask_kind": statics[6]}
        if statics[7]:  # a cast prologue folded in; absent by default, so plain attention is unchanged
            params["compute_dtype"] = statics[7]
        params.update(score_mod_params(*statics[8:10]))
        return "attention", params
    if ctor == "attention_vjp":
        _, params = op_params("attention", statics[:10])
        return "attention_vjp", {**params, "wrt": int(statics[10])}
    if ctor == "attention_fp8":
        return "attention_fp8", {**_attention_params(*statics[:6]), "out_dtype": statics[6]}
    if ctor == "slice":
        return "slice", {"start_indices": tuple(statics[0]), "limit_indices": tuple(statics[1])}
    if ctor == "concat":
        return "concatenate", {"dimension": int(statics[0])}
    if ctor == "packed_attention":
        pa, oa, scale, causal, mask_kind = statics
        return "packed_attention", {
            "packed_layout": axes_to_packed_layout(tuple(pa)), "o_layout": axes_to_layout(tuple(oa)),
            "scale": float(scale), "causal": bool(causal), "mask_kind": mask_kind,
        }
    if ctor == "convert":
        return "convert_element_type", {"new_dtype": statics[0]}
    if ctor == "select":
        return "select_n", {}
    if ctor == "integer_pow":
        return "integer_pow", {"y": statics[0]}
    if ctor == "softmax":
        return "softmax", {}
    if ctor.startswith("fused"):
        dot = lone_matmul(statics[0])  # a region of a matmul alone is that matmul
        return ("dot_general", dot) if dot is not None else ("fused", {"body": statics[0]})
    raise ValueError(f"constructor {ctor!r} has no IR op of its own")
