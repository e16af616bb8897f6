"""jax.grad of written-out attention: the backward becomes `attention_vjp` (dq, dk, dv of one
attention, run as one call) with the original gradients' values, over random inputs that include
±0, denormals, large magnitudes, infinities and NaN."""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqsat_attn as ea
from eqsat_attn.capture import capture
from eqsat_attn.cost import for_device
from eqsat_attn.egraph.rulesets import DEFAULT_RULESETS
from eqsat_attn.pipeline import VALUE_GRADIENT_RULES, gradient_rules

from attention_corpus import LIMITS, excess_error, tolerance

VALUE_GRADIENT = [*DEFAULT_RULESETS, VALUE_GRADIENT_RULES]  # V's gradient alone: opt in (pipeline.gradient_rules)

lower_module = importlib.import_module("eqsat_attn.lower")  # the package exports a function `lower`
F32, BF16 = jnp.float32, jnp.bfloat16
B, H, S, D = 2, 2, 8, 16


def _inputs(seed: int, shapes, dtype=F32, specials: tuple[float, ...] = ()) -> tuple:
    """Normal arrays with ±0, denormals and ±40 planted (and ``specials``, e.g. inf or NaN)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        flat = rng.standard_normal(int(np.prod(shape))).astype(np.float32)
        planted = [0.0, -0.0, 1e-40, -1e-40, 40.0, -40.0, *specials]
        flat[rng.permutation(flat.size)[:len(planted)]] = planted
        out.append(jnp.asarray(flat.reshape(shape)).astype(dtype))
    return tuple(out)


def _softmax(s):
    return jax.nn.softmax(s, axis=-1)


def scaled(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25), v)


def one_head(q, k, v):
    return _softmax(q @ k.T / 4.0) @ v


def heads_in_batch(q, k, v):
    return _softmax(jnp.einsum("nqd,nkd->nqk", q, k) * 0.25) @ v


def causal_where(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    keep = jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.where(keep, s, jnp.finfo(F32).min)), v)


def biased(q, k, v, bias):
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias), v)


def key_padding(q, k, v, keep):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.where(keep[:, None, None, :], s, -1e9)), v)


def bf16_f32_softmax(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.25, BF16)
    p = _softmax(s.astype(F32)).astype(BF16)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


def bf16_softmax_causal(q, k, v):
    """Scores, softmax and P·V all in bfloat16 (jax.nn.softmax sums in float32 inside)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.25, BF16)
    keep = jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.where(keep, s, jnp.asarray(-jnp.inf, BF16))), v)


def soft_capped(q, k, v):
    """Gemma's logit soft-cap: tanh's derivative in the backward (jax 0.12's one_minus_square)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(50.0 * jnp.tanh(s / 50.0)), v)


@jax.custom_jvp
def _tanh_earlier_jax(x):
    return jnp.tanh(x)


@_tanh_earlier_jax.defjvp
def _tanh_earlier_jax_jvp(primals, tangents):
    """tanh's derivative as jax before ``one_minus_square`` writes it: ``(g + g * t) * (1 - t)``."""
    (x,), (g,) = primals, tangents
    t = jnp.tanh(x)
    return t, lax.mul(lax.add(g, lax.mul(g, t)), lax.sub(jnp.ones_like(x), t))


def soft_capped_earlier_jax(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(50.0 * _tanh_earlier_jax(s / 50.0)), v)


def _earlier_jax_softmax(axis: int, summed: tuple[int, ...] | None = None):
    """jax.nn.softmax over ``axis`` with its backward as jax.grad wrote it before jax 0.12 (no custom
    JVP; the quotient's transpose squares the kept row sum): ``(g / T + sum(-(g * T^-2 * E))) * E``,
    the kept row sum summed over ``summed`` (default: ``axis``; with unit batch and head axes too
    where unbatched inputs broadcast the quotient over them)."""
    def forward(s):
        e = jnp.exp(s - lax.stop_gradient(s.max(axis, keepdims=True)))
        t = e.sum(axis, keepdims=True)
        return e / t, (e, t)

    def backward(res, g):
        e, t = res
        spread = lambda x: lax.broadcast_in_dim(x, g.shape, tuple(range(g.ndim)))  # noqa: E731
        kept = jnp.sum(g * spread(lax.integer_pow(t, -2)) * e, axis=axis).reshape(t.shape)
        axes = summed or (axis % g.ndim,)
        row = jnp.sum(-kept, axis=axes)
        others = tuple(i for i in range(g.ndim) if i not in axes)
        return ((g / spread(t) + lax.broadcast_in_dim(row, g.shape, others)) * e,)

    softmax = jax.custom_vjp(lambda s: forward(s)[0])
    softmax.defvjp(forward, backward)
    return softmax


_softmax_earlier_jax = _earlier_jax_softmax(-1)
_softmax_earlier_jax_units = _earlier_jax_softmax(-1, summed=(0, 1, 3))  # one sequence, one head
_softmax_earlier_jax_keys_first = _earlier_jax_softmax(-2)  # scores as K·Qᵀ


def keys_first_earlier_jax(q, k, v):
    """`keys_first_scores` through the earlier spelling: the kept row sum summed over axis -2."""
    p = _softmax_earlier_jax_keys_first(jnp.einsum("bhkd,bhqd->bhkq", k, q) * 0.25)
    return jnp.einsum("bhkq,bhkd->bhqd", p, v)


def softmax_earlier_jax_one_sequence(q, k, v):
    """One sequence, one head ([1, 1, S, D]): the earlier spelling's row sum over two unit axes."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax_earlier_jax_units(s), v)


def bf16_pet_output_cast_earlier_jax(q, k, v):
    """`bf16_pet_output_cast` through the earlier spelling: its dP rounded to bf16 and widened."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * 0.25
    p = _softmax_earlier_jax(s).astype(BF16)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, preferred_element_type=F32).astype(BF16)


def softmax_earlier_jax(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax_earlier_jax(s), v)


def traced_scale(q, k, v, scale):
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale), v)


def exp_log_softmax(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.exp(jax.nn.log_softmax(s, axis=-1)), v)


def reciprocal_unstopped_max(q, k, v):
    """E * (1 / sum(E)) with the max not under stop_gradient: its backward adds the max's cotangent."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("bhqk,bhkd->bhqd", e * jnp.reciprocal(e.sum(-1, keepdims=True)), v)


def keys_first_scores(q, k, v):
    """Scores as K·Qᵀ [B, H, Sk, Sq], softmax over axis -2."""
    p = jax.nn.softmax(jnp.einsum("bhkd,bhqd->bhkq", k, q) * 0.25, axis=-2)
    return jnp.einsum("bhkq,bhkd->bhqd", p, v)


def haliax_kv_first(q, k, v):
    """Haliax-style scores [B, KPos, H, QPos] of [B, S, H, D] operands, softmax over axis 1."""
    w = jnp.einsum("bqhd,bkhd->bkhq", q, k) * 0.25
    return jnp.einsum("bkhq,bkhd->bqhd", jax.nn.softmax(w, axis=1), v)


def decode_squeezed(q, k, v, keep):
    """A decode step: q [B, H, D] without a query axis against [B, H, S, D] caches, a length mask."""
    s = jnp.einsum("bhd,bhkd->bhk", q, k) * 0.25
    return jnp.einsum("bhk,bhkd->bhd", _softmax(jnp.where(keep[:, None, :], s, -jnp.inf)), v)


def bloom_folded(q, k, v):
    """HF BLOOM: [B*H, S, D] operands, ALiBi, scores reshaped to [B, H, S, S] for the causal mask."""
    alibi = jnp.tile(jnp.asarray([0.5, 0.25], F32)[:, None] * jnp.arange(S, dtype=F32)[None, :], (B, 1))[:, None, :]
    scores = (alibi + jnp.matmul(q, jnp.swapaxes(k, 1, 2)) * 0.25).reshape(B, H, S, S)
    keep = jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]
    p = _softmax(jnp.where(keep, scores, jnp.finfo(F32).min)).reshape(B * H, S, S)
    return jnp.matmul(p, v)


def bf16_pet_output_cast(q, k, v):
    """bf16 operands, f32 accumulation (preferred_element_type), the output cast back to bf16."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * 0.25
    p = _softmax(s).astype(BF16)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, preferred_element_type=F32).astype(BF16)


BHSD = ((B, H, S, D),) * 3
KEEP = jnp.asarray(np.arange(S)[None, :] < np.array([5, S])[:, None])
CASES = {
    "scaled": (scaled, BHSD, (), F32),
    "one_head": (one_head, ((S, D),) * 3, (), F32),
    "heads_in_batch": (heads_in_batch, ((B * H, S, D),) * 3, (), F32),
    "causal_where": (causal_where, BHSD, (), F32),
    "biased": (biased, BHSD, ((1, H, S, S),), F32),
    "key_padding": (key_padding, BHSD, ("keep",), F32),
    "bf16_f32_softmax": (bf16_f32_softmax, BHSD, (), BF16),
    "bf16_softmax_causal": (bf16_softmax_causal, BHSD, (), BF16),
    "soft_capped": (soft_capped, BHSD, (), F32),
    "soft_capped_earlier_jax": (soft_capped_earlier_jax, BHSD, (), F32),
    "softmax_earlier_jax": (softmax_earlier_jax, BHSD, (), F32),
    "softmax_earlier_jax_one_sequence": (softmax_earlier_jax_one_sequence, ((1, 1, S, D),) * 3, (), F32),
    "bf16_pet_output_cast_earlier_jax": (bf16_pet_output_cast_earlier_jax, BHSD, (), BF16),
    "keys_first_earlier_jax": (keys_first_earlier_jax, BHSD, (), F32),
    "traced_scale": (traced_scale, BHSD, ("scale",), F32),
    "exp_log_softmax": (exp_log_softmax, BHSD, (), F32),
    "reciprocal_unstopped_max": (reciprocal_unstopped_max, BHSD, (), F32),
    "keys_first_scores": (keys_first_scores, BHSD, (), F32),
    "haliax_kv_first": (haliax_kv_first, ((B, S, H, D),) * 3, (), F32),
    "decode_squeezed": (decode_squeezed, ((B, H, D), (B, H, S, D), (B, H, S, D)), ("keep",), F32),
    "bloom_folded": (bloom_folded, ((B * H, S, D),) * 3, (), F32),
    "bf16_pet_output_cast": (bf16_pet_output_cast, BHSD, (), BF16),
}
SPELLED_BACKWARDS = ("soft_capped", "soft_capped_earlier_jax", "traced_scale", "exp_log_softmax", "reciprocal_unstopped_max")
LAYOUTS = ("keys_first_scores", "haliax_kv_first", "decode_squeezed", "bloom_folded")
"""Layouts of scores whose backward is raised (issue 19): softmax over a non-last axis, a query
without a sequence axis, heads folded into the batch and reshaped for the mask."""


def _grad_fn(fn):
    """jax.grad of sum(fn(q, k, v, *extra) * cotangent) with respect to q, k and v."""
    def loss(q, k, v, *rest):
        *extra, cot = rest
        return jnp.sum(fn(q, k, v, *extra).astype(F32) * cot)

    return jax.grad(loss, argnums=(0, 1, 2))


def _args(name: str, seed: int, specials: tuple[float, ...] = ()) -> tuple:
    fn, shapes, extra, dtype = CASES[name]
    q, k, v = _inputs(seed, shapes, dtype, specials)
    special_extras = {"keep": KEEP, "scale": jnp.float32(np.random.default_rng(seed).uniform(0.1, 0.5))}
    more = tuple(special_extras[e] if isinstance(e, str) else _inputs(seed + 1, (e,))[0] for e in extra)
    out = jax.eval_shape(fn, q, k, v, *more)
    (cot,) = _inputs(seed + 2, (out.shape,))
    return (q, k, v, *more, cot)


def _optimized(name: str):
    return ea.optimize(_grad_fn(CASES[name][0]), cost_model=for_device("h100"), limits=LIMITS)


def _assert_values(fn, args, got, want):
    """Equal values in float32. In half precision the written-out backward rounds P, dP and the
    scores' cotangent to bf16 where the fused backward keeps float32, so there the check is that
    the optimized gradients are no further from the float32 computation than the original's, with
    the same non-finite positions."""
    if all(jnp.dtype(a.dtype) == F32 for a in args):
        assert excess_error(got, want, tolerance(args, want)) <= 0
        return
    truth = fn(*[a.astype(F32) for a in args])
    for g, w, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(truth), strict=True):
        g, w, t = (np.asarray(x, np.float64) for x in (g, w, t))
        assert np.array_equal(np.isfinite(g), np.isfinite(w))
        finite = np.isfinite(t)
        scale = 1.0 + np.abs(t[finite])
        assert np.max(np.abs(g - t)[finite] / scale) <= np.max(np.abs(w - t)[finite] / scale) + 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_raised_with_equal_values(name):
    fn = _grad_fn(CASES[name][0])
    optimized = _optimized(name)
    args = _args(name, seed=len(name))
    report = optimized.explain(*args)
    assert sorted(info.gradient for info in report.attention) == ["dk", "dq", "dv"], str(report.after)
    assert "softmax" not in {n.op for n in report.after.nodes}, "the backward still reads P"
    _assert_values(fn, args, optimized(*args), fn(*args))


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_gradients_keep_nonfinite_positions(special):
    """An infinite or NaN entry in Q, K or V makes the same gradient entries NaN or infinite as
    the written-out backward does."""
    fn = _grad_fn(scaled)
    optimized = _optimized("scaled")
    args = _args("scaled", seed=7, specials=(special,))
    got, want = optimized(*args), fn(*args)
    assert any(not np.all(np.isfinite(np.asarray(w))) for w in want)  # the check is not vacuous
    assert excess_error(got, want, tolerance(args, want)) <= 0


def _assert_nonfinite_positions_kept(name: str, special: float, seed: int) -> None:
    """``name``'s gradient raised to dQ, dK and dV with the written-out gradients' values, on inputs
    holding ``special`` (whose NaN or Inf reaches the gradients: the check is not vacuous)."""
    fn = _grad_fn(CASES[name][0])
    optimized = _optimized(name)
    args = _args(name, seed=seed, specials=(special,))
    report = optimized.explain(*args)
    assert sorted(info.gradient for info in report.attention) == ["dk", "dq", "dv"], str(report.after)
    got, want = optimized(*args), fn(*args)
    assert any(not np.all(np.isfinite(np.asarray(w))) for w in want)  # the check is not vacuous
    assert excess_error(got, want, tolerance(args, want)) <= 0


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", SPELLED_BACKWARDS)
def test_spelled_backwards_keep_nonfinite_positions(name, special):
    """The backwards of a soft-cap, a traced scale, exp(log_softmax) and E * (1 / sum(E)) (max not
    under stop_gradient) raised, with the written-out gradients' NaN and Inf positions and values."""
    _assert_nonfinite_positions_kept(name, special, seed=23)


@pytest.mark.parametrize("special", [np.inf, np.nan])
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_backwards_keep_nonfinite_positions(name, special):
    """The backwards over K·Qᵀ scores, Haliax's [B, K, H, Q] scores, a decode step's squeezed query
    and BLOOM's folded heads, raised, keep the written-out gradients' NaN and Inf positions."""
    _assert_nonfinite_positions_kept(name, special, seed=29)


@pytest.mark.parametrize("special", [None, np.inf, np.nan])
def test_value_gradient_alone_raised(special):
    """jax.grad with respect to V alone (Q and K frozen: no softmax backward) is the op's dV: one
    gradient, no P left, the written-out values (±0, denormals, ±40 planted; Inf or NaN too)."""
    def loss(q, k, v, cot):
        return jnp.sum(scaled(q, k, v) * cot)

    fn = jax.grad(loss, argnums=2)
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS, rules=VALUE_GRADIENT)
    q, k, v = _inputs(31, BHSD, specials=() if special is None else (special,))
    (cot,) = _inputs(32, (BHSD[0],))
    report = optimized.explain(q, k, v, cot)
    assert [info.gradient for info in report.attention] == ["dv"], str(report.after)
    assert "softmax" not in {n.op for n in report.after.nodes}, "dV still reads P"
    got, want = optimized(q, k, v, cot), fn(q, k, v, cot)
    if special is not None:
        assert not np.all(np.isfinite(np.asarray(want)))  # the check is not vacuous
    assert excess_error(got, want, tolerance((q, k, v, cot), want)) <= 0


def test_value_gradient_alone_raised_in_bfloat16():
    """bf16 (jax.nn.softmax sums in float32): dV alone raised with the written-out one's non-finite
    positions, on average no further from the float32 gradient (the op's P comes from float32
    scores, the program's from bf16 ones), and nowhere further by more than one bf16 rounding (dV
    is one bf16 output: where the two round to neighbours, either may be the nearer)."""
    def loss(q, k, v, cot):
        return jnp.sum(scaled(q, k, v).astype(F32) * cot)

    fn = jax.grad(loss, argnums=2)
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS, rules=VALUE_GRADIENT)
    args = (*_inputs(33, BHSD, BF16), *_inputs(34, (BHSD[0],)))
    assert [info.gradient for info in optimized.explain(*args).attention] == ["dv"]
    got, want = (np.asarray(x, np.float64) for x in (optimized(*args), fn(*args)))
    truth = np.asarray(fn(*[a.astype(F32) for a in args]), np.float64)
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(truth)
    got_error, want_error = (np.abs(x - truth)[finite] / (1.0 + np.abs(truth[finite])) for x in (got, want))
    assert got_error.mean() <= want_error.mean()
    assert got_error.max() <= want_error.max() + 2.0 ** -8


def test_gradient_rule_sets_follow_what_the_program_writes_out():
    """A full backward gets `attention_grad`; V's gradient alone and a forward program nothing (V's
    gradient alone, Pᵀ · do, is raised only where `attention_value_grad` is asked for: by default
    it stays as written, as a softmax over the queries contracted over the keys does)."""
    args = _args("scaled", seed=1)
    value_only = jax.grad(lambda q, k, v, cot: jnp.sum(scaled(q, k, v) * cot), argnums=2)
    assert gradient_rules(capture(_grad_fn(scaled), *args).program) == ["attention_grad"]
    assert gradient_rules(capture(value_only, *args).program) == []
    assert gradient_rules(capture(scaled, *args[:3]).program) == []
    report = ea.optimize(value_only, cost_model=for_device("h100"), limits=LIMITS).explain(*args)
    assert report.attention == []


def test_soft_capped_gradients_match_float64():
    """The op's gradients with a soft-cap (the reference's backward) against jax.grad of the
    written-out ``c * tanh(s / c)`` attention in float64, on inputs with ±0, denormals and ±40."""
    from test_exactness import x64

    from eqsat_attn.kernels.reference import attention_reference

    q, k, v, do = _inputs(29, ((B, H, S, D),) * 4)
    _, pullback = jax.vjp(lambda q, k, v: attention_reference(q, k, v, scale=0.25, causal=False, softcap=50.0), q, k, v)
    got = pullback(do)
    with x64():
        wide = [jnp.asarray(np.asarray(t, np.float64)) for t in (q, k, v, do)]
        want = jax.grad(lambda q, k, v: jnp.sum(soft_capped(q, k, v) * wide[3]), argnums=(0, 1, 2))(*wide[:3])
        want = [np.asarray(w, np.float64) for w in want]
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(g, np.float64) - w).max() <= 1e-4 * (1.0 + np.abs(w).max())


@pytest.mark.parametrize("name", ["scaled", "key_padding", "decode_squeezed"])
def test_three_gradients_run_as_one_call(monkeypatch, name):
    """dQ, dK and dV of one attention are one backward call (dV is not a second op of its own,
    such as `value_gradient_only`'s with zeros for V, which would run the backward again)."""
    calls = []
    original = lower_module.attention_gradients

    def counting(node, *args, **kwargs):
        calls.append(node.inputs)
        return original(node, *args, **kwargs)

    monkeypatch.setattr(lower_module, "attention_gradients", counting)
    optimized = _optimized(name)
    optimized(*_args(name, seed=3))
    assert len(calls) == 1


def test_gradient_of_a_nonlinear_loss():
    """do depends on the forward output (sum(o²)): the forward runs as attention as well."""
    def loss(q, k, v):
        return jnp.sum(scaled(q, k, v) ** 2)

    fn = jax.grad(loss, argnums=(0, 1, 2))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    args = _inputs(11, BHSD)
    report = optimized.explain(*args)
    assert {info.gradient for info in report.attention} >= {"dq", "dk", "dv"}
    got, want = optimized(*args), fn(*args)
    assert excess_error(got, want, tolerance(args, want)) <= 0


def test_weights_also_used_keep_their_values():
    """A loss that reads P itself (an attention-weights penalty) keeps the original values."""
    def loss(q, k, v):
        p = _softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25)
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", p, v)) + jnp.sum(p * p)

    fn = jax.grad(loss, argnums=(0, 1, 2))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    args = _inputs(13, BHSD)
    got, want = optimized(*args), fn(*args)
    assert excess_error(got, want, tolerance(args, want)) <= 0


def test_gradients_read_operands_in_place():
    """K's transpose for Q·Kᵀ folds into the gradient op's layouts: nothing is transposed."""
    optimized = _optimized("scaled")
    report = optimized.explain(*_args("scaled", seed=5))
    assert [n.op for n in report.after.nodes if n.op == "transpose"] == []
    assert {info.k_layout for info in report.attention} == {"BHSD"}


@pytest.mark.parametrize("bias_shape", [(B, H, S, S), (1, H, S, S)])
def test_bias_gradient_raised(bias_shape):
    """The bias's gradient is the op's too (a broadcast bias sums it over the broadcast axes)."""
    def loss(q, k, v, bias, cot):
        return jnp.sum(biased(q, k, v, bias) * cot)

    fn = jax.grad(loss, argnums=(0, 1, 2, 3))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    q, k, v = _inputs(17, BHSD)
    (bias,) = _inputs(18, (bias_shape,))
    (cot,) = _inputs(19, (BHSD[0],))
    report = optimized.explain(q, k, v, bias, cot)
    assert sorted(info.gradient for info in report.attention) == ["dbias", "dk", "dq", "dv"], str(report.after)
    assert report.not_attention == []
    got, want = optimized(q, k, v, bias, cot), fn(q, k, v, bias, cot)
    assert excess_error(got, want, tolerance((q, k, v, bias), want)) <= 0


def test_gradients_lower_to_the_flash_backward_for_a_gpu(monkeypatch):
    """On a GPU the raised gradients are one forward and the Triton flash backward (lowered for
    CUDA here, without one): no softmax materialised, and the three share one call."""
    from test_kernels import _pretend_hopper

    _pretend_hopper(monkeypatch)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compiled kernels, not interpret mode
    shapes = [jax.ShapeDtypeStruct((2, 4, 256, 64), BF16)] * 4  # q, k, v, the cotangent
    optimized = ea.optimize(_grad_fn(scaled), cost_model=for_device("h100"), limits=LIMITS)
    program = optimized.explain(*shapes).after
    assert sorted(info.gradient for info in optimized.explain(*shapes).attention) == ["dk", "dq", "dv"]
    run = lower_module.lower(program, attention_kernel="pallas")
    text = jax.jit(lambda *xs: run(*xs)).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3, "forward, dq and dk/dv kernels"


def test_bias_and_mask_gradients_raised():
    """where(keep, s + bias, fill): the gradients of Q, K, V and the bias are the op's (the bias's
    gradient is zero where the mask hides it, as the program's)."""
    def attend(q, k, v, bias, keep):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
        return jnp.einsum("bhqk,bhkd->bhqd", _softmax(jnp.where(keep[:, None, None, :], s, -1e9)), v)

    def loss(q, k, v, bias, keep, cot):
        return jnp.sum(attend(q, k, v, bias, keep) * cot)

    fn = jax.grad(loss, argnums=(0, 1, 2, 3))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    q, k, v = _inputs(29, BHSD)
    (bias,) = _inputs(30, ((B, H, S, S),))
    (cot,) = _inputs(31, (BHSD[0],))
    report = optimized.explain(q, k, v, bias, KEEP, cot)
    assert sorted(info.gradient for info in report.attention) == ["dbias", "dk", "dq", "dv"], str(report.after)
    assert {info.mask_kind for info in report.attention} == {"bias+bool"}
    got, want = optimized(q, k, v, bias, KEEP, cot), fn(q, k, v, bias, KEEP, cot)
    assert excess_error(got, want, tolerance((q, k, v, bias), want)) <= 0
    assert np.all(np.asarray(got[3])[:, :, :, 5:][0] == 0)  # batch 0 hides keys 5.. : no bias gradient there


def test_a_gradient_run_restarts_once_its_backward_is_raised_and_settled(monkeypatch):
    """A jax.grad program may raise attention only through its backward (`RAISED_GRADIENTS`; the
    forward family never fires): once that has settled past `RAISED_SETTLED_ENODES` e-nodes
    (lowered here so this small program reaches it, and with no grace rounds: it saturates within
    two rounds of its backward's first raise) the run restarts as a forward one does, and the
    program chosen keeps the raised gradient ops with equal values."""
    from eqsat_attn import pipeline
    from eqsat_attn.pipeline import OptimizeOptions

    monkeypatch.setattr(pipeline, "RAISED_SETTLED_ENODES", 300)
    monkeypatch.setattr(pipeline, "GRADIENT_GRACE_ROUNDS", 0)
    fn, args = _grad_fn(scaled), _args("scaled", seed=41)
    program = ea.capture(fn, *args).program
    model = for_device("h100")
    chosen, run, _ = pipeline.optimize_part(program, OptimizeOptions(cost_model=model, limits=LIMITS), model)
    assert "attention_gradients settled" in run.stop_reason and "after a restart" in run.stop_reason
    assert run.saturated and not run.rules_fired.get(pipeline.RAISED)
    assert run.rules_fired.get(pipeline.RAISED_GRADIENTS) and chosen.count("attention_vjp") >= 1
    _assert_values(fn, args, lower_module.lower(chosen)(*args), fn(*args))


def grouped_query_einsum(q, k, v, bias):
    """Flax nnx's grouped-query spelling: Q split to [B, Sq, Hkv, G, D], the scores einsum writing
    [B, Hkv, G, Sq, Sk] (so the product Q·Kᵀ has Q's free axes as (Sq, G) and may be read both ways)."""
    b, s_q, heads, d = q.shape
    kv_heads = k.shape[2]
    q5 = q.reshape(b, s_q, kv_heads, heads // kv_heads, d) / jnp.sqrt(d).astype(q.dtype)
    w = jnp.einsum("...qhgd,...kh1d->...hgqk", q5, k[..., None, :]).reshape(b, heads, s_q, -1)
    p = jax.nn.softmax(w + bias, -1).reshape(b, kv_heads, heads // kv_heads, s_q, -1)
    return jnp.einsum("...hgqk,...kh1d->...qhgd", p, v[..., None, :]).reshape(b, s_q, heads, d)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("device", ["h100", "cpu"])
def test_grouped_query_gradients_in_either_view(kv_heads, device):
    """A grouped product readable as (Sq, G) or (G, Sq) gets each view's gradients viewed back as
    that view's: Q's and the bias's gradients are equal whichever the cost model extracts (one
    view's dQ was once taken for the other's, which changed values)."""
    heads = 4
    q, k, v, bias, cot = _inputs(3, [(B, S, heads, D), (B, S, kv_heads, D), (B, S, kv_heads, D), (1, heads, S, S),
                                     (B, S, heads, D)])
    fn = jax.grad(lambda q, k, v, bias: jnp.sum(grouped_query_einsum(q, k, v, bias) * cot), argnums=(0, 1, 2, 3))
    optimized = ea.optimize(fn, cost_model=for_device(device), limits=LIMITS)
    report = optimized.explain(q, k, v, bias)
    assert report.attention or device == "cpu"  # the CPU row prices the written-out backward lower
    assert excess_error(optimized(q, k, v, bias), fn(q, k, v, bias), tolerance(q)) <= 0


def two_score_products(q1, q2, k1, k2, v):
    """DeepSeek MLA's scores: two products added, the second's K shared by every head (no head axis)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q1, k1) + jnp.einsum("bhqd,bkd->bhqk", q2, k2)
    return jnp.einsum("bhqk,bhkd->bhqd", _softmax(s), v)


def test_scores_of_two_products_keep_their_gradients():
    """Only a V with the product's batch axes is attention's V (the second product's head-less K
    once passed for one, and the optimized gradient failed MLIR's verifier): the gradients keep
    their values, raised or not."""
    q1, q2, k1, k2, v, cot = _inputs(5, [(B, H, S, D), (B, H, S, D), (B, H, S, D), (B, S, D), (B, H, S, D), (B, H, S, D)])
    fn = jax.grad(lambda q1, q2, k1, k2, v: jnp.sum(two_score_products(q1, q2, k1, k2, v) * cot), argnums=(0, 1, 2))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the original program
        got = optimized(q1, q2, k1, k2, v)
    assert excess_error(got, fn(q1, q2, k1, k2, v), 1e-4) <= 0  # the ±40 entries: reassociated row sums


def test_shared_query_gradient_is_the_ops_summed_over_the_batch():
    """A query without a batch axis (learned latents) broadcast over K's batch: its gradient is
    the op's dQ summed over the batch (`shared_query_gradient`), with the written-out values."""
    from attention_corpus import BY_NAME

    case = BY_NAME["query_shared_over_batch"]
    latents, k, v = case.args()
    (cot,) = _inputs(41, (jax.eval_shape(case.fn, latents, k, v).shape,))
    fn = jax.grad(lambda *a: jnp.sum(case.fn(*a[:3]) * a[3]), argnums=(0, 1, 2))
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=LIMITS)
    report = optimized.explain(latents, k, v, cot)
    assert sorted(info.gradient for info in report.attention) == ["dk", "dq", "dv"], str(report.after)
    assert "softmax" not in {n.op for n in report.after.nodes}, "the backward still reads P"
    args = (latents, k, v, cot)
    assert excess_error(optimized(*args), fn(*args), tolerance(args, fn(*args))) <= 0


WINDOW = jnp.asarray((np.arange(S)[None, :] <= np.arange(S)[:, None]) & (np.arange(S)[:, None] - np.arange(S)[None, :] < 3))


@jax.custom_vjp
def _where_softmax_earlier_jax(s):
    """``jax.nn.softmax(s, where=WINDOW)`` as it was before jax 0.12 (no custom JVP)."""
    return _where_softmax_earlier_jax_fwd(s)[0]


def _where_softmax_earlier_jax_fwd(s):
    hidden = jnp.where(WINDOW, s, -jnp.inf)
    e = jnp.exp(hidden - lax.stop_gradient(hidden.max(-1, keepdims=True)))
    t = jnp.where(WINDOW, e, 0.0).sum(-1, keepdims=True)
    return jnp.where(WINDOW, e / t, 0.0), (e, t)


def _where_softmax_earlier_jax_bwd(res, g):
    """The quotient's transpose with dP and the broadcast row sum zeroed where the window hides,
    then the where's own backward (zero where it hides), as jax.grad wrote it."""
    e, t = res
    spread = lambda x: lax.broadcast_in_dim(x, g.shape, tuple(range(g.ndim)))  # noqa: E731
    g = jnp.where(WINDOW, g, 0.0)
    kept = jnp.sum(g * spread(lax.integer_pow(t, -2)) * e, axis=-1).reshape(t.shape)
    row = jnp.where(WINDOW, lax.broadcast_in_dim(jnp.sum(-kept, axis=-1), g.shape, (0, 1, 2)), 0.0)
    return (jnp.where(WINDOW, (g / spread(t) + row) * e, 0.0),)


_where_softmax_earlier_jax.defvjp(_where_softmax_earlier_jax_fwd, _where_softmax_earlier_jax_bwd)


def test_where_softmax_earlier_jax_gradients_of_q_and_k_raised():
    """jax.nn.softmax(s, where=window)'s backward as jax.grad wrote it before jax 0.12 (the quotient's,
    zeroed where the window hides): Q's and K's gradients raised with the written-out values
    (V's gradient reads P zeroed where the op's P is NaN: not raised, as under 0.12's spelling)."""
    def loss(q, k, v, cot):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", _where_softmax_earlier_jax(s), v) * cot)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    args = (*_inputs(3, BHSD), *_inputs(4, ((B, H, S, D),)))
    optimized = ea.optimize(grad, cost_model=for_device("h100"), limits=LIMITS)
    report = optimized.explain(*args)
    assert sorted(info.gradient for info in report.attention) == ["dk", "dq"], str(report.after)
    assert excess_error(optimized(*args), grad(*args), tolerance(args, grad(*args))) <= 0


def test_folded_heads_gradients_are_the_ops():
    """GPT-NeoX folds the heads for Q·Kᵀ and splits them for the mask and P·V: its dQ and dK are
    the op's (`folded_heads_dot` reads the folded dS · K as the [B, H] product of the scaled
    cotangent), not products of the op's bias gradient dS, with the written-out values."""
    from attention_corpus import BY_NAME

    case = BY_NAME["neox_folded_heads_split_for_mask_grad"]
    args = case.args()
    optimized = ea.optimize(case.fn, cost_model=for_device("h100"), limits=LIMITS)
    report = optimized.explain(*args)
    assert sorted(info.gradient for info in report.attention) == ["dk", "dq", "dv"], str(report.after)
    assert excess_error(optimized(*args), case.fn(*args), tolerance(args, case.fn(*args))) <= 0
