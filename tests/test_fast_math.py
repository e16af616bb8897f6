"""``precision="fast_math"`` (rules/attention.py, `attention_fast_math`): the softmax spellings
"exact" leaves are raised, with the program's values wherever it meets no Inf or NaN, and the
op's stable values where it overflows (the documented difference, README "Precision policy")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from attention_corpus import BY_NAME, FAST_MATH_RAISED, LIMITS, _extreme, excess_error, qkv
from eqsat_attn.attention_misses import softmax_misses
from eqsat_attn.cost import for_device


def optimized(fn, precision: str):
    return ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS, precision=precision)


def raised(fn, args, precision: str) -> int:
    return len(optimized(fn, precision).explain(*args).attention)


@pytest.mark.parametrize("name", sorted(FAST_MATH_RAISED))
def test_raised_with_the_programs_values(name: str):
    """Each positive "exact" leaves (tests/attention_corpus.py, `KNOWN_UNRAISED`) is raised, no
    softmax left, with the program's values on ±0, denormals and ±40 in Q, K and V (scores within
    exp's range)."""
    case = BY_NAME[name]
    rng = np.random.default_rng(7)
    q, k, v, *extra = case.args()
    args = (*(_extreme(t, rng) for t in (q, k, v)), *extra)
    fast = optimized(case.fn, "fast_math")
    report = fast.explain(*args)
    assert report.attention and not softmax_misses(report.after) and not report.not_attention, str(report.after)
    assert excess_error(fast(*args), case.fn(*args), 2e-5) <= 0


def test_softmax_without_max_where_exp_overflows():
    """Scores past 88 overflow the program's exp (inf / inf: NaN rows); "exact" keeps those NaNs,
    fast_math gives the op's stable softmax there, and the program's values in every other row."""
    fn = BY_NAME["softmax_no_max_subtraction"].fn
    q, k, v = qkv()(np.random.default_rng(3))
    q = q.at[0, 0, 2].multiply(400.0)  # one query row whose scores reach far past 88
    want = fn(q, k, v)
    overflowed = np.isnan(np.asarray(want)).any(-1)
    assert overflowed[0, 0, 2] and overflowed.sum() == 1

    exact = optimized(fn, "exact")
    assert len(exact.explain(q, k, v).attention) == 0
    np.testing.assert_array_equal(np.isnan(exact(q, k, v)), np.isnan(want))

    got = np.asarray(optimized(fn, "fast_math")(q, k, v))
    stable = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, axis=-1)
    np.testing.assert_allclose(got[0, 0, 2], np.asarray(jnp.einsum("bhqk,bhkd->bhqd", stable, v))[0, 0, 2],
                               rtol=2e-5, atol=2e-5)
    assert excess_error(got[~overflowed], np.asarray(want)[~overflowed], 2e-5) <= 0


def test_gpt2_mask_where_a_hidden_score_is_infinite():
    """GPT-2's ``w * b - 1e10 * (1 - b)`` is NaN wherever b hides an infinite score (inf * 0);
    "exact" keeps that NaN, fast_math masks the score as a where would."""
    fn = BY_NAME["mask_gpt2_w_times_b_minus_1e10"].fn
    q, k, v = qkv()(np.random.default_rng(5))
    k = k.at[0, 0, 6, 0].set(jnp.inf)  # key 6: hidden from queries 0-5, seen (inf score) by 6 and 7
    want = np.asarray(fn(q, k, v))
    assert np.isnan(want[0, 0, :6]).all()
    np.testing.assert_array_equal(np.isnan(optimized(fn, "exact")(q, k, v)), np.isnan(want))
    got = np.asarray(optimized(fn, "fast_math")(q, k, v))
    assert np.isfinite(got[0, 0, :6]).all()
    assert excess_error(got[1:], want[1:], 2e-5) <= 0


def test_fast_math_is_an_option_and_checked():
    fn = BY_NAME["softmax_no_max_subtraction"].fn
    args = BY_NAME["softmax_no_max_subtraction"].args()
    assert raised(fn, args, "exact") == 0 and raised(fn, args, "fast_math") == 1
    with pytest.raises(ValueError, match="fast_math"):
        ea.optimize(fn, precision="fast")


def test_additive_causal_mask_becomes_the_causal_flag():
    """``s + where(causal, 0, -inf)`` stays a bias under "exact" (NaN where a hidden score is +inf);
    fast_math makes it the causal flag (tiles a kernel can skip), with the program's values on
    extreme entries and the where's -inf where a hidden score is +inf."""
    case = BY_NAME["mask_causal_as_additive_bias"]
    q, k, v = (_extreme(t, np.random.default_rng(11)) for t in case.args())
    exact, fast = (optimized(case.fn, p).explain(q, k, v).attention for p in ("exact", "fast_math"))
    assert [(a.causal, a.mask_kind) for a in exact] == [(False, "bias")]
    assert [(a.causal, a.mask_kind, a.mask_fill) for a in fast] == [(True, "none", -np.inf)]
    assert excess_error(optimized(case.fn, "fast_math")(q, k, v), case.fn(q, k, v), 2e-5) <= 0

    k = k.at[0, 0, 7, :].set(jnp.inf)  # key 7 (hidden from queries 0-6) scores +inf against positive q
    q = q.at[0, 0, :, :].set(1.0)
    assert np.isnan(np.asarray(case.fn(q, k, v))[0, 0, :7]).all()
    assert np.isfinite(np.asarray(optimized(case.fn, "fast_math")(q, k, v))[0, 0, :7]).all()


def test_a_users_own_nan_guard_is_kept():
    """fast_math's rules only read float edge cases inside the softmax spellings they raise: a
    program's own ``where(isfinite(x), x, 0)`` still zeroes an infinity."""

    def sanitize(x):
        row_max = x.max(-1, keepdims=True)
        return jnp.where(jnp.isfinite(x), x, 0.0) + jnp.where(jnp.isfinite(row_max), row_max, 0.0)

    x = jnp.array([[1.0, jnp.inf, -2.0], [jnp.nan, 0.5, -jnp.inf]], jnp.float32)
    np.testing.assert_array_equal(optimized(sanitize, "fast_math")(x), sanitize(x))


def _half_attention(q, k, v, bias):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, -1), v)


def test_float16_scores_are_raised_only_under_fast_math():
    """float16 scores past 65504 are ±inf in the program (a NaN row) and finite in the op's
    float32 scores, and so is a float16 ``finfo.min`` padding bias added to them: "exact" leaves
    such attention alone, with its values, and says why; fast_math raises it. A float32 product
    of float16 operands (preferred_element_type) is raised under "exact"."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 8, 8)), jnp.float16) for _ in range(3))
    q, k = q.at[0, 0, 3].set(300.0), k.at[0, 0, 2].set(300.0)  # one score 720000 > 65504
    keep = jnp.asarray(np.arange(8)[None, :] < np.array([8, 0])[:, None])  # batch 1: every key padded
    bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float16).min).astype(jnp.float16)[:, None, None, :]
    args = (q, k, v, bias)
    want = np.asarray(_half_attention(*args), np.float32)
    assert np.isnan(want).any()
    exact = optimized(_half_attention, "exact")
    report = exact.explain(*args)
    assert not report.attention and any("float16" in r for r in report.not_attention), report.not_attention
    np.testing.assert_array_equal(np.asarray(exact(*args), np.float32), want)
    assert raised(_half_attention, args, "fast_math") == 1
    within = (q.at[0, 0, 3].set(1.0), k.at[0, 0, 2].set(1.0), v, jnp.zeros_like(bias))  # no float16 overflow
    assert excess_error(optimized(_half_attention, "fast_math")(*within), _half_attention(*within), 2e-3) <= 0

    def widened(q, k, v):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(jnp.float16), v)

    assert raised(widened, (q, k, v), "exact") == 1
    assert excess_error(optimized(widened, "exact")(q, k, v), widened(q, k, v), 2e-3) <= 0


def test_float64_attention_is_left_in_float64():
    """The op computes in float32: float64 attention is not raised, under either precision."""
    previous = jax.config.jax_enable_x64  # jax 0.11 has no jax.enable_x64 context
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(4)
        q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 8, 8)), jnp.float64) for _ in range(3))
        bias = jnp.zeros((1, 1, 1, 8), jnp.float64)
        for precision in ("exact", "fast_math"):
            fn = optimized(_half_attention, precision)
            assert not fn.explain(q, k, v, bias).attention
            np.testing.assert_array_equal(np.asarray(fn(q, k, v, bias)), np.asarray(_half_attention(q, k, v, bias)))
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_a_learned_scales_gradient_keeps_the_programs_grouping_under_exact():
    """CLIP's learned scale t: jax.grad writes t's gradient as sum(g ⊙ x), x = Q·Kᵀ; read from the
    op's dQ it is sum(Q ⊙ dQ'), dQ' = g·K, the same products summed the other way round. Where x
    cancels to 0 (q = (1, 1, 0..), k_j = (1e30, -1e30, ..)) and g is large, g·K overflows: the
    program's gradient is finite, "exact" keeps it, fast_math's is not finite."""
    case = BY_NAME["scale_runtime_scalar_wrt_scale_grad"]
    q, k, v, scale, cot = case.args()
    q = q.at[0, 0].set(0.0).at[0, 0, 0, :2].set(1.0)
    k = k.at[0, 0, :, 0].set(1e30).at[0, 0, :, 1].set(-1e30)
    v = v.at[0, 0].multiply(1e12)
    args = (q, k, v, scale, cot)
    want = case.fn(*args)
    assert np.isfinite(np.asarray(want[3]))
    exact = optimized(case.fn, "exact")
    np.testing.assert_allclose(np.asarray(exact(*args)[3]), np.asarray(want[3]), rtol=2e-5)
    assert not np.isfinite(np.asarray(optimized(case.fn, "fast_math")(*args)[3]))
