"""The Program IR: an SSA DAG of tensor nodes shared by every stage of the optimizer.

A `Program` is a tuple of `Node`s in topological order. Each node names an op, the ids of
its input nodes, static parameters (hashable values only) and its output `TensorType`.
Programs compare and hash structurally, so two captures of the same function are equal.
The op names, `TensorType` and the per-op type rules live in `eqsat_attn.op_types` (under
`eqsat_attn.region`, which a ``fused`` node's type needs) and are re-exported here.

Op vocabulary (params in brackets; output shape and dtype always come from `Node.type`):

- ``input[index]``: the index-th flat argument. ``literal[value]``: a scalar constant.
  ``constant[value: ConstValue]``: a closed-over array.
- elementwise: every name in `UNARY_OPS` and `BINARY_OPS` (operands all of the output's
  shape: capture makes implicit broadcasts explicit), ``integer_pow[y]``,
  ``convert_element_type[new_dtype]``, ``select_n`` (predicate first, then the cases).
- ``transpose[perm]``, ``reshape`` (to ``type.shape``), ``broadcast_in_dim[broadcast_dimensions]``,
  ``reduce_sum|reduce_max|reduce_min[axes]``, ``iota[dimension]``,
  ``dot_general[lhs_contract, rhs_contract, lhs_batch, rhs_batch, preferred_element_type, precision?]``
  (precision absent for JAX's default, "highest" for ``Precision.HIGHEST``, "bf16_bf16_f32" or
  "f16_f16_f32" for that algorithm preset over a float32 and a half-precision operand).
- ``slice[start_indices, limit_indices]`` (stride 1) and ``concatenate[dimension]`` (any
  number of operands of one dtype, equal except along ``dimension``).
- ``packed_attention[packed_layout, o_layout, scale, causal, mask_kind]``: attention whose Q, K
  and V are the three entries of one packed array (input 0, e.g. a fused QKV projection's output
  as [B,S,3,H,D]); ``packed_layout`` is a permutation of "BHSD3" naming its axis order, "3" the
  packed axis (Q, K, V at index 0, 1, 2). Optional input 1 is the bias.
- ``softmax``: the numerically stable softmax over the last axis (raised by the rules).
- ``attention[q_layout, k_layout, v_layout, o_layout, scale, causal, mask_kind, compute_dtype?]``:
  inputs (q, k, v), (q, k, v, mask) for mask_kind "bias" (additive) or "bool", or (q, k, v, bias,
  mask) for "bias+bool" (`ATTENTION_MASK_OPERANDS`); layouts are strings over "BHSD" naming the axis order of
  each operand ("BHDS" for V is the transposed-V form). GQA grouping follows from the head counts.
  ``compute_dtype`` (absent by default): q, k and v are cast to it inside the kernel before the
  matmuls (a folded cast prologue, rules/fusion.py), and the result has that dtype.
- ``attention_vjp[<attention's params>, wrt]``: inputs (q, k, v, do) or (q, k, v, do, mask): the
  gradient of ``sum(attention(q, k, v[, mask]) * do)`` with respect to q, k, v or an additive bias
  (``wrt`` 0, 1, 2, 3), in that input's type (raised from a jax.grad program's written-out attention backward).
- ``attention_fp8[q_layout, k_layout, v_layout, o_layout, scale, causal, out_dtype]``: inputs
  (q8, k8, v8, q_scale, k_scale, v_scale): attention over the fp8 operands dequantized by their
  rank-0 float scales (x8 · s), result in ``out_dtype`` (eqsat_attn.kernels.fp8_attention).
- ``fused[body]``: one kernel computing the region body text (`eqsat_attn.region`) from its
  inputs: elementwise ops, broadcasts, converts, transposes and at most a matmul (epilogue).
- ``opaque[call: OpaqueCall]``: anything else, re-bound unchanged by lowering; its outputs
  are read by ``opaque_output[index]`` nodes. Opaque nodes with effects (prints, callbacks)
  are the program's ``effects``: live even when nothing reads them, run in their listed order.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .op_types import (  # the op vocabulary and TensorType, re-exported: they are the IR's names too
    ATTENTION_AXES, ATTENTION_MASK_OPERANDS, BINARY_OPS, COMPARISON_OPS, ELEMENTWISE_OPS, LEAF_OPS, PACKED_AXES,
    REDUCE_OPS, UNARY_OPS,
    TensorType, dtype_itemsize, short_dtype,
)
from .op_types import infer_type as infer_op_type
from .region import region_type

#: a dot's half-precision algorithm presets (``precision`` over a float32 and a half operand), by the
#: operand type they multiply in (``BF16_BF16_F32`` as jax names it is "bf16_bf16_f32" here)
HALF_PRESETS = {"bf16_bf16_f32": "bfloat16", "f16_f16_f32": "float16"}


def _float_bits(value: float) -> tuple[str, int]:
    """A float's identity by its IEEE bits: -0.0 differs from 0.0, a NaN equals only itself."""
    return ("float", struct.unpack("<q", struct.pack("<d", value))[0])


class Params(Mapping[str, Hashable]):
    """An immutable, hashable mapping of a node's static parameters."""

    __slots__ = ("_items", "_hash", "_cached_key")

    def __init__(self, items: Mapping[str, Hashable] | Iterable[tuple[str, Hashable]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: tuple[tuple[str, Hashable], ...] = tuple(sorted(pairs, key=lambda kv: kv[0]))
        self._hash: int | None = None  # computed once: nodes are hashed on every builder lookup
        self._cached_key: tuple | None = None

    def __getitem__(self, key: str) -> Hashable:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def _key(self) -> tuple:
        # floats by their bits: -0.0 and 0.0 are different literals, and NaN equals itself
        if self._cached_key is None:
            self._cached_key = tuple((k, _float_bits(v) if isinstance(v, float) else v) for k, v in self._items)
        return self._cached_key

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._key())
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and (self is other or self._key() == other._key())

    def __repr__(self) -> str:
        return f"Params({dict(self._items)!r})"


@dataclass(frozen=True, eq=False)
class ConstValue:
    """A closed-over array, compared and hashed by dtype, shape and contents."""

    array: np.ndarray
    _key: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "_key", (str(arr.dtype), arr.shape, hash(arr.tobytes())))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ConstValue)
            and self._key == other._key
            and np.array_equal(self.array, other.array)
        )

    def __repr__(self) -> str:
        return f"ConstValue({short_dtype(str(self.array.dtype))}{list(self.array.shape)})"


@dataclass(frozen=True, eq=False)
class OpaqueCall:
    """A JAX primitive the rules do not model, with its parameters, re-bound as is.

    Compared by identity: two opaque calls are the same only if they are the same object.
    """

    primitive: Any
    params: Mapping[str, Any]
    out_types: tuple[TensorType, ...]

    @property
    def name(self) -> str:
        return str(getattr(self.primitive, "name", self.primitive))

    def __repr__(self) -> str:
        return f"OpaqueCall({self.name})"


@dataclass(frozen=True)
class Node:
    """One SSA value: ``op(*inputs)[params] -> type``. Opaque nodes have ``type=None``."""

    op: str
    inputs: tuple[int, ...] = ()
    params: Params = Params()
    type: TensorType | None = None

    def __getitem__(self, key: str) -> Hashable:
        return self.params[key]


@dataclass(frozen=True)
class Program:
    """An SSA DAG: nodes in topological order, flat input node ids and output node ids.

    ``effects`` are the opaque nodes with side effects (`jax.debug.print`, callbacks), in the
    order the original program ran them: roots like the outputs, kept even when unread.
    """

    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    effects: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                if not 0 <= j < i:
                    raise ValueError(f"node %{i} ({node.op}) uses %{j}, which is not an earlier node")
        for i in self.effects:
            if self.nodes[i].op != "opaque":
                raise ValueError(f"effect %{i} is a {self.nodes[i].op} node; only opaque nodes have effects")

    @property
    def roots(self) -> tuple[int, ...]:
        """The outputs, then the effects: what every live node is needed for."""
        return self.outputs + self.effects

    def __len__(self) -> int:
        return len(self.nodes)

    def type_of(self, node_id: int) -> TensorType:
        t = self.nodes[node_id].type
        if t is None:
            raise ValueError(f"node %{node_id} ({self.nodes[node_id].op}) has no single type")
        return t

    @property
    def input_types(self) -> tuple[TensorType, ...]:
        return tuple(self.type_of(i) for i in self.inputs)

    @property
    def output_types(self) -> tuple[TensorType, ...]:
        return tuple(self.type_of(i) for i in self.outputs)

    def count(self, op: str) -> int:
        """Number of nodes with this op that are reachable from the outputs and effects."""
        return sum(1 for i in self.live_nodes() if self.nodes[i].op == op)

    def live_nodes(self) -> list[int]:
        """Ids of the nodes the outputs and effects depend on, in topological order."""
        live = set(self.roots)
        for i in range(len(self.nodes) - 1, -1, -1):
            if i in live:
                live.update(self.nodes[i].inputs)
        return sorted(live)

    def users(self) -> dict[int, list[int]]:
        """Map from node id to the ids of the live nodes that read it."""
        out: dict[int, list[int]] = {}
        for i in self.live_nodes():
            for j in self.nodes[i].inputs:
                out.setdefault(j, []).append(i)
        return out

    def __str__(self) -> str:
        return pretty(self)


class ProgramBuilder:
    """Builds a Program node by node, sharing structurally equal nodes (hash-consing)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.inputs: list[int] = []
        self._memo: dict[Node, int] = {}

    def add(self, op: str, inputs: Sequence[int] = (), type: TensorType | None = None, **params: Hashable) -> int:
        return self.add_node(Node(op, tuple(inputs), Params(params), type))

    def add_node(self, node: Node) -> int:
        """Add ``node`` (its inputs already ids of this builder); an equal earlier node is reused."""
        op = node.op
        if op in ("input", "opaque"):
            self.nodes.append(node)
            node_id = len(self.nodes) - 1
            if op == "input":
                self.inputs.append(node_id)
            return node_id
        found = self._memo.get(node)
        if found is not None:
            return found
        self.nodes.append(node)
        self._memo[node] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def input(self, type: TensorType) -> int:
        return self.add("input", (), type, index=len(self.inputs))

    def type_of(self, node_id: int) -> TensorType:
        t = self.nodes[node_id].type
        assert t is not None, f"node %{node_id} has no single type"
        return t

    def build(self, outputs: Sequence[int], effects: Sequence[int] = ()) -> Program:
        """The program returning ``outputs`` and running ``effects``.

        An opaque node among ``outputs`` is no value but an effect (decoders get an encoding's
        root list, outputs then effects, and pass it whole): it moves, in order, to the effects.
        """
        is_effect = [self.nodes[i].op == "opaque" for i in outputs]
        values = tuple(i for i, e in zip(outputs, is_effect) if not e)
        kept = tuple(effects) + tuple(i for i, e in zip(outputs, is_effect) if e)
        return Program(tuple(self.nodes), tuple(self.inputs), values, kept)


def _format_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def format_node(node_id: int, node: Node) -> str:
    """One line of the pretty-printer: ``%3: f32[2,4] = tanh %2``."""
    params = ", ".join(f"{k}={_format_param(v)}" for k, v in node.params.items() if v is not None)
    head = node.op + (f"[{params}]" if params else "")
    args = " ".join(f"%{i}" for i in node.inputs)
    lhs = f"%{node_id}: {node.type}" if node.type is not None else f"%{node_id}"
    return f"{lhs} = {head} {args}".rstrip()


def pretty(program: Program) -> str:
    """Readable listing of the live nodes of a program."""
    args = ", ".join(f"%{i}: {program.nodes[i].type}" for i in program.inputs)
    lines = [f"program({args}) {{"]
    for i in program.live_nodes():
        node = program.nodes[i]
        if node.op == "input":
            continue
        lines.append("  " + format_node(i, node))
    if program.effects:
        lines.append("  effects " + ", ".join(f"%{i}" for i in program.effects))
    lines.append("  return " + ", ".join(f"%{i}" for i in program.outputs))
    lines.append("}")
    return "\n".join(lines)


def infer_type(op: str, params: Mapping[str, Any], inputs: Sequence[TensorType]) -> TensorType:
    """Output type of a modelled op from its static parameters and input types (a ``fused``
    node's through its region body, `eqsat_attn.region`)."""
    if op == "fused":
        return region_type(str(params["body"]), inputs)
    return infer_op_type(op, params, inputs)
