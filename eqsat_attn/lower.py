"""Lowering: `ir.Program` -> a JAX callable built from public `lax` functions.

The callable takes the program's flat inputs and returns the list of its outputs, with
exactly the shapes and dtypes of ``program.output_types``. Opaque nodes re-bind their
original primitive; attention nodes call `eqsat_attn.kernels.attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import ir, region
from .alibi_bias import alibi_of
from .cost.roofline import current_device_model
from .ir import Node, Program
from .kernels import attention, chosen_kernel, kernel_supports_layouts, pallas_takes_scores
from .kernels.alibi import Alibi
from .kernels.fp8_attention import FP8_DTYPES, attention_reference_fp8, flash_attention_fp8
from .kernels.fp8_straight_through import attention_fp8_straight_through
from .kernels.packed import lower_packed_attention
from .kernels.partitioned import shard_attention
from .kernels.reference import MASK_VALUE
from .static_values import StaticValues

UNARY_LOWERINGS: dict[str, Callable[[Any], Any]] = {
    "neg": lax.neg, "exp": lax.exp, "exp2": lax.exp2, "log": lax.log, "log1p": lax.log1p,
    "expm1": lax.expm1, "tanh": lax.tanh, "logistic": lax.logistic, "sqrt": lax.sqrt,
    "rsqrt": lax.rsqrt, "cbrt": lax.cbrt, "erf": lax.erf, "erf_inv": lax.erf_inv, "abs": lax.abs,
    "sign": lax.sign, "floor": lax.floor, "ceil": lax.ceil, "round": lax.round, "sin": lax.sin,
    "cos": lax.cos, "tan": lax.tan, "not": lax.bitwise_not, "is_finite": lax.is_finite,
    "stop_gradient": lax.stop_gradient, "square": lax.square, "real": lax.real, "imag": lax.imag,
}
BINARY_LOWERINGS: dict[str, Callable[[Any, Any], Any]] = {
    "add": lax.add, "sub": lax.sub, "mul": lax.mul, "div": lax.div, "max": lax.max,
    "min": lax.min, "pow": lax.pow, "rem": lax.rem, "atan2": lax.atan2,
    "nextafter": lax.nextafter, "and": lax.bitwise_and, "or": lax.bitwise_or,
    "xor": lax.bitwise_xor, "eq": lax.eq, "ne": lax.ne, "lt": lax.lt, "le": lax.le,
    "gt": lax.gt, "ge": lax.ge,
}
REDUCE_LOWERINGS: dict[str, Callable[..., Any]] = {
    "reduce_sum": lax.reduce_sum, "reduce_max": lax.reduce_max, "reduce_min": lax.reduce_min,
}
ATTENTION_CANONICAL = "BHSD"


def lower(program: Program, *, attention_kernel: str = "auto") -> Callable[..., list[Any]]:
    """A function of the program's flat inputs returning the list of its outputs."""
    order = _nodes_to_evaluate(program)
    n_inputs = len(program.inputs)
    unrounded = _fp8_attention_sources(program)
    unbroadcast = _unbroadcast_masks(program)
    alibis = _alibi_biases(program)

    def run(*flat_inputs: Any) -> list[Any]:
        if len(flat_inputs) != n_inputs:
            raise TypeError(f"program takes {n_inputs} inputs, got {len(flat_inputs)}")
        values: dict[int, Any] = {}
        gradients: dict[tuple, tuple[Any, Any, Any]] = {}
        for position, node_id in enumerate(program.inputs):
            values[node_id] = flat_inputs[position]
        for node_id in order:
            node = program.nodes[node_id]
            if node.op == "input":
                continue
            args = [values[i] for i in node.inputs]
            for position, (source, shape) in unbroadcast.get(node_id, {}).items():
                args[position] = jnp.reshape(values[source], shape)
            if node.op == "attention_vjp":  # q's, k's and v's gradients of one attention: one call
                key = (node.inputs, attention_of_vjp(node).params)
                if key not in gradients:
                    gradients[key] = attention_gradients(node, args, attention_kernel, alibis.get(node_id))
                values[node_id] = gradients[key][int(node.params["wrt"])]
            elif node.op == "attention_fp8" and node_id in unrounded:
                values[node_id] = lower_attention_fp8(node, args, attention_kernel,
                                                      unrounded=[values[i] for i in unrounded[node_id]])
            elif node_id in alibis:
                values[node_id] = lower_attention(node, args, attention_kernel, alibis[node_id])
            else:
                values[node_id] = lower_node(node, args, attention_kernel)
        return [values[i] for i in program.outputs]

    return run


def _nodes_to_evaluate(program: Program) -> list[int]:
    """The live nodes in an order that runs the effects in the program's order: each effect
    right after what it reads, then what the outputs still need (a decoded program numbers
    its nodes in extraction order, which need not be the order its effects ran in)."""
    order: list[int] = []
    seen: set[int] = set()
    for root in program.effects + program.outputs:
        stack = [root]
        while stack:  # iterative post-order: a node after all of its inputs
            i = stack[-1]
            if i in seen:
                stack.pop()
                continue
            pending = [j for j in program.nodes[i].inputs if j not in seen]
            if pending:
                stack.extend(reversed(pending))
                continue
            stack.pop()
            seen.add(i)
            order.append(i)
    return order


def _alibi_biases(program: Program) -> dict[int, Alibi]:
    """{attention or attention_vjp node: its bias as `Alibi`} for the biases the program
    provably computes as ALiBi (`alibi_bias.alibi_of`), which the kernels then compute from the
    slopes instead of reading; never where the program asks for the bias's own gradient."""
    differentiated_bias = {(n.inputs, attention_of_vjp(n).params) for n in program.nodes
                           if n.op == "attention_vjp" and int(n.params["wrt"]) == 3}
    static = StaticValues(program)
    found: dict[int, Alibi | None] = {}
    out: dict[int, Alibi] = {}
    for i, node in enumerate(program.nodes):
        if node.op not in ("attention", "attention_vjp") or \
                str(node.params.get("mask_kind")) not in ("bias", "bias+bool"):
            continue
        if node.op == "attention_vjp" and (node.inputs, attention_of_vjp(node).params) in differentiated_bias:
            continue
        bias = node.inputs[3 if node.op == "attention" else 4]
        if bias not in found:
            found[bias] = alibi_of(program, bias, static)
        if found[bias] is not None:
            out[i] = found[bias]
    return out


def _unbroadcast_masks(program: Program) -> dict[int, dict[int, tuple[int, tuple[int, ...]]]]:
    """For each attention whose bias or mask is a broadcast that only expands axes (an additive
    key-padding mask [B, 1, 1, Sk] spread over heads and queries, a per-head bias over the batch):
    {input position: (the broadcast's operand, that operand's shape as rank 4 with 1 where it
    broadcast)}. The kernels take a bias or mask broadcastable to [B, H, Sq, Sk] and read such one
    without it being materialised (the same values: a broadcast moves none). A gradient's bias
    only where the program does not ask for the bias's own gradient (that has the full shape)."""
    differentiated_bias = {(n.inputs, attention_of_vjp(n).params) for n in program.nodes
                           if n.op == "attention_vjp" and int(n.params["wrt"]) == 3}
    out: dict[int, dict[int, tuple[int, tuple[int, ...]]]] = {}
    for i, node in enumerate(program.nodes):
        if node.op == "attention":  # (attention_fp8's inputs after v are its scales, not masks)
            first = 3
        elif node.op == "attention_vjp":  # q, k, v, do, then the bias and mask
            has_bias = str(node.params.get("mask_kind")) in ("bias", "bias+bool")
            first = 5 if has_bias and (node.inputs, attention_of_vjp(node).params) in differentiated_bias else 4
        else:
            continue
        for position in range(first, len(node.inputs)):
            source = program.nodes[node.inputs[position]]
            if source.op != "broadcast_in_dim":
                continue
            dims, small = tuple(source.params["broadcast_dimensions"]), program.type_of(source.inputs[0]).shape
            full = program.type_of(node.inputs[position]).shape
            if list(dims) != sorted(dims) or any(n not in (1, full[d]) for n, d in zip(small, dims)):
                continue  # a broadcast that also reorders axes (not a view of its operand)
            shape = [1] * len(full)
            for n, d in zip(small, dims):
                shape[d] = n
            out.setdefault(i, {})[position] = (source.inputs[0], tuple(shape))
    return out


def _fp8_attention_sources(program: Program) -> dict[int, tuple[int, int, int]]:
    """For each fp8 attention whose Q, K and V are each a float value rounded to fp8 in this
    program: the ids of those unrounded values (lowered as one op, so gradients reach them
    unrounded: `kernels.fp8_straight_through`)."""
    def source(i: int) -> int | None:
        node = program.nodes[i]
        if node.op != "convert_element_type" or str(node.params["new_dtype"]) not in FP8_DTYPES:
            return None
        (j,) = node.inputs
        src = str(program.type_of(j).dtype)
        return j if src in ("float32", "bfloat16", "float16") else None

    out = {}
    for i, node in enumerate(program.nodes):
        if node.op == "attention_fp8":
            sources = [source(j) for j in node.inputs[:3]]
            if all(j is not None for j in sources):
                out[i] = tuple(sources)
    return out


def lower_node(node: Node, args: list[Any], attention_kernel: str = "auto") -> Any:
    """The JAX value of one node given the values of its inputs."""
    op, p, t = node.op, node.params, node.type
    if op in UNARY_LOWERINGS:
        return UNARY_LOWERINGS[op](args[0])
    if op in BINARY_LOWERINGS:
        return BINARY_LOWERINGS[op](args[0], args[1])
    if op in REDUCE_LOWERINGS:
        return REDUCE_LOWERINGS[op](args[0], axes=tuple(p["axes"]))
    if op == "literal":
        return np.array(p["value"], dtype=jnp.dtype(t.dtype))
    if op == "constant":
        return p["value"].array
    if op == "integer_pow":
        return lax.integer_pow(args[0], p["y"])
    if op == "convert_element_type":
        return lax.convert_element_type(args[0], jnp.dtype(p["new_dtype"]))
    if op == "select_n":
        return lax.select_n(*args)
    if op == "transpose":
        return lax.transpose(args[0], tuple(p["perm"]))
    if op == "reshape":
        return lax.reshape(args[0], t.shape)
    if op == "broadcast_in_dim":
        return lax.broadcast_in_dim(args[0], t.shape, tuple(p["broadcast_dimensions"]))
    if op == "iota":
        return lax.broadcasted_iota(jnp.dtype(t.dtype), t.shape, p["dimension"])
    if op == "dot_general":
        return _dot_general(p, args)
    if op == "opaque":
        call = p["call"]
        # as jax's own eval_jaxpr does: call-like primitives (custom_vjp_call, remat) get their
        # function parameters back from get_bind_params (jax 0.11 returns (subfuns, params))
        bind_params = call.primitive.get_bind_params(dict(call.params))
        if isinstance(bind_params, tuple):
            subfuns, bind_params = bind_params
            out = call.primitive.bind(*subfuns, *args, **bind_params)
        else:
            out = call.primitive.bind(*args, **bind_params)
        return tuple(out) if call.primitive.multiple_results else (out,)
    if op == "opaque_output":
        return args[0][p["index"]]
    if op == "slice":
        return lax.slice(args[0], tuple(p["start_indices"]), tuple(p["limit_indices"]))
    if op == "concatenate":
        return lax.concatenate(args, p["dimension"])
    if op == "attention":
        return lower_attention(node, args, attention_kernel)
    if op == "attention_vjp":
        return attention_gradients(node, args, attention_kernel)[int(p["wrt"])]
    if op == "attention_fp8":
        return lower_attention_fp8(node, args, attention_kernel)
    if op == "packed_attention":
        return lower_packed_attention(node, args, attention_kernel)
    if op == "softmax":
        return jax.nn.softmax(args[0], axis=-1)
    if op == "fused":  # one function body of the region's ops; XLA fuses it as it fuses them
        return evaluate_region(str(p["body"]), args)
    raise NotImplementedError(f"lowering has no rule for op {op!r}")


def evaluate_region(body: str, inputs: Sequence[Any]) -> Any:
    """A fused region's value: its body's ops (`eqsat_attn.region`) applied as `lower_node`
    applies the unfused ops, in one function that XLA fuses as it fuses them."""
    values: list[Any] = []
    for step in region.compile_body(body):
        if step.kind == "arg":
            values.append(inputs[step.index])
        elif step.kind == "literal":
            value, dtype = region.literal_value(step.op)
            values.append(np.array(value, dtype=jnp.dtype(dtype)))
        else:
            args = [values[i] for i in step.args]
            types = [ir.TensorType(tuple(np.shape(a)), str(jnp.result_type(a))) for a in args]
            node = Node(step.ir_op, (), ir.Params(step.params), region.step_type(step, types))
            values.append(lower_node(node, args))
    return values[-1]


def dot_precision_arg(precision: str | None) -> Any:
    """``lax.dot_general``'s precision for an IR dot's: None (JAX's default), ``Precision.HIGHEST``
    for "highest", the algorithm preset a half-precision preset's lower-case name names."""
    if not precision:
        return None
    return lax.Precision.HIGHEST if precision == "highest" else lax.DotAlgorithmPreset[precision.upper()]


#: jaxlib before 0.12 runs some 16-bit dots accumulating in float32 on no CPU path ("Unsupported
#: element type for DotThunk::Execute: BF16 x BF16 = F32", e.g. batch axes (0, 1) against (0, 2),
#: which the transpose rules write): there such a dot widens its operands first, the same products
#: (exact in float32) summed in float32 in XLA's own order
_WIDEN_HALF_DOTS_ON_CPU = jax.__version_info__ < (0, 12)


def _dot_general(p: ir.Params, args: list[Any]) -> Any:
    dims = ((tuple(p["lhs_contract"]), tuple(p["rhs_contract"])), (tuple(p["lhs_batch"]), tuple(p["rhs_batch"])))
    pet = p.get("preferred_element_type")
    a, b = args[0], args[1]
    if (_WIDEN_HALF_DOTS_ON_CPU and pet == "float32" and jax.default_backend() == "cpu"
            and {jnp.dtype(a.dtype).name, jnp.dtype(b.dtype).name} <= {"bfloat16", "float16"}):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return lax.dot_general(
        a, b, dims, precision=dot_precision_arg(p.get("precision")),
        preferred_element_type=None if pet is None else jnp.dtype(pet),
    )


def layout_perm(source: str, target: str) -> tuple[int, ...]:
    """The permutation taking an array in axis order ``source`` to axis order ``target``."""
    if sorted(source) != sorted(target):
        raise ValueError(f"layouts {source!r} and {target!r} name different axes")
    return tuple(source.index(axis) for axis in target)


def _to_layout(x: Any, source: str, target: str) -> Any:
    perm = layout_perm(source, target)
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


def resolve_attention_kernel(attention_kernel: str) -> str:
    """The kernel "auto" stands for on the default JAX backend: "pallas" on GPU, else "reference"."""
    return chosen_kernel(attention_kernel)


def _relaid_v_layout(dtype: Any, causal: bool) -> str:
    """Where a V the kernel cannot read in place (neither D nor S minor) is copied to: the faster
    of "BHSD" / "BHDS" on this device, as `RooflineModel.attention_variant` prices it."""
    try:
        return current_device_model().relaid_v_layout(str(jnp.dtype(dtype)), causal)
    except Exception:  # noqa: BLE001 - no cost model / backend: the standard layout
        return ATTENTION_CANONICAL


def attention_mask_args(mask_kind: str, args: Sequence[Any]) -> dict[str, Any]:
    """The ``bias`` / ``mask`` keyword arguments of the attention kernels for an attention node's
    inputs (q, k, v, then those `ir.ATTENTION_MASK_OPERANDS` names: "bias+bool" has both)."""
    if mask_kind not in ir.ATTENTION_MASK_OPERANDS:
        raise ValueError(f"unknown attention mask_kind {mask_kind!r}; known: {sorted(ir.ATTENTION_MASK_OPERANDS)}")
    names = ir.ATTENTION_MASK_OPERANDS[mask_kind]
    if len(args) != 3 + len(names):
        raise ValueError(f"an attention with mask_kind {mask_kind!r} has {3 + len(names)} inputs "
                         f"(q, k, v{''.join(', ' + n for n in names)}), got {len(args)}")
    return dict(zip(names, args[3:]))


def lower_attention(node: Node, args: Sequence[Any], attention_kernel: str = "auto",
                    alibi: Alibi | None = None) -> Any:
    """Call the attention kernel on q, k, v in their own layouts, writing o in its layout.

    The Pallas kernels read every layout `kernel_supports_layouts` accepts in place (D minor in
    q, k, o; D or S minor in v), and the reference takes any layout, so in general no operand is
    copied. Only an operand the Pallas kernel cannot read is transposed first: q, k to BHSD, v to
    BHSD or BHDS (the faster kernel on this device), and o is then written in BHSD and
    transposed to its layout. The roofline cost model charges exactly those transposes. On the
    Pallas backend a decode-shaped call (Sq <= 16, Sk >= 1024, no bias: `kernels.decode_attention.
    takes_decode`, from static shapes) runs the decode kernel (`kernels.attention` picks it).
    ``alibi``: the bias operand is that ALiBi (`_alibi_biases`): the kernels get the slopes instead.
    """
    p = node.params
    extra = attention_mask_args(str(p.get("mask_kind", "none")), args)
    if alibi is not None and jax.device_count() > 1:  # shards hold head subsets: slopes are per head
        sq, sk = args[0].shape[str(p["q_layout"]).index("S")], args[1].shape[str(p["k_layout"]).index("S")]
        extra["bias"], alibi = alibi.bias(sq, sk), None
    if alibi is not None:
        del extra["bias"]
    q, k, v = args[0], args[1], args[2]
    q_layout, k_layout, v_layout, o_layout = (str(p[n]) for n in ("q_layout", "k_layout", "v_layout", "o_layout"))
    mods = {"mask_fill": float(p.get("mask_fill", MASK_VALUE)), "softcap": float(p.get("softcap", 0.0))}
    exact = pallas_takes_scores(has_mask="mask" in extra, causal=bool(p["causal"]), **mods)
    kernel = chosen_kernel(attention_kernel, exact_on_pallas=exact)
    compute_dtype = p.get("compute_dtype") or None  # a folded cast: the kernel casts q, k, v to it
    layouts = dict(q_layout=q_layout, k_layout=k_layout, v_layout=v_layout, o_layout=o_layout)
    if kernel == "pallas":
        (q, k, v), layouts = _kernel_readable((q, k, v), layouts, compute_dtype or q.dtype, bool(p["causal"]))
    out_layout = layouts["o_layout"]

    mask_names = tuple(extra)  # "bias" and/or "mask"

    def kernel_call(q: Any, k: Any, v: Any, *masks: Any) -> Any:
        return attention(q, k, v, scale=float(p["scale"]), causal=bool(p["causal"]), kernel=kernel,
                         compute_dtype=compute_dtype, alibi=alibi, **layouts, **mods,
                         **dict(zip(mask_names, masks)))

    masks = [extra[name] for name in mask_names]
    if kernel == "pallas":  # split over batch and heads under a device mesh
        out = shard_attention(kernel_call, q, k, v, *masks, **layouts)
    else:
        out = kernel_call(q, k, v, *masks)
    return _to_layout(out, out_layout, o_layout)


def _kernel_readable(qkv: Sequence[Any], layouts: dict[str, str], dtype: Any,
                     causal: bool) -> tuple[tuple[Any, Any, Any], dict[str, str]]:
    """q, k, v and the four layouts for a Pallas kernel call: an operand the kernels cannot read
    in place is transposed, q and k to BHSD, v to BHSD or BHDS (the faster kernel on this device
    for ``dtype``), and o is written in BHSD (the caller transposes it back to its own layout)."""
    if kernel_supports_layouts(*(layouts[f"{n}_layout"] for n in "qkvo")):
        return tuple(qkv), layouts
    out, new = [], dict(layouts)
    for name, x in zip("qkv", qkv):
        layout = layouts[f"{name}_layout"]
        if layout[-1] not in ("DS" if name == "v" else "D"):
            target = _relaid_v_layout(dtype, causal) if name == "v" else ATTENTION_CANONICAL
            x, new[f"{name}_layout"] = _to_layout(x, layout, target), target
        out.append(x)
    if layouts["o_layout"][-1] != "D":
        new["o_layout"] = ATTENTION_CANONICAL
    return tuple(out), new


def attention_of_vjp(node: Node) -> Node:
    """The attention an ``attention_vjp`` node differentiates (its inputs without ``do``)."""
    params = ir.Params((k, v) for k, v in node.params.items() if k != "wrt")
    return Node("attention", node.inputs[:3] + node.inputs[4:], params, None)


def attention_gradients(node: Node, args: Sequence[Any], attention_kernel: str = "auto",
                        alibi: Alibi | None = None) -> tuple[Any, ...]:
    """(dq, dk, dv[, dbias]) of an ``attention_vjp`` node's attention at its cotangent ``do``: the
    attention lowered as `lower_attention` lowers it (the Pallas kernels' custom VJP runs the
    flash backward, which also gives the bias gradient), differentiated with `jax.vjp`. With
    ``alibi`` (the bias is that ALiBi, not differentiated) only dq, dk, dv."""
    q, k, v, do, *mask = args
    forward = attention_of_vjp(node)
    if alibi is not None:
        out, pullback = jax.vjp(lambda q, k, v: lower_attention(forward, [q, k, v, *mask], attention_kernel, alibi),
                                q, k, v)
    elif node.params.get("mask_kind") in ("bias", "bias+bool"):  # an additive bias is differentiable: wrt 3
        bias, *keep = mask
        out, pullback = jax.vjp(lambda q, k, v, b: lower_attention(forward, [q, k, v, b, *keep], attention_kernel),
                                q, k, v, bias)
    else:
        out, pullback = jax.vjp(lambda q, k, v: lower_attention(forward, [q, k, v, *mask], attention_kernel), q, k, v)
    return tuple(pullback(lax.convert_element_type(do, out.dtype)))


def lower_attention_fp8(node: Node, args: Sequence[Any], attention_kernel: str = "auto",
                        unrounded: Sequence[Any] | None = None) -> Any:
    """fp8 attention: the Pallas fp8 kernel on e4m3 operands where Pallas runs (an operand it
    cannot read in place transposed first, as `lower_attention` does, so the kernel's values do
    not depend on the layouts extraction chose), else the reference (dequantize, attention) in
    any layouts. ``unrounded``: the float values
    ``args[:3]`` were rounded from, to differentiate straight through that rounding (same values)."""
    p = node.params
    o_layout = str(p["o_layout"])
    layouts = {f"{n}_layout": str(p[f"{n}_layout"]) for n in "qkvo"}
    pallas = chosen_kernel(attention_kernel) == "pallas" and str(jnp.dtype(args[0].dtype)) == "float8_e4m3fn"
    fp8_dtypes = [str(jnp.dtype(a.dtype)) for a in args[:3]]
    qkv = args[:3] if unrounded is None else unrounded
    if pallas:  # the kernel in any layouts, as `lower_attention` (rounding commutes with a transpose)
        qkv, layouts = _kernel_readable(qkv, layouts, args[2].dtype, bool(p["causal"]))
    kw = dict(scale=float(p["scale"]), causal=bool(p["causal"]), out_dtype=str(p["out_dtype"]), **layouts)
    if unrounded is not None:
        out = attention_fp8_straight_through(qkv, args[3:6], fp8_dtypes, pallas=pallas, **kw)
    else:
        out = (flash_attention_fp8 if pallas else attention_reference_fp8)(*qkv, *args[3:6], **kw)
    return _to_layout(out, layouts["o_layout"], o_layout)
