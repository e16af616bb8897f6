"""The ``@optimize`` decorator: trace, optimize, lower and cache per argument structure."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax

from .capture import Captured, capture, normalize_static_argnums, split_args
from .ir import Program
from .lower import lower, resolve_attention_kernel
from .pipeline import Limits, OptimizeOptions, PipelineResult, optimize_program
from .qkv_layouts import projections
from .report import Report, attention_infos, region_infos


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    entries: int


@dataclass(frozen=True)
class _Compiled:
    """One cache entry: the jitted lowered program and how to call it."""

    captured: Captured
    call: Callable[..., list[Any]]
    report: Report


class OptimizedFunction:
    """A function whose jaxpr is optimized by equality saturation before it runs.

    Call it like the original function. One compiled program is kept per argument
    structure (pytree structure, shapes, dtypes, weak types and static argument values).
    """

    def __init__(self, fn: Callable[..., Any], options: OptimizeOptions, static_argnums: int | Sequence[int] = ()) -> None:
        self.fn = fn
        self.options = options
        self.static_argnums = static_argnums
        self._cache: dict[Hashable, _Compiled] = {}
        self._hits = 0
        self._misses = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        entry = self._entry(args, kwargs)
        flat = entry.captured.flat_args(*args, **kwargs)
        return entry.captured.unflatten(entry.call(*flat))

    def explain(self, *args: Any, **kwargs: Any) -> Report:
        """The report for these arguments: programs before and after, costs, rules, attention."""
        return self._entry(args, kwargs).report

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def cache_clear(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else functools.partial(self, instance)

    def _entry(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Compiled:
        static_nums = normalize_static_argnums(self.static_argnums, len(args))
        statics, _, in_tree, avals = split_args(args, kwargs, static_nums)
        key = _cache_key(statics, static_nums, in_tree, avals)
        entry = self._cache.get(key)
        if entry is not None:
            self._hits += 1
            return entry
        self._misses += 1
        entry = self._compile(args, kwargs, static_nums)
        if not any(isinstance(c, jax.core.Tracer) for c in entry.captured.hoisted_consts):
            # a closure over an outer transformation's tracers is only valid for this call
            self._cache[key] = entry
        return entry

    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any], static_nums: tuple[int, ...]) -> _Compiled:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        captured = capture(self.fn, *args, static_argnums=static_nums, **kwargs)
        timings["trace"] = time.perf_counter() - start

        start = time.perf_counter()
        result, problems = self._optimize(captured)
        timings["optimize"] = time.perf_counter() - start

        start = time.perf_counter()
        kernel = resolve_attention_kernel(self.options.backend)
        program, call = self._lower_checked(captured, result.program, kernel, problems)
        if captured.custom_jvp_inlined and program is not captured.program:
            call = with_original_derivatives(call, captured)
        timings["lower"] = time.perf_counter() - start

        for problem in problems:
            warnings.warn(f"eqsat_attn.optimize({_name(self.fn)}): {problem}", RuntimeWarning, stacklevel=4)
        report = Report(
            before=captured.program,
            after=program,
            attention=attention_infos(program, kernel),
            cost_before=result.cost_before,
            cost_after=result.cost_after if program is result.program else result.cost_before,
            rules_fired=dict(result.rules_fired),
            egraph_nodes=result.egraph_nodes,
            saturated=result.saturated,
            warnings=tuple(result.warnings) + tuple(problems),
            timings=timings,
            fused_regions=region_infos(program),
            projections=projections(program),
            layout_explainer=result.layout_decision if program is result.program else None,
            repeated_blocks=result.repeated_blocks,
            unchosen_attention=result.attention_notes if program is result.program else (),
        )
        return _Compiled(captured, call, report)

    def _optimize(self, captured: Captured) -> tuple[PipelineResult, list[str]]:
        original = captured.program
        try:
            result = optimize_program(original, self.options)
        except Exception as exc:  # the optimizer must never change what the user computes
            fallback = PipelineResult(original, {}, 0, False, 0.0, 0.0)
            return fallback, [f"optimizer failed ({type(exc).__name__}: {exc}); running the original program"]
        if result.program.input_types != original.input_types or result.program.output_types != original.output_types:
            return (
                PipelineResult(original, result.rules_fired, result.egraph_nodes, result.saturated, result.cost_before, result.cost_before),
                ["optimizer returned a program with a different signature; running the original program"],
            )
        return result, []

    def _lower_checked(
        self, captured: Captured, program: Program, kernel: str, problems: list[str]
    ) -> tuple[Program, Callable[..., list[Any]]]:
        """Lower ``program``; if it fails to trace, lower the captured program instead."""
        flat_avals = [*captured.in_avals, *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in captured.hoisted_consts)]
        call = jax.jit(lower(program, attention_kernel=kernel))
        if program is captured.program:
            return program, call
        try:
            jax.eval_shape(call, *flat_avals)
        except Exception as exc:
            problems.append(f"lowering the optimized program failed ({type(exc).__name__}: {exc}); running the original program")
            return captured.program, jax.jit(lower(captured.program, attention_kernel=kernel))
        return program, call


def with_original_derivatives(call: Callable[..., list[Any]], captured: Captured) -> Callable[..., list[Any]]:
    """``call``'s values with the original function's derivatives (forward and reverse mode).

    Capture inlines custom_jvp calls so rules see their primal; their derivative rules then
    live only in the original function, so the optimized program's derivatives are taken from
    it. Values still come from the optimized program.
    """
    from jax.extend.core import jaxpr_as_fun

    original = jaxpr_as_fun(captured.closed_jaxpr)
    n_leaves = len(captured.in_avals)

    @jax.custom_jvp
    def optimized(*flat: Any) -> list[Any]:
        return list(call(*flat))

    @optimized.defjvp
    def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
        # hoisted constants (closed-over tracers) are jaxpr constants of the original
        _, out_tangents = jax.jvp(lambda *xs: list(original(*xs)), primals[:n_leaves], tangents[:n_leaves])
        return optimized(*primals), out_tangents

    return optimized


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _cache_key(
    statics: tuple[Any, ...], static_nums: tuple[int, ...], in_tree: Any, avals: Sequence[jax.ShapeDtypeStruct]
) -> Hashable:
    for pos, value in zip(static_nums, statics):
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"static argument {pos} is a {type(value).__name__}, which is not hashable; "
                "static arguments must be hashable (use a tuple instead of a list)"
            ) from None
    signature = tuple((a.shape, str(a.dtype), bool(a.weak_type)) for a in avals)
    return (static_nums, tuple((type(v), v) for v in statics), in_tree, signature)


def optimize(
    fn: Callable[..., Any] | None = None,
    *,
    cost_model: object | None = None,
    rules: Sequence[str] | None = None,
    backend: str = "auto",
    limits: Limits | None = None,
    extractor: str = "greedy-dag",
    static_argnums: int | Sequence[int] = (),
    precision: str = "exact",
    reuse_blocks: bool = True,
) -> Any:
    """Optimize a JAX function by equality saturation; use bare (``@optimize``) or with options.

    ``backend`` picks how attention runs: "pallas", "reference" or "auto" (Pallas on GPU).
    ``limits`` bounds saturation; past it the best program found so far is used.
    ``extractor`` is "greedy-dag" (default), "tree" or "ilp" (exact, small graphs).
    ``precision="fp8"`` lets the optimizer run bf16/f16 attention in fp8 where the cost model
    says it pays (values then change; README, "Precision policy"); the default "exact" never
    introduces a lower precision. ``reuse_blocks`` (default) optimizes identical repeated blocks
    (a model's layers, cut at the residual stream; `eqsat_attn.blocks`) once. If the
    optimizer fails, a warning is emitted and the original program runs: values never change.
    """
    options = OptimizeOptions(
        rules=rules, cost_model=cost_model, backend=backend, limits=limits or Limits(), extractor=extractor,
        precision=precision, reuse_blocks=reuse_blocks,
    )

    def wrap(f: Callable[..., Any]) -> OptimizedFunction:
        return OptimizedFunction(f, options, static_argnums)

    return wrap if fn is None else wrap(fn)
