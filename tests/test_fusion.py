"""The `fusion` rule set (issue 7): every family fires on a program made for it and keeps values on
random inputs; a V that passes through a bias add and a rotary embedding is written transposed by
its elementwise region for transposed-V attention; regions show in the Report."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from cost_models import PreferFused, PreferTransposedV
from eqsat_attn import ir, region
from eqsat_attn.cost import for_device
from eqsat_attn.egraph.rulesets import DEFAULT_RULESETS, resolve
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program
from test_rules import B, assert_same_values
from work_limits import SAFETY_NET_S

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent fallback to the original

LIMITS = Limits(iterations=12, nodes=60_000, seconds=SAFETY_NET_S)
WITH_FUSION = [*DEFAULT_RULESETS, "fusion"]


# ----------------------------------------------------------------------------- one program per family


def p_chain():
    """tanh(x * 0.5 + bias) -> transposed: leaves, unary, binary, vector_text, region_inputs."""
    b = B(); x = b.input(4, 6); bias = b.input(6)
    h = b.op("mul", x, b.broadcast(b.literal(0.5), (4, 6), ()))
    h = b.op("add", h, b.broadcast(bias, (4, 6), (1,)))
    return b.build(b.t(b.op("tanh", h), 1, 0))


def p_shared():
    """x * logistic(x) (silu) and x + x ** 3: one input read through two operands."""
    b = B(); x = b.input(3, 5)
    silu = b.op("mul", x, b.op("logistic", x))
    cube = b.op("add", x, b.op("integer_pow", x, y=3))
    return b.build(silu, cube)


def p_epilogue():
    """An activation after a matmul with a bias."""
    b = B(); x = b.input(4, 8); w = b.input(8, 6); bias = b.input(6)
    h = b.op("add", b.dot(x, w, lc=(1,), rc=(0,)), b.broadcast(bias, (4, 6), (1,)))
    return b.build(b.op("tanh", h))


def p_transposed_read():
    """A region reading a transposed input and a cast."""
    b = B(); x = b.input(3, 4, 5); y = b.input(5, 3, 4)
    cast = b.op("convert_element_type", b.t(y, 1, 2, 0), new_dtype="float32")
    return b.build(b.op("exp", b.op("sub", x, cast)))


def _attention_program(scale_on: str):
    Bt, S, H, D = 2, 8, 2, 4

    def fn(q, k, v):
        if scale_on == "q":
            q = q * 0.5
        elif scale_on == "k":
            k = k / 4.0
        else:
            v = v * 3.0
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    from eqsat_attn.capture import capture

    args = [np.zeros((Bt, H, S, D), np.float32)] * 3
    return capture(fn, *args).program


def p_attention_cast(cast: str = "qkv", to: str = "bfloat16"):
    """Attention (already raised) over Q, K, V given in f32 and cast to ``to``: the operands named
    in ``cast`` are converts of f32 inputs, the others values computed in ``to`` (tanh). Long
    enough (S=512, D=64) for the H100 roofline to find the attention compute-bound: there the
    folded form is strictly cheaper (memory-bound, its wider reads cost what the converts wrote)."""
    b = B()
    shape = (1, 2, 512, 64)
    ops = []
    for name in "qkv":
        x = b.op("convert_element_type", b.input(*shape), new_dtype=to)
        ops.append(x if name in cast else b.op("tanh", x))
    params = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD", scale=0.35, causal=True,
                  mask_kind="none")
    return b.build(b.op("attention", *ops, **params))


FAMILIES = {
    "fusion.region_inputs": (p_chain, ["fusion"], PreferFused()),
    "fusion.vector_text": (p_chain, ["fusion"], PreferFused()),
    "fusion.leaves": (p_chain, ["fusion"], PreferFused()),
    "fusion.unary": (p_chain, ["fusion"], PreferFused()),
    "fusion.binary": (p_chain, ["fusion"], PreferFused()),
    "fusion.shared_inputs": (p_shared, ["fusion"], PreferFused()),
    "fusion.epilogue": (p_epilogue, ["fusion"], PreferFused()),
    "fusion.attention_prologue": (lambda: _attention_program("q"), WITH_FUSION, for_device("h100")),
    "fusion.attention_cast_prologue": (p_attention_cast, WITH_FUSION, for_device("h100")),
}


def test_every_fusion_family_has_a_program():
    (rs,) = resolve(["fusion"])
    assert {f.name for f in rs.families} == set(FAMILIES)
    assert rs.doc and all(f.doc and f.rules for f in rs.families)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fires_and_keeps_values(family):
    make, rules, model = FAMILIES[family]
    program = make()
    result = optimize_program(program, OptimizeOptions(rules=rules, cost_model=model, limits=LIMITS))
    assert result.rules_fired.get(family, 0) > 0, result.rules_fired
    assert result.program.output_types == program.output_types
    assert_same_values(program, result.program, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [p_chain, p_shared, p_epilogue, p_transposed_read])
def test_regions_are_chosen_and_compute_the_same(make):
    program = make()
    result = optimize_program(program, OptimizeOptions(rules=["fusion"], cost_model=PreferFused(), limits=LIMITS))
    assert result.program.count("fused") >= 1
    assert_same_values(program, result.program, rtol=1e-5, atol=1e-5)


def test_chain_becomes_one_region_writing_the_transposed_layout():
    result = optimize_program(p_chain(), OptimizeOptions(rules=["fusion"], cost_model=PreferFused(), limits=LIMITS))
    (node,) = [result.program.nodes[i] for i in result.program.live_nodes() if result.program.nodes[i].op == "fused"]
    stats = region.stats(str(node["body"]))
    assert stats.writes_transposed and {"mul", "add", "tanh", "B"} <= set(stats.ops)
    assert len(node.inputs) == 2  # x and the bias; the 0.5 is a literal inside


def test_shared_input_is_read_once():
    result = optimize_program(p_shared(), OptimizeOptions(rules=["fusion"], cost_model=PreferFused(), limits=LIMITS))
    fused = [result.program.nodes[i] for i in result.program.live_nodes() if result.program.nodes[i].op == "fused"]
    assert len(fused) == 2 and all(len(n.inputs) == 1 for n in fused)


def test_epilogue_region_holds_the_matmul():
    result = optimize_program(p_epilogue(), OptimizeOptions(rules=["fusion"], cost_model=PreferFused(), limits=LIMITS))
    (node,) = [result.program.nodes[i] for i in result.program.live_nodes() if result.program.nodes[i].op == "fused"]
    assert region.stats(str(node["body"])).dots == 1
    assert result.program.count("dot_general") == 0


@pytest.mark.parametrize("scale_on", ["q", "k", "v"])
def test_attention_scale_prologue(scale_on):
    program = _attention_program(scale_on)
    result = optimize_program(program, OptimizeOptions(rules=WITH_FUSION, cost_model=for_device("h100"), limits=LIMITS))
    assert result.rules_fired.get("fusion.attention_prologue", 0) > 0
    (att,) = [result.program.nodes[i] for i in result.program.live_nodes() if result.program.nodes[i].op == "attention"]
    if scale_on != "v":
        assert att["scale"] == pytest.approx(0.5 if scale_on == "q" else 0.25)
        assert result.program.count("mul") + result.program.count("div") == 0
    assert_same_values(program, result.program, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- cost model


def test_roofline_prices_a_region_as_one_kernel():
    model = for_device("h100")
    t = ir.TensorType((64, 1024), "float32")
    view = ea.cost.OpView("fused", ir.Params({"body": "W[1,0](exp(mul(tanh(add($0,$1)),$0)))"}), (t, t), ir.TensorType((1024, 64), "float32"))
    br = model.breakdown(view)
    assert br.bytes == 3 * t.nbytes and br.launch_s == model.device.launch_overhead
    assert br.extra_s == pytest.approx(model._transpose_seconds(t.nbytes))  # the minor axis moves
    lone = ea.cost.OpView("fused", ir.Params({"body": "T[1,0]($0)"}), (t,), ir.TensorType((1024, 64), "float32"))
    materialised = ea.cost.OpView("transpose", ir.Params({"perm": (1, 0)}), (t,), ir.TensorType((1024, 64), "float32"))
    assert model.node_cost(lone) >= model.node_cost(materialised)  # a region never makes a transpose cheaper
    unfused = sum(
        model.node_cost(ea.cost.OpView(op, ir.Params(p), ins, out)) for op, p, ins, out in (
            ("add", {}, (t, t), t), ("tanh", {}, (t,), t), ("mul", {}, (t, t), t), ("exp", {}, (t,), t),
            ("transpose", {"perm": (1, 0)}, (t,), ir.TensorType((1024, 64), "float32")),
        )
    )
    assert br.seconds < unfused


def test_bad_region_body_is_a_clear_error():
    with pytest.raises(region.RegionSyntaxError, match="unknown op"):
        region.region_type("frobnicate($0)", [ir.TensorType((2,), "float32")])
    with pytest.raises(region.RegionSyntaxError, match="reads \\$1"):
        region.region_type("add($0,$1)", [ir.TensorType((2,), "float32")])


# ----------------------------------------------------------------------------- V through bias + rotary


BT, S, H, D = 2, 16, 2, 8
E = H * D


def rotary_block(x, wq, wk, wv, bv, cos, sin):
    def split(t):  # [B, S, E] -> [B, S, H, D]
        return t.reshape(BT, S, H, D)

    q, k = split(x @ wq), split(x @ wk)
    v = split(x @ wv) + bv  # bias add
    rotated = jnp.concatenate([-v[..., D // 2:], v[..., :D // 2]], axis=-1)
    v = v * cos[:, None, :] + rotated * sin[:, None, :]  # rotary embedding (cos/sin tables [S, D])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D ** -0.5)
    return jnp.einsum("bhqk,bkhd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _rotary_args():
    keys = jax.random.split(jax.random.PRNGKey(3), 7)
    shapes = [(BT, S, E), (E, E), (E, E), (E, E), (H, D), (S, D), (S, D)]
    return [jax.random.normal(k_, s_) for k_, s_ in zip(keys, shapes)]


def test_v_transpose_goes_into_its_bias_and_rotary_region():
    args = _rotary_args()
    model = PreferTransposedV(for_device("h100"))
    optimized = ea.optimize(rotary_block, rules=WITH_FUSION, cost_model=model, limits=Limits(iterations=30, seconds=SAFETY_NET_S))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rep = optimized.explain(*args)
        np.testing.assert_allclose(np.asarray(optimized(*args)), np.asarray(rotary_block(*args)), rtol=1e-4, atol=1e-4)
    (info,) = rep.attention
    assert info.v_layout == "BHDS"
    after = rep.after
    (att,) = [after.nodes[i] for i in after.live_nodes() if after.nodes[i].op == "attention"]
    v_node = after.nodes[att.inputs[2]]
    assert v_node.op == "fused", f"V comes from {v_node.op}\n{after}"
    stats = region.stats(str(v_node["body"]))
    assert stats.transposes, "the transpose of V is inside V's region"
    assert stats.ops.count("mul") >= 2 and "add" in stats.ops  # the rotary embedding and the bias add
    assert after.count("transpose") == 0
    assert any(r.body == v_node["body"] for r in rep.fused_regions)
    assert "fused region" in rep.summary()


# ----------------------------------------------------------------------------- cast prologue


def _attention_nodes(program: ir.Program) -> list[ir.Node]:
    return [program.nodes[i] for i in program.live_nodes() if program.nodes[i].op == "attention"]


@pytest.mark.parametrize("cast,to", [("qkv", "bfloat16"), ("q", "bfloat16"), ("kv", "float16"), ("v", "bfloat16")])
def test_cast_prologue_folds_into_attention_with_the_same_values(cast, to):
    """The casts are folded (the chosen attention reads the f32 inputs and computes in ``to``),
    and the result equals the original bit for bit on random inputs (the kernel casts first)."""
    program = p_attention_cast(cast, to)
    result = optimize_program(program, OptimizeOptions(rules=WITH_FUSION, cost_model=for_device("h100"), limits=LIMITS))
    assert result.rules_fired.get("fusion.attention_cast_prologue", 0) > 0
    (att,) = _attention_nodes(result.program)
    assert att["compute_dtype"] == to and att.type.dtype == to
    assert result.program.count("convert_element_type") == 3 - len(cast)  # only those under the tanh stay
    assert [result.program.type_of(i).dtype for i in att.inputs] == ["float32" if n in cast else to for n in "qkv"]
    assert result.program.output_types == program.output_types
    assert_same_values(program, result.program, rtol=0, atol=0)


def test_cast_prologue_is_chosen_by_the_ilp_extractor_too():
    program = p_attention_cast("qkv")
    options = OptimizeOptions(rules=WITH_FUSION, cost_model=for_device("h100"), limits=LIMITS, extractor="ilp")
    result = optimize_program(program, options)
    (att,) = _attention_nodes(result.program)
    assert att["compute_dtype"] == "bfloat16" and result.program.count("convert_element_type") == 0
    assert_same_values(program, result.program, rtol=0, atol=0)


def test_a_cast_from_an_integer_is_not_folded():
    """Only float-to-float casts fold: an integer operand cast to bf16 keeps its convert."""
    b = B()
    q = b.op("convert_element_type", b.input(2, 2, 16, 8, dtype="int32"), new_dtype="bfloat16")
    k, v = (b.op("convert_element_type", b.input(2, 2, 16, 8), new_dtype="bfloat16") for _ in range(2))
    program = b.build(b.op("attention", q, k, v, q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD",
                           scale=0.5, causal=False, mask_kind="none"))
    result = optimize_program(program, OptimizeOptions(rules=WITH_FUSION, cost_model=for_device("h100"), limits=LIMITS))
    (att,) = _attention_nodes(result.program)
    assert result.program.type_of(att.inputs[0]).dtype == "bfloat16"  # q's int32 -> bf16 convert stays
    assert result.program.nodes[att.inputs[0]].op == "convert_element_type"
    assert_same_values(program, result.program, rtol=0, atol=0)


def test_roofline_prices_the_folded_cast_below_convert_then_attention():
    """Folded: the attention reads the f32 operands once and computes at the bf16 rate; unfused:
    three converts write bf16 copies, then attention reads them."""
    model = for_device("h100")
    f32, bf16 = (ir.TensorType((4, 32, 2048, 128), dt) for dt in ("float32", "bfloat16"))
    params = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD", scale=0.1, causal=True,
                  mask_kind="none")
    plain = ea.cost.OpView("attention", ir.Params(params), (bf16,) * 3, bf16)
    folded = ea.cost.OpView("attention", ir.Params({**params, "compute_dtype": "bfloat16"}), (f32,) * 3, bf16)
    convert = ea.cost.OpView("convert_element_type", ir.Params({"new_dtype": "bfloat16"}), (f32,), bf16)
    br = model.breakdown(folded)
    assert br.bytes == 3 * f32.nbytes + bf16.nbytes  # the wider inputs, read once
    assert br.compute_s == pytest.approx(model.breakdown(plain).compute_s)  # the bf16 rate, not f32's
    assert model.node_cost(folded) < model.node_cost(plain) + 3 * model.node_cost(convert)


BT2, S2, H2, D2 = 1, 512, 2, 64  # compute-bound attention under the H100 roofline


def cast_block(x, wq, wk, wv):
    """f32 projections cast to bf16 right before attention (V as [B, S, H, D])."""
    def split(t):
        return t.reshape(BT2, S2, H2, D2).astype(jnp.bfloat16)

    q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D2 ** -0.5)
    return jnp.einsum("bhqk,bkhd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _cast_block_args():
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    shapes = [(BT2, S2, H2 * D2)] + [(H2 * D2, H2 * D2)] * 3
    x, *ws = [jax.random.normal(k_, s_) for k_, s_ in zip(keys, shapes)]
    return [x, *(w * (H2 * D2) ** -0.5 for w in ws)]  # unit-scale q, k, v: bf16 scores stay accurate


def test_jax_casts_fold_and_the_report_says_so():
    """attention(q.astype(bf16), k.astype(bf16), v.astype(bf16)) from JAX code: the chosen program
    has no converts, its attention computes in bf16 over the f32 projections, the Report shows the
    folded cast, and the values equal those of the program with the casts left unfused."""
    args = _cast_block_args()
    limits = Limits(iterations=30, seconds=SAFETY_NET_S)
    folded = ea.optimize(cast_block, rules=WITH_FUSION, cost_model=for_device("h100"), limits=limits)
    unfolded = ea.optimize(cast_block, cost_model=for_device("h100"), limits=limits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rep = folded.explain(*args)
        got, plain = np.asarray(folded(*args)), np.asarray(unfolded(*args))
    (info,) = rep.attention
    assert info.compute_dtype == "bfloat16" and set(info.cast_operands) == {"q:f32", "k:f32", "v:f32"}
    assert "cast prologue folded" in rep.summary()
    assert rep.after.count("convert_element_type") == 0
    assert rep.rules_fired.get("fusion.attention_cast_prologue", 0) > 0
    assert got.dtype == plain.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), plain.astype(np.float32))
    want = np.asarray(cast_block(*args), np.float32)  # XLA's bf16 matmuls and softmax: bf16 tolerance
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=3e-2, atol=3e-2)
    # gradients flow through the in-kernel cast to the f32 projections as through the converts
    loss = lambda fn: lambda *a: fn(*a).astype(jnp.float32).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        g_folded = jax.grad(loss(folded), argnums=(1, 2, 3))(*args)
        g_plain = jax.grad(loss(unfolded), argnums=(1, 2, 3))(*args)
    for a, b in zip(g_folded, g_plain):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_transposed_v_is_reachable_through_the_folded_cast():
    """With the cast folded, V's transpose still bubbles into its f32 projection: the attention
    reads f32 V in the transposed-V layout and casts it in-kernel."""
    args = _cast_block_args()
    model = PreferTransposedV(for_device("h100"))
    optimized = ea.optimize(cast_block, rules=WITH_FUSION, cost_model=model, limits=Limits(iterations=30, seconds=SAFETY_NET_S))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rep = optimized.explain(*args)
        got = np.asarray(optimized(*args), np.float32)
    (info,) = rep.attention
    assert info.v_layout == "BHDS" and info.compute_dtype == "bfloat16"
    (att,) = _attention_nodes(rep.after)
    assert rep.after.type_of(att.inputs[2]).dtype == "float32"
    assert rep.after.count("transpose") == 0 and rep.after.count("convert_element_type") == 0
    np.testing.assert_allclose(got, np.asarray(cast_block(*args), np.float32), rtol=3e-2, atol=3e-2)
