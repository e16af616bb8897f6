"""Static masks by evaluation (eqsat_attn/static_values.py): the values of input-free nodes, the
mask facts encode asserts from them (`causal_mask`, `rows_kept`), the rules that carry `rows_kept`
through broadcasts, and what the report says of a `jax.nn.softmax(where=mask)` left unraised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from egglog import EGraph

import eqsat_attn as ea
from eqsat_attn.attention_misses import softmax_misses
from eqsat_attn.capture import capture
from eqsat_attn.egraph import encode, resolve, run_rulesets
from eqsat_attn.egraph.language import causal_mask, rows_kept
from eqsat_attn.pipeline import Limits
from eqsat_attn.static_values import StaticValues, is_causal_value, keeps_every_row
from work_limits import SAFETY_NET_S

S = 8
LIMITS = Limits(iterations=8, nodes=50_000, seconds=SAFETY_NET_S)


def _iotas():
    return jnp.arange(S)[:, None], jnp.arange(S)[None, :]


def _window(width: int = 3):
    i, j = _iotas()
    return (j <= i) & (i - j < width)


def _program_of(mask_fn, *args):
    """A program returning ``where(mask, x, 0)`` for x of shape [2, S, S] (the mask broadcast over x)."""
    x = jnp.zeros((2, S, S), jnp.float32)
    return capture(lambda x, *a: jnp.where(mask_fn(*a), x, 0.0), x, *args).program


def _mask_nodes(program, dtype="bool"):
    return [i for i in program.live_nodes() if program.nodes[i].type is not None
            and program.nodes[i].type.dtype == dtype and program.nodes[i].type.rank >= 2]


def _facts(program, static_elements=None):
    """(e-graph, {node id: (causal_mask?, rows_kept?)}) for the program's boolean nodes of rank >= 2, after encoding."""
    egraph = EGraph()
    enc = encode(program, egraph) if static_elements is None else encode(program, egraph, static_elements)
    return egraph, enc, _read(egraph, enc, program)


def _holds(egraph, fact) -> bool:
    try:
        egraph.check(fact)
    except Exception:  # noqa: BLE001 - egglog raises on a fact that does not hold
        return False
    return True


def _read(egraph, enc, program):
    return {i: (_holds(egraph, causal_mask(enc.terms[i])), _holds(egraph, rows_kept(enc.terms[i])))
            for i in _mask_nodes(program)}


def test_static_values_follow_lax_on_index_arithmetic():
    """Floor and truncating division, remainders of negatives, abs: a mask's value is jax's."""
    def mask():
        i, j = _iotas()
        return ((i - j) // 3 == jax.lax.rem(i - 5, 3)) | (jnp.abs(i - j) < 2) | (jax.lax.div(i - 6, 4) == j - 1)

    program = capture(lambda x: jnp.where(mask(), x, 0.0), jnp.zeros((S, S), jnp.float32)).program
    ors = [i for i in _mask_nodes(program) if program.nodes[i].op == "or"]
    np.testing.assert_array_equal(StaticValues(program).value(max(ors)), np.asarray(mask()))


def test_values_of_input_dependent_or_oversized_nodes_are_unknown():
    program = _program_of(lambda keep: keep[:, None, :] & _window(), jnp.ones((2, S), bool))
    values = StaticValues(program)
    padded = [i for i in _mask_nodes(program) if program.nodes[i].op == "and" and program.nodes[i].type.rank == 3]
    assert padded and values.value(padded[0]) is None
    window = [i for i in _mask_nodes(program) if program.nodes[i].op == "and" and program.nodes[i].type.rank == 2]
    assert window and values.value(window[0]) is not None
    assert StaticValues(program, max_elements=S * S - 1).value(window[0]) is None


def test_mask_predicates():
    i, j = np.arange(4)[:, None], np.arange(4)[None, :]
    assert is_causal_value(j <= i) and is_causal_value((j <= i).astype(np.float32)) and not is_causal_value(j < i)
    assert keeps_every_row(j <= i) and not keeps_every_row(j < i) and not keeps_every_row((j <= i).astype(np.int32))


def test_a_window_keeps_every_row_and_is_not_causal():
    program = _program_of(_window)
    _, _, facts = _facts(program)
    window = [i for i in facts if program.nodes[i].op in ("and", "broadcast_in_dim")]
    assert window and all(facts[i] == (False, True) for i in window), facts


def test_causal_spelled_j_lt_i_plus_1_gets_the_causal_flag_fact():
    def lt_plus1():
        i, j = _iotas()
        return j < i + 1

    _, _, facts = _facts(_program_of(lt_plus1))
    assert (True, True) in facts.values()


def test_a_mask_with_an_empty_row_or_from_an_input_has_no_fact():
    def strict():
        i, j = _iotas()
        return j < i  # row 0 keeps no key

    _, _, facts = _facts(_program_of(strict))
    assert facts and all(f == (False, False) for f in facts.values())
    padded = _program_of(lambda keep: jnp.broadcast_to(keep[:, None, :], (2, S, S)), jnp.ones((2, S), bool))
    _, _, facts = _facts(padded)
    assert facts and all(f == (False, False) for f in facts.values())


def test_rows_kept_is_carried_through_a_broadcast_past_the_size_cap():
    """Evaluated up to S*S elements, the [2, S, S] broadcast is not: the rules give it the fact."""
    program = _program_of(_window)
    egraph, enc, before = _facts(program, static_elements=S * S)
    wide = [i for i in before if program.nodes[i].type.shape == (2, S, S)]
    assert wide and not any(before[i][1] for i in wide)
    run = run_rulesets(egraph, resolve(["attention_raise"]), LIMITS)
    assert run.saturated
    after = _read(egraph, enc, program)
    assert all(after[i][1] for i in wide)


def _attention_nodes(program):
    return [program.nodes[i] for i in program.live_nodes() if program.nodes[i].op == "attention"]


def test_static_j_lt_i_plus_1_raises_attention_with_the_causal_flag():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, S, 4)), jnp.float32) for _ in range(3))

    def fn(q, k, v):
        i, j = _iotas()
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(j < i + 1, s, -jnp.inf), -1), v)

    report = ea.optimize(fn).explain(q, k, v)
    (node,) = _attention_nodes(report.after)
    assert node["causal"] and node["mask_kind"] == "none", str(report.after)


def test_the_report_names_an_unraised_where_softmax_and_a_per_head_scale():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, S, 4)), jnp.float32) for _ in range(3))
    keep = jnp.asarray(np.arange(S)[None, :] < np.array([0, S])[:, None])  # batch 0: every key padded

    def padded(q, k, v, keep):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1, where=keep[:, None, None, :]), v)

    (line,) = ea.optimize(padded).explain(q, k, v, keep).not_attention
    assert "where=mask" in line and "may hide a whole row" in line, line

    def per_head(q, k, v, scale):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)

    # read off the written-out program (the optimized one raises it: `scores_per_head_scale`)
    (miss,) = softmax_misses(capture(per_head, q, k, v, jnp.ones((2, 1, 1), jnp.float32)).program)
    assert "per-head scale" in miss.reason and "multiplied by a mask" not in miss.reason, miss

    def gpt2(q, k, v):  # w·b - 1e10·(1 - b) with b a 0/1 lower triangle
        b = jnp.tril(jnp.ones((S, S), jnp.float32))
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s * b - 1e10 * (1 - b), -1), v)

    (miss,) = softmax_misses(capture(gpt2, q, k, v).program)
    assert "multiplied by a mask" in miss.reason, miss


def test_a_where_softmax_window_is_raised_and_reported_as_a_window():
    """jax.nn.softmax(s, where=window) · V becomes one attention, its mask read as a window."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, S, 4)), jnp.float32) for _ in range(3))

    def fn(q, k, v):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1, where=_window(3)), v)

    report = ea.optimize(fn).explain(q, k, v)
    assert [a.mask_pattern for a in report.attention] == ["sliding window 3"], str(report.after)
    assert not report.not_attention


def test_a_bfloat16_additive_mask_is_evaluated():
    """Casts and selects in bfloat16 are evaluated (arithmetic in it is not: numpy rounds it otherwise)."""
    def fn(x):
        i, j = _iotas()
        bias = jnp.where(j <= i, 0.0, -1e9).astype(jnp.bfloat16)
        return x + bias

    program = capture(fn, jnp.zeros((S, S), jnp.bfloat16)).program
    (cast,) = [i for i in program.live_nodes() if program.nodes[i].op == "convert_element_type"
               and program.nodes[i].type.dtype == "bfloat16" and program.nodes[i].type.rank == 2]
    value = StaticValues(program).value(cast)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    np.testing.assert_array_equal(value.astype(np.float32), np.where(j <= i, 0.0, np.float32(jnp.bfloat16(-1e9))))


def test_a_one_by_one_true_mask_spread_over_the_scores_is_not_causal():
    """tril of a [1, 1] mask is [[True]]: broadcast to [S, S] it keeps everything, so neither the
    evaluated broadcast nor the rules may call it causal."""
    program = _program_of(lambda: jnp.broadcast_to(jnp.arange(1)[:, None] >= jnp.arange(1)[None, :], (2, S, S)))
    egraph, enc, before = _facts(program, static_elements=2)
    wide = [i for i in before if program.nodes[i].type.shape == (2, S, S)]
    run_rulesets(egraph, resolve(["attention_raise"]), LIMITS)
    after = _read(egraph, enc, program)
    assert wide and all(after[i] == (False, True) for i in wide), after


def test_a_constant_padding_mask_is_named_key_padding():
    """A key-padding mask closed over as a constant (Haiku's mask [B, 1, 1, Sk], spread to the
    scores) is evaluated and named key padding; one that also varies along the queries is not."""

    def padded(keep):
        def fn(q, k, v):
            s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, -1e30)
            return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)
        return fn

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 8, 4)), jnp.float32) for _ in range(3))
    keys = jnp.asarray(np.arange(8)[None, :] < np.array([8, 5])[:, None])
    kinds = {}
    for name, keep in (("keys", keys[:, None, None, :]), ("rows", keys[:, None, :, None] & keys[:, None, None, :])):
        optimized = ea.optimize(padded(keep))
        report = optimized.explain(q, k, v)
        kinds[name] = [a.mask_pattern for a in report.attention]
        np.testing.assert_allclose(optimized(q, k, v), padded(keep)(q, k, v), rtol=2e-5, atol=2e-6)
    assert kinds == {"keys": ["key padding"], "rows": ["arbitrary"]}, kinds
