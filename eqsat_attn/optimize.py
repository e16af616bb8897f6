"""The ``@optimize`` decorator: trace, optimize, lower and cache per argument structure."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from . import disk_cache
from .collector import collection_paused
from .capture import Captured, capture, normalize_static_argnums, split_args
from .choices import check_rules
from .ir import Program
from .lower import lower, resolve_attention_kernel
from .pipeline import Limits, OptimizeOptions, PipelineResult, optimize_program
from .qkv_layouts import projections
from .report import Report, attention_infos, region_infos


#: Optimized programs kept per decorated function (least recently used dropped first), as
#: ``functools.lru_cache``'s default; ``ea.optimize(cache_size=...)`` changes it, None = unbounded.
DEFAULT_CACHE_SIZE = 128


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int  # optimized programs held now
    maxsize: int | None  # most held at once (None: unbounded)

    @property
    def entries(self) -> int:  # the name before `size`
        return self.size


@dataclass(frozen=True)
class _Compiled:
    """One cache entry: the jitted lowered program and how to call it."""

    captured: Captured
    call: Callable[..., list[Any]]
    report: Report


class OptimizedFunction:
    """A function whose jaxpr is optimized by equality saturation before it runs.

    Call it like the original function. One compiled program is kept per argument
    structure (pytree structure, shapes, dtypes, weak types and static argument values), at
    most ``cache_size`` of them (least recently used dropped first). As a method, the cache
    belongs to the function and is shared by every instance, with ``self`` part of the key
    (see `BoundOptimizedFunction`).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        options: OptimizeOptions,
        static_argnums: int | Sequence[int] = (),
        cache_size: int | None = DEFAULT_CACHE_SIZE,
        cache_dir: Any = None,
    ) -> None:
        self.fn = fn
        self.options = options
        self.cache_dir = _checked_cache_dir(cache_dir)  # None: the process-wide setting (disk_cache)
        self.static_argnums = _checked_static_argnums(static_argnums)
        self.cache_size = _checked_cache_size(cache_size)
        self._cache: OrderedDict[Hashable, _Compiled] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._warned: set[str] = set()  # fallback causes already reported for this function
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(args, kwargs, self.static_argnums)

    def explain(self, *args: Any, **kwargs: Any) -> Report:
        """The report for these arguments: programs before and after, costs, rules, attention."""
        return self._entry(args, kwargs, self.static_argnums).report

    def cache_info(self) -> CacheInfo:
        """Hits, misses, programs held now and the most held (``maxsize``)."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def cache_clear(self) -> None:
        """Drop every optimized program and the counts (fallback warnings are given again)."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0
            self._warned.clear()

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else BoundOptimizedFunction(self, instance)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], static_argnums: int | Sequence[int]) -> Any:
        entry = self._entry(args, kwargs, static_argnums)
        flat = entry.captured.flat_args(*args, **kwargs)
        return entry.captured.unflatten(entry.call(*flat))

    def _entry(self, args: tuple[Any, ...], kwargs: dict[str, Any], static_argnums: int | Sequence[int]) -> _Compiled:
        static_nums = normalize_static_argnums(static_argnums, len(args))
        statics, _, in_tree, avals = split_args(args, kwargs, static_nums)
        key = _cache_key(statics, static_nums, in_tree, avals)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._hits += 1
                self._cache.move_to_end(key)
                return entry
            self._misses += 1
        entry = self._compile(args, kwargs, static_nums)  # outside the lock: threads may optimize at once
        if not any(isinstance(c, jax.core.Tracer) for c in entry.captured.hoisted_consts):
            # a closure over an outer transformation's tracers is only valid for this call
            with self._lock:
                self._cache[key] = entry
                while self.cache_size is not None and len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return entry

    def _warn_once(self, problem: str) -> None:
        """One RuntimeWarning per function and cause, naming the function (Python's own
        once-per-location filter would otherwise hide a second function's warning)."""
        with self._lock:
            if problem in self._warned:
                return
            self._warned.add(problem)
        warnings.warn(
            f"eqsat_attn.optimize({_name(self.fn)}): {problem}", RuntimeWarning, skip_file_prefixes=_INTERNAL_DIRS
        )

    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any], static_nums: tuple[int, ...]) -> _Compiled:
        with collection_paused():  # the cyclic collector's passes cost ~20% of an optimization
            return self._compile_now(args, kwargs, static_nums)

    def _compile_now(self, args: tuple[Any, ...], kwargs: dict[str, Any], static_nums: tuple[int, ...]) -> _Compiled:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        captured = capture(self.fn, *args, static_argnums=static_nums, **kwargs)
        timings["trace"] = time.perf_counter() - start

        start = time.perf_counter()
        directory = disk_cache.resolve_cache_dir(self.cache_dir)
        key = disk_cache.entry_key(captured.program, self.options) if directory is not None else None
        stored = disk_cache.load(directory, key, captured.program) if key is not None else None
        result, problems = (stored, []) if stored is not None else self._optimize(captured)
        timings["disk_cache" if stored is not None else "optimize"] = time.perf_counter() - start

        start = time.perf_counter()
        kernel = resolve_attention_kernel(self.options.backend)
        # a stored program lowered when it was stored (the key holds the platform and versions)
        program, call = self._lower_checked(captured, result.program, kernel, problems, verified=stored is not None)
        if captured.custom_jvp_inlined and program is not captured.program:
            # jitted: an eager call then takes jit's fast path, not custom_jvp's Python dispatch
            call = jax.jit(with_original_derivatives(call, captured))
        timings["lower"] = time.perf_counter() - start
        if key is not None and stored is None and not problems and program is result.program:
            start = time.perf_counter()
            self._store(directory, key, result, captured, problems)
            timings["optimize"] += time.perf_counter() - start

        for problem in problems:
            self._warn_once(problem)
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
            precision=self.options.precision,
        )
        return _Compiled(captured, call, report)

    def _store(self, directory: Any, key: str, result: PipelineResult, captured: Captured, problems: list[str]) -> None:
        """Write an optimized program that lowered to the disk cache (`eqsat_attn.disk_cache`)."""
        try:
            disk_cache.store(directory, key, result, captured.program)
        except disk_cache.Unserializable:
            pass  # an optimized scan/checkpoint body (a new opaque call), a call with a function parameter: in memory only
        except OSError as exc:
            problems.append(f"could not write the disk cache {directory} ({exc}); optimized programs "
                            "are kept in memory only")

    def _optimize(self, captured: Captured) -> tuple[PipelineResult, list[str]]:
        original = captured.program
        try:
            result = optimize_program(original, self.options, warn=False)
        except Exception as exc:  # the optimizer must never change what the user computes
            fallback = PipelineResult(original, {}, 0, False, 0.0, 0.0)
            return fallback, [f"optimizer failed ({type(exc).__name__}: {exc}); running the original program"]
        if result.fallback is not None:  # reported once, as the decorator's problem
            return dataclasses.replace(result, warnings=()), [result.fallback]
        if result.program.input_types != original.input_types or result.program.output_types != original.output_types:
            return (
                PipelineResult(original, result.rules_fired, result.egraph_nodes, result.saturated, result.cost_before, result.cost_before),
                ["optimizer returned a program with a different signature; running the original program"],
            )
        return result, []

    def _lower_checked(
        self, captured: Captured, program: Program, kernel: str, problems: list[str], verified: bool = False,
    ) -> tuple[Program, Callable[..., list[Any]]]:
        """Lower ``program``; if it fails to lower, lower the captured program instead.
        ``verified``: it lowered before (a disk cache entry), so it is not lowered twice."""
        flat_avals = [*captured.in_avals, *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in captured.hoisted_consts)]
        call = jax.jit(lower(program, attention_kernel=kernel))
        if program is captured.program or verified:
            return program, call
        try:  # lowered, not only traced: MLIR's verifier checks every op (a wrong reshape fails here)
            platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
            call.trace(*flat_avals).lower(lowering_platforms=(platform,))
        except Exception as exc:
            problems.append(f"lowering the optimized program failed ({type(exc).__name__}: {exc}); running the original program")
            return captured.program, jax.jit(lower(captured.program, attention_kernel=kernel))
        return program, call


class BoundOptimizedFunction:
    """An optimized method bound to an instance: ``obj.method(...)``, ``obj.method.explain(...)``.

    ``self`` is argument 0 of the function, as in ``static_argnums``. It is static (keyed by
    its hash and equality, as ``jax.jit``'s static arguments) unless it is a pytree of arrays
    (an Equinox or Flax module), which is traced like any argument. The cache and its counts
    are the function's, shared by all instances.
    """

    def __init__(self, function: OptimizedFunction, instance: Any) -> None:
        self.__func__ = function
        self.__self__ = instance
        functools.update_wrapper(self, function.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__._run((self.__self__, *args), kwargs, self._static_argnums(len(args) + 1))

    def explain(self, *args: Any, **kwargs: Any) -> Report:
        """The report for these arguments (``self`` included), as `OptimizedFunction.explain`."""
        return self.__func__._entry((self.__self__, *args), kwargs, self._static_argnums(len(args) + 1)).report

    def cache_info(self) -> CacheInfo:
        return self.__func__.cache_info()

    def cache_clear(self) -> None:
        self.__func__.cache_clear()

    def __eq__(self, other: object) -> bool:  # as bound methods: the same function on the same instance
        return (isinstance(other, BoundOptimizedFunction) and other.__func__ is self.__func__
                and other.__self__ is self.__self__)

    def __hash__(self) -> int:
        return hash((id(self.__func__), id(self.__self__)))

    def _static_argnums(self, nargs: int) -> tuple[int, ...]:
        nums = normalize_static_argnums(self.__func__.static_argnums, nargs)
        if 0 in nums or _is_array_pytree(self.__self__):
            return nums
        return (0, *nums)


def _is_array_pytree(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)


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
    """``module.qualname`` of the decorated function."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


# Frames a fallback warning skips, so it points at the user's call.
_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(jax.__file__))


def _checked_static_argnums(static_argnums: Any) -> int | tuple[int, ...]:
    nums = (static_argnums,) if isinstance(static_argnums, int) else static_argnums
    if not isinstance(nums, Sequence) or not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
        raise TypeError(f"static_argnums must be an int or a sequence of ints, got {static_argnums!r}")
    return static_argnums if isinstance(static_argnums, int) else tuple(static_argnums)


def _checked_cache_size(cache_size: Any) -> int | None:
    if cache_size is not None and (isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0):
        raise ValueError(
            f"cache_size must be a non-negative int (0 keeps nothing) or None (unbounded), got {cache_size!r}")
    return cache_size


def _checked_cache_dir(cache_dir: Any) -> Any:
    """None (the process-wide setting), False (off) or a directory path (as a Path)."""
    return cache_dir if cache_dir is None or cache_dir is False else disk_cache.checked_cache_dir(cache_dir)


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
    signature = tuple((a.shape, a.dtype, a.weak_type) for a in avals)  # dtypes hash as their names do
    return (static_nums, tuple((type(v), v) for v in statics), in_tree, signature)


def optimize(
    fn: Callable[..., Any] | None = None,
    *,
    cost_model: str | object | None = None,
    rules: str | Sequence[str] | None = None,
    backend: str = "auto",
    limits: Limits | None = None,
    extractor: str = "greedy-dag",
    static_argnums: int | Sequence[int] = (),
    precision: str = "exact",
    reuse_blocks: bool = True,
    cache_size: int | None = DEFAULT_CACHE_SIZE,
    cache_dir: str | os.PathLike[str] | bool | None = None,
) -> Any:
    """Optimize a JAX function by equality saturation; use bare (``@optimize``) or with options.

    ``cost_model`` is a model object or a name: "default" (this device), "bytes",
    "roofline-<h100|h200|cpu>[-reference]" (`eqsat_attn.choices.COST_MODEL_NAMES`).
    ``rules`` are rule-set names or rule-file paths (one name is a list of one); None = defaults.
    ``backend`` picks how attention runs: "pallas", "reference" or "auto" (Pallas on GPU).
    ``limits`` bounds saturation; past it the best program found so far is used.
    ``extractor`` is "greedy-dag" (default), "tree" or "ilp" (exact, small graphs).
    ``precision="fp8"`` lets the optimizer run bf16/f16 attention in fp8 where the cost model
    says it pays (values then change; README, "Precision policy"); ``precision="fast_math"``
    also raises softmax spellings that equal attention but where the program meets Inf or NaN,
    signed zeros and exp's rounding (no max subtracted, exp(s - logsumexp), GPT-2's multiplicative
    mask); the default "exact" changes values only by float reassociation. ``reuse_blocks`` (default) optimizes identical repeated blocks
    (a model's layers, cut at the residual stream; `eqsat_attn.blocks`) once. ``cache_size``
    optimized programs are kept per function (`DEFAULT_CACHE_SIZE`; None: unbounded).
    ``cache_dir`` keeps optimized programs on disk for other processes (`eqsat_attn.disk_cache`):
    a directory, False (off for this function) or None (default: `eqsat_attn.set_cache_dir`'s
    directory, else ``$EQSAT_ATTN_CACHE_DIR``, else off).

    Every option is checked here: a bad one raises ValueError or TypeError now (an unknown
    rule set or a broken rule file too: the rule files are loaded now), not at the first call.
    If the optimizer fails at a call, a warning naming the function is emitted (once per
    function and cause) and the original program runs: values never change.
    """
    options = OptimizeOptions(
        rules=rules, cost_model=cost_model, backend=backend, limits=limits if limits is not None else Limits(),
        extractor=extractor, precision=precision, reuse_blocks=reuse_blocks,
    )
    check_rules(options.rules)
    static_argnums = _checked_static_argnums(static_argnums)
    cache_size = _checked_cache_size(cache_size)
    cache_dir = _checked_cache_dir(cache_dir)

    def wrap(f: Callable[..., Any]) -> OptimizedFunction:
        if not callable(f):
            raise TypeError(f"ea.optimize decorates a function, got {f!r} (options are keywords: rules=..., ...)")
        return OptimizedFunction(f, options, static_argnums, cache_size, cache_dir)

    return wrap if fn is None else wrap(fn)
