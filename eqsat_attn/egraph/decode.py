"""Extracted term DAG -> Program, iteratively (no recursion limit) and with sharing kept.

egglog's extractor returns a hash-consed `TermDag`; each term id becomes at most one node.
"""

from __future__ import annotations

from typing import Any

from egglog import bindings

from .. import ir
from .encode import Encoding, axes_to_layout

_PREFIXES = ("Term_", "TermList_")


def _ctor(name: str) -> str:
    for prefix in _PREFIXES:
        k = name.rfind(prefix)
        if k >= 0:
            return prefix + name[k + len(prefix):]
    return name


class _Decoder:
    def __init__(self, termdag: bindings.TermDag, enc: Encoding) -> None:
        self.dag = termdag
        self.enc = enc
        self.builder = ir.ProgramBuilder()
        self.values: dict[int, Any] = {}
        self.types: dict[int, ir.TensorType] = {}
        for i in enc.program.inputs:  # keep every argument, in order, even if unused now
            node = enc.program.nodes[i]
            self.builder.add("input", (), node.type, **dict(node.params))

    def decode(self, root: int) -> list[int]:
        stack = [root]
        while stack:
            tid = stack[-1]
            if tid in self.values:
                stack.pop()
                continue
            term = self.dag.get(tid)
            pending = [a for a in getattr(term, "args", ()) if a not in self.values]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self.values[tid] = self._build(term)
        out = self.values[root]
        assert isinstance(out, list)
        return out

    def _build(self, term: Any) -> Any:
        if isinstance(term, bindings.TermLit):
            lit = term.value
            return None if isinstance(lit, bindings.Unit) else lit.value
        if isinstance(term, bindings.TermVar):
            raise ValueError(f"cannot decode a variable term {term.name!r}")
        args = [self.values[a] for a in term.args]
        name = _ctor(term.name)
        if term.name == "vec-of":
            return tuple(int(a) for a in args)
        if term.name == "vec-empty":
            return ()
        if name == "TermList_nil":
            return []
        if name == "TermList_cons":
            return [args[0], *args[1]]
        return self._node(name.removeprefix("Term_"), args)

    def _node(self, ctor: str, a: list[Any]) -> int:
        b = self.builder
        prog = self.enc.program
        if ctor == "input":
            return b.inputs[a[0]]
        if ctor == "literal":
            value, dtype = a
            py = bool(value) if dtype == "bool" else int(value) if "int" in dtype else float(value)
            return b.add("literal", (), ir.TensorType((), dtype), value=py)
        if ctor in ("constant", "opaque"):
            node = self.enc.uninterpreted[a[0]]
            operands = a[1] if ctor == "opaque" else []
            if node.op in ("input", "opaque"):  # identity-compared: reuse one node per original
                key = ("uninterpreted", a[0], tuple(operands))
                if key not in self.values:
                    self.values[key] = b.add(node.op, operands, node.type, **dict(node.params))
                return self.values[key]
            return b.add(node.op, operands, node.type, **dict(node.params))
        if ctor == "output":
            call, index = a
            node = b.nodes[call]
            return b.add("opaque_output", (call,), node["call"].out_types[index], index=index)
        if ctor == "iota":
            dtype, shape, dimension = a
            return b.add("iota", (), ir.TensorType(shape, dtype), dimension=dimension)
        if ctor == "unary":
            op, x = a
            t = b.type_of(x)
            return b.add(op, (x,), ir.TensorType(t.shape, "bool" if op == "is_finite" else t.dtype))
        if ctor == "binary":
            op, x, y = a
            t = b.type_of(x)
            dtype = "bool" if op in ("eq", "ne", "lt", "le", "gt", "ge") else t.dtype
            return b.add(op, (x, y), ir.TensorType(t.shape, dtype))
        if ctor == "softmax":
            return b.add("softmax", (a[0],), b.type_of(a[0]))
        if ctor == "integer_pow":
            x, y = a
            return b.add("integer_pow", (x,), b.type_of(x), y=y)
        if ctor == "convert":
            x, dtype = a
            return b.add("convert_element_type", (x,), ir.TensorType(b.type_of(x).shape, dtype), new_dtype=dtype)
        if ctor == "select":
            pred, f, t = a
            return b.add("select_n", (pred, f, t), b.type_of(t))
        if ctor == "transpose":
            x, perm = a
            t = b.type_of(x)
            return b.add("transpose", (x,), ir.TensorType(tuple(t.shape[i] for i in perm), t.dtype), perm=perm)
        if ctor == "reshape":
            x, shape = a
            return b.add("reshape", (x,), ir.TensorType(shape, b.type_of(x).dtype))
        if ctor == "broadcast":
            x, shape, dims = a
            return b.add("broadcast_in_dim", (x,), ir.TensorType(shape, b.type_of(x).dtype), broadcast_dimensions=dims)
        if ctor == "reduce":
            op, x, axes = a
            t = b.type_of(x)
            shape = tuple(s for i, s in enumerate(t.shape) if i not in axes)
            return b.add(op, (x,), ir.TensorType(shape, t.dtype), axes=axes)
        if ctor == "dot":
            x, y, lc, rc, lb, rb, out_dtype = a
            tx, ty = b.type_of(x), b.type_of(y)
            free_x = [tx.shape[i] for i in range(tx.rank) if i not in lc and i not in lb]
            free_y = [ty.shape[i] for i in range(ty.rank) if i not in rc and i not in rb]
            shape = tuple(tx.shape[i] for i in lb) + tuple(free_x) + tuple(free_y)
            return b.add(
                "dot_general", (x, y), ir.TensorType(shape, out_dtype or tx.dtype),
                lhs_contract=lc, rhs_contract=rc, lhs_batch=lb, rhs_batch=rb,
                preferred_element_type=out_dtype or None,
            )
        if ctor == "attention":
            q, k, v, mask, qa, ka, va, oa, scale, causal, mask_kind = a
            tq, tv = b.type_of(q), b.type_of(v)
            logical = (tq.shape[qa[0]], tq.shape[qa[1]], tq.shape[qa[2]], tv.shape[va[3]])
            shape = [0] * 4
            for axis, pos in enumerate(oa):
                shape[pos] = logical[axis]
            inputs = (q, k, v) if mask is None else (q, k, v, mask)
            return b.add(
                "attention", inputs, ir.TensorType(tuple(shape), tq.dtype),
                q_layout=axes_to_layout(qa), k_layout=axes_to_layout(ka), v_layout=axes_to_layout(va),
                o_layout=axes_to_layout(oa), scale=float(scale), causal=bool(causal), mask_kind=mask_kind,
            )
        if ctor == "no_mask":
            return None
        raise ValueError(f"cannot decode term constructor {ctor!r}")


def decode(termdag: bindings.TermDag, root: int, enc: Encoding) -> ir.Program:
    """The program whose outputs are the extracted root `TermList`."""
    dec = _Decoder(termdag, enc)
    outputs = dec.decode(root)
    return dec.builder.build(outputs)
