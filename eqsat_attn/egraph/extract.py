"""Extraction with egglog's extractors under an eqsat_attn cost model.

`RawCostModel` adapts a `CostModel` (which prices an `OpView`) to egglog's DAG cost model:
each e-node is priced once from egglog's raw values, with its children's shapes and dtypes
read from the analysis; `enode_view` gives the same view of an e-node expression (for tools
that enumerate e-class members). `extract_program` runs egglog's greedy-DAG (or tree) extractor
on the root of an encoding and decodes the result.
"""

from __future__ import annotations

from typing import Any

from egglog import EGraph, bindings, get_callable_args, get_callable_fn
from egglog.egraph import to_runtime_expr
from egglog.runtime import resolve_callable

from .. import ir
from ..cost.model import CostModel, OpView
from .ctors import ARG_KINDS, FREE_CTORS, op_params, split_args
from .decode import decode
from .encode import Encoding
from .language import Term, concat_shape, dtype, list_dtype, shape

UNKNOWN_TYPE_COST = 1e30  # an e-node whose types the analysis never reached is never chosen
#: seconds extraction adds to each e-node that runs (priced above zero): between forms the model
#: prices alike, the one with fewer operations is chosen, whatever order the e-graph holds them in
#: (without it, float rounding in summing a DAG's costs decided, and a block extracted alone could
#: differ from the same block extracted inside its program). Far below any priced difference (the
#: model's own tie-breaks are 1 ns), far above the rounding of a sum of seconds.
OPERATION_TIE_BREAK = 1e-12


def _py(expr: Any) -> Any:
    value = expr.value
    if isinstance(value, tuple):
        return tuple(_py(v) for v in value)
    return value


def _type(egraph: EGraph, term: Any, cache: dict | None = None) -> ir.TensorType | None:
    if cache is not None:  # e-classes are shared by many e-nodes: look each one up once
        key = ("type", term.__egg_typed_expr__)
        if key not in cache:
            cache[key] = _type(egraph, term)
        return cache[key]
    s = egraph.lookup_function_value(shape(term))
    d = egraph.lookup_function_value(dtype(term))
    if s is None or d is None:
        return None
    return ir.TensorType(tuple(int(v) for v in _py(s)), str(_py(d)))


def _py_cached(expr: Any, cache: dict | None) -> Any:
    """`_py`, remembered per literal (the same Vec/String literals recur in most e-nodes)."""
    if cache is None:
        return _py(expr)
    key = ("py", expr.__egg_typed_expr__)
    if key not in cache:
        cache[key] = _py(expr)
    return cache[key]


_CTORS = {
    getattr(Term, name): name
    for name in (
        "input", "literal", "constant", "iota", "unary", "binary", "integer_pow", "convert", "select", "softmax",
        "transpose", "reshape", "broadcast", "reduce", "dot", "attention", "no_mask", "mask_pair", "opaque",
        "output", "attention_fp8", "attention_vjp",
        "slice", "concat", "packed_attention",
    )
}
_CTORS.update({getattr(Term, f"fused{n}"): f"fused{n}" for n in range(7)})  # fused regions (issue 7)


def enode_view(egraph: EGraph, expr: Any, enc: Encoding, cache: dict | None = None) -> OpView | None | float:
    """OpView of a Term e-node; None for free and non-tensor nodes; UNKNOWN_TYPE_COST if untyped.

    egglog lets a cost callback read the analysis of the node's children only, so the node's
    own type is inferred from theirs (`ir.infer_type`). ``cache`` (a dict kept for one
    extraction, while the e-graph cannot change) remembers child types and literal values.
    """
    fn = get_callable_fn(expr)
    ctor = _CTORS.get(fn) if fn is not None else None
    if ctor is None:  # let-bound names are Terms too: never extract a name
        return UNKNOWN_TYPE_COST if isinstance(expr, Term) else None
    if ctor in FREE_CTORS:
        return None
    args = get_callable_args(expr)
    tensor_args = [a for a in args if isinstance(a, Term)]
    if ctor in ("attention", "attention_vjp"):  # mask kind "none": the mask operand is Term.no_mask()
        kind_position = ARG_KINDS[ctor].index("str")
        if _py_cached(args[kind_position], cache) == "none":
            tensor_args = tensor_args[:3 if ctor == "attention" else 4]
    if ctor == "packed_attention" and _py_cached(args[-1], cache) == "none":
        tensor_args = tensor_args[:1]
    if ctor == "concat":
        t = _type(egraph, expr, cache)
        return UNKNOWN_TYPE_COST if t is None else concat_view(int(_py_cached(args[1], cache)), t)
    inputs = []
    for a in tensor_args:
        t = _type(egraph, a, cache)
        if t is None:
            return UNKNOWN_TYPE_COST
        inputs.append(t)
    return op_view(ctor, [_py_cached(a, cache) for a in args if not isinstance(a, Term)], inputs)


def concat_view(axis: int, out: ir.TensorType) -> OpView:
    """What the cost model sees of a concatenation: its output (its operands, together, are the
    same bytes; their individual types are not needed to price a copy)."""
    return OpView("concatenate", {"dimension": axis}, (out,), out)


def op_view(ctor: str, statics: list[Any], inputs: list[ir.TensorType]) -> OpView:
    """What the cost model sees of a modelled constructor applied to typed operands.

    A "bias+bool" attention's fourth operand is its `Term.mask_pair`, typed as the bias (the
    analysis types it only when the boolean mask has the bias's shape): the view gets both, as
    the IR node's inputs q, k, v, bias, keep."""
    op, params = op_params(ctor, statics)
    if op == "attention" and params["mask_kind"] == "bias+bool" and len(inputs) == 4:
        inputs = [*inputs, ir.TensorType(inputs[3].shape, "bool")]
    if ctor in ("reshape", "broadcast"):  # the output shape is the first static
        return OpView(op, params, tuple(inputs), ir.TensorType(tuple(statics[0]), inputs[0].dtype))
    return OpView(op, params, tuple(inputs), ir.infer_type(op, params, inputs))


def extract_program(
    egraph: EGraph, enc: Encoding, model: CostModel, extractor: str = "greedy-dag"
) -> tuple[ir.Program, float]:
    """The cheapest program in the root's e-class under ``model`` and its extracted cost."""
    assert enc.root is not None
    runtime = to_runtime_expr(enc.root)
    state = egraph._state  # egglog 14: the extractor is reached through the bindings directly
    sort = state.type_ref_to_egg(runtime.__egg_typed_expr__.tp)
    egg_expr = state.typed_expr_to_egg(runtime.__egg_typed_expr__, expr_to_let=True)
    value = state.egraph.eval_expr(egg_expr)[1]
    adapter = RawCostModel(egraph, model).bindings_model()
    try:
        termdag, results = bindings.extract_best_with_dag_cost_model(
            state.egraph, [(sort, value)], adapter, extractor=extractor
        )
    except BaseException as exc:  # a Rust panic reaches Python as a BaseException (pyo3)
        if type(exc).__name__ != "PanicException":
            raise
        # seen with the tree extractor from ~12 transformer layers on: tree costs double with
        # every reuse of the residual stream, and egglog fails to rebuild the term
        raise RuntimeError(f"egglog's {extractor} extractor failed: {exc}") from None
    if results[0] is None:
        raise ValueError("the program's root has no extractable term")
    cost, term = results[0]
    return decode(termdag, term, enc), float(cost)


# --- fast path: price e-nodes from egglog's raw values -------------------------------------

class RawCostModel:
    """Prices Term e-nodes straight from egglog's raw values during extraction.

    No Python expression is rebuilt per e-node: child types are read with one table lookup per
    e-class and cached.
    """

    def __init__(self, egraph: EGraph, model: CostModel) -> None:
        state = egraph._state
        self.egg = state.egraph
        self.model = model
        self.shape_fn = state.callable_ref_to_egg(resolve_callable(shape)[0])[0]
        self.dtype_fn = state.callable_ref_to_egg(resolve_callable(dtype)[0])[0]
        self.concat_shape_fn = state.callable_ref_to_egg(resolve_callable(concat_shape)[0])[0]
        self.list_dtype_fn = state.callable_ref_to_egg(resolve_callable(list_dtype)[0])[0]
        self.types: dict[Any, ir.TensorType | None] = {}
        self.costs: dict[tuple[str, tuple], float] = {}  # per signature: see enode_cost
        self.ctors: dict[str, str | None] = {}

    def _ctor(self, name: str) -> str | None:
        if name not in self.ctors:
            k = name.rfind("Term_")
            self.ctors[name] = name[k + 5:] if k >= 0 and name[k + 5:] in ARG_KINDS else None
        return self.ctors[name]

    def _type(self, value: Any) -> ir.TensorType | None:
        if value not in self.types:
            s = self.egg.lookup_function(self.shape_fn, [value])
            d = self.egg.lookup_function(self.dtype_fn, [value])
            self.types[value] = None if s is None or d is None else ir.TensorType(
                tuple(self.egg.value_to_i64(v) for v in self.egg.value_to_vec(s)), self.egg.value_to_string(d)
            )
        return self.types[value]

    def _static(self, kind: str, value: Any) -> Any:
        if kind == "i64":
            return self.egg.value_to_i64(value)
        if kind == "f64":
            return self.egg.value_to_f64(value)
        if kind == "str":
            return self.egg.value_to_string(value)
        return tuple(self.egg.value_to_i64(v) for v in self.egg.value_to_vec(value))

    def enode_cost(self, name: str, args: list[Any]) -> float:
        ctor = self._ctor(name)
        if ctor is None:
            # let-bound names are Terms too: never extract one; lists and vectors are free
            return UNKNOWN_TYPE_COST if "thunk" in name else 0.0
        if ctor in FREE_CTORS:
            return 0.0
        # An e-node's cost depends only on its constructor, static values and operand types, so
        # nodes that differ only in which e-classes they read (every layer of a model) share one
        # entry: the cost model runs once per distinct signature.
        kinds = ARG_KINDS[ctor]
        key = (name, tuple(self._type(a) if kind == "T" else a for kind, a in zip(kinds, args)))
        cost = self.costs.get(key)
        if cost is None:
            cost = self._price(ctor, kinds, args)
            cost = self.costs[key] = cost + OPERATION_TIE_BREAK if cost > 0 else cost
        return cost

    def _price(self, ctor: str, kinds: tuple[str, ...], args: list[Any]) -> float:
        values = [a if kind in ("T", "L") else self._static(kind, a) for kind, a in zip(kinds, args)]
        if ctor == "concat":  # keyed by its operand list's e-class (kind "L"), priced from its analysis
            return self._concat_cost(args[0], args[1], values[1])
        children, statics = split_args(ctor, values)
        inputs = [self._type(c) for c in children]
        if any(t is None for t in inputs):
            return UNKNOWN_TYPE_COST
        return float(self.model.node_cost(op_view(ctor, statics, inputs)))

    def _concat_cost(self, parts: Any, axis_value: Any, axis: int) -> float:
        """A concatenation is priced from its operand list's analysis (`concat_shape`)."""
        s = self.egg.lookup_function(self.concat_shape_fn, [parts, axis_value])
        d = self.egg.lookup_function(self.list_dtype_fn, [parts])
        if s is None or d is None:
            return UNKNOWN_TYPE_COST
        out = ir.TensorType(tuple(self.egg.value_to_i64(v) for v in self.egg.value_to_vec(s)), self.egg.value_to_string(d))
        return float(self.model.node_cost(concat_view(axis, out)))

    def bindings_model(self) -> bindings.DagCostModel:
        return bindings.DagCostModel(0.0, self.enode_cost, lambda *_: 0.0, lambda *_: 0.0)
