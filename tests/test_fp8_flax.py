"""fp8 attention written with flax's own fp8 ops: Q, K and V pass through flax's
quantize-dequantize (``flax.linen.fp8_ops``: ``in_qdq``, the custom_vjp that
``Fp8DotGeneralOp`` applies to each operand, and ``qdq``), whose scales are ``(1,)``-shaped
arrays. The optimizer raises the attention to one ``attention_fp8`` op; values and
gradients equal the original program on random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax.linen import fp8_ops  # noqa: E402

import eqsat_attn as ea  # noqa: E402

E4M3 = jnp.float8_e4m3fn
HEADS, HEAD_DIM, EMBED = 2, 8, 32


class Fp8QDQ(fp8_ops.Fp8DotGeneralBase):
    """flax's fp8 quantize-dequantize of one operand, with the scale and amax-history variables
    flax's fp8 dot ops keep (scales shaped (1,))."""

    amax_history_length: int = 16

    def __call__(self, x):
        return fp8_ops.in_qdq(x.dtype, self.e4m3_dtype, x, self.input_scale.value, self.input_amax_history.value)


class Fp8AttentionBlock(nn.Module):
    """Projections, fp8 quantize-dequantize of Q, K and V, flax's dot_product_attention."""

    causal: bool = False

    @nn.compact
    def __call__(self, x):
        q, k, v = (Fp8QDQ(name=f"{n}_fp8")(nn.DenseGeneral((HEADS, HEAD_DIM), name=n)(x)) for n in "qkv")
        mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
        return nn.dot_product_attention(q, k, v, mask=mask)


def random_variables(module, seed, s=16):
    """Parameters, fp8 scales and amax histories all random (a history of past amaxes sets the
    scale the quantize uses, so scales and histories both matter)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, s, EMBED)), jnp.float32)
    variables = module.init(jax.random.PRNGKey(seed), x)

    def randomize(path, leaf):
        name = jax.tree_util.keystr(path)
        if "amax_history" in name:
            return jnp.asarray(rng.uniform(0.5, 6.0, size=leaf.shape), jnp.float32)
        if "scale" in name:
            return jnp.asarray(rng.uniform(0.005, 0.05, size=leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32)

    return jax.tree_util.tree_map_with_path(randomize, variables), x


def fp8_nodes(program):
    return [n for n in program.nodes if n.op == "attention_fp8"]


@pytest.mark.parametrize("causal", [False, True])
def test_flax_fp8_qdq_attention_is_raised_to_fp8_attention(causal):
    module = Fp8AttentionBlock(causal=causal)
    fn = lambda variables, x: module.apply(variables, x)
    opt = ea.optimize(fn)
    variables, x = random_variables(module, 0)
    assert variables["_overwrite_with_gradient"]["q_fp8"]["input_scale"].shape == (1,)
    rep = opt.explain(variables, x)
    (node,) = fp8_nodes(rep.after)
    assert not [n for n in rep.after.nodes if n.op == "attention"]
    assert [rep.after.type_of(i).dtype for i in node.inputs] == ["float8_e4m3fn"] * 3 + ["float32"] * 3
    assert [rep.after.type_of(i).shape for i in node.inputs[3:]] == [()] * 3
    assert bool(node.params["causal"]) == causal
    for family in ("single_element_scale", "scalar_into_scale", "raise_dequantized"):
        assert rep.rules_fired.get(f"fp8_attention.{family}", 0) > 0, family
    for seed in (1, 2):  # random parameters, scales, histories and inputs
        variables, x = random_variables(module, seed)
        np.testing.assert_allclose(np.asarray(opt(variables, x)), np.asarray(jax.jit(fn)(variables, x)),
                                   rtol=2e-5, atol=2e-5)


def test_flax_fp8_gradients_are_flax_own():
    """flax's quantize-dequantize is a custom_vjp (straight-through gradient; the new scale and
    amax history are returned as the gradients of the fp8 variables): jax.grad of the optimized
    function gives exactly those."""
    module = Fp8AttentionBlock()
    variables, x = random_variables(module, 3)
    w = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, HEADS, HEAD_DIM)), jnp.float32)
    loss = lambda variables, x: (module.apply(variables, x) * w).sum()
    opt = ea.optimize(loss)
    assert fp8_nodes(opt.explain(variables, x).after)
    got, want = jax.grad(opt)(variables, x), jax.grad(loss)(variables, x)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    fp8_state = want["_overwrite_with_gradient"]["v_fp8"]["input_scale"]
    assert not np.allclose(fp8_state, variables["_overwrite_with_gradient"]["v_fp8"]["input_scale"])
    size = max(float(jnp.max(jnp.abs(e))) for e in jax.tree_util.tree_leaves(want))
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        # (the K bias's gradient is zero up to rounding: softmax ignores a shift of the scores)
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5 * size)


@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scalar", "one-element"])
def test_flax_qdq_function_with_scalar_or_one_element_scales(scale_shape):
    """flax's plain ``fp8_ops.qdq`` (no custom_vjp) on Q, K, V with scalar or (1,) scales, V
    stored [B, H, D, S]: raised, V read in place in the transposed-V layout."""

    def fn(q, k, vt, qs, ks, vs):
        q, k, vt = (fp8_ops.qdq(a, E4M3, sc, jnp.float32) for a, sc in ((q, qs), (k, ks), (vt, vs)))
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * HEAD_DIM ** -0.5, axis=-1)
        return jnp.einsum("bhqk,bhdk->bhqd", p, vt)

    def args(seed):
        rng = np.random.default_rng(seed)
        xs = [jnp.asarray(rng.normal(size=shp) * a, jnp.float32)
              for shp, a in (((1, 2, 16, 8), 2.0), ((1, 2, 16, 8), 1.0), ((1, 2, 8, 16), 3.0))]
        scales = [jnp.asarray(jnp.max(jnp.abs(a)) / 448.0 * rng.uniform(0.9, 1.5)).reshape(scale_shape) for a in xs]
        return xs + scales

    opt = ea.optimize(fn)
    rep = opt.explain(*args(0))
    (node,) = fp8_nodes(rep.after)
    assert rep.attention[0].v_layout == "BHDS"
    assert [rep.after.type_of(i).dtype for i in node.inputs[:3]] == ["float8_e4m3fn"] * 3
    for seed in (1, 2):
        a = args(seed)
        np.testing.assert_allclose(np.asarray(opt(*a)), np.asarray(jax.jit(fn)(*a)), rtol=2e-5, atol=2e-5)
