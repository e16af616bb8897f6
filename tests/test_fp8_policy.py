"""The opt-in fp8 precision policy: ``ea.optimize(precision="fp8")`` may run bf16 attention as fp8
attention over per-tensor-quantized Q, K, V; the default never does, and the cost table decides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn.cost import for_device
from eqsat_attn.pipeline import OptimizeOptions
from work_limits import SAFETY_NET_S

FAST = ea.Limits(iterations=12, nodes=50_000, seconds=SAFETY_NET_S)
#: Documented tolerance of the policy (README, "Precision policy"): |o - o_bf16| <= 0.1·max|v|.
POLICY_ATOL = 0.1


def attention(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / 4.0
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def bf16_args(seed: int, b=1, h=2, s=32, d=16):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(b, h, s, d)) * a, jnp.bfloat16) for a in (1.5, 1.0, 2.0)]


def fp8_friendly_model():
    """The H100 roofline with fp8 attention priced at 90% of the fp8 peak (cuDNN-like), so that
    fp8 attention is cheaper than our bf16 kernel."""
    model = for_device("h100")
    for variant in ("standard", "transposed"):
        for causal in (False, True):
            model = model.with_attention_efficiency("float8_e4m3fn", variant, causal, 0.9)
    return model


class PreferFp8:
    """Values check at small shapes: bf16 attention and matmuls very dear, everything else cheap."""

    name = "prefer-fp8"

    def node_cost(self, node) -> float:
        return {"attention": 1e12, "dot_general": 1e6}.get(node.op, 1.0)


PRODUCTION = [jax.ShapeDtypeStruct((4, 32, 4096, 128), jnp.bfloat16)] * 3  # priced, never run


def ops(program) -> list[str]:
    return [program.nodes[i].op for i in program.live_nodes()]


def test_fp8_policy_introduces_fp8_attention_within_tolerance():
    args = bf16_args(0)
    opt = ea.optimize(attention, precision="fp8", cost_model=PreferFp8(), limits=FAST)
    report = opt.explain(*args)
    assert "attention_fp8" in ops(report.after) and "attention" not in ops(report.after)
    assert report.rules_fired.get("fp8_policy.introduce_fp8", 0) >= 1
    got = np.asarray(opt(*args), np.float32)
    want = np.asarray(attention(*args), np.float32)
    err = np.abs(got - want).max()
    assert 0 < err <= POLICY_ATOL * float(np.abs(np.asarray(args[2], np.float32)).max()), err
    assert got.dtype == np.float32 and opt(*args).dtype == jnp.bfloat16


def test_fp8_friendly_table_picks_fp8_at_production_shape():
    """With fp8 attention at 90% of the fp8 peak (what cuDNN's fp8 reaches), quantizing Q, K, V
    (memory-bound passes) plus fp8 attention beats bf16 attention at B4 H32 S4096 D128."""
    report = ea.optimize(attention, precision="fp8", cost_model=fp8_friendly_model(), limits=FAST).explain(
        *PRODUCTION)
    assert "attention_fp8" in ops(report.after)
    assert report.cost_after < report.cost_before


def test_default_precision_never_introduces_fp8():
    args = bf16_args(1)
    report = ea.optimize(attention, cost_model=PreferFp8(), limits=FAST).explain(*args)
    assert "attention_fp8" not in ops(report.after)
    assert not any(name.startswith("fp8_policy") for name in report.rules_fired)


def test_hopper_table_keeps_bf16_when_quantizing_costs_more_than_fp8_saves():
    """Measured on an H200: our fp8 kernel (Mosaic GPU, transposed V) runs at 682 TFLOP/s, our bf16
    kernel at 565, which saves 0.34 ms at B4 H32 S4096 D128. Quantizing Q, K and V at run time
    reads each bf16 tensor twice (amax, then the cast) and writes it as fp8, 0.30 ms of memory
    traffic at the least, and V must then be transposed (0.13 ms more): so with Q, K, V given in
    bf16 the Hopper model keeps bf16 attention even when fp8 is allowed."""
    h100 = for_device("h100").device
    fp8_rate = h100.attention_eff("float8_e4m3fn", "transposed", False) * h100.peak("float8_e4m3fn")
    bf16_rate = h100.attention_eff("bfloat16", "standard", False) * h100.peak("bfloat16")
    flops = 4 * 4 * 32 * 4096 * 4096 * 128
    saved = flops / bf16_rate - flops / fp8_rate
    bf16_bytes = 4 * 32 * 4096 * 128 * 2
    quantize_floor = 3 * (2 * bf16_bytes + bf16_bytes // 2) / h100.bandwidth
    transpose_v8 = bf16_bytes / (h100.bandwidth * h100.transpose_bandwidth_fraction)  # read + write fp8
    assert fp8_rate > bf16_rate and quantize_floor < saved < quantize_floor + transpose_v8
    report = ea.optimize(attention, precision="fp8", cost_model=for_device("h100"), limits=FAST).explain(
        *PRODUCTION)
    assert "attention" in ops(report.after) and "attention_fp8" not in ops(report.after)


def test_fp8_policy_gradients_are_finite_and_close():
    args = bf16_args(3)
    opt = ea.optimize(attention, precision="fp8", cost_model=PreferFp8(), limits=FAST)
    loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2))  # noqa: E731
    got = jax.grad(loss(opt), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(attention), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g))
        assert np.linalg.norm(g - w) <= 0.25 * np.linalg.norm(w)


@pytest.mark.parametrize("loss_scale", [1.0, 1e-3])
def test_fp8_policy_gradients_do_not_underflow(loss_scale):
    """The cotangent of a quantized operand x8 is g·s (s = amax/448): with a mean loss every
    entry is below e4m3's smallest value (2^-9), so rounded to fp8, as JAX's dtype rule for fp8
    values has it, all of them were zero. The gradients pass straight through the rounding
    (`kernels.fp8_straight_through`) and keep the forward's accuracy."""
    args = bf16_args(4)
    opt = ea.optimize(attention, precision="fp8", cost_model=PreferFp8(), limits=FAST)
    assert "attention_fp8" in ops(opt.explain(*args).after)
    loss = lambda f: (lambda *a: loss_scale * jnp.mean(f(*a).astype(jnp.float32) ** 2))  # noqa: E731
    got = jax.grad(loss(opt), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(attention), argnums=(0, 1, 2))(*args)
    for x, g, w in zip(args, got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        descale = np.abs(np.asarray(x, np.float32)).max() / 448
        assert np.abs(w).max() * descale < 2.0 ** -9
        assert np.count_nonzero(g) > 0.9 * g.size
        assert np.linalg.norm(g - w) <= 0.15 * np.linalg.norm(w)


def test_unknown_precision_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="precision must be one of"):
        OptimizeOptions(precision="int4")
