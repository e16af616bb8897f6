"""Capture -> lower round trips: ``optimize(f)(args) == f(args)`` on real models, plus the
decorator's cache, transformations, static arguments and errors."""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqsat_attn as ea
from eqsat_attn.ir import ProgramBuilder, TensorType
from work_limits import SAFETY_NET_S


def _normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def assert_same_outputs(got, want, rtol: float = 2e-6, atol: float = 2e-6) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert jnp.shape(g) == jnp.shape(w)
        assert jnp.result_type(g) == jnp.result_type(w)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


#: Small saturation limits: these tests check capture and lowering, not how far the search goes.
FAST = ea.Limits(iterations=3, nodes=20_000, seconds=SAFETY_NET_S)


def round_trip(fn, *args, **tol):
    """Check optimize(fn) against fn; return the captured program."""
    optimized = ea.optimize(fn, limits=FAST)
    assert_same_outputs(optimized(*args), fn(*args), **tol)
    return optimized.explain(*args).before


# ---------------------------------------------------------------- corpus


def test_mlp() -> None:
    def mlp(params, x):
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    sizes = [6, 16, 16, 3]
    params = [(_normal(i, (m, n)), _normal(10 + i, (n,))) for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
    program = round_trip(mlp, params, _normal(99, (5, 6)), rtol=1e-5, atol=1e-5)
    assert program.count("dot_general") == 3 and program.count("opaque") == 0


def test_layer_norm() -> None:
    def layer_norm(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias

    program = round_trip(layer_norm, _normal(0, (4, 8)), _normal(1, (8,)), _normal(2, (8,)), rtol=1e-5, atol=1e-5)
    assert program.count("rsqrt") == 1 and program.count("opaque") == 0


def test_rope() -> None:
    def rope(x):  # x [B, S, H, D]
        _, s, _, d = x.shape
        inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        angles = jnp.arange(s, dtype=jnp.float32)[:, None] * inv_freq[None, :]
        sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape)

    round_trip(rope, _normal(0, (2, 6, 2, 8)), rtol=1e-5, atol=1e-5)


def test_flax_linen_multi_head_attention() -> None:
    import flax.linen as nn

    module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = _normal(0, (2, 5, 8))
    params = module.init(jax.random.key(1), x, x)
    program = round_trip(lambda p, x: module.apply(p, x, x), params, x, rtol=1e-5, atol=1e-5)
    assert program.count("dot_general") >= 6  # q, k, v, scores, p@v, output projection


def test_equinox_multihead_attention_under_vmap() -> None:
    import equinox as eqx

    mha = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, key=jax.random.key(0))
    xs = _normal(1, (3, 5, 8))
    optimized = ea.optimize(lambda x: mha(x, x, x), limits=FAST)
    got = jax.vmap(optimized)(xs)
    want = jax.vmap(lambda x: mha(x, x, x))(xs)
    assert_same_outputs(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_jax_nn_dot_product_attention_causal(kv_heads: int) -> None:
    q = _normal(0, (2, 6, 4, 8))
    k, v = _normal(1, (2, 6, kv_heads, 8)), _normal(2, (2, 6, kv_heads, 8))
    fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    program = round_trip(fn, q, k, v, rtol=1e-5, atol=1e-5)
    assert program.count("opaque") == 0 and program.count("exp") == 1


def test_scan_and_cond_become_opaque_nodes() -> None:
    def fn(x):
        total, partials = lax.scan(lambda c, row: (c + row.sum(), c * row), 0.0, x)
        flipped = lax.cond(total > 0, lambda y: y, lambda y: -y, x)
        return partials + flipped

    program = round_trip(fn, _normal(0, (3, 4)), rtol=1e-6, atol=1e-6)
    names = sorted(program.nodes[i]["call"].name for i in program.live_nodes() if program.nodes[i].op == "opaque")
    assert names == ["cond", "scan"]
    assert program.count("opaque_output") == 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_tanh_derivative_is_modelled_bit_for_bit(dtype) -> None:
    """tanh's derivative (jax 0.12's ``one_minus_square``, or how an older jax writes it) is captured
    as modelled ops, not opaque, with the program's values bit for bit: ±0, denormals, ±1 and
    their neighbours, huge values, infinities and NaN."""
    special = np.array([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 0.9999999, 1.0000001, 0.5, 3e19, -3e19, 1e38,
                        np.inf, -np.inf, np.nan], np.float32)
    x = jnp.asarray(special).astype(dtype)
    fn = jax.vmap(jax.grad(jnp.tanh))
    optimized = ea.optimize(fn, limits=FAST)
    program = optimized.explain(x).before
    assert program.count("opaque") == 0, str(program)
    got, want = np.asarray(optimized(x)), np.asarray(jax.jit(fn)(x))
    bits = np.uint32 if dtype == jnp.float32 else np.uint16
    assert np.array_equal(got.view(bits), want.view(bits)), (got, want)


def test_dict_of_outputs_with_duplicates_inputs_and_literals() -> None:
    fn = lambda x, y: {"sum": x + y, "x": x, "again": (x, x + y), "two": jnp.float32(2.0)}
    program = round_trip(fn, _normal(0, (3,)), _normal(1, (3,)))
    again_x, again_sum, total, two, same_x = program.outputs  # leaves in sorted key order
    assert again_x == same_x == program.inputs[0]  # outputs that are inputs, duplicated
    assert again_sum == total and program.nodes[total].op == "add"
    assert program.nodes[two].op == "literal" and program.nodes[two]["value"] == 2.0


def test_bf16_dtype_is_preserved() -> None:
    fn = lambda x, w: jnp.tanh(x @ w) * 2.0
    x, w = _normal(0, (4, 8), jnp.bfloat16), _normal(1, (8, 4), jnp.bfloat16)
    program = round_trip(fn, x, w, rtol=1e-2, atol=1e-2)
    assert ea.optimize(fn, limits=FAST)(x, w).dtype == jnp.bfloat16
    assert all(program.type_of(i).dtype == "bfloat16" for i in program.outputs)


@pytest.mark.parametrize("fn", [jax.nn.softmax, jax.nn.gelu, jax.nn.relu], ids=["softmax", "gelu", "relu"])
def test_custom_jvp_activations_are_inlined(fn) -> None:
    program = round_trip(fn, _normal(0, (3, 5)), rtol=1e-6, atol=1e-6)
    assert program.count("opaque") == 0


def test_custom_vjp_stays_opaque() -> None:
    @jax.custom_vjp
    def clip_grad_sin(x):
        return jnp.sin(x)

    clip_grad_sin.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda cos, g: (jnp.clip(g * cos, -1, 1),))
    program = round_trip(lambda x: clip_grad_sin(x) * 3.0, _normal(0, (4,)))
    assert program.count("opaque") == 1 and program.count("sin") == 0  # its backward is user code


def test_nested_jit_is_inlined() -> None:
    inner = jax.jit(lambda a, b: jnp.exp(a) * b)
    program = round_trip(lambda x, y: inner(x, y) + inner(y, x), _normal(0, (2, 3)), _normal(1, (2, 3)))
    assert program.count("opaque") == 0 and program.count("exp") == 2


def test_prng_keys_as_argument_and_closed_over() -> None:
    key, x = jax.random.key(3), _normal(0, (2, 3))
    program = round_trip(lambda x, k: x + jax.random.normal(k, x.shape), x, key)
    assert program.input_types[1].dtype.startswith("key")
    program = round_trip(lambda x: x * jax.random.uniform(key, x.shape), x)
    assert len(program.inputs) == 2  # the closed-over key is passed in, not embedded


def test_implicit_broadcasts_are_made_explicit() -> None:
    program = ea.capture(lambda x: x / x.sum(-1, keepdims=True) * 2.0, _normal(0, (2, 4))).program
    for i in program.live_nodes():
        node = program.nodes[i]
        if node.op in ("div", "mul"):
            assert all(program.type_of(j).shape == (2, 4) for j in node.inputs), str(program)


# ---------------------------------------------------------------- attention lowering


def _numpy_attention(q, k, v, scale, causal, bias=None):
    """q [B,H,Sq,D], k/v [B,Hkv,Sk,D] -> [B,H,Sq,D] in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


def _attention_program(q_shape, k_shape, v_shape, o_shape, layouts, causal, mask_kind, mask_shape=None):
    b = ProgramBuilder()
    ins = [b.input(TensorType(s, "float32")) for s in (q_shape, k_shape, v_shape)]
    if mask_shape is not None:
        ins.append(b.input(TensorType(mask_shape, "float32")))
    q_layout, k_layout, v_layout, o_layout = layouts
    out = b.add(
        "attention", ins, TensorType(o_shape, "float32"), q_layout=q_layout, k_layout=k_layout,
        v_layout=v_layout, o_layout=o_layout, scale=0.25, causal=causal, mask_kind=mask_kind,
    )
    return b.build([out])


def test_attention_node_lowers_to_softmax_attention() -> None:
    pytest.importorskip("eqsat_attn.kernels", reason="eqsat_attn.kernels (the attention kernels) is not importable")
    bsz, h, hkv, s, d = 2, 4, 2, 6, 8
    q_bhsd, k_bhsd, v_bhsd = _normal(0, (bsz, h, s, d)), _normal(1, (bsz, hkv, s, d)), _normal(2, (bsz, hkv, s, d))
    want = _numpy_attention(q_bhsd, k_bhsd, v_bhsd, 0.25, causal=True)

    # q, k and o in BSHD, V stored transposed (BHDS): the lowering must move axes both ways
    q, k, v = q_bhsd.transpose(0, 2, 1, 3), k_bhsd.transpose(0, 2, 1, 3), v_bhsd.transpose(0, 1, 3, 2)
    program = _attention_program(q.shape, k.shape, v.shape, (bsz, s, h, d), ("BSHD", "BSHD", "BHDS", "BSHD"), True, "none")
    (got,) = jax.jit(ea.lower(program, attention_kernel="reference"))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)

    bias = _normal(3, (bsz, 1, s, s))
    program = _attention_program(q_bhsd.shape, k_bhsd.shape, v_bhsd.shape, q_bhsd.shape, ("BHSD",) * 4, False, "bias", bias.shape)
    (got,) = ea.lower(program, attention_kernel="reference")(q_bhsd, k_bhsd, v_bhsd, bias)
    want = _numpy_attention(q_bhsd, k_bhsd, v_bhsd, 0.25, causal=False, bias=bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_report_lists_attention_nodes() -> None:
    program = _attention_program((1, 4, 3, 8), (1, 2, 3, 8), (1, 2, 8, 3), (1, 3, 4, 8), ("BHSD", "BHSD", "BHDS", "BSHD"), True, "none")
    (info,) = ea.report.attention_infos(program, "reference")
    assert (info.v_layout, info.causal, info.groups, info.o_layout, info.kernel) == ("BHDS", True, 2, "BSHD", "reference")
    report = ea.Report(before=program, after=program, attention=[info])
    assert "v=BHDS" in str(report) and "GQA groups=2" in str(report)


# ---------------------------------------------------------------- the decorator


def test_cache_hits_on_same_shapes_and_misses_on_new_shapes() -> None:
    @ea.optimize
    def fn(x):
        return jnp.tanh(x) * x

    fn(_normal(0, (2, 3)))
    fn(_normal(1, (2, 3)))
    assert fn.cache_info()[:3] == (1, 1, 1)  # hits, misses, size
    fn(_normal(2, (4, 3)))
    fn(_normal(3, (2, 3), jnp.bfloat16))
    assert fn.cache_info()[:3] == (1, 3, 3)


def test_grad_through_optimized_function_matches() -> None:
    fn = lambda w, x: jnp.sum(jax.nn.softmax(jnp.tanh(x @ w)) ** 2)
    w, x = _normal(0, (4, 5)), _normal(1, (3, 4))
    got = jax.grad(ea.optimize(fn, limits=FAST))(w, x)
    np.testing.assert_allclose(got, jax.grad(fn)(w, x), rtol=1e-5, atol=1e-6)


def test_vmap_over_optimized_function() -> None:
    fn = lambda x, w: jax.nn.gelu(x @ w)
    xs, w = _normal(0, (5, 3, 4)), _normal(1, (4, 2))
    got = jax.vmap(ea.optimize(fn, limits=FAST), in_axes=(0, None))(xs, w)
    assert_same_outputs(got, jax.vmap(fn, in_axes=(0, None))(xs, w), rtol=1e-5, atol=1e-6)


def test_call_inside_jit_and_closure_over_tracer() -> None:
    optimized = ea.optimize(lambda x, y: jnp.exp(x) - y, limits=FAST)
    x, y = _normal(0, (3,)), _normal(1, (3,))

    @jax.jit
    def outer(x, y):
        scaled = ea.optimize(lambda a: a * y, limits=FAST)(x)  # closes over a tracer of the outer jit
        return optimized(x, y) + scaled

    assert_same_outputs(outer(x, y), jnp.exp(x) - y + x * y)


def test_static_argnums() -> None:
    def fn(x, mode, power):
        return jnp.sin(x) ** power if mode == "sin" else jnp.cos(x) ** power

    optimized = ea.optimize(fn, static_argnums=(1, -1), limits=FAST)
    x = _normal(0, (4,))
    assert_same_outputs(optimized(x, "sin", 2), fn(x, "sin", 2))
    assert_same_outputs(optimized(x, "cos", 3), fn(x, "cos", 3))
    optimized(x, "cos", 3)
    assert optimized.cache_info()[:3] == (1, 2, 2)


def test_python_scalars_are_weak_arrays() -> None:
    optimized = ea.optimize(lambda x, s: x * s, limits=FAST)
    x = _normal(0, (3,), jnp.bfloat16)
    out = optimized(x, 1.5)
    assert out.dtype == jnp.bfloat16
    assert_same_outputs(out, x * 1.5)


def test_string_argument_raises_type_error_naming_it() -> None:
    optimized = ea.optimize(lambda x, name: x, limits=FAST)
    with pytest.raises(TypeError, match=r"positional argument 1 is a str.*static_argnums=\(1,\)"):
        optimized(_normal(0, (2,)), "relu")
    with pytest.raises(TypeError, match=r"positional argument 0 at \['cfg'\] is a object"):
        optimized({"cfg": object()}, _normal(0, (2,)))


def test_unhashable_static_argument_is_a_clear_error() -> None:
    optimized = ea.optimize(lambda x, axes: x.sum(axes), static_argnums=1, limits=FAST)
    with pytest.raises(TypeError, match="not hashable"):
        optimized(_normal(0, (2, 3)), [0])


def test_optimizer_failure_warns_and_keeps_values(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(program, options, **kwargs):
        raise RuntimeError("e-graph exploded")

    monkeypatch.setattr(importlib.import_module("eqsat_attn.optimize"), "optimize_program", broken)
    fn = lambda x: jnp.tanh(x) + 1.0
    optimized = ea.optimize(fn, limits=FAST)
    x = _normal(0, (3,))
    with pytest.warns(RuntimeWarning, match="e-graph exploded"):
        out = optimized(x)
    assert_same_outputs(out, fn(x))
    report = optimized.explain(x)
    assert any("e-graph exploded" in w for w in report.warnings)
    assert report.after == report.before


def test_explain_report_and_output_types() -> None:
    optimized = ea.optimize(lambda x, w: (x @ w).astype(jnp.bfloat16), limits=FAST)
    x, w = _normal(0, (2, 3)), _normal(1, (3, 5))
    out = optimized(x, w)
    assert out.shape == (2, 5) and out.dtype == jnp.bfloat16
    report = optimized.explain(x, w)
    assert isinstance(report, ea.Report)
    assert report.after.output_types == (TensorType((2, 5), "bfloat16"),)
    assert set(report.timings) == {"trace", "optimize", "lower"}
    assert "dot_general" in str(report) and report.attention == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized(x, w)


def test_custom_vjp_backward_is_kept():
    """A custom_vjp's backward is user code (here gradient clipping): it stays opaque and runs."""

    @jax.custom_vjp
    def clip_gradient(x):
        return x

    clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))

    def f(x):
        return (clip_gradient(x * 3.0) ** 2).sum() + jnp.tanh(x).sum()

    x = jnp.asarray(np.random.default_rng(0).standard_normal(5), jnp.float32)
    optimized = ea.optimize(f)
    np.testing.assert_allclose(jax.grad(optimized)(x), jax.grad(f)(x), rtol=1e-6)
    assert any(optimized.explain(x).before.nodes[i].op == "opaque" for i in range(len(optimized.explain(x).before)))


def test_custom_vjp_attention_is_raised_and_its_backward_kept():
    """A custom_vjp whose primal computes attention (a kernel's reference forward) is inlined for
    the rules and raised; its hand-written backward (here clipped) still gives jax.grad."""

    def attention(q, k, v):
        return jax.nn.softmax(q @ k.swapaxes(-1, -2) * 0.5, axis=-1) @ v

    @jax.custom_vjp
    def clipped_attention(q, k, v):
        return attention(q, k, v)

    def backward(saved, g):
        grads = jax.vjp(attention, *saved)[1](g)
        return tuple(jnp.clip(d, -0.05, 0.05) for d in grads)

    clipped_attention.defvjp(lambda q, k, v: (attention(q, k, v), (q, k, v)), backward)

    def f(q, k, v):
        return clipped_attention(q, k, v) * 2.0

    q, k, v = (_normal(seed, (2, 2, 8, 4)) for seed in (1, 2, 3))
    optimized = ea.optimize(f, limits=ea.Limits(iterations=20, seconds=SAFETY_NET_S))
    report = optimized.explain(q, k, v)
    assert len(report.attention) == 1 and report.before.count("opaque") == 0
    np.testing.assert_allclose(optimized(q, k, v), f(q, k, v), rtol=1e-5, atol=1e-6)
    loss = lambda fn: jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2))  # noqa: E731
    for got, want in zip(loss(optimized)(q, k, v), loss(f)(q, k, v), strict=True):
        assert float(jnp.abs(want).max()) == pytest.approx(0.05)  # the clip decided it
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_custom_jvp_rules_still_give_the_derivatives():
    """A custom_jvp is inlined for the rules; its derivative rule (a straight-through
    estimator here) still decides jax.grad and jax.jvp of the optimized function."""

    @jax.custom_jvp
    def straight_through_round(x):
        return jnp.round(x)

    straight_through_round.defjvp(lambda primals, tangents: (straight_through_round(primals[0]), tangents[0]))

    def f(x):
        y = jnp.transpose(jnp.transpose(x) * 2.0)
        return (straight_through_round(y) * jnp.sin(x)).sum()

    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.float32)
    optimized = ea.optimize(f)
    np.testing.assert_allclose(optimized(x), f(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(optimized)(x), jax.grad(f)(x), rtol=1e-5)
    t = jnp.ones_like(x) * 0.5
    np.testing.assert_allclose(jax.jvp(optimized, (x,), (t,))[1], jax.jvp(f, (x,), (t,))[1], rtol=1e-5)


def test_float_cast_of_a_literal_is_folded_with_the_rounded_value() -> None:
    """A bf16 mask value written as an f32 literal (-1e9) becomes one bf16 literal holding the
    value XLA's cast produces, so the attention rules see a literal mask value."""

    def masked(s):
        keep = jnp.tril(jnp.ones(s.shape[-2:], bool))
        return jnp.where(keep, s, -1e9) * 3  # jnp.where casts the f32 literal inside its jaxpr

    s = _normal(5, (4, 6, 6)).astype(jnp.bfloat16)
    program = round_trip(masked, s, rtol=0, atol=0)
    literals = [n for n in program.nodes if n.op == "literal" and n.type.dtype == "bfloat16"]
    want = float(np.asarray(-1e9, np.float32).astype(jnp.bfloat16))
    assert want != -1e9 and any(n.params["value"] == want for n in literals)
    assert not any(n.op == "convert_element_type" and program.nodes[n.inputs[0]].op == "literal"
                   for n in program.nodes)
