"""Values never change: bits of literals, 64-bit integers, weak types and effects survive
`ea.optimize` exactly (capture, e-graph, extraction, lowering)."""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import eqsat_attn as ea
from eqsat_attn.capture import capture
from eqsat_attn.egraph.encode import f64_holds_exactly

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(value) -> np.ndarray:
    """The raw bits of an array: equal bits mean the same value, sign of zero and NaN included."""
    a = np.asarray(value)
    return a.view(_UINT[a.dtype.itemsize])


def assert_same_bits(want, got) -> None:
    """Same types and bits. Compare with ``jax.jit(fn)``, which the optimized function is: eager
    JAX flushes a denormal sum to zero where XLA's jit folds ``x + -0.0`` to ``x``."""
    want_leaves, got_leaves = jax.tree.leaves(want), jax.tree.leaves(got)
    assert len(want_leaves) == len(got_leaves)
    for w, g in zip(want_leaves, got_leaves):
        assert jax.typeof(g) == jax.typeof(w), (jax.typeof(g), jax.typeof(w))
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"want {w}, got {g}")


def optimized_quietly(fn, *args, **kwargs):
    """``ea.optimize(fn)(*args)``, failing on a fallback warning (the original would run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return ea.optimize(fn, **kwargs)(*args)


@contextlib.contextmanager
def x64():
    """64-bit types on for the block (jax 0.12 `jax.enable_x64`, else the config flag), restored after."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
        return
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


# extreme values: both zeros, a denormal, the largest finite, infinities, NaN
EXTREMES = np.array([1.5, -0.0, 0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, np.inf, -np.inf, np.nan, -2.0], np.float32)


# ----------------------------------------------------------------------------- literal bits


@pytest.mark.parametrize("name, fn", [
    ("times -0.0", lambda x: x * -0.0),
    ("where 0.0 or -0.0", lambda x: jnp.where(x > 0, 0.0, -0.0)),
    ("both zeros, one program", lambda x: (x * 0.0, x * -0.0, x + -0.0)),
    ("nan", lambda x: x + jnp.nan),
    ("negative nan", lambda x: jnp.where(x > 0, x, -jnp.nan)),
    ("infinities", lambda x: (x * -jnp.inf, jnp.maximum(x, -jnp.inf), jnp.minimum(x, jnp.inf))),
    ("denormal literal", lambda x: x * 1e-45 + jnp.float32(-1e-40)),
    ("bf16 -0.0", lambda x: x.astype(jnp.bfloat16) * jnp.bfloat16(-0.0)),
])
def test_literals_keep_their_bits(name, fn):
    x = jnp.asarray(EXTREMES)
    assert_same_bits(jax.jit(fn)(x), optimized_quietly(fn, x))


def test_inexact_literals_stay_out_of_egglog_f64():
    """egglog's f64 equates -0.0 with 0.0 and all NaNs, and rounds integers past 2**53."""
    assert f64_holds_exactly(0.0) and f64_holds_exactly(float("inf")) and f64_holds_exactly(2**53)
    assert not f64_holds_exactly(-0.0)
    assert not f64_holds_exactly(float("nan"))
    assert not f64_holds_exactly(2**53 + 1) and not f64_holds_exactly(-(2**62) - 1)


def test_zero_literals_of_each_sign_are_distinct_nodes():
    program = capture(lambda x: (x * 0.0, x * -0.0), jnp.ones(3)).program
    values = sorted(str(n.params["value"]) for n in program.nodes if n.op == "literal")
    assert values == ["-0.0", "0.0"], program


# ----------------------------------------------------------------------------- 64-bit integers


@pytest.mark.parametrize("name, fn", [
    ("int64 add past 2**53", lambda x: x + (2**62 + 1)),
    ("int64 mul and sub", lambda x: x * (2**53 + 1) - (2**61 + 3)),
    ("int64 min", lambda x: jnp.minimum(x, -(2**63) + 5)),
    ("uint64 max", lambda x: x.astype(jnp.uint64) + np.uint64(2**64 - 1)),
])
def test_64_bit_integer_literals_stay_exact(name, fn):
    with x64():
        x = jnp.array([0, 1, -3, 2**40 + 7], jnp.int64)
        want = jax.jit(fn)(x)
        assert want.dtype.itemsize == 8
        assert_same_bits(want, optimized_quietly(fn, x))


def test_float64_literals_stay_exact():
    with x64():
        x = jnp.array([0.0, -0.0, 1e-310, 1.7e308, np.nan, -np.inf], jnp.float64)
        fn = lambda v: (v * 0.1 + 1e-300, v * -0.0)  # noqa: E731
        assert_same_bits(jax.jit(fn)(x), optimized_quietly(fn, x))


# ----------------------------------------------------------------------------- weak types


@pytest.mark.parametrize("name, fn, args", [
    ("bf16 times a Python scalar", lambda x, s: x * s, (jnp.ones(3, jnp.bfloat16), 2.0)),
    ("weak result", lambda x, s: s * 3, (jnp.ones(3), 2.0)),
    ("weak result of two scalars", lambda x, s: (s + 1.5, x * 2), (jnp.ones(2, jnp.float16), 0.5)),
    ("weak int result", lambda x, s: s * 2 - 1, (jnp.ones(2), 3)),
    ("strong result from a weak input", lambda x, s: jnp.asarray(s, jnp.float32), (jnp.ones(2), 2.0)),
])
def test_results_keep_weak_types(name, fn, args):
    want = jax.eval_shape(fn, *args)
    f = ea.optimize(fn)
    assert jax.eval_shape(f, *args) == want
    got = optimized_quietly(fn, *args)
    assert [jax.typeof(v).weak_type for v in jax.tree.leaves(got)] == [a.weak_type for a in jax.tree.leaves(want)]
    assert_same_bits(jax.jit(fn)(*args), got)


def test_weak_result_promotes_as_the_original_does():
    """A weakly typed f32 result plus bf16 stays bf16 (a strong one would make f32)."""
    fn = lambda s: s * 2  # noqa: E731
    y = jnp.ones(4, jnp.bfloat16)
    assert (fn(2.0) + y).dtype == jnp.bfloat16
    assert (optimized_quietly(fn, 2.0) + y).dtype == jnp.bfloat16
    assert jax.jit(lambda s, y: ea.optimize(fn)(s) + y)(2.0, y).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- effects


def _effectful(log: list):
    """Prints, callbacks and an ordered io_callback, none of whose results are used."""

    def fn(x):
        jax.debug.callback(lambda v: log.append(("first", float(v))), x.sum())
        y = jnp.tanh(jnp.transpose(jnp.transpose(x)))
        io_callback(lambda v: log.append(("io", float(v))) or np.float32(0),
                    jax.ShapeDtypeStruct((), jnp.float32), y.max(), ordered=True)
        jax.debug.callback(lambda v: log.append(("second", float(v))), y[0, 0])
        io_callback(lambda: log.append(("io2", 0.0)), None, ordered=True)
        jax.debug.print("printed {}", y[0, 1])
        return y * 2

    return fn


@pytest.mark.parametrize("wrap", ["optimize", "jit(optimize)", "optimize(jit)"])
def test_effects_run_as_in_the_original(wrap, capsys):
    x = jnp.arange(6.0).reshape(2, 3) / 7
    want_log: list = []
    want = _effectful(want_log)(x)
    want_out = capsys.readouterr().out
    assert [k for k, _ in want_log] == ["first", "io", "second", "io2"] and "printed" in want_out

    log: list = []
    fn = _effectful(log)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if wrap == "optimize":
            got = ea.optimize(fn)(x)
        elif wrap == "jit(optimize)":
            got = jax.jit(ea.optimize(fn))(x)
        else:  # effects inside a jitted call: kept as one opaque call
            got = ea.optimize(jax.jit(fn))(x)
    jax.effects_barrier()
    assert sorted(log) == sorted(want_log)  # each effect once, with its values
    ordered = [e for e in log if e[0].startswith("io")]
    assert ordered == [e for e in want_log if e[0].startswith("io")]
    if wrap == "optimize":  # not nested in another jit: every effect in program order
        assert log == want_log
    # (nested jits may run unordered debug callbacks out of program order, as jax.jit(jax.jit(fn)) does)
    assert capsys.readouterr().out == want_out
    np.testing.assert_array_equal(got, want)


def test_effects_are_program_roots():
    report = ea.optimize(_effectful([])).explain(jnp.ones((2, 3)))
    program, after = report.before, report.after
    names = [program.nodes[i].params["call"].name for i in program.effects]
    assert names == ["debug_callback", "io_callback", "debug_callback", "io_callback", "debug_print"]
    assert set(program.effects) <= set(program.live_nodes())
    assert "effects %" in str(after)
    calls = [program.nodes[i].params["call"] for i in program.effects]
    assert [after.nodes[i].params["call"] for i in after.effects] == calls
    assert after.count("transpose") == 0  # the rules still ran around the effects


def test_effects_survive_exact_extraction():
    log: list = []
    fn = _effectful(log)
    x = jnp.ones((2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ea.optimize(fn, extractor="ilp")(x)
    jax.effects_barrier()
    assert [k for k, _ in log] == ["first", "io", "second", "io2"]


def test_a_stack_with_effects_is_optimized_whole():
    """Repeated layers are not cut apart when the program has effects (parts would drop them)."""
    from eqsat_attn import examples
    from eqsat_attn.blocks import split_repeated

    fn, args = examples.stacked_example(2)
    assert split_repeated(capture(fn, *args).program) is not None
    log: list = []

    def with_print(*a):
        y = fn(*a)
        # (of y.sum(), jax.jit(with_print) itself trips an XLA RET_CHECK on CPU, jax 0.12.1)
        jax.debug.callback(lambda v: log.append(float(v)), y[0, 0, 0])
        return y

    program = capture(with_print, *args).program
    assert split_repeated(program) is None and len(program.effects) == 1
    want = jax.jit(with_print)(*args)
    got = optimized_quietly(with_print, *args)
    jax.effects_barrier()
    assert len(log) == 2
    np.testing.assert_allclose(log[1], log[0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
