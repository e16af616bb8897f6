"""Extracted term DAG -> Program, iteratively (no recursion limit) and with sharing kept.

egglog's extractor returns a hash-consed `TermDag`; each term id becomes at most one node.
"""

from __future__ import annotations

from typing import Any

from egglog import bindings

from .. import ir
from .ctors import ARG_KINDS, op_params, split_args
from .encode import Encoding

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
        if ctor == "no_mask":
            return None
        if ctor == "mask_pair":  # an attention's bias and boolean mask: two of its inputs
            return tuple(a)
        if ctor == "concat":
            parts, axis = a
            types = [b.type_of(t) for t in parts]
            return b.add("concatenate", parts, ir.infer_type("concatenate", {"dimension": axis}, types), dimension=axis)
        if ctor not in ARG_KINDS:
            raise ValueError(f"cannot decode term constructor {ctor!r}")
        tensors, statics = split_args(ctor, a)
        tensors = [i for t in tensors for i in (t if isinstance(t, tuple) else (t,))]  # a mask pair: both
        op, params = op_params(ctor, statics)
        types = [b.type_of(t) for t in tensors]
        if ctor in ("reshape", "broadcast"):  # the output shape is the first static
            out = ir.TensorType(tuple(statics[0]), types[0].dtype)
        else:
            out = ir.infer_type(op, params, types)
        return b.add(op, tensors, out, **params)


def decode(termdag: bindings.TermDag, root: int, enc: Encoding) -> ir.Program:
    """The program whose outputs are the extracted root `TermList`."""
    dec = _Decoder(termdag, enc)
    outputs = dec.decode(root)
    return dec.builder.build(outputs)
