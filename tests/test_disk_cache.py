"""The disk cache of optimized programs (eqsat_attn/disk_cache.py): a second decorator or process
loads the program instead of optimizing; corrupt, stale or mismatched entries are recomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
import eqsat_attn.optimize  # noqa: F401 - the module, for monkeypatching
from eqsat_attn import disk_cache

optimize_module = sys.modules["eqsat_attn.optimize"]  # the package attribute is the decorator
from eqsat_attn.ir import ConstValue, ProgramBuilder, TensorType
from eqsat_attn.pipeline import OptimizeOptions, PipelineResult
from work_limits import SAFETY_NET_S

FAST = ea.Limits(iterations=4, nodes=20_000, seconds=SAFETY_NET_S)
OPTS = dict(rules=["transpose", "canonical"], limits=FAST)


def extreme(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """Random normals with ±0, a denormal, near-overflow values, NaN and ±Inf mixed in."""
    values = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32).ravel()
    specials = np.array([0.0, -0.0, 1e-45, -3e38, 3e38, np.nan, np.inf, -np.inf], np.float32)
    values[: min(len(values), len(specials))] = specials[: len(values)]
    return jnp.asarray(values.reshape(shape))


def block(x, w):
    """Transposes that cancel around tanh, a matmul, a closed-over constant with ±0 and a denormal."""
    y = jnp.transpose(jnp.tanh(jnp.transpose(x, (1, 0))), (1, 0))
    return jnp.einsum("se,ef->fs", y, w) + jnp.asarray(np.array([0.0, -0.0, 1e-45, 2.5], np.float32))[:, None]


@pytest.fixture(autouse=True)
def no_process_wide_cache(monkeypatch):
    """Each test starts with the disk cache off (no set_cache_dir, no environment variable)."""
    monkeypatch.delenv(disk_cache.ENV_VAR, raising=False)
    monkeypatch.setattr(disk_cache, "_configured", disk_cache._UNSET)


@pytest.fixture
def optimizer_runs(monkeypatch) -> list[int]:
    """Counts calls of the optimizer entry point the decorator uses."""
    runs: list[int] = []
    real = optimize_module.optimize_program

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize_module, "optimize_program", counted)
    return runs


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json"))


def test_second_decorator_loads_from_disk_without_optimizing(tmp_path, optimizer_runs):
    x, w = extreme((4, 6)), extreme((6, 4), seed=1)
    first = ea.optimize(block, cache_dir=tmp_path, **OPTS)
    want = first(x, w)
    assert len(optimizer_runs) == 1 and len(entries(tmp_path)) == 1
    assert "optimize" in first.explain(x, w).timings

    second = ea.optimize(block, cache_dir=tmp_path, **OPTS)  # fresh in-process cache
    report = second.explain(x, w)
    assert len(optimizer_runs) == 1, "the second decorator ran the optimizer"
    assert "disk_cache" in report.timings and "optimize" not in report.timings
    assert report.after == first.explain(x, w).after
    np.testing.assert_array_equal(np.asarray(second(x, w)), np.asarray(want))
    np.testing.assert_allclose(np.asarray(want), np.asarray(block(x, w)), rtol=1e-6)


def test_corrupt_entry_is_rejected_and_rewritten(tmp_path, optimizer_runs):
    x, w = extreme((4, 6), seed=2), extreme((6, 4), seed=3)
    want = ea.optimize(block, cache_dir=tmp_path, **OPTS)(x, w)
    (path,) = entries(tmp_path)
    good = path.read_text()
    entry = json.loads(good)
    for broken in (good[: len(good) // 2],  # truncated
                   json.dumps({**entry, "payload": entry["payload"].replace('"tanh"', '"exp"')}),  # checksum fails
                   json.dumps({**entry, "format": disk_cache.FORMAT_VERSION + 1})):  # another format
        path.write_text(broken)
        runs = len(optimizer_runs)
        got = ea.optimize(block, cache_dir=tmp_path, **OPTS)(x, w)
        assert len(optimizer_runs) == runs + 1, "a corrupt entry was used"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert path.read_text() == good, "the entry was not rewritten"
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_entry_with_other_types_is_rejected(tmp_path):
    """A well-formed entry whose program does not have the captured signature is never used."""
    b = ProgramBuilder()
    i = b.input(TensorType((3,), "float32"))
    captured = b.build([b.add("tanh", (i,), TensorType((3,), "float32"))])
    b = ProgramBuilder()
    i = b.input(TensorType((3,), "float32"))
    other = b.build([b.add("convert_element_type", (i,), TensorType((3,), "float16"), new_dtype="float16")])
    disk_cache.store(tmp_path, "k" * 64, PipelineResult(other, {}, 0, True, 1.0, 1.0), captured)
    assert disk_cache.load(tmp_path, "k" * 64, captured) is None
    disk_cache.store(tmp_path, "k" * 64, PipelineResult(captured, {"a": 2}, 5, True, 1.0, 0.5), captured)
    loaded = disk_cache.load(tmp_path, "k" * 64, captured)
    assert loaded is not None and loaded.program == captured and loaded.rules_fired == {"a": 2}


def test_changed_cost_model_or_rules_misses(tmp_path, optimizer_runs):
    x, w = extreme((4, 6), seed=4), extreme((6, 4), seed=5)
    ea.optimize(block, cache_dir=tmp_path, cost_model="roofline-cpu", **OPTS)(x, w)
    ea.optimize(block, cache_dir=tmp_path, cost_model="bytes", **OPTS)(x, w)
    assert len(optimizer_runs) == 2 and len(entries(tmp_path)) == 2

    program = ea.capture(block, x, w).program
    rule_file = tmp_path / "mine.py"
    rule_file.write_text((Path(ea.__file__).parents[1] / "rules" / "transpose.py").read_text())
    key = disk_cache.entry_key(program, OptimizeOptions(rules=[str(rule_file)]))
    assert key is not None and key == disk_cache.entry_key(program, OptimizeOptions(rules=[str(rule_file)]))
    table = ea.cost.H100.with_attention_efficiency("bfloat16", "standard", False, 0.5)
    assert key != disk_cache.entry_key(
        program, OptimizeOptions(rules=[str(rule_file)], cost_model=ea.cost.RooflineModel(table)))
    assert key != disk_cache.entry_key(program, OptimizeOptions(rules=[str(rule_file)], extractor="tree"))


def test_rule_text_is_in_the_key(tmp_path, monkeypatch):
    from eqsat_attn.egraph import rulesets

    program = ea.capture(block, extreme((4, 6)), extreme((6, 4))).program
    options = OptimizeOptions(rules=["transpose"])
    key = disk_cache.entry_key(program, options)
    path = next(p for p, sets in rulesets._LOADED.items() if any(s.name == "transpose" for s in sets))
    edited = tmp_path / "transpose.py"
    edited.write_text(path.read_text() + "\n# one more comment\n")
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self, real=Path.read_bytes: real(edited if self == path else self))
    assert disk_cache.entry_key(program, options) != key


def test_programs_with_opaque_calls_stay_in_memory(tmp_path):
    def looped(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.tanh(c[0]), c[1] + 1), (x, 0))[0].T.T

    x = extreme((3, 5), seed=6)
    got = ea.optimize(looped, cache_dir=tmp_path, **OPTS)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(looped(x)), rtol=1e-6)
    assert entries(tmp_path) == []


def test_serialization_round_trips_extreme_constants():
    b = ProgramBuilder()
    i = b.input(TensorType((5,), "bfloat16"))
    values = np.array([0.0, -0.0, np.nan, -np.inf, 1e-40], np.float32).astype(jnp.bfloat16)
    c = b.add("constant", (), TensorType((5,), "bfloat16"), value=ConstValue(values))
    lit = b.add("literal", (), TensorType((), "bfloat16"), value=-0.0)
    s = b.add("add", (i, c), TensorType((5,), "bfloat16"))
    program = b.build([b.add("transpose", (s,), TensorType((5,), "bfloat16"), perm=(0,)), lit])
    back = disk_cache.program_from_json(json.loads(json.dumps(disk_cache.program_to_json(program))))
    # (ConstValue compares with np.array_equal, so a NaN constant is equal only to itself: compare bytes)
    assert disk_cache.program_to_json(back) == disk_cache.program_to_json(program)
    assert back.nodes[c].params["value"].array.dtype == values.dtype
    assert [n.op for n in back.nodes] == [n.op for n in program.nodes]
    assert np.signbit(back.nodes[lit].params["value"])
    assert disk_cache.program_digest(back) == disk_cache.program_digest(program)
    changed = np.array(values)
    changed[1] = 0.0  # -0.0 -> +0.0: a different constant, a different digest
    b2 = ProgramBuilder()
    b2.input(TensorType((5,), "bfloat16"))
    b2.add("constant", (), TensorType((5,), "bfloat16"), value=ConstValue(changed))
    b1 = ProgramBuilder()
    b1.input(TensorType((5,), "bfloat16"))
    b1.add("constant", (), TensorType((5,), "bfloat16"), value=ConstValue(values))
    assert disk_cache.program_digest(b1.build([1])) != disk_cache.program_digest(b2.build([1]))


def test_where_the_cache_lives(tmp_path, monkeypatch, optimizer_runs):
    x = extreme((4, 6), seed=7)
    assert disk_cache.resolve_cache_dir() is None  # off by default
    monkeypatch.setenv(disk_cache.ENV_VAR, str(tmp_path / "env"))
    assert disk_cache.resolve_cache_dir() == tmp_path / "env"
    ea.set_cache_dir(tmp_path / "set")
    assert disk_cache.resolve_cache_dir() == tmp_path / "set"
    f = ea.optimize(lambda x: jnp.tanh(x.T).T, **OPTS)
    f(x)
    assert len(entries(tmp_path / "set")) == 1 and not (tmp_path / "env").exists()
    ea.optimize(lambda x: jnp.tanh(x.T).T, cache_dir=False, **OPTS)(x)  # off for this function
    assert len(optimizer_runs) == 2
    ea.set_cache_dir(None)  # off, whatever the environment says
    assert disk_cache.resolve_cache_dir() is None
    with pytest.raises(TypeError, match="cache_dir must be a directory path"):
        ea.optimize(cache_dir=3)
    with pytest.raises(TypeError, match="cache_dir must be a directory path"):
        ea.set_cache_dir(["x"])


def test_unwritable_cache_warns_and_keeps_values(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    x = extreme((4, 6), seed=8)
    f = lambda x: jnp.tanh(x.T).T  # noqa: E731
    with pytest.warns(RuntimeWarning, match="could not write the disk cache"):
        got = ea.optimize(f, cache_dir=blocker / "cache", **OPTS)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(f(x)), rtol=1e-6)


SETUP = textwrap.dedent("""
    import jax.numpy as jnp, numpy as np
    import eqsat_attn as ea
    def f(x):
        return jnp.tanh(jnp.transpose(x, (1, 0))).T * 2.0
    x = jnp.asarray(np.linspace(-3e38, 3e38, 12, dtype=np.float32).reshape(3, 4))
    g = ea.optimize(f, rules=["transpose"], limits=ea.Limits(iterations=3, nodes=20000, seconds=600.0),
                    cost_model="roofline-cpu", backend="reference")  # the same key on any machine
""")
SCRIPT = SETUP + textwrap.dedent("""
    report = g.explain(x)
    print("FROM_DISK" if "disk_cache" in report.timings else "OPTIMIZED", np.asarray(g(x)).tobytes().hex())
""")


def test_second_process_hits_the_cache(tmp_path):
    """This process optimizes and writes the entry; a new process loads it without optimizing."""
    ea.set_cache_dir(tmp_path)
    here: dict = {}
    exec(SETUP, here)  # noqa: S102 - the same function source as the child's
    want = np.asarray(here["g"](here["x"])).tobytes().hex()
    assert "optimize" in here["g"].explain(here["x"]).timings and len(entries(tmp_path)) == 1
    env = {**os.environ, disk_cache.ENV_VAR: str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FROM_DISK", want]
    assert len(entries(tmp_path)) == 1


def embed_then_attend(table, ids, w):
    """An embedding lookup (a gather: an opaque call) feeding plain layers."""
    x = table[ids]
    return jnp.tanh(x @ w).T.T


def test_programs_with_plain_opaque_calls_are_stored(tmp_path, optimizer_runs):
    """A gather (an embedding) is keyed by its primitive and parameters and stored by position:
    a second decorator loads the program, makes the same call and computes the same values."""
    table, w = extreme((10, 6), seed=3), extreme((6, 4), seed=4)
    ids = jnp.asarray([3, 0, 9, 3], jnp.int32)
    first = ea.optimize(embed_then_attend, cache_dir=tmp_path, **OPTS)
    want = np.asarray(first(table, ids, w))
    assert len(entries(tmp_path)) == 1 and len(optimizer_runs) == 1
    second = ea.optimize(embed_then_attend, cache_dir=tmp_path, **OPTS)
    report = second.explain(table, ids, w)
    assert "disk_cache" in report.timings and len(optimizer_runs) == 1
    assert [n.params["call"].name for n in report.after.nodes if n.op == "opaque"] == ["gather"]
    np.testing.assert_array_equal(np.asarray(second(table, ids, w)), want)
    np.testing.assert_array_equal(want, np.asarray(embed_then_attend(table, ids, w)))


def test_an_opaque_call_is_in_the_key():
    """Two gathers that differ only in a parameter (the clip mode) have different keys."""
    table, ids = extreme((10, 6), seed=3), jnp.asarray([3, 0, 12], jnp.int32)
    clip = ea.capture(lambda t, i: jnp.take(t, i, axis=0, mode="clip"), table, ids).program
    fill = ea.capture(lambda t, i: jnp.take(t, i, axis=0, mode="fill"), table, ids).program
    options = OptimizeOptions(**OPTS)
    keys = {disk_cache.entry_key(clip, options), disk_cache.entry_key(fill, options)}
    assert None not in keys and len(keys) == 2
