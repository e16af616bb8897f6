"""Values a program computes from no input: masks built from iotas, literals and constants.

The e-graph's mask facts (`causal_mask`, `rows_kept`) and the report's mask kinds read such
masks by evaluating them. Evaluation is numpy over the ops masks are built from (index arithmetic,
comparisons, boolean logic, casts, selects and views), each node at most once per
`StaticValues`; anything else (an unknown op, a value over ``max_elements``, arithmetic whose
float result might round differently on a device) is "not static" (None), never a guess.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .ir import Program

MAX_ELEMENTS = 2**22  # a static value larger than this is not evaluated (nor anything computed from it)
NOT_STATIC_OPS = frozenset({"input", "opaque", "opaque_output"})
#: dtypes numpy computes exactly as XLA does (integers wrap alike; float32/64 are IEEE): others
#: (bfloat16, float16, fp8) are only cast to, compared or selected
ARITHMETIC_KINDS = "biu"
ARITHMETIC_FLOATS = ("float32", "float64")

_COMPARE = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
            "ge": np.greater_equal}
_LOGIC = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}
_ARITHMETIC = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum, "min": np.minimum}
_UNARY = {"neg": np.negative, "abs": np.abs, "sign": np.sign}


def _numpy_dtype(name: str) -> np.dtype | None:
    """numpy's dtype of a type name (bfloat16 and the fp8 types as jax registers them); None if unknown."""
    try:
        return np.dtype(jnp.dtype(name))
    except TypeError:
        return None


def _exact_arithmetic(dtype: np.dtype) -> bool:
    return dtype.kind in ARITHMETIC_KINDS or dtype.name in ARITHMETIC_FLOATS


def _no_denormals(value: np.ndarray) -> bool:
    """A float result holds no denormal (a device may flush it to zero where numpy does not)."""
    if value.dtype.kind != "f":
        return True
    tiny = np.finfo(value.dtype).tiny
    magnitude = np.abs(value)
    return not np.any((magnitude > 0) & (magnitude < tiny))


def _cast(value: np.ndarray, to: np.dtype) -> np.ndarray | None:
    """``convert_element_type``; a float cast to an integer only where every value is finite and in
    range (elsewhere numpy's result is undefined)."""
    if value.dtype.kind == "f" and to.kind in "iu":
        info = np.iinfo(to)
        if not np.all(np.isfinite(value)) or np.any(value < info.min) or np.any(value > info.max):
            return None
        return np.trunc(value).astype(to)
    if to.kind == "b":
        return value != 0
    return value.astype(to)


def _evaluate(op: str, params, shape: tuple[int, ...], dtype: np.dtype, args: list[np.ndarray]) -> np.ndarray | None:
    """One node's value from its operands' values, or None where it is not evaluated exactly."""
    if op == "literal":
        return np.array(params["value"], dtype=dtype)
    if op == "constant":
        return np.asarray(params["value"].array)
    if op == "iota":
        axis = int(params["dimension"])
        index = np.arange(shape[axis], dtype=dtype).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        return np.broadcast_to(index, shape)
    if op == "broadcast_in_dim":
        dims = tuple(params["broadcast_dimensions"])
        src = args[0]
        view = src.reshape([src.shape[dims.index(a)] if a in dims else 1 for a in range(len(shape))])
        return np.broadcast_to(view, shape)
    if op == "reshape":
        return args[0].reshape(shape)
    if op == "transpose":
        return np.transpose(args[0], tuple(params["perm"]))
    if op == "convert_element_type":
        return _cast(args[0], dtype)
    if op == "select_n":
        which, cases = args[0], args[1:]
        if which.dtype.kind == "b":
            return np.where(which, cases[1], cases[0]) if len(cases) == 2 else None
        return np.choose(which, cases) if np.all((which >= 0) & (which < len(cases))) else None
    if op in _COMPARE:
        return _COMPARE[op](args[0], args[1])
    if op == "not":
        return np.logical_not(args[0]) if args[0].dtype.kind == "b" else np.invert(args[0])
    if op in _LOGIC and dtype.kind in "biu":
        return _LOGIC[op](args[0], args[1])
    if not _exact_arithmetic(dtype):
        return None
    if op in _ARITHMETIC:
        return _ARITHMETIC[op](args[0], args[1])
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op == "integer_pow" and dtype.kind in "iu" and int(params["y"]) >= 0:
        return np.power(args[0], int(params["y"]), dtype=dtype)
    if op in ("div", "rem") and dtype.kind in "iu":  # lax truncates toward zero; by zero: undefined here
        a, b = args
        if np.any(b == 0):
            return None
        quotient = np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))
        return (quotient if op == "div" else a - quotient * b).astype(dtype)
    if op == "div":
        return np.divide(args[0], args[1])
    return None


class StaticValues:
    """The values of a program's input-free nodes, evaluated on demand, each at most once."""

    def __init__(self, program: Program, max_elements: int = MAX_ELEMENTS) -> None:
        self.program = program
        self.max_elements = max_elements
        self._values: dict[int, np.ndarray | None] = {}
        self._static: set[int] | None = None

    def is_static(self, node_id: int) -> bool:
        """Whether the node depends on no input (one pass over the program, on the first call)."""
        if self._static is None:
            self._static = set()
            for i, node in enumerate(self.program.nodes):
                if node.op not in NOT_STATIC_OPS and all(j in self._static for j in node.inputs):
                    self._static.add(i)
        return node_id in self._static

    def value(self, node_id: int) -> np.ndarray | None:
        """The node's value when it depends on no input and every step is evaluated, else None."""
        if node_id in self._values:
            return self._values[node_id]
        if not self.is_static(node_id):
            return None
        stack = [node_id]
        while stack:  # iterative post-order: mask sub-programs may be deep
            i = stack[-1]
            node = self.program.nodes[i]
            pending = [j for j in node.inputs if j not in self._values]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if i not in self._values:
                self._values[i] = self._node_value(i)
        return self._values[node_id]

    def _node_value(self, i: int) -> np.ndarray | None:
        node = self.program.nodes[i]
        t = node.type
        if node.op in NOT_STATIC_OPS or t is None or int(np.prod(t.shape, dtype=np.int64)) > self.max_elements:
            return None
        args = [self._values[j] for j in node.inputs]
        dtype = _numpy_dtype(t.dtype)
        if any(a is None for a in args) or dtype is None:
            return None
        try:
            with np.errstate(all="ignore"):  # integers wrap as in XLA; float specials are values
                out = _evaluate(node.op, node.params, tuple(t.shape), dtype, args)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, FloatingPointError):
            return None  # an unusual static node is simply not evaluated
        if out is None:
            return None
        out = np.asarray(out)
        if out.shape != tuple(t.shape) or not _no_denormals(out):
            return None
        return out.astype(dtype, copy=False) if out.dtype != dtype else out


def keeps_every_row(value: np.ndarray) -> bool:
    """A boolean mask keeps at least one key (True) in every row along its last axis."""
    return value.dtype.kind == "b" and value.ndim >= 1 and value.shape[-1] > 0 and bool(np.all(value.any(axis=-1)))


def is_causal_value(array: np.ndarray) -> bool:
    """A mask equal to tril(ones) over its last two axes, top-left aligned (bool or 0/1 values),
    the same for every leading index."""
    if array.ndim < 2 or array.dtype.kind not in "biuf":
        return False
    tril = np.tril(np.ones(array.shape[-2:], dtype=bool))
    return bool(np.all(np.where(tril, array == 1, array == 0)))


__all__ = ["MAX_ELEMENTS", "StaticValues", "is_causal_value", "keeps_every_row"]
