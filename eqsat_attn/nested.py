"""Optimize the bodies of scan and checkpoint.

A ``lax.scan`` over layers or a ``jax.checkpoint`` (remat) stays one opaque node of the program
it sits in, but its body is a program too. `optimize_bodies` captures each such body, optimizes
it with the caller's options (rules, cost model, limits; bodies nested in it the same way, by
recursion), lowers the chosen body back to a jaxpr and puts that jaxpr in place of the body
parameter. Nothing else about the call changes: same primitive, every other parameter as it was
(length, reverse, unroll, carry and const counts, linearity, checkpoint policy and prevent_cse),
and a body with exactly the original input and output avals (shapes, dtypes, weak types) and
effects. A body the cost model does not predict faster keeps its original jaxpr; one whose
optimization fails keeps it too, with a warning: values never change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import jax
from jax import lax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from .capture import capture
from .ir import Node, OpaqueCall, Params, Program
from .lower import lower, resolve_attention_kernel

if TYPE_CHECKING:
    from .pipeline import PipelineResult

#: Primitives whose body is optimized, with the parameter holding it and the name reports use.
#: jax.checkpoint's primitive is "remat2" (named "checkpoint" in older JAX).
BODY_PARAMS: dict[str, tuple[str, str]] = {
    "scan": ("jaxpr", "scan"),
    "remat2": ("jaxpr", "checkpoint"),
    "checkpoint": ("jaxpr", "checkpoint"),
}


@dataclass(frozen=True, eq=False)
class NestedCall(OpaqueCall):
    """An opaque scan or checkpoint whose ``params`` hold an optimized body jaxpr.

    ``body`` is the optimized body program (what the report reads), ``result`` its pipeline run.
    """

    body: Program
    result: PipelineResult

    @property
    def where(self) -> str:
        """Where the body sits, for people: "scan body", "checkpoint body"."""
        return f"{BODY_PARAMS[self.name][1]} body"

    @property
    def runs(self) -> int:
        """How many times the body runs per call: a scan's length, else once."""
        return int(self.params.get("length", 1)) if self.name == "scan" else 1

    def __repr__(self) -> str:
        return f"OpaqueCall({self.name}, optimized body)"


@dataclass(frozen=True)
class BodyOutcome:
    """What happened to the bodies of one program: the calls whose body was optimized, and the
    warnings of bodies that kept their original jaxpr."""

    calls: tuple[NestedCall, ...] = ()
    warnings: tuple[str, ...] = ()


def optimize_bodies(
    program: Program, optimize: Callable[[Program], PipelineResult], backend: str
) -> tuple[Program, BodyOutcome]:
    """``program`` with the body of each scan and checkpoint node optimized by ``optimize``
    and lowered for ``backend`` ("auto", "pallas", "reference": `OptimizeOptions.backend`).

    Node ids are unchanged: each such opaque node's call is replaced by a `NestedCall`.
    """
    nodes = list(program.nodes)
    calls: list[NestedCall] = []
    messages: list[str] = []
    for node_id, node in enumerate(program.nodes):
        call = node.params["call"] if node.op == "opaque" else None
        if call is None or call.name not in BODY_PARAMS or isinstance(call, NestedCall):
            continue
        try:
            optimized, notes = optimize_body(call, optimize, resolve_attention_kernel(backend))
        except Exception as exc:  # noqa: BLE001 - any failure keeps the original body
            message = (f"eqsat_attn: optimizing a {BODY_PARAMS[call.name][1]} body failed "
                       f"({type(exc).__name__}: {exc}); running its original body")
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            messages.append(message)
            continue
        messages.extend(notes)
        if optimized is not None:
            calls.append(optimized)
            nodes[node_id] = Node("opaque", node.inputs, Params({"call": optimized}), node.type)
    if not calls:
        return program, BodyOutcome(warnings=tuple(messages))
    return Program(tuple(nodes), program.inputs, program.outputs), BodyOutcome(tuple(calls), tuple(messages))


def optimize_body(
    call: OpaqueCall, optimize: Callable[[Program], PipelineResult], attention_kernel: str
) -> tuple[NestedCall | None, tuple[str, ...]]:
    """The call with its body optimized, or None when there is nothing to change (a body with
    effects or closing over tracers, or one the cost model predicts no faster optimized), with
    the warnings of a run that changed nothing. Raises when the optimized body cannot replace
    the original exactly."""
    param = BODY_PARAMS[call.name][0]
    original = call.params[param]
    closed = original if hasattr(original, "consts") else ClosedJaxpr(original, [])  # remat: an open jaxpr
    if closed.jaxpr.effects:
        return None, ()
    in_avals = [v.aval for v in closed.jaxpr.invars]
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=bool(getattr(a, "weak_type", False))) for a in in_avals]
    captured = capture(jaxpr_as_fun(closed), *structs)
    if captured.hoisted_consts:
        return None, ()
    result = optimize(captured.program)
    if not result.cost_after < result.cost_before:  # nothing predicted faster: keep the original jaxpr
        return None, tuple(result.warnings)
    body_fn = lower(result.program, attention_kernel=attention_kernel)
    if captured.custom_jvp_inlined:  # the primal of a custom_jvp (softmax) was inlined
        body_fn = _with_original_derivatives(body_fn, closed)
    out_avals = [v.aval for v in closed.jaxpr.outvars]
    new = jax.make_jaxpr(lambda *xs: _weak_as(body_fn(*xs), out_avals))(*structs)
    _check_same_signature(closed, new)
    replacement = new if isinstance(original, type(new)) else new.jaxpr
    params = {**call.params, param: replacement}
    return NestedCall(call.primitive, params, call.out_types, result.program, result), ()


def _weak_as(outputs: Sequence[Any], avals: Sequence[Any]) -> list[Any]:
    """``outputs``, each weak-typed where the matching aval is (lowering writes literals as
    strongly typed arrays, so ``c * 2.0`` of a weak ``c`` comes back strong)."""
    out = []
    for x, aval in zip(outputs, avals):
        if getattr(aval, "weak_type", False) and not jax.typeof(x).weak_type and x.dtype == aval.dtype:
            x = lax.convert_element_type_p.bind(x, new_dtype=x.dtype, weak_type=True, sharding=None)
        out.append(x)
    return out


def _check_same_signature(original: Any, new: Any) -> None:
    """Raise unless ``new`` is a drop-in body for ``original``: no constants unless the original
    closes over some too, same effects, same input and output avals (weak types included)."""
    if new.consts and not original.consts:
        raise ValueError(f"the optimized body closes over {len(new.consts)} constants; the original over none")
    if new.jaxpr.effects != original.jaxpr.effects:
        raise ValueError(f"the optimized body has effects {new.jaxpr.effects}, the original {original.jaxpr.effects}")
    for side in ("invars", "outvars"):
        want, got = _avals(getattr(original.jaxpr, side)), _avals(getattr(new.jaxpr, side))
        if want != got:
            raise ValueError(f"the optimized body's {side[:-4]}puts are {got}, the original's {want}")


def _avals(atoms: Sequence[Any]) -> list[tuple[tuple[int, ...], str, bool]]:
    return [(tuple(a.aval.shape), str(a.aval.dtype), bool(getattr(a.aval, "weak_type", False))) for a in atoms]


def _with_original_derivatives(body_fn: Callable[..., list[Any]], original: Any) -> Callable[..., list[Any]]:
    """``body_fn``'s values with the original body's derivatives, as the decorator does for a
    whole function (`optimize.with_original_derivatives`): capture inlined a custom_jvp's primal,
    so its derivative rule lives only in the original body."""
    original_fn = jaxpr_as_fun(original)

    @jax.custom_jvp
    def body(*xs: Any) -> list[Any]:
        return list(body_fn(*xs))

    @body.defjvp
    def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
        _, out_tangents = jax.jvp(lambda *xs: list(original_fn(*xs)), primals, tangents)
        return body(*primals), out_tangents

    return body


def merge(result: PipelineResult, outcome: BodyOutcome) -> PipelineResult:
    """``result`` (a program's own run) with its optimized bodies added: their predicted costs
    (times the runs per call: opaque nodes are priced as free), rule firings, e-graph sizes,
    saturation and warnings."""
    if not outcome.calls and not outcome.warnings:
        return result
    bodies = [call.result for call in outcome.calls]
    fired = dict(result.rules_fired)
    for body in bodies:
        for name, count in body.rules_fired.items():
            fired[name] = fired.get(name, 0) + count
    return replace(
        result,
        rules_fired=fired,
        egraph_nodes=result.egraph_nodes + sum(body.egraph_nodes for body in bodies),
        saturated=result.saturated and all(body.saturated for body in bodies),
        cost_before=result.cost_before + sum(c.runs * c.result.cost_before for c in outcome.calls),
        cost_after=result.cost_after + sum(c.runs * c.result.cost_after for c in outcome.calls),
        warnings=tuple(result.warnings) + outcome.warnings + tuple(w for body in bodies for w in body.warnings),
    )
