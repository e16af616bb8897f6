"""Attention raising and layout choice: library forms become exactly one Attention op with the
original values; near-misses are left alone; the V layout follows the cost model."""

from __future__ import annotations

import dataclasses
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn import ir
from eqsat_attn.cost import MaterializedBytes, OpView, for_device
from eqsat_attn.lower import lower
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program
from work_limits import SAFETY_NET_S

B, S, H, D = 2, 8, 4, 16
E = H * D
KEYS = jax.random.split(jax.random.PRNGKey(7), 8)
Q4, K4, V4 = (jax.random.normal(KEYS[i], (B, S, H, D)) for i in range(3))  # [B, S, H, D]
X = jax.random.normal(KEYS[3], (B, S, E))


def einsum_bhsd(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(D).astype(np.float32)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def einsum_bshd_scale_on_q(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q * (D**-0.5), k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def scale_on_k_tril_mask(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k * 0.25)
    s = jnp.where(jnp.tril(jnp.ones((S, S), bool)), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def iota_mask_neg_inf(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D**-0.5)
    s = jnp.where(jnp.arange(S)[:, None] >= jnp.arange(S)[None, :], s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def hand_written_softmax(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = s - jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def additive_bias(q, k, v, bias):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def dpa(causal: bool):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


MHA = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E)
MHA_PARAMS = MHA.init(KEYS[4], X)
EQX_MHA = eqx.nn.MultiheadAttention(num_heads=H, query_size=E, key=KEYS[5])
BHSD_ARGS = tuple(t.transpose(0, 2, 1, 3) for t in (Q4, K4, V4))

# name: (function, args, expect causal, expect GQA groups)
FORMS = {
    "einsum_bhsd": (einsum_bhsd, BHSD_ARGS, False, 1),
    "einsum_bshd_scale_on_q": (einsum_bshd_scale_on_q, (Q4, K4, V4), False, 1),
    "scale_on_k_tril_mask": (scale_on_k_tril_mask, (Q4, K4, V4), True, 1),
    "iota_mask_neg_inf": (iota_mask_neg_inf, (Q4, K4, V4), True, 1),
    "hand_written_softmax": (hand_written_softmax, (Q4, K4, V4), False, 1),
    "additive_bias": (additive_bias, BHSD_ARGS + (jax.random.normal(KEYS[6], (B, H, S, S)),), False, 1),
    "dot_product_attention": (dpa(False), (Q4, K4, V4), False, 1),
    "dot_product_attention_causal": (dpa(True), (Q4, K4, V4), True, 1),
    "dot_product_attention_gqa": (dpa(True), (Q4, K4[:, :, :2], V4[:, :, :2]), True, 2),
    "flax_linen_mha": (lambda p, x: MHA.apply(p, x), (MHA_PARAMS, X), False, 1),
    "flax_linen_mha_causal": (
        lambda p, x: MHA.apply(p, x, mask=nn.make_causal_mask(x[..., 0])), (MHA_PARAMS, X), True, 1,
    ),
    "equinox_mha_vmap": (lambda x: jax.vmap(lambda t: EQX_MHA(t, t, t))(x), (X,), False, 1),
}


def _close(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_library_form_is_raised_to_one_attention(name):
    fn, args, causal, groups = FORMS[name]
    # priced for a GPU: on the CPU model these tiny shapes are cheaper unfused (tile padding)
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=Limits(iterations=30, seconds=SAFETY_NET_S))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would hide a failure
        report = optimized.explain(*args)
    assert len(report.attention) == 1, report.after
    (info,) = report.attention
    assert info.causal is causal
    assert info.groups == groups
    assert info.mask_kind == ("bias" if name == "additive_bias" else "none")
    assert report.after.count("softmax") == 0 and report.after.count("exp") == 0
    _close(optimized(*args), fn(*args))


def softmax_wrong_axis(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-2), v)


def mask_not_causal(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    s = jnp.where(jnp.arange(S)[:, None] <= jnp.arange(S)[None, :], s, -1e9)  # anti-causal
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def op_between_matmuls(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.tanh(jax.nn.softmax(s, axis=-1)), v)


def mask_small_negative(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    s = jnp.where(jnp.arange(S)[:, None] >= jnp.arange(S)[None, :], s, -3.0)  # does not mask
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("fn", [softmax_wrong_axis, op_between_matmuls])
def test_near_misses_are_left_alone(fn):
    """Neither is attention, nor its gradient by default (a softmax over the queries contracted over
    the keys is Pᵀ · V, which `attention_value_grad` raises as V's gradient only where asked)."""
    optimized = ea.optimize(fn, limits=Limits(iterations=20, seconds=SAFETY_NET_S))
    report = optimized.explain(Q4, K4, V4)
    assert report.attention == [], report.after
    _close(optimized(Q4, K4, V4), fn(Q4, K4, V4))


def low_scores(q, k, v):
    """Scores far below the fill (-1e4): the fill, not the scores, dominates each row."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 1e4 - 1e6
    s = jnp.where(jnp.arange(S)[:, None] >= jnp.arange(S)[None, :], s, -1e4)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize(("fn", "causal"), [(mask_not_causal, False), (mask_small_negative, True), (low_scores, True)])
def test_where_masks_keep_their_exact_fill(fn, causal):
    """Any boolean where-mask is the op's mask, with the program's fill kept exactly: an anti-causal
    mask is a boolean mask, and a fill that does not hide (-3, or -1e4 above scores near -1e6) gives
    the program's values, not those of a -inf mask."""
    optimized = ea.optimize(fn, cost_model=for_device("h100"), limits=Limits(iterations=20, seconds=SAFETY_NET_S))
    (info,) = optimized.explain(Q4, K4, V4).attention
    assert info.causal is causal
    want = fn(Q4, K4, V4)
    _close(optimized(Q4, K4, V4), want)
    assert np.all(np.isfinite(np.asarray(want)))


@dataclasses.dataclass
class AttentionPricedOut:
    """Bytes moved, with every attention op a million times dearer."""

    name: str = "attention-priced-out"

    def node_cost(self, node: OpView) -> float:
        base = MaterializedBytes().node_cost(node)
        return base * 1e6 if node.op == "attention" else base


def test_a_where_masked_softmax_miss_names_its_scores_not_the_mask():
    """The nearest form of a masked softmax is read through the where-mask's value operand (not
    its predicate): scores that are not a matmul say what they are."""

    def masked_not_matmul(q, k, v):
        s = jnp.sin(q) * 0.5  # scores that are not Q·Kᵀ
        keep = jnp.arange(s.shape[-1]) % 2 == 0
        p = jax.nn.softmax(jnp.where(keep, s, -1e9), axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    q = jnp.ones((1, 2, 8, 8), jnp.float32)
    (line,) = ea.optimize(masked_not_matmul).explain(q, q, q).not_attention
    assert "nearest producer: sin" in line, line


def test_the_report_says_why_a_softmax_is_not_attention():
    """A softmax left in the chosen program is explained: the nearest form it missed, or the
    predicted cost of the attention found for it but not chosen."""
    args = BHSD_ARGS
    missed = ea.optimize(op_between_matmuls).explain(*args).not_attention
    assert len(missed) == 1 and "tanh" in missed[0], missed
    priced_out = ea.optimize(einsum_bhsd, cost_model=AttentionPricedOut()).explain(*args)
    assert priced_out.attention == []
    notes = [n for n in priced_out.not_attention if "but not chosen" in n]
    assert len(notes) == 1 and "attention-priced-out" in notes[0], priced_out.not_attention
    assert "found for 1 of the 1 softmax" in notes[0] and priced_out.not_attention[0] == notes[0]
    assert "not attention:" in priced_out.summary()
    chosen = ea.optimize(einsum_bhsd, cost_model=for_device("h100")).explain(*args)
    assert len(chosen.attention) == 1 and chosen.not_attention == []


def test_the_report_names_a_written_out_softmax_left_expanded():
    """A stable softmax written out by hand whose pieces a jax.grad program's backward also reads
    (XLA's bf16 softmax with max and sum reduced in float32: max's VJP reads the max) stays
    expanded, with no softmax op in the chosen program; the report still names it and why."""
    def unfused(q, k, v):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        m = jnp.max(s.astype(jnp.float32), -1, keepdims=True).astype(s.dtype)
        e = jnp.exp(s - m)
        return jnp.einsum("bhqk,bhkd->bhqd", e / jnp.sum(e.astype(jnp.float32), -1, keepdims=True).astype(s.dtype), v)

    args = tuple(a.astype(jnp.bfloat16) for a in BHSD_ARGS)
    grad = jax.grad(lambda q, k, v: jnp.sum(unfused(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
    report = ea.optimize(grad, cost_model=for_device("h100")).explain(*args)
    lines = [n for n in report.not_attention if "stable softmax written out" in n]
    assert lines and lines[0].startswith("exp %"), report.not_attention


def test_the_report_says_where_the_weights_are_read_besides_p_v():
    """Weights returned, or read by a gradient's written-out softmax backward no rule raised (scores
    divided by a traced temperature: not raised, see `scores_traced_scale`), are named as such."""
    def weights_too(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v), p

    def temperature(q, k, v, tau):
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / tau, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    args = BHSD_ARGS
    (returned,) = ea.optimize(weights_too, cost_model=AttentionPricedOut()).explain(*args).not_attention[-1:]
    assert "also an output" in returned, returned
    grad = jax.grad(lambda q, k, v, tau: jnp.sum(temperature(q, k, v, tau) ** 2), argnums=(0, 1, 2))
    (backward,) = ea.optimize(grad, cost_model=for_device("h100")).explain(*args, jnp.float32(2.0)).not_attention
    assert "written-out softmax backward" in backward, backward


@dataclasses.dataclass
class VariantModel:
    """Bytes moved, with attention priced per V layout: ``transposed`` scales the cost of
    attention reading V with its sequence axis minor, ``standard`` with head_dim minor."""

    standard: float = 1.0
    transposed: float = 1.0
    name: str = "variant-test"

    def node_cost(self, node: OpView) -> float:
        base = MaterializedBytes().node_cost(node)
        if node.op == "transpose":
            return 0.1 * base  # cheap enough that the variant factors decide
        if node.op != "attention":
            return base
        v_layout = str(node.params["v_layout"])
        if v_layout.endswith("S"):
            return base * self.transposed
        if v_layout.endswith("D"):
            return base * self.standard
        return 1e12  # neither minor axis the kernel can read


def _attention_program(fn, *args) -> ir.Program:
    return ea.capture(fn, *args).program


def _optimized(program: ir.Program, model, rules=None) -> ir.Program:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = optimize_program(program, OptimizeOptions(cost_model=model, rules=rules, limits=Limits(iterations=30, seconds=SAFETY_NET_S)))
    return result.program


def _v_layout(program: ir.Program) -> str:
    (node,) = [program.nodes[i] for i in program.live_nodes() if program.nodes[i].op == "attention"]
    return str(node["v_layout"])


def _values_equal(a: ir.Program, b: ir.Program) -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(t.shape).astype(t.dtype) for t in a.input_types]
    _close(lower(a)(*inputs), lower(b)(*inputs))


def make_projected_block(b: int, s: int, h: int, d: int, scale: float):
    """Attention whose Q, K and V come from projections of x, heads split by reshape+transpose."""

    def block(x, wq, wk, wv):
        def split(t):
            return t.reshape(b, s, h, d).transpose(0, 2, 1, 3)

        q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)

    return block


projected_block = make_projected_block(B, S, H, D, 0.25)


W = tuple(jax.random.normal(KEYS[i], (E, E)) / 8 for i in (4, 5, 6))


def test_v_from_a_projection_is_written_transposed_by_the_projection():
    program = _attention_program(projected_block, X, *W)
    chosen = _optimized(program, VariantModel(standard=1.0, transposed=0.5))
    assert _v_layout(chosen).endswith("DS") or _v_layout(chosen)[-1] == "S"
    att = next(chosen.nodes[i] for i in chosen.live_nodes() if chosen.nodes[i].op == "attention")
    v_producer = chosen.nodes[att.inputs[2]]
    while v_producer.op == "reshape":  # the head split is a view
        v_producer = chosen.nodes[v_producer.inputs[0]]
    assert v_producer.op == "dot_general", "V should come straight from its projection"
    assert chosen.count("transpose") == 0, chosen
    _values_equal(program, chosen)


def test_v_arriving_transposed_is_consumed_directly():
    def fn(q, k, vt):  # vt is [B, H, D, S]
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
        return jnp.einsum("bhqk,bhdk->bhqd", jax.nn.softmax(s, axis=-1), vt)

    args = (BHSD_ARGS[0], BHSD_ARGS[1], BHSD_ARGS[2].transpose(0, 1, 3, 2))
    program = _attention_program(fn, *args)
    chosen = _optimized(program, VariantModel(standard=1.0, transposed=0.5))
    assert _v_layout(chosen) == "BHDS"
    assert chosen.count("transpose") == 0
    _values_equal(program, chosen)


@pytest.mark.parametrize(("standard", "transposed", "expect"), [(1.0, 1.5, "BHSD"), (1.0, 0.2, "BHDS")])
def test_layout_decision_follows_the_variant_efficiencies(standard, transposed, expect):
    """V arrives as a plain [B, H, S, D] input: nothing can absorb a transpose, so the
    transposed-V form costs a materialised transpose; the model's efficiencies decide."""
    program = _attention_program(einsum_bhsd, *BHSD_ARGS)
    chosen = _optimized(program, VariantModel(standard=standard, transposed=transposed))
    assert _v_layout(chosen) == expect
    assert chosen.count("transpose") == (1 if expect == "BHDS" else 0)
    _values_equal(program, chosen)


def test_default_h100_model_writes_v_transposed_from_its_projection_and_keeps_an_input_v():
    """bf16 on H100 under the shipped roofline table: a projection can write Vᵀ for free, so the
    transposed-V form wins by the table's (measured, small) edge; a V that arrives as an input
    would need a materialised transpose, which costs more than that edge, so attention folds it
    back. (Projections kept separate: with the projection rules, merging them wins here, see
    tests/test_qkv.py.) At the benchmark's shape, traced only: the edge (0.6% of attention) is
    worth microseconds there, where at toy sizes it is below the dot-orientation tie-break."""
    separate = ["canonical", "transpose", "attention_raise", "attention_layout"]
    b, s, h, d = 4, 4096, 32, 128
    e = h * d
    x = jax.ShapeDtypeStruct((b, s, e), jnp.bfloat16)
    ws = [jax.ShapeDtypeStruct((e, e), jnp.bfloat16)] * 3

    block = make_projected_block(b, s, h, d, 0.125)

    model = for_device("h100")
    projected = _optimized(_attention_program(block, x, *ws), model, separate)
    assert _v_layout(projected).endswith("S"), projected
    assert projected.count("transpose") == 0
    (info,) = ea.optimize(block, cost_model=model, rules=separate).explain(x, *ws).attention
    assert info.v_layout == "BHDS" and info.v_storage == _v_layout(projected)

    def plain(q, k, v):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.125
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)

    qkv = [jax.ShapeDtypeStruct((b, h, s, d), jnp.bfloat16)] * 3
    kept = _optimized(_attention_program(plain, *qkv), model)
    assert _v_layout(kept) == "BHSD"
    assert kept.count("transpose") == 0


@pytest.mark.parametrize("dtype, big", [("float16", 100.0), ("float32", 1e19)])
def test_a_scaled_plain_matmul_keeps_its_values_at_the_edge_of_overflow(dtype, big):
    """``(x * 0.01) @ y`` is not rewritten to ``(x @ y) * 0.01``: that overflows where the program
    does not (x = y = 100 in float16, 1e19 in float32). A scale moves only into attention's float32
    scores."""

    def fn(x, y):
        return (x * 0.01) @ y, (x / 100.0) @ y

    x = jnp.full((4, 4), big, dtype)
    want = jax.jit(fn)(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = ea.optimize(fn)(x, x)
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(w, np.float32)))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_run_still_growing_restarts_from_its_best_program(monkeypatch):
    """jax.nn.dot_product_attention with a boolean mask (its 5-D einsum) grew past 100,000 e-nodes
    in one run (today ~9,000: transposes no longer bubble out of broadcasts); a run still growing
    at `RESTART_ENODES` (lowered here so this program reaches it) restarts from the program
    extracted there, where attention is one op, and saturates: the result counts work only, so
    it is the same on any machine."""
    from eqsat_attn import pipeline

    restart_enodes = 3_000
    monkeypatch.setattr(pipeline, "RESTART_ENODES", restart_enodes)

    def fn(q, k, v):
        mask = (jnp.arange(S) < S - 2)[None, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    program = _attention_program(fn, Q4, K4, V4)
    model = for_device("h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        chosen, run, _ = pipeline.optimize_part(program, OptimizeOptions(cost_model=model), model)
    assert "after a restart" in run.stop_reason and "(e-node limit (3000))" in run.stop_reason
    assert run.egraph_nodes >= restart_enodes and run.saturated
    assert chosen.count("attention") == 1
    _values_equal(program, chosen)


def test_a_run_restarts_once_attention_is_raised_and_settled(monkeypatch):
    """Causal jax.nn.dot_product_attention (its 5-D einsum) grew to 15,000 e-nodes before it
    saturated (today ~3,400: transposes no longer bubble out of broadcasts); once attention is
    raised and the raise rule set raises no more past `RAISED_SETTLED_ENODES` e-nodes (lowered
    here so this program reaches it), the run restarts from the program extracted there: a
    smaller e-graph, the causal flag kept, equal values."""
    from eqsat_attn import pipeline
    from eqsat_attn.pipeline import RAISED_RESTART_ENODES, optimize_part

    monkeypatch.setattr(pipeline, "RAISED_SETTLED_ENODES", 1_500)

    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    program = _attention_program(fn, Q4, K4, V4)
    model = for_device("h100")
    options = OptimizeOptions(cost_model=model, limits=Limits(iterations=30, seconds=SAFETY_NET_S))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        chosen, run, _ = optimize_part(program, options, model)
    assert "settled" in run.stop_reason and "after a restart" in run.stop_reason and run.saturated
    assert run.egraph_nodes <= RAISED_RESTART_ENODES
    (node,) = [chosen.nodes[i] for i in chosen.live_nodes() if chosen.nodes[i].op == "attention"]
    assert node["causal"] is True or node["causal"] == 1
    _values_equal(program, chosen)


def _causal_rows_at_the_edges():
    """q, k, v, bias [1, 2, 8, 4] where some rows' kept scores are all -inf (the bias hides
    them), one row holds a NaN score, one a +inf score, and V holds ±0, denormals and an inf."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    bias[0, 0, 3, :4] = -np.inf  # row 3 keeps keys 0..3: every kept score -inf
    bias[0, 1, 0, 0] = -np.inf  # row 0 keeps key 0 only: -inf
    q[0, 0, 5, 1] = np.nan
    bias[0, 1, 6, 2] = np.inf
    v[0, 0, :4, 0] = [0.0, -0.0, 1e-45, -1e-45]
    v[0, 1, 7, 3] = np.inf
    return q, k, v, bias


@pytest.mark.parametrize("spelling", ["post_where", "softmax_where_argument"])
def test_causal_zeroing_of_p_is_raised_with_the_programs_values(spelling):
    """``where(causal, softmax(causal -inf-masked s + bias), 0) · V`` and ``jax.nn.softmax(s + bias,
    where=causal) · V`` become attention with the program's values on rows whose kept scores are
    all -inf, hold a NaN or a +inf (NaN where the program has NaN, equal elsewhere)."""
    keep = jnp.tril(jnp.ones((8, 8), bool))

    def fn(q, k, v, bias):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.5 + bias
        if spelling == "post_where":
            p = jnp.where(keep, jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1), 0.0)
        else:
            p = jax.nn.softmax(s, axis=-1, where=keep)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    args = _causal_rows_at_the_edges()
    optimized = ea.optimize(fn, cost_model=for_device("h100"))
    assert len(optimized.explain(*args).attention) == 1
    got, want = np.asarray(optimized(*args)), np.asarray(fn(*args))
    assert np.isnan(want).any() and np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repeat", ["jnp_repeat", "repeat_kv_broadcast", "tile"])
def test_repeated_kv_heads_are_read_grouped(repeat):
    """K and V repeated to the query heads (``jnp.repeat`` along heads, Llama's broadcast-and-merge
    ``repeat_kv``, in [B, S, H, D]) become grouped-query attention over the unrepeated K and V;
    ``jnp.tile`` (head h reads kv head h % Hkv, not the op's h // G) stays repeated. Values equal
    on inputs with ±0, denormals, ±30 entries."""
    b, s, h, hk, d = 2, 16, 4, 2, 8
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for n in (h, hk, hk))
    q[0, 0, 0, :4] = [0.0, -0.0, 1e-45, 30.0]
    k[1, 2, 1, :2] = [-30.0, 1e-40]

    def rep(x):
        if repeat == "jnp_repeat":
            return jnp.repeat(x, h // hk, axis=2)
        if repeat == "tile":
            return jnp.tile(x, (1, 1, h // hk, 1))
        return jnp.broadcast_to(x[:, :, :, None], (b, s, hk, h // hk, d)).reshape(b, s, h, d)

    def fn(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, rep(k)) / jnp.sqrt(jnp.float32(d))
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), rep(v))

    optimized = ea.optimize(fn, cost_model=for_device("h100"))
    after = optimized.explain(q, k, v).after
    (node,) = [after.nodes[i] for i in after.live_nodes() if after.nodes[i].op == "attention"]
    k_type = after.type_of(node.inputs[1])
    heads = k_type.shape[node["k_layout"].index("H")]
    assert heads == (h if repeat == "tile" else hk), (node, k_type)
    np.testing.assert_allclose(optimized(q, k, v), fn(q, k, v), rtol=2e-6, atol=2e-6)


def test_gradients_of_repeated_kv_attention_read_kv_unrepeated():
    """jax.grad of attention over ``jnp.repeat``-ed K and V: the raised forward and its three
    gradients all read the unrepeated K and V (K's and V's gradients summed over the group inside
    the op, where jax.grad sums the repeat's cotangent), no repeat is left, and the gradients
    equal jax.grad's on inputs with ±0, denormals and ±30 entries."""
    b, s, h, hk, d = 2, 16, 4, 2, 8
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for n in (h, hk, hk))
    q[0, 1, 2, :4] = [0.0, -0.0, 1e-45, 30.0]
    v[1, 3, 0, :2] = [-30.0, 1e-40]

    def fn(q, k, v):
        rep = lambda x: jnp.repeat(x, h // hk, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, rep(k)) / jnp.sqrt(jnp.float32(d))
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), rep(v))

    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o * jnp.cos(o))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    optimized = ea.optimize(grad, cost_model=for_device("h100"))
    after = optimized.explain(q, k, v).after
    ops = [after.nodes[i] for i in after.live_nodes() if after.nodes[i].op in ("attention", "attention_vjp")]
    assert sorted(int(n.params.get("wrt", -1)) for n in ops) == [-1, 0, 1, 2]
    for node in ops:
        assert after.type_of(node.inputs[1]).shape == (b, s, hk, d), node
    assert not any(after.type_of(i).rank == 5 for i in after.live_nodes()), "a repeat of K or V is left"
    for got, want in zip(optimized(q, k, v), grad(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("op", [">=", ">"])
def test_additive_mask_compared_back_to_booleans_is_the_causal_flag(op):
    """``where(causal, 0, big_negative) >= big_negative / 2`` (MaxText's mask) is the causal mask
    itself (rules/attention.py, `thresholded_masks`), so the op gets the causal flag, not a tensor."""
    lo = -0.7 * float(jnp.finfo(jnp.float32).max)
    cut = lo if op == ">" else lo * 0.5  # each separates 0 from lo in its own way

    def fn(q, k, v):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
        additive = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), 0.0, lo)
        keep = additive >= cut if op == ">=" else additive > cut
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, lo), -1), v)

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 2, 8, 16)) for i in range(3))
    optimized = ea.optimize(fn)
    assert [(a.causal, a.mask_kind) for a in optimized.explain(q, k, v).attention] == [(True, "none")]
    np.testing.assert_allclose(optimized(q, k, v), fn(q, k, v), rtol=2e-5, atol=2e-5)
