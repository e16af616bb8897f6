"""A matmul's ``precision=``: HIGHEST is modelled (and kept through every rewrite and lowering),
other non-default precisions stay opaque, and attention is raised from HIGHEST matmuls because
every lowering of the op multiplies float32 at HIGHEST (kernels/reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqsat_attn as ea
from eqsat_attn.capture import capture
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program
from test_qkv import FUSE
from test_rules import B, assert_same_values
from work_limits import SAFETY_NET_S

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to the original program fails
LIMITS = Limits(iterations=12, nodes=50_000, seconds=SAFETY_NET_S)
HI = lax.Precision.HIGHEST


def _dots(program) -> list:
    return [n for n in program.nodes if n.op == "dot_general"]


@pytest.mark.parametrize("precision, dtype, modelled", [
    (None, jnp.float32, ""),
    (lax.Precision.DEFAULT, jnp.float32, ""),
    (HI, jnp.float32, "highest"),
    ((HI, HI), jnp.bfloat16, "highest"),
    (lax.DotAlgorithmPreset.F32_F32_F32, jnp.float32, "highest"),
    (lax.DotAlgorithmPreset.BF16_BF16_F32, jnp.bfloat16, ""),
    (lax.Precision.HIGH, jnp.float32, None),
    ((HI, lax.Precision.DEFAULT), jnp.float32, None),
    (lax.DotAlgorithmPreset.TF32_TF32_F32, jnp.float32, None),
])
def test_capture_models_default_and_highest_only(precision, dtype, modelled):
    x, w = jnp.ones((4, 8), dtype), jnp.ones((8, 3), dtype)
    program = capture(lambda x, w: lax.dot(x, w, precision=precision), x, w).program
    if modelled is None:
        assert not _dots(program) and any(n.op == "opaque" for n in program.nodes), program
    else:
        (dot,) = _dots(program)
        assert dot.params.get("precision", "") == modelled


@pytest.mark.parametrize("preset, half, modelled", [
    (lax.DotAlgorithmPreset.BF16_BF16_F32, jnp.bfloat16, "bf16_bf16_f32"),
    (lax.DotAlgorithmPreset.F16_F16_F32, jnp.float16, "f16_f16_f32"),
    (lax.DotAlgorithmPreset.BF16_BF16_F32, jnp.float16, None),  # another half type: opaque
])
def test_half_preset_over_a_mixed_pair_is_modelled_and_lowered_back(preset, half, modelled):
    """jax.grad transposes a half-precision dot that asked for a preset into a dot of a float32
    cotangent and a half operand with that preset: it is modelled with the preset's name, and
    lowering asks for the same preset (the lowered StableHLO names its algorithm)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 8)) * np.exp(rng.uniform(-20, 20, (4, 8))), jnp.float32)
    x = x.at[0, :3].set(jnp.array([-0.0, 1e-40, 3e38], jnp.float32))
    w = jnp.asarray(rng.standard_normal((8, 3)), half)

    def fn(x, w):
        return lax.dot(x, w, precision=preset, preferred_element_type=jnp.float32)

    program = capture(fn, x, w).program
    if modelled is None:
        assert not _dots(program) and any(n.op == "opaque" for n in program.nodes), program
        return
    (dot,) = _dots(program)
    assert dot.params["precision"] == modelled
    lowered = ea.lower(program)
    np.testing.assert_array_equal(np.asarray(lowered(x, w)[0]), np.asarray(fn(x, w)))
    text = jax.jit(lambda x, w: lowered(x, w)[0]).lower(x, w).as_text()
    assert any("dot_general" in line and "lhs_precision_type" in line for line in text.splitlines()), text


def _matmul_chain(x, w1, w2, b):
    h = jnp.tanh(jnp.matmul(x, w1, precision=HI) + b)
    return jnp.matmul(h, w2, precision=HI).T * 2.0


def test_highest_survives_rewrites_and_lowering():
    """Transposes folded into the matmuls, epilogues fused: every matmul the optimized function
    runs still asks for HIGHEST (the lowered StableHLO says so), and values are equal."""
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((16, 32), (32, 24), (24, 8), (24,))]
    args[0] = args[0].at[0, :4].set(jnp.array([0.0, -0.0, 3e38, 1e-40], jnp.float32))
    optimized = ea.optimize(_matmul_chain, limits=LIMITS)
    np.testing.assert_allclose(optimized(*args), _matmul_chain(*args), rtol=2e-6, atol=2e-6)
    text = jax.jit(optimized).lower(*args).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("HIGHEST" in line for line in dots), dots


def test_projections_of_different_precisions_are_not_merged():
    """Sibling projections merge into one matmul only when they ask for the same precision."""
    b = B(); x = b.input(2, 3, 8); w1 = b.input(8, 4); w2 = b.input(8, 6); w3 = b.input(8, 4)
    dots = [b.op("dot_general", x, w, lhs_contract=(2,), rhs_contract=(0,), lhs_batch=(), rhs_batch=(),
                 preferred_element_type=None, **({"precision": "highest"} if w == w2 else {}))
            for w in (w1, w2, w3)]
    program = b.build(b.op("concatenate", *[b.op("tanh", d) for d in dots], dimension=2))
    result = optimize_program(program, OptimizeOptions(rules=["projections"], cost_model=FUSE, limits=LIMITS,
                                                       extractor="ilp"))
    chosen = _dots(result.program)
    assert len(chosen) == 2, result.program  # w1 and w3 merged, w2 on its own
    assert sorted(d.params.get("precision", "") for d in chosen) == ["", "highest"]
    assert_same_values(program, result.program, rtol=1e-4, atol=1e-5)


def test_attention_from_highest_matmuls_is_raised_with_equal_values():
    """float32 attention written with HIGHEST matmuls becomes the Attention op; inputs include
    signed zeros, denormals, large scores and an infinite value."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
    q[0, 0, 0, :4] = [0.0, -0.0, 1e-40, 30.0]
    k[0, 1, 3, :2] = [40.0, -40.0]
    v[0, 0, 5, 0] = np.inf

    def attention(q, k, v):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=HI) * 0.35
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v, precision=HI)

    optimized = ea.optimize(attention, limits=LIMITS)
    assert len(optimized.explain(q, k, v).attention) == 1
    np.testing.assert_allclose(optimized(q, k, v), attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_highest_float32_matmuls_are_priced_without_tf32():
    """On the Hopper table a float32 matmul at HIGHEST costs the non-tensor-core rate (TF32 is the
    default's), alone and as a fused region's matmul; bfloat16 is unaffected."""
    from eqsat_attn.cost import for_device
    from eqsat_attn.cost.model import OpView
    from eqsat_attn.ir import TensorType

    model = for_device("h100")
    dims = dict(lhs_contract=(1,), rhs_contract=(0,), lhs_batch=(), rhs_batch=(), preferred_element_type=None)

    def dot_cost(dtype, **extra):
        a, b, out = (TensorType(s, dtype) for s in ((4096, 4096), (4096, 4096), (4096, 4096)))
        return model.node_cost(OpView("dot_general", {**dims, **extra}, (a, b), out))

    assert dot_cost("float32", precision="highest") > 5 * dot_cost("float32")
    assert dot_cost("bfloat16", precision="highest") == dot_cost("bfloat16")
    t = TensorType((4096, 4096), "float32")
    fused = [model.node_cost(OpView("fused", {"body": f"tanh(D[1;0;;;;{pr}]($0,$1))"}, (t, t), t)) for pr in ("", "highest")]
    assert fused[1] > 5 * fused[0]
