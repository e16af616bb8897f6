"""Capture: a JAX function -> jaxpr -> `ir.Program`.

Call-like equations (``jit``/``pjit``, ``closed_call``, ``core_call``, and the primal of
``custom_jvp_call``) are inlined; ``custom_vjp_call`` stays opaque unless its primal casts to
float8 (an fp8 quantize-dequantize, e.g. flax's ``fp8_ops.in_qdq``) or computes attention (two
products and an exponential: a kernel's reference forward). The ops named in `ir` become
first-class nodes, with implicit broadcasts (rank-0 operands, size-1 dimensions) made
explicit as ``broadcast_in_dim``. Everything else becomes one ``opaque`` node, re-bound
unchanged by lowering, with one ``opaque_output`` node per result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import jax.extend.core as jcore
import numpy as np
from jax._src.lax import lax as lax_internal

from . import ir
from .ir import ConstValue, OpaqueCall, ProgramBuilder, TensorType
from .fold import folded_scalar

#: Equations whose body is inlined, with the parameter names that may hold the body.
_CALL_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "jit": ("jaxpr",),
    "pjit": ("jaxpr",),
    "closed_call": ("call_jaxpr", "jaxpr"),
    "core_call": ("call_jaxpr", "jaxpr"),
    "custom_jvp_call": ("call_jaxpr", "fun_jaxpr"),
}
# custom_vjp calls stay opaque: their backward is user code (clipping, straight-through
# estimators) that inlining the primal would silently drop. custom_jvp calls are inlined so
# the rules see their primal (jax.nn.relu, user activations); the decorator then takes
# derivatives from the original function (`Captured.custom_jvp_inlined`). The one exception
# is a custom_vjp whose primal casts to float8: fp8 libraries (flax's fp8_ops) wrap their
# quantize-dequantize in one (straight-through backward, scale updates), and the fp8 rules
# must see it; its derivatives then come from the original function in the same way. So is
# one whose primal computes attention (`_computes_attention`: a kernel's pure-JAX fallback).
_CUSTOM_VJP_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "custom_vjp_call": ("call_jaxpr", "fun_jaxpr"),
    "custom_vjp_call_jaxpr": ("fun_jaxpr", "call_jaxpr"),
}
_FP8_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
_REDUCE_PARAMS_OK = ("axes",)
_ALIAS_PRIMITIVES = frozenset({"copy"})


@dataclass(frozen=True)
class Captured:
    """A traced function: its program and how to map pytrees to and from its flat values.

    ``program`` takes the flat dynamic leaves of ``(args, kwargs)`` (``in_tree``) followed by
    ``hoisted_consts`` (closed-over values that cannot be embedded as constants: tracers of
    an outer transformation, PRNG key arrays), and returns the flat leaves of the result
    (``out_tree``).
    """

    program: ir.Program
    in_tree: Any
    out_tree: Any
    in_avals: tuple[jax.ShapeDtypeStruct, ...]
    static_argnums: tuple[int, ...] = ()
    hoisted_consts: tuple[Any, ...] = ()
    closed_jaxpr: Any = None  # the traced function itself (its custom derivative rules intact)
    custom_jvp_inlined: bool = False  # a custom_jvp (or an fp8 or attention custom_vjp) was inlined
    out_weak_types: tuple[bool, ...] = ()  # which flat results the traced function gives weakly typed

    def flat_args(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The flat inputs of ``program`` for a call with these (full) arguments."""
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        leaves, tree = jax.tree_util.tree_flatten((dynamic, kwargs))
        if tree != self.in_tree:
            raise ValueError(f"argument structure {tree} differs from the captured {self.in_tree}")
        return [*leaves, *self.hoisted_consts]

    def unflatten(self, flat_outputs: Sequence[Any]) -> Any:
        """The result pytree, each leaf as weakly typed as the traced function's own.

        The program's types are concrete dtypes (lowering builds literals as arrays), so a
        result computed from Python scalars would come back strongly typed and change how it
        promotes later (a weak f32 plus bf16 is bf16; a strong one makes f32).
        """
        flat = list(flat_outputs)
        if self.out_weak_types:
            flat = [with_weak_type(v, weak) for v, weak in zip(flat, self.out_weak_types)]
        return jax.tree_util.tree_unflatten(self.out_tree, flat)


def with_weak_type(value: Any, weak: bool) -> Any:
    """``value`` with JAX's weak-type flag set to ``weak`` (same dtype and bits)."""
    aval = jax.typeof(value)
    if bool(getattr(aval, "weak_type", False)) == weak or jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):
        return value
    # the private convert is the one way to set the flag; it re-tags a value, converting nothing
    return lax_internal._convert_element_type(value, np.dtype(aval.dtype), weak_type=weak)


def normalize_static_argnums(static_argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    """Static argument positions as sorted non-negative ints; out of range ones are errors."""
    nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    out = set()
    for n in nums:
        pos = n + nargs if n < 0 else n
        if not 0 <= pos < nargs:
            raise ValueError(f"static_argnums contains {n}, but the function was called with {nargs} positional arguments")
        out.add(pos)
    return tuple(sorted(out))


def abstract_leaf(leaf: Any, where: str | Callable[[], tuple[str, str]], static_hint: str = "") -> jax.ShapeDtypeStruct:
    """The abstract value of one argument leaf; a clear TypeError for non-arrays. ``where`` may be
    a function giving (where, hint), called only for that error (paths are slow to format)."""
    try:
        aval = jax.typeof(leaf)
        shape, dtype = aval.shape, aval.dtype
    except (TypeError, AttributeError):
        if callable(where):
            where, static_hint = where()
        raise TypeError(
            f"{where} is a {type(leaf).__name__} ({leaf!r:.60}), which is not an array: "
            f"{static_hint}or pass an array instead"
        ) from None
    return jax.ShapeDtypeStruct(shape, dtype, weak_type=bool(getattr(aval, "weak_type", False)))


def _leaf_location(path: Sequence[Any], positions: Sequence[int]) -> tuple[str, str]:
    """Where a leaf of split_args's (dynamic, kwargs) tree is, and how to make it static."""
    (top, *rest) = path
    if top.idx == 0:
        pos = positions[rest[0].idx]
        sub = jax.tree_util.keystr(tuple(rest[1:]))
        return (f"positional argument {pos}" + (f" at {sub}" if sub else ""),
                f"mark argument {pos} static with static_argnums=({pos},) ")
    return (f"keyword argument {jax.tree_util.keystr(tuple(rest))}",
            "pass it positionally and mark it static with static_argnums ")


def split_args(
    args: Sequence[Any], kwargs: dict[str, Any], static_argnums: Sequence[int]
) -> tuple[tuple[Any, ...], list[Any], Any, tuple[jax.ShapeDtypeStruct, ...]]:
    """Static argument values, flat dynamic leaves, their tree and their abstract values."""
    statics = tuple(args[i] for i in static_argnums)
    dynamic = tuple(a for i, a in enumerate(args) if i not in static_argnums)
    positions = [i for i in range(len(args)) if i not in static_argnums]
    with_path, tree = jax.tree_util.tree_flatten_with_path((dynamic, kwargs))
    avals = tuple(abstract_leaf(leaf, lambda path=path: _leaf_location(path, positions)) for path, leaf in with_path)
    return statics, [leaf for _, leaf in with_path], tree, avals


def capture(fn: Callable[..., Any], *args: Any, static_argnums: int | Sequence[int] = (), **kwargs: Any) -> Captured:
    """Trace ``fn(*args, **kwargs)`` on abstract values and convert its jaxpr to a Program.

    Arguments may be arrays, tracers, Python scalars (weak-typed) or ``jax.ShapeDtypeStruct``;
    positions in ``static_argnums`` are passed through as Python values.
    """
    static_nums = normalize_static_argnums(static_argnums, len(args))
    _, _, in_tree, avals = split_args(args, kwargs, static_nums)
    out_tree_box: list[Any] = []

    def flat_fn(*leaves: Any) -> list[Any]:
        dynamic, kw = jax.tree_util.tree_unflatten(in_tree, list(leaves))
        it = iter(dynamic)
        full = [args[i] if i in static_nums else next(it) for i in range(len(args))]
        flat_out, out_tree = jax.tree_util.tree_flatten(fn(*full, **kw))
        out_tree_box.append(out_tree)
        return flat_out

    closed = jax.make_jaxpr(flat_fn)(*avals)
    program = jaxpr_to_program(closed)
    hoisted = tuple(c for c in closed.consts if must_hoist(c))
    out_weak = tuple(bool(getattr(a, "weak_type", False)) for a in closed.out_avals)
    return Captured(
        program, in_tree, out_tree_box[-1], avals, static_nums, hoisted, closed, _uses_custom_jvp(closed.jaxpr),
        out_weak,
    )


def _uses_custom_jvp(jaxpr: Any) -> bool:
    """Whether a custom_jvp call (or an fp8 or attention custom_vjp) is inlined anywhere in ``jaxpr``
    (nested calls included)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call" or _inlined_custom_vjp_body(eqn) is not None:
            return True
        if eqn.primitive.name in _CALL_PRIMITIVES:
            for name in _CALL_PRIMITIVES[eqn.primitive.name]:
                inner = eqn.params.get(name)
                if inner is not None and _uses_custom_jvp(getattr(inner, "jaxpr", inner)):
                    return True
    return False


def must_hoist(value: Any) -> bool:
    """Whether a closed-over value must be passed as an input rather than embedded."""
    if isinstance(value, jax.core.Tracer):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def jaxpr_to_program(closed_jaxpr: Any) -> ir.Program:
    """Convert a ClosedJaxpr to a Program with one input per jaxpr invar.

    Closed-over constants become ``constant`` nodes (scalars become ``literal`` nodes);
    constants that cannot be embedded (`must_hoist`: tracers of an outer transformation,
    PRNG keys) become extra inputs after the jaxpr's own, in the order of ``consts``.
    """
    builder = ProgramBuilder()
    jaxpr, consts = closed_jaxpr.jaxpr, list(closed_jaxpr.consts)
    env: dict[Any, int] = {}
    for var in jaxpr.invars:
        env[var] = builder.input(_type_of(var.aval))
    for var, value in zip(jaxpr.constvars, consts):
        if must_hoist(value):
            env[var] = builder.input(_type_of(var.aval))
        else:
            env[var] = _const_node(builder, value, var.aval)
    converter = _Converter(builder)
    converter.run(jaxpr, env)
    outputs = [_read(builder, env, v) for v in jaxpr.outvars]
    return builder.build(outputs, converter.effects)




def dot_precision(precision: Any, operand_dtypes: set[str]) -> str | None:
    """The modelled precision of a dot_general's ``precision`` parameter: "" for what the default
    computes (none given, DEFAULT, or the algorithm preset that is the default for its operands:
    ``BF16_BF16_F32`` over bfloat16, half-precision products accumulated in float32, as
    jax.nn.dot_product_attention asks), "highest" for ``Precision.HIGHEST`` on both operands (or
    ``F32_F32_F32`` over float32), the preset's name in lower case for a half-precision preset over
    a float32 and a half-precision operand (jax.grad's transpose of a dot that asked for that
    preset: the backend may round the float32 operand to the half type), None for anything else
    (HIGH, TF32 presets): such a dot stays opaque, with its precision."""
    if precision is None:
        return ""
    name = getattr(precision, "name", None)
    if name is not None:  # a DotAlgorithmPreset
        half = ir.HALF_PRESETS.get(name.lower())
        if name == "DEFAULT" or operand_dtypes == {half}:
            return ""
        if half is not None and operand_dtypes == {half, "float32"}:
            return name.lower()
        return "highest" if name == "F32_F32_F32" and operand_dtypes == {"float32"} else None
    if isinstance(precision, tuple):
        names = {getattr(x, "name", x) for x in precision}
        if names <= {None, "DEFAULT"}:
            return ""
        return "highest" if names == {"HIGHEST"} else None
    return None


def _type_of(aval: Any) -> TensorType:
    return TensorType(tuple(int(d) for d in aval.shape), str(aval.dtype))


def _const_node(builder: ProgramBuilder, value: Any, aval: Any) -> int:
    array = np.asarray(value)
    if array.dtype != np.dtype(aval.dtype):
        array = array.astype(aval.dtype)
    t = _type_of(aval)
    if array.ndim == 0:
        return builder.add("literal", (), t, value=array.item())
    return builder.add("constant", (), t, value=ConstValue(array))


def _read(builder: ProgramBuilder, env: dict[Any, int], atom: Any) -> int:
    if isinstance(atom, jcore.Literal):
        return _const_node(builder, atom.val, atom.aval)
    return env[atom]


def _inlined_custom_vjp_body(eqn: Any) -> tuple[Any, list[Any]] | None:
    """(jaxpr, consts) of a custom_vjp call whose primal casts to float8 or computes attention
    (`_computes_attention`), else None."""
    names = _CUSTOM_VJP_PRIMITIVES.get(eqn.primitive.name)
    if names is None:
        return None
    body = _call_body(eqn, names)
    return body if body is not None and (_casts_to_fp8(body[0]) or _computes_attention(body[0])) else None


def _computes_attention(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (calls inside it included) holds two products and an exponential: an
    attention (or attention-like) primal, as a kernel's custom_vjp wraps its reference forward
    beside a hand-written backward. The rules must see it to raise it; its derivatives then come
    from the original function, as for fp8's quantize-dequantize."""
    counts = {"dot_general": 0, "exp": 0}

    def walk(inner: Any) -> None:
        for eqn in inner.eqns:
            if eqn.primitive.name in counts:
                counts[eqn.primitive.name] += 1
            body = _call_body(eqn, _CALL_PRIMITIVES.get(eqn.primitive.name, ()))
            if body is not None:
                walk(body[0])

    walk(jaxpr)
    return counts["dot_general"] >= 2 and counts["exp"] >= 1


def _casts_to_fp8(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a call inside it) converts a value to a float8 dtype."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and str(eqn.params.get("new_dtype")) in _FP8_DTYPES:
            return True
        body = _call_body(eqn, _CALL_PRIMITIVES.get(eqn.primitive.name, ()))
        if body is not None and _casts_to_fp8(body[0]):
            return True
    return False


def _inner_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """(jaxpr, consts) of an inlinable call equation, or None if it cannot be inlined."""
    return _call_body(eqn, _CALL_PRIMITIVES.get(eqn.primitive.name, ())) or _inlined_custom_vjp_body(eqn)


def _call_body(eqn: Any, names: Sequence[str]) -> tuple[Any, list[Any]] | None:
    """(jaxpr, consts) held by the first of ``names`` in ``eqn``'s parameters, when it matches
    the equation's inputs and outputs."""
    for name in names:
        inner = eqn.params.get(name)
        if inner is None:
            continue
        if hasattr(inner, "consts"):  # ClosedJaxpr
            inner_jaxpr, consts = inner.jaxpr, list(inner.consts)
        else:
            inner_jaxpr, consts = inner, []
        if len(inner_jaxpr.invars) != len(eqn.invars) or len(inner_jaxpr.constvars) != len(consts):
            return None
        if len(inner_jaxpr.outvars) != len(eqn.outvars):
            return None
        return inner_jaxpr, consts
    return None


def _unsharded(sharding: Any) -> bool:
    """No sharding constraint: none, or a sharding over a mesh without axes (what jax.grad's
    transposes attach to a cast: ``NamedSharding(AbstractMesh(()), P(None, ...))`` constrains nothing)."""
    if sharding is None:
        return True
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    return mesh is not None and spec is not None and not tuple(getattr(mesh, "axis_names", (None,))) and all(
        part is None for part in spec)


def _all_none(params: dict[str, Any], allowed: Sequence[str] = ()) -> bool:
    return all(v is None for k, v in params.items() if k not in allowed)


class _Converter:
    """Walks jaxpr equations, adding nodes to a builder."""

    def __init__(self, builder: ProgramBuilder) -> None:
        self.b = builder
        self.effects: list[int] = []  # opaque nodes of effectful equations, in program order

    def run(self, jaxpr: Any, env: dict[Any, int]) -> None:
        for eqn in jaxpr.eqns:
            ins = [_read(self.b, env, v) for v in eqn.invars]
            outs = self.equation(eqn, ins)
            for var, node_id in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = node_id

    def equation(self, eqn: Any, ins: list[int]) -> list[int]:
        name = eqn.primitive.name
        if not eqn.effects:
            inner = _inner_jaxpr(eqn)
            if inner is not None:
                inner_jaxpr, consts = inner
                env = dict(zip(inner_jaxpr.invars, ins))
                for var, value in zip(inner_jaxpr.constvars, consts):
                    env[var] = _const_node(self.b, value, var.aval)
                self.run(inner_jaxpr, env)
                return [_read(self.b, env, v) for v in inner_jaxpr.outvars]
            if name in _ALIAS_PRIMITIVES and len(ins) == 1:
                return ins
            out_types = [_type_of(v.aval) for v in eqn.outvars]
            if name == "split" and len(ins) == 1 and set(eqn.params) == {"sizes", "axis"}:
                return self.split(int(eqn.params["axis"]), ins[0], out_types)
            if len(out_types) == 1:
                node_id = self.first_class(name, dict(eqn.params), ins, out_types[0], eqn)
                if node_id is not None:
                    return [node_id]
        return self.opaque(eqn, ins)

    def opaque(self, eqn: Any, ins: list[int]) -> list[int]:
        out_types = tuple(_type_of(v.aval) for v in eqn.outvars)
        call = OpaqueCall(eqn.primitive, dict(eqn.params), out_types)
        node_id = self.b.add("opaque", ins, None, call=call)
        if eqn.effects:  # a print or callback: kept and run in order even if nothing reads it
            self.effects.append(node_id)
        return [self.b.add("opaque_output", (node_id,), t, index=i) for i, t in enumerate(out_types)]

    def broadcast_to(self, node_id: int, shape: tuple[int, ...]) -> int:
        """Make an elementwise operand exactly ``shape`` (rank-0 or size-1 broadcasting)."""
        t = self.b.type_of(node_id)
        if t.shape == shape:
            return node_id
        offset = len(shape) - t.rank
        if offset < 0 or any(d not in (1, shape[offset + i]) for i, d in enumerate(t.shape)):
            raise ValueError(f"cannot broadcast {t} to {shape}")
        dims = tuple(range(offset, len(shape)))
        return self.b.add("broadcast_in_dim", (node_id,), TensorType(shape, t.dtype), broadcast_dimensions=dims)

    def elementwise(self, op: str, ins: list[int], out: TensorType, **params: Hashable) -> int:
        operands = [self.broadcast_to(i, out.shape) for i in ins]
        return self.b.add(op, operands, out, **params)

    def first_class(self, name: str, p: dict[str, Any], ins: list[int], out: TensorType, eqn: Any) -> int | None:
        """The node for a modelled op, or None if this equation must stay opaque."""
        b = self.b
        sources = [b.nodes[i] for i in ins]
        if all(s.op == "literal" for s in sources):
            value = folded_scalar(eqn, sources, out)  # e.g. 1 / sqrt(64): one literal, as XLA folds it
            if value is not None:
                return b.add("literal", (), out, value=value.item())
        if name in ir.UNARY_OPS or name in ir.BINARY_OPS:
            arity = 1 if name in ir.UNARY_OPS else 2
            if len(ins) != arity or not _all_none(p):
                return None
            return self.elementwise(name, ins, out)
        if name == "add_any" and len(ins) == 2:  # the cotangent sum of a jax.grad program: plain addition
            return self.elementwise("add", ins, out)
        if name == "integer_pow" and len(ins) == 1:
            return self.elementwise(name, ins, out, y=int(p["y"]))
        if name == "one_minus_square" and len(ins) == 1 and jnp.issubdtype(out.dtype, jnp.floating):
            return self.one_minus_square(ins[0], out)
        if name == "select_n" and len(ins) >= 2:
            return self.elementwise(name, ins, out)
        if name == "convert_element_type" and len(ins) == 1 and _unsharded(p.get("sharding")):
            source = b.nodes[ins[0]]
            if source.op == "literal" and jnp.issubdtype(out.dtype, jnp.floating):
                # fold a float cast of a literal (e.g. -1e9 as a bf16 mask value), rounded as XLA rounds
                value = np.asarray(source.params["value"], source.type.dtype).astype(out.dtype)
                return b.add("literal", (), out, value=value.item())
            return b.add(name, ins, out, new_dtype=str(np.dtype(p["new_dtype"])))
        if name == "transpose" and len(ins) == 1:
            return b.add(name, ins, out, perm=tuple(int(i) for i in p["permutation"]))
        if name in ("reshape", "squeeze", "expand_dims") and len(ins) == 1:
            if p.get("dimensions") is not None and name == "reshape":
                return None
            if not _unsharded(p.get("sharding")):
                return None
            return b.add("reshape", ins, out)
        if name == "broadcast_in_dim" and len(ins) == 1 and _unsharded(p.get("sharding")):
            dims = tuple(int(d) for d in p["broadcast_dimensions"])
            return b.add(name, ins, out, broadcast_dimensions=dims)
        if name in ir.REDUCE_OPS and len(ins) == 1 and _all_none(p, _REDUCE_PARAMS_OK):
            return b.add(name, ins, out, axes=tuple(int(a) for a in p["axes"]))
        if name == "iota" and not ins and _all_none(p, ("dtype", "shape", "dimension")):
            return b.add(name, (), out, dimension=int(p["dimension"]))
        if name == "dot_general" and len(ins) == 2:
            return self.dot_general(p, ins, out)
        if name == "slice" and len(ins) == 1 and p.get("strides") in (None, (1,) * out.rank):
            return b.add(name, ins, out, start_indices=tuple(map(int, p["start_indices"])),
                         limit_indices=tuple(map(int, p["limit_indices"])))
        if name == "concatenate" and ins and set(p) == {"dimension"}:
            return b.add(name, ins, out, dimension=int(p["dimension"]))
        return None

    def one_minus_square(self, x: int, out: TensorType) -> int:
        """jax 0.12's ``one_minus_square`` (what it writes for tanh's derivative) as the ops its lowering
        emits, ``(1 + x) * (1 - x)``: the same HLO, so the same values bit for bit (±0, Inf and NaN
        included), and the rules see the arithmetic."""
        one = self.b.add("literal", (), TensorType((), out.dtype), value=1.0)
        plus, minus = self.elementwise("add", [one, x], out), self.elementwise("sub", [one, x], out)
        return self.elementwise("mul", [plus, minus], out)

    def split(self, axis: int, x: int, out_types: list[TensorType]) -> list[int]:
        """``split`` (what `jnp.split` emits) as one static slice per piece."""
        shape = self.b.type_of(x).shape
        outs, offset = [], 0
        for t in out_types:
            start = tuple(offset if i == axis else 0 for i in range(len(shape)))
            limit = tuple(offset + t.shape[axis] if i == axis else n for i, n in enumerate(shape))
            outs.append(self.b.add("slice", (x,), t, start_indices=start, limit_indices=limit))
            offset += t.shape[axis]
        return outs

    def dot_general(self, p: dict[str, Any], ins: list[int], out: TensorType) -> int | None:
        operand_dtypes = {self.b.nodes[i].type.dtype for i in ins}
        precision = dot_precision(p.get("precision"), operand_dtypes)
        if precision is None or not _unsharded(p.get("out_sharding")):
            return None
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        pet = p.get("preferred_element_type")
        return self.b.add(
            "dot_general", ins, out,
            lhs_contract=tuple(map(int, lc)), rhs_contract=tuple(map(int, rc)),
            lhs_batch=tuple(map(int, lb)), rhs_batch=tuple(map(int, rb)),
            preferred_element_type=None if pet is None else str(np.dtype(pet)),
            **({"precision": precision} if precision else {}),
        )
