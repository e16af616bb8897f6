"""ea.optimize's and ea.explore's options: checked where given, rule files loaded safely from
threads, one fallback warning per function and cause, decorated methods, the bounded cache."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn import pipeline
from eqsat_attn.choices import COST_MODEL_NAMES
from eqsat_attn.egraph.rulesets import RuleFileError, load_rule_file
from eqsat_attn.optimize import DEFAULT_CACHE_SIZE
from work_limits import SAFETY_NET_S

FAST = ea.Limits(iterations=3, nodes=20_000, seconds=SAFETY_NET_S)


def extreme(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """Random normals with ±0, a denormal, near-overflow values, NaN and ±Inf mixed in."""
    values = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32).ravel()
    specials = np.array([0.0, -0.0, 1e-45, -3e38, 3e38, np.nan, np.inf, -np.inf], np.float32)
    values[: min(len(values), len(specials))] = specials[: len(values)]
    return jnp.asarray(values.reshape(shape))


def swap_tanh(x):
    """Two transposes around tanh (they cancel), then a scale."""
    return jnp.transpose(jnp.tanh(jnp.transpose(x, (1, 0))), (1, 0)) * 2.0


def assert_same(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)  # NaN == NaN


# ---------------------------------------------------------------- options checked where given


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        (dict(rules=["nope"]), ValueError, r"unknown rule set 'nope'.*transpose"),
        (dict(rules=["transpose", 3]), TypeError, r"rules must be .*3"),
        (dict(extractor="x"), ValueError, r"unknown extractor 'x'.*'greedy-dag', 'tree', 'ilp'"),
        (dict(limits="fast"), TypeError, r"limits must be an eqsat_attn.Limits.*'fast'"),
        (dict(cost_model="nope"), ValueError, r"unknown cost model 'nope'.*'bytes'.*'roofline-h100'"),
        (dict(cost_model=3), TypeError, r"cost_model must be .*got 3"),
        (dict(backend="gpu"), ValueError, r"unknown backend 'gpu'.*'pallas'"),
        (dict(precision="fp4"), ValueError, r"precision must be one of"),
        (dict(cache_size=-1), ValueError, r"cache_size .*-1"),
        (dict(static_argnums="0"), TypeError, r"static_argnums .*'0'"),
    ],
)
def test_bad_options_raise_when_given(options, error, says):
    with pytest.raises(error, match=says):
        ea.optimize(**options)  # no function decorated, nothing called: the check is here
    with pytest.raises(error, match=says):
        ea.optimize(swap_tanh, **options)


def test_a_bare_rule_set_name_is_one_rule_set():
    optimized = ea.optimize(swap_tanh, rules="transpose", limits=FAST)
    assert optimized.options.rules == ("transpose",)
    x = extreme((3, 5))
    assert_same(optimized(x), swap_tanh(x))
    fired = optimized.explain(x).rules_fired
    assert fired and all(name.startswith("transpose.") for name in fired), fired


@pytest.mark.parametrize("name", COST_MODEL_NAMES)
def test_every_cost_model_name_the_cli_takes_is_accepted(name):
    optimized = ea.optimize(swap_tanh, cost_model=name, limits=FAST)
    model = optimized.options.cost_model
    assert model is None if name == "default" else model.name == name


def test_a_named_cost_model_optimizes_and_keeps_values():
    optimized = ea.optimize(swap_tanh, cost_model="roofline-h100", limits=FAST)
    x = extreme((4, 6), seed=1)
    assert_same(optimized(x), swap_tanh(x))
    assert optimized.explain(x).after.count("transpose") == 0


def test_decorating_something_that_is_not_a_function():
    with pytest.raises(TypeError, match="decorates a function"):
        ea.optimize("transpose")


def test_explorer_checks_its_options():
    ex = ea.explore(swap_tanh, extreme((2, 3)))
    with pytest.raises(ValueError, match="unknown rule set 'nope'"):
        ex.run("nope")
    with pytest.raises(TypeError, match="limits must be an eqsat_attn.Limits"):
        ex.run(limits="fast")
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        ex.run(iterations=0)
    with pytest.raises(ValueError, match="unknown extractor 'x'"):
        ex.extract(extractor="x")
    with pytest.raises(ValueError, match="unknown cost model"):
        ex.extract("roofline-a100")
    step = ex.run(["canonical", "transpose"])  # a list counts as the names in it
    assert step.rulesets == ("canonical", "transpose")


# ---------------------------------------------------------------- rule files

MUL_ONE_RULES = '''
"""A user rule file."""
import time

from egglog import String, f64, var
from eqsat_attn.egraph.language import IntVec, Term
from eqsat_attn.egraph.rulesets import RuleSet, rw

time.sleep(0.2)  # a slow import: other threads arrive while this file is half run
{name} = RuleSet("{name}", "Multiplying by one is the identity.")
x = var("x", Term)
s, d = var("s", IntVec), var("d", IntVec)
dt = var("dt", String)


@{name}.family
def mul_one():
    """x * broadcast(1) is x."""
    yield rw(Term.binary("mul", x, Term.broadcast(Term.literal(f64(1.0), dt), s, d)), x)
'''


def test_missing_rule_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.py"
    with pytest.raises(FileNotFoundError, match=r"rule file .*nowhere\.py does not exist"):
        ea.optimize(rules=[str(missing)])


def test_rule_file_without_a_rule_set_is_named(tmp_path):
    empty = tmp_path / "empty_rules.py"
    empty.write_text("X = 1\n")
    with pytest.raises(RuleFileError, match=r"empty_rules\.py declares no eqsat_attn RuleSet"):
        ea.optimize(rules=str(empty))


def test_rule_file_that_raises_says_which_and_why(tmp_path):
    broken = tmp_path / "broken_rules.py"
    broken.write_text("import math\nmath.sqrt(-1)\n")
    with pytest.raises(RuleFileError, match=r"broken_rules\.py raised while loading: ValueError: math domain error"):
        ea.optimize(rules=[str(broken)])
    assert isinstance(RuleFileError("x"), ValueError)


def test_eight_threads_load_one_rule_file_at_once(tmp_path):
    path = tmp_path / "threaded_rules.py"
    path.write_text(MUL_ONE_RULES.format(name="threaded_mul_one"))
    start = threading.Barrier(8)
    results: list[object] = [None] * 8

    def load(i: int) -> None:
        start.wait()
        try:
            results[i] = load_rule_file(path)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, list) for r in results), results
    assert all(r == results[0] and [s.name for s in r] == ["threaded_mul_one"] for r in results)


def test_eight_threads_first_optimized_calls_with_a_user_rule_file(tmp_path):
    path = tmp_path / "first_call_rules.py"
    path.write_text(MUL_ONE_RULES.format(name="first_call_mul_one"))
    x = extreme((2, 3), seed=2)

    def fn(x):
        return jnp.exp(x * jnp.ones_like(x))

    start = threading.Barrier(8)
    outcomes: list[object] = [None] * 8

    def work(i: int) -> None:
        start.wait()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a fallback would fail this thread
                optimized = ea.optimize(fn, rules=[str(path)], limits=FAST)
                outcomes[i] = (optimized(x), optimized.explain(x).rules_fired)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(o, tuple) for o in outcomes), outcomes
    for value, fired in outcomes:
        assert_same(value, fn(x))
        assert fired.get("first_call_mul_one.mul_one", 0) > 0, fired


def test_eight_threads_first_calls_in_a_fresh_process():
    """The shipped rule files load once per process: in a new one, eight threads need them at once."""
    script = textwrap.dedent(
        """
        import threading, warnings
        import jax.numpy as jnp
        import eqsat_attn as ea

        x = jnp.linspace(-3.0, 3.0, 12).reshape(3, 4)
        problems, barrier = [], threading.Barrier(8)

        def work():
            barrier.wait()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # the rule files load here (every shipped one, to know the names); one small set runs
                f = ea.optimize(lambda x: x * 2.0, rules=["canonical"], limits=ea.Limits(iterations=1))
                f(x)
            problems.extend(str(w.message) for w in caught)

        threads = [threading.Thread(target=work) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("PROBLEMS", problems)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "PROBLEMS []" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- fallback warnings


def test_one_fallback_warning_per_function_and_cause(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the e-graph broke")

    monkeypatch.setattr(pipeline, "optimize_part", fail)

    def first(x):
        return jnp.sin(x) + 1.0

    def second(x):
        return jnp.cos(x) * 2.0

    optimized = [ea.optimize(first, limits=FAST), ea.optimize(second, limits=FAST)]
    x, y = extreme((3, 4), seed=3), extreme((5,), seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # Python's default filters: RuntimeWarning shown once per location and text
        warnings.simplefilter("default")
        for f, plain in zip(optimized * 2, [first, second] * 2):  # one call site for all of them
            assert_same(f(x), plain(x))
        assert_same(optimized[0](y), first(y))  # a new shape, the same cause: no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    assert "test_one_fallback_warning_per_function_and_cause.<locals>.first" in messages[0]
    assert "test_one_fallback_warning_per_function_and_cause.<locals>.second" in messages[1]
    assert all("the e-graph broke" in m and "running the original program" in m for m in messages)
    assert all(w.filename == __file__ for w in caught)  # points at the user's call
    report = optimized[1].explain(x)
    assert [w for w in report.warnings if "the e-graph broke" in w] == [messages[1].split(": ", 1)[1]]
    assert report.after == report.before


# ---------------------------------------------------------------- methods


class Scaler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    @ea.optimize(limits=FAST)
    def apply(self, x):
        """Scale a transposed tanh."""
        return swap_tanh(x) * self.scale


@jax.tree_util.register_dataclass
@dataclass
class Affine:
    w: jax.Array

    @ea.optimize(limits=FAST)
    def __call__(self, x):
        return jnp.tanh(x @ self.w)


def test_decorated_method_calls_explains_and_caches_per_instance():
    Scaler.apply.cache_clear()
    x = extreme((3, 4), seed=5)
    half, triple = Scaler(0.5), Scaler(3.0)
    assert_same(half.apply(x), swap_tanh(x) * 0.5)
    assert_same(triple.apply(x), swap_tanh(x) * 3.0)  # its own entry: self is part of the key
    assert_same(half.apply(x), swap_tanh(x) * 0.5)
    report = half.apply.explain(x)
    assert report.after.count("transpose") == 0
    info = triple.apply.cache_info()
    assert (info.hits, info.misses, info.size) == (2, 2, 2)  # one cache for the function, shared
    assert Scaler.apply.cache_info() == info
    assert half.apply.__doc__ == "Scale a transposed tanh." and half.apply.__name__ == "apply"
    assert half.apply == half.apply and half.apply != triple.apply  # as bound methods compare
    assert_same(jax.jit(triple.apply)(x), swap_tanh(x) * 3.0)
    half.apply.cache_clear()
    assert Scaler.apply.cache_info().size == 0


def test_method_of_a_pytree_instance_traces_self():
    x = extreme((2, 3), seed=6)
    a, b = Affine(jax.random.normal(jax.random.key(7), (3, 3))), Affine(jax.random.normal(jax.random.key(8), (3, 3)))
    Affine.__call__.cache_clear()
    np.testing.assert_allclose(a(x), jnp.tanh(x @ a.w), rtol=1e-6)
    np.testing.assert_allclose(b(x), jnp.tanh(x @ b.w), rtol=1e-6)  # same shapes: the same program, other weights
    info = Affine.__call__.cache_info()
    assert (info.hits, info.misses, info.size) == (1, 1, 1)
    assert a.__call__.explain(x).before.count("dot_general") == 1


def test_method_of_an_unhashable_instance_says_so():
    @dataclass  # eq=True without frozen: unhashable
    class Plain:
        scale: float

        @ea.optimize(limits=FAST)
        def apply(self, x):
            return x * self.scale

    with pytest.raises(TypeError, match="static argument 0 is a Plain, which is not hashable"):
        Plain(2.0).apply(jnp.ones(3))


# ---------------------------------------------------------------- the bounded cache


def test_cache_is_a_bounded_lru():
    optimized = ea.optimize(swap_tanh, limits=FAST, cache_size=2)
    a, b, c = extreme((2, 3)), extreme((3, 3)), extreme((4, 3))
    for x in (a, b, c):  # c pushes a out
        assert_same(optimized(x), swap_tanh(x))
    assert optimized.cache_info() == (0, 3, 2, 2)
    optimized(c)  # a hit, and the most recent
    optimized(b)
    assert optimized.cache_info() == (2, 3, 2, 2)
    optimized(a)  # evicted: optimized again, dropping c (least recently used)
    assert optimized.cache_info() == (2, 4, 2, 2)
    optimized(b)
    assert optimized.cache_info().hits == 3


def test_cache_clear_frees_what_it_held():
    optimized = ea.optimize(swap_tanh, limits=FAST)
    assert optimized.cache_info().maxsize == DEFAULT_CACHE_SIZE
    optimized(extreme((2, 3)))
    held = [weakref.ref(entry) for entry in optimized._cache.values()]
    assert len(held) == 1 and held[0]() is not None
    optimized.cache_clear()
    gc.collect()
    assert held[0]() is None
    assert optimized.cache_info() == (0, 0, 0, DEFAULT_CACHE_SIZE)


def test_cache_size_zero_keeps_nothing_and_none_is_unbounded():
    keep_none = ea.optimize(swap_tanh, limits=FAST, cache_size=0)
    x = extreme((2, 2))
    assert_same(keep_none(x), swap_tanh(x))
    keep_none(x)
    assert keep_none.cache_info() == (0, 2, 0, 0)
    assert ea.optimize(swap_tanh, cache_size=None).cache_info().maxsize is None
