"""The op vocabulary's names, `TensorType` and each op's type rule: the bottom of the IR layer.

`eqsat_attn.ir` (programs) and `eqsat_attn.region` (fused-region bodies) build on this module;
`ir` re-exports every name here and adds the type of a ``fused`` node (through its body).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


UNARY_OPS: frozenset[str] = frozenset(
    {
        "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt",
        "cbrt", "erf", "erf_inv", "abs", "sign", "floor", "ceil", "round", "sin", "cos", "tan",
        "not", "is_finite", "stop_gradient", "square", "real", "imag",
    }
)
BINARY_OPS: frozenset[str] = frozenset(
    {
        "add", "sub", "mul", "div", "max", "min", "pow", "rem", "atan2", "nextafter",
        "and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge",
    }
)
REDUCE_OPS: frozenset[str] = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
ELEMENTWISE_OPS: frozenset[str] = UNARY_OPS | BINARY_OPS | {
    "integer_pow", "convert_element_type", "select_n",
}
LEAF_OPS: frozenset[str] = frozenset({"input", "literal", "constant", "iota"})
ATTENTION_AXES = "BHSD"  # logical axes of an attention operand; its layouts are permutations of them
PACKED_AXES = "BHSD3"  # logical axes of a packed Q/K/V array; "3" indexes Q, K, V
#: an attention node's inputs after q, k, v, by its mask kind ("bias+bool": an additive bias and a
#: boolean mask together, the scores ``where(keep, s + bias, fill)``)
ATTENTION_MASK_OPERANDS: dict[str, tuple[str, ...]] = {
    "none": (), "bias": ("bias",), "bool": ("mask",), "bias+bool": ("bias", "mask"),
}
COMPARISON_OPS: frozenset[str] = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype (a NumPy dtype name such as "float32" or "bfloat16") of one value."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact (np.prod in int64 was ~10 us a call: pricing asks often)

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def __str__(self) -> str:
        return f"{short_dtype(self.dtype)}[{','.join(map(str, self.shape))}]"


_SHORT_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16",
    "float8_e4m3fn": "f8e4m3", "float8_e5m2": "f8e5m2", "int64": "i64", "int32": "i32",
    "int16": "i16", "int8": "i8", "uint32": "u32", "uint8": "u8", "bool": "bool",
}


def short_dtype(dtype: str) -> str:
    return _SHORT_DTYPES.get(dtype, dtype)


@functools.lru_cache(maxsize=None)
def dtype_itemsize(dtype: str) -> int:
    import jax.numpy as jnp

    return jnp.dtype(dtype).itemsize


def infer_type(op: str, params: Mapping[str, Any], inputs: Sequence[TensorType]) -> TensorType:
    """Output type of a modelled op (any but ``fused``, whose type comes from its body:
    `eqsat_attn.ir.infer_type`) from its static parameters and input types."""
    if op in UNARY_OPS or op in ("integer_pow", "softmax"):
        return TensorType(inputs[0].shape, "bool" if op == "is_finite" else inputs[0].dtype)
    if op in BINARY_OPS:
        return TensorType(inputs[0].shape, "bool" if op in COMPARISON_OPS else inputs[0].dtype)
    if op == "convert_element_type":
        return TensorType(inputs[0].shape, str(params["new_dtype"]))
    if op == "select_n":
        return inputs[1]
    if op == "transpose":
        t = inputs[0]
        return TensorType(tuple(t.shape[i] for i in params["perm"]), t.dtype)
    if op in REDUCE_OPS:
        t = inputs[0]
        return TensorType(tuple(s for i, s in enumerate(t.shape) if i not in params["axes"]), t.dtype)
    if op == "dot_general":
        a, b = inputs
        lc, rc, lb, rb = (params[k] for k in ("lhs_contract", "rhs_contract", "lhs_batch", "rhs_batch"))
        free_a = [a.shape[i] for i in range(a.rank) if i not in lc and i not in lb]
        free_b = [b.shape[i] for i in range(b.rank) if i not in rc and i not in rb]
        shape = tuple(a.shape[i] for i in lb) + tuple(free_a) + tuple(free_b)
        return TensorType(shape, params.get("preferred_element_type") or a.dtype)
    if op == "slice":
        start, limit = params["start_indices"], params["limit_indices"]
        return TensorType(tuple(hi - lo for lo, hi in zip(start, limit)), inputs[0].dtype)
    if op == "concatenate":
        axis = params["dimension"]
        shape = list(inputs[0].shape)
        shape[axis] = sum(t.shape[axis] for t in inputs)
        return TensorType(tuple(shape), inputs[0].dtype)
    if op == "packed_attention":
        packed, layout = inputs[0], str(params["packed_layout"])
        logical = {c: packed.shape[layout.index(c)] for c in "BHSD"}
        return TensorType(tuple(logical[c] for c in params["o_layout"]), packed.dtype)
    if op == "attention":
        q, v = inputs[0], inputs[2]
        qa = [params["q_layout"].index(c) for c in "BHSD"]
        logical = {"B": q.shape[qa[0]], "H": q.shape[qa[1]], "S": q.shape[qa[2]], "D": v.shape[params["v_layout"].index("D")]}
        return TensorType(tuple(logical[c] for c in params["o_layout"]), params.get("compute_dtype") or q.dtype)
    if op == "attention_vjp":  # the gradient of q, k, v or the bias (after do): that operand's type
        wrt = int(params["wrt"])
        return inputs[wrt if wrt < 3 else 4]
    if op == "attention_fp8":
        out = infer_type("attention", params, inputs[:3])
        return TensorType(out.shape, str(params["out_dtype"]))
    if op == "fused":
        raise ValueError("a fused node is typed through its region body: use eqsat_attn.ir.infer_type")
    raise ValueError(f"no type rule for op {op!r}; give the node its type explicitly")
