"""Extraction with egglog's extractors under an eqsat_attn cost model.

`egglog_cost_model` adapts a `CostModel` (which prices an `OpView`) to egglog's
`DagCostModel`: each e-node is priced once, with the shapes and dtypes of its children
read from the analysis. `extract_program` runs egglog's greedy-DAG (or tree) extractor
on the root of an encoding and decodes the result.
"""

from __future__ import annotations

from typing import Any

from egglog import DagCostModel, EGraph, bindings, get_callable_args, get_callable_fn
from egglog.egraph import _DagCostModel, to_runtime_expr

from .. import ir
from ..cost.model import CostModel, OpView
from .decode import decode
from .encode import Encoding, axes_to_layout
from .language import Term, dtype, shape

UNKNOWN_TYPE_COST = 1e30  # an e-node whose types the analysis never reached is never chosen


def _py(expr: Any) -> Any:
    value = expr.value
    if isinstance(value, tuple):
        return tuple(_py(v) for v in value)
    return value


def _type(egraph: EGraph, term: Any) -> ir.TensorType | None:
    s = egraph.lookup_function_value(shape(term))
    d = egraph.lookup_function_value(dtype(term))
    if s is None or d is None:
        return None
    return ir.TensorType(tuple(int(v) for v in _py(s)), str(_py(d)))


_CTORS = {
    getattr(Term, name): name
    for name in (
        "input", "literal", "constant", "iota", "unary", "binary", "integer_pow", "convert", "select", "softmax",
        "transpose", "reshape", "broadcast", "reduce", "dot", "attention", "no_mask", "opaque", "output",
    )
}


def enode_view(egraph: EGraph, expr: Any, enc: Encoding) -> OpView | None | float:
    """OpView of a Term e-node; None for free and non-tensor nodes; UNKNOWN_TYPE_COST if untyped.

    egglog lets a cost callback read the analysis of the node's children only, so the node's
    own type is inferred from theirs (`ir.infer_type`).
    """
    fn = get_callable_fn(expr)
    ctor = _CTORS.get(fn) if fn is not None else None
    if ctor is None:  # let-bound names are Terms too: never extract a name
        return UNKNOWN_TYPE_COST if isinstance(expr, Term) else None
    if ctor in ("no_mask", "opaque", "output", "input", "literal", "constant", "iota"):
        return None
    args = get_callable_args(expr)
    tensor_args = [a for a in args if isinstance(a, Term)]
    if ctor == "attention" and _py(args[-1]) == "none":  # the mask operand is Term.no_mask()
        tensor_args = tensor_args[:3]
    inputs = []
    for a in tensor_args:
        t = _type(egraph, a)
        if t is None:
            return UNKNOWN_TYPE_COST
        inputs.append(t)
    statics = [_py(a) for a in args if not isinstance(a, Term)]
    if ctor == "reshape":
        return OpView("reshape", {}, tuple(inputs), ir.TensorType(tuple(statics[0]), inputs[0].dtype))
    if ctor == "broadcast":
        return OpView("broadcast_in_dim", {"broadcast_dimensions": statics[1]}, tuple(inputs),
                      ir.TensorType(tuple(statics[0]), inputs[0].dtype))
    op, params = _params(ctor, statics)
    return OpView(op, params, tuple(inputs), ir.infer_type(op, params, inputs))


def _params(ctor: str, vals: list[Any]) -> tuple[str, dict[str, Any]]:
    if ctor in ("unary", "binary"):
        return vals[0], {}
    if ctor == "reduce":
        return vals[0], {"axes": vals[1]}
    if ctor == "transpose":
        return "transpose", {"perm": vals[0]}
    if ctor == "dot":
        lc, rc, lb, rb, out_dtype = vals
        return "dot_general", {"lhs_contract": lc, "rhs_contract": rc, "lhs_batch": lb, "rhs_batch": rb,
                "preferred_element_type": out_dtype or None}
    if ctor == "attention":
        qa, ka, va, oa, scale, causal, mask_kind = vals
        return "attention", {"q_layout": axes_to_layout(qa), "k_layout": axes_to_layout(ka), "v_layout": axes_to_layout(va),
                "o_layout": axes_to_layout(oa), "scale": scale, "causal": bool(causal), "mask_kind": mask_kind}
    if ctor == "broadcast":
        return "broadcast_in_dim", {"broadcast_dimensions": vals[1]}
    if ctor == "convert":
        return "convert_element_type", {"new_dtype": vals[0]}
    if ctor == "select":
        return "select_n", {}
    if ctor == "output":
        return "opaque_output", {"index": vals[0]}
    names = {"integer_pow": ("y",), "iota": ("dtype", "shape", "dimension")}
    return ctor, dict(zip(names.get(ctor, ()), vals))


def egglog_cost_model(model: CostModel, enc: Encoding) -> DagCostModel[float]:
    """A DagCostModel pricing each Term e-node with ``model`` (everything else is free)."""

    def marginal(egraph: EGraph, expr: Any) -> float:
        view = enode_view(egraph, expr, enc)
        if view is None:
            return 0.0
        if isinstance(view, float):
            return view
        return float(model.node_cost(view))

    return DagCostModel(marginal_cost=marginal, identity=0.0)


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
    adapter = _DagCostModel(egglog_cost_model(model, enc), egraph).to_bindings_cost_model()
    termdag, results = bindings.extract_best_with_dag_cost_model(
        state.egraph, [(sort, value)], adapter, extractor=extractor
    )
    if results[0] is None:
        raise ValueError("the program's root has no extractable term")
    cost, term = results[0]
    return decode(termdag, term, enc), float(cost)
