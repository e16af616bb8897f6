"""fp8 attention kernel (Pallas, interpret mode on CPU) against a float64 reference on the
dequantized operands; quantization helpers; Triton lowering; compiled kernel on GPU.

Tolerance (documented in eqsat_attn/kernels/fp8_attention.py): the inputs are exactly the fp8
values the kernel reads, so the only error beyond float32 is P's cast to e4m3 (3 mantissa bits,
a relative 2^-4 per probability in random directions) and the bf16 output:
|o - ref| <= FP8_ATOL·max|v| + FP8_RTOL·|ref| elementwise (P's error weighs V's entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn.kernels.fp8_attention import (FP8_ATOL, FP8_RTOL, attention_reference_fp8,
                                              compute_scale, dequantize, flash_attention_fp8,
                                              flash_attention_fp8_vjp, quantize)
from bench_scripts import load_bench
from test_kernels import _pretend_hopper, np_attention

pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")

on_gpu = jax.default_backend() == "gpu"
E4M3 = jnp.float8_e4m3fn


def fp8_inputs(seed, b, h, hkv, sq, sk, d, v_layout, amps=(3.0, 0.7, 2.0)):
    """Random q, k, v (different magnitudes), quantized per tensor; V in v_layout."""
    rng = np.random.default_rng(seed)
    shapes = ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    xs = [jnp.asarray(rng.normal(size=s) * a, jnp.float32) for s, a in zip(shapes, amps)]
    if v_layout == "BHDS":
        xs[2] = jnp.swapaxes(xs[2], 2, 3)
    scales = [compute_scale(x) for x in xs]
    x8 = [quantize(x, s) for x, s in zip(xs, scales)]
    do = jnp.asarray(rng.normal(size=(b, h, sq, d)), jnp.float32)
    return x8, scales, do


def expected(x8, scales, do, **kw):
    """float64 forward and gradients (numpy) of attention on the dequantized operands."""
    deq = [np.asarray(dequantize(x, s), np.float64) for x, s in zip(x8, scales)]
    return np_attention(*deq, do, **kw)


def vmax(x8, scales) -> float:
    return float(jnp.abs(dequantize(x8[2], scales[2])).max())


def check(got, want, what, atol=FP8_ATOL, rtol=FP8_RTOL):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    assert excess.max() <= 0, f"{what}: error exceeds tolerance by {excess.max():.3g}"


@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,hkv,sq,sk,d,blocks", [
    (2, 2, 128, 128, 64, (32, 32)),  # several key tiles, fully masked causal tiles skipped
    (4, 2, 100, 77, 40, (None, None)),  # ragged lengths, GQA, head dim padded to 64
    (2, 2, 300, 300, 64, (64, 256)),  # 256-key tiles (bench/tune_attention.py --fp8 sweeps them)
])
def test_fp8_forward_matches_float64(v_layout, causal, h, hkv, sq, sk, d, blocks):
    x8, scales, do = fp8_inputs(3, 1, h, hkv, sq, sk, d, v_layout)
    scale = d ** -0.5
    o = flash_attention_fp8(*x8, *scales, scale=scale, causal=causal, v_layout=v_layout,
                            block_q=blocks[0], block_k=blocks[1])
    assert o.dtype == jnp.bfloat16 and o.shape == (1, h, sq, d)
    want = expected(x8, scales, do, scale=scale, causal=causal, v_layout=v_layout)[0]
    check(o, want, "o", atol=FP8_ATOL * vmax(x8, scales))
    # the reference semantics of the op agree in float32 to float32 accuracy
    ref = attention_reference_fp8(*x8, *scales, scale=scale, causal=causal, v_layout=v_layout,
                                  out_dtype=jnp.float32)
    check(ref, want, "reference", atol=1e-5, rtol=1e-5)


def test_fp8_layouts_agree_and_scales_are_runtime():
    """Standard and transposed V give the same result; descales are traced (one compile)."""
    x8, scales, _ = fp8_inputs(4, 1, 2, 2, 64, 64, 32, "BHSD")
    fn = jax.jit(lambda q, k, v, a, b, c, vl: flash_attention_fp8(
        q, k, v, a, b, c, scale=0.2, causal=True, v_layout=vl), static_argnums=6)
    o1 = fn(*x8, *scales, "BHSD")
    o2 = fn(x8[0], x8[1], jnp.swapaxes(x8[2], 2, 3), *scales, "BHDS")
    np.testing.assert_array_equal(np.asarray(o1, np.float32), np.asarray(o2, np.float32))
    o3 = fn(*x8, scales[0], scales[1], scales[2] * 2, "BHSD")  # doubled v descale doubles o
    np.testing.assert_allclose(np.asarray(o3, np.float32), 2 * np.asarray(o1, np.float32), rtol=1e-2,
                               atol=1e-3)


#: Backward tolerance vs the float64 gradients on the dequantized operands, elementwise
#: |g - ref| <= GRAD_ATOL·max|ref| and in L2 ||g - ref|| <= GRAD_L2·||ref||. The error is the
#: forward's (P rounded to e4m3 in o, which enters delta = rowsum(o·dO)) plus bf16 roundings;
#: measured on these shapes: max 0.021·max|ref|, L2 0.012 (the float32 recompute: 0.023, 0.010).
GRAD_ATOL = 0.05
GRAD_L2 = 0.03


def check_grads(grads, want):
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert np.abs(g - w).max() <= GRAD_ATOL * np.abs(w).max(), name
        assert np.linalg.norm(g - w) <= GRAD_L2 * np.linalg.norm(w), name


@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_pallas_backward_matches_float64(v_layout, causal):
    """The backward runs the bf16 Pallas dK/dV and dQ kernels on bf16-dequantized operands;
    its gradients w.r.t. the dequantized operands match float64 (GQA, ragged length)."""
    x8, scales, do = fp8_inputs(5, 1, 4, 2, 70, 70, 32, v_layout)
    kw = dict(scale=32 ** -0.5, causal=causal, v_layout=v_layout)
    o, grads = flash_attention_fp8_vjp(*x8, *scales, do, **kw)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    assert grads[2].shape == x8[2].shape  # dV in V's layout
    o_want, dq, dk, dv, _ = expected(x8, scales, do, **kw)
    check(o, o_want, "o", atol=FP8_ATOL * vmax(x8, scales))
    check_grads(grads, (dq, dk, dv))

    loss = lambda *a: jnp.sum(flash_attention_fp8(*a, **kw).astype(jnp.float32) * do)  # noqa: E731
    names = " ".join(str(e) for e in jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*x8, *scales).eqns)
    assert "flash_attention_bwd_dkv" in names and "flash_attention_bwd_dq" in names


def test_fp8_backward_cotangents_and_scale_gradients():
    """jax.grad through flash_attention_fp8: fp8 operands get ``g·s`` in their fp8 dtype (JAX's
    rule), the descales sum(g·x8) in float32, matching float64."""
    x8, scales, do = fp8_inputs(6, 1, 2, 2, 64, 64, 32, "BHDS")
    kw = dict(scale=32 ** -0.5, causal=True, v_layout="BHDS")

    def loss(q, k, v, qs, ks, vs):
        return jnp.sum(flash_attention_fp8(q, k, v, qs, ks, vs, **kw).astype(jnp.float32) * do)

    got = jax.grad(loss, argnums=tuple(range(6)))(*x8, *scales)
    _, grads = flash_attention_fp8_vjp(*x8, *scales, do, **kw)
    _, dq, dk, dv, _ = expected(x8, scales, do, **kw)
    for x, s, g8, g, want, got_s in zip(x8, scales, got[:3], grads, (dq, dk, dv), got[3:]):
        assert g8.dtype == x.dtype and got_s.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g8.astype(jnp.float32)),
                                      np.asarray((g.astype(jnp.float32) * s).astype(x.dtype).astype(jnp.float32)))
        want_s = float(np.sum(want * np.asarray(x.astype(jnp.float32), np.float64)))
        scale_of_terms = float(np.sum(np.abs(want * np.asarray(x.astype(jnp.float32), np.float64))))
        assert abs(float(got_s) - want_s) <= GRAD_L2 * scale_of_terms, (float(got_s), want_s)


def test_fp8_jax_backward_still_available():
    x8, scales, do = fp8_inputs(7, 1, 2, 1, 40, 40, 32, "BHSD")
    kw = dict(scale=0.2, causal=False, v_layout="BHSD")
    _, grads = flash_attention_fp8_vjp(*x8, *scales, do, backward="jax", **kw)
    assert [g.dtype for g in grads] == [jnp.float32] * 3
    check_grads(grads, expected(x8, scales, do, **kw)[1:4])
    with pytest.raises(ValueError, match="backward must be one of"):
        flash_attention_fp8(*x8, *scales, backward="cuda", **kw)


def test_quantize_roundtrip_and_errors():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)) * 5.0, jnp.float32)
    s = compute_scale(x)
    x8 = quantize(x, s)
    assert x8.dtype == E4M3
    assert float(jnp.abs(x8.astype(jnp.float32)).max()) == 448.0  # amax maps to the top value
    err = jnp.abs(dequantize(x8, s) - x)
    assert float((err - 2.0 ** -4 * jnp.abs(x) - s * 2.0 ** -9).max()) <= 0
    assert float(jnp.abs(quantize(x * 1e3, s).astype(jnp.float32)).max()) == 448.0  # clipped, no nan
    with pytest.raises(ValueError, match="float8"):
        flash_attention_fp8(x[None, None], x[None, None], x[None, None], scale=1.0, causal=False)
    with pytest.raises(ValueError, match="per-tensor"):
        flash_attention_fp8(x8[None, None], x8[None, None], x8[None, None], jnp.ones(2), scale=1.0,
                            causal=False)
    with pytest.raises(ValueError, match="block_k"):
        flash_attention_fp8(x8[None, None], x8[None, None], x8[None, None], scale=1.0, causal=False,
                            block_k=16)


@pytest.mark.skipif(on_gpu, reason="the GPU test compiles the real kernel")
@pytest.mark.parametrize("v_layout,causal", [("BHSD", True), ("BHDS", False)])
def test_fp8_kernel_lowers_to_triton(monkeypatch, v_layout, causal):
    _pretend_hopper(monkeypatch)
    q = jax.ShapeDtypeStruct((1, 4, 1000, 128), E4M3)
    v = jax.ShapeDtypeStruct((1, 2, 128, 1000) if v_layout == "BHDS" else (1, 2, 1000, 128), E4M3)
    k = jax.ShapeDtypeStruct((1, 2, 1000, 128), E4M3)
    sc = jax.ShapeDtypeStruct((), jnp.float32)
    for blocks in ((None, None), (128, 256)):
        fn = lambda q, k, v, a, b, c: flash_attention_fp8(  # noqa: E731
            q, k, v, a, b, c, scale=0.1, causal=causal, v_layout=v_layout, interpret=False,
            block_q=blocks[0], block_k=blocks[1], num_warps=8, num_stages=2)
        text = jax.jit(fn).trace(q, k, v, sc, sc, sc).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(on_gpu, reason="the GPU test compiles the real kernel")
@pytest.mark.parametrize("v_layout,causal", [("BHSD", True), ("BHDS", False)])
def test_fp8_backward_lowers_to_triton(monkeypatch, v_layout, causal):
    """jax.grad through the fp8 kernel lowers to three Triton kernels: fp8 forward, bf16 dK/dV, dQ."""
    _pretend_hopper(monkeypatch)
    q = jax.ShapeDtypeStruct((1, 4, 1000, 128), E4M3)
    v = jax.ShapeDtypeStruct((1, 2, 128, 1000) if v_layout == "BHDS" else (1, 2, 1000, 128), E4M3)
    k = jax.ShapeDtypeStruct((1, 2, 1000, 128), E4M3)
    sc = jax.ShapeDtypeStruct((), jnp.float32)
    loss = lambda q, k, v, a, b, c: jnp.sum(flash_attention_fp8(  # noqa: E731
        q, k, v, a, b, c, scale=0.1, causal=causal, v_layout=v_layout, interpret=False).astype(jnp.float32))
    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    text = jax.jit(grad).trace(q, k, v, sc, sc, sc).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU backend")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_gpu_compiled_matches_float64(v_layout, causal):
    x8, scales, do = fp8_inputs(6, 2, 4, 2, 1000, 1000, 128, v_layout)
    kw = dict(scale=128 ** -0.5, causal=causal, v_layout=v_layout)
    o = jax.jit(lambda *a: flash_attention_fp8(*a, **kw))(*x8, *scales)
    check(o, expected(x8, scales, do, **kw)[0], "o", atol=FP8_ATOL * vmax(x8, scales))


def test_bench_fp8_cpu_smoke(tmp_path):
    """bench/attention.py --fp8 runs end to end (interpret mode); every row of ours checks ok."""
    mod = load_bench("attention", "bench_attention_fp8")
    out = tmp_path / "fp8.md"
    mod.main(["--cpu-smoke", "--fp8", "--out", str(out)])
    text = out.read_text()
    for name in ("ours fp8 Triton standard", "ours fp8 Triton transposed-V", "ours bf16 Triton standard",
                 "cuDNN fp8"):
        assert name in text
    mosaic = [line for line in text.splitlines()  # the per-kernel rows (third column: kernel)
              if line.count("|") > 4 and line.split("|")[3].strip().startswith("ours fp8 Mosaic GPU")]
    assert len(mosaic) == 3  # both schedules and P in registers (staged when interpreted), checked
    assert all(line.endswith("| ok |") for line in mosaic)
    assert "FAIL" not in text and text.count("| ok |") >= 7
    assert "vs ours fp8 standard" in text


def test_bench_end_to_end_fp8_cpu_smoke(tmp_path):
    """bench/end_to_end.py --fp8 at a tiny shape: the Flax (flax's fp8_ops.qdq) and hand-written
    fp8 blocks are raised to fp8 attention, run on the Pallas fp8 kernel (interpret mode) and
    agree with jax.jit of the same block; the page says device, date and command."""
    mod = load_bench("end_to_end", "bench_end_to_end_fp8")
    out = tmp_path / "e2e-fp8.md"
    assert mod.main(["--cpu-smoke", "--fp8", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- device: " in text and "- date: " in text and "- command: `python bench/end_to_end.py --cpu-smoke --fp8" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "fp8 |" in line]
    assert len(rows) == 8 and "FAIL" not in text
    for group in ("flax fp8", "hand-written fp8"):
        steered = [r for r in rows if r[0] == group and r[1] == mod.STEERED]
        assert len(steered) == 1
        _, _, _, _, _, err, rel, check, fp8_ops, _, _ = steered[0]
        assert check == "ok" and fp8_ops == "1"
        assert 0 < float(rel) <= mod.FP8_BLOCK_RTOL  # the kernel's P rounding shows; within tolerance


@pytest.mark.parametrize("device", ["cpu", "h100", "h200"])
def test_bench_fp8_steering_takes_fp8_attention_under_every_table(device):
    """The steered row's model (bench/end_to_end.py's `Fp8AttentionSteering`) gives fp8 attention
    in the hand-written fp8 block at the smoke shape under every device table, so the smoke run
    means the same on a GPU host; values stay within the block's fp8 tolerance. (Greedy extraction
    alone kept the H200 table's attention on the dequantized operands; the one extraction finds
    the fp8 form itself, and is never costlier than the steered choice.)"""
    from eqsat_attn import examples
    from eqsat_attn.cost import program_cost
    from eqsat_attn.cost.roofline import for_device

    mod = load_bench("end_to_end", "bench_end_to_end_fp8_steering")
    shape = mod.SMOKE_SHAPE
    params = examples.block_params(shape, 3, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(4), (shape.batch, shape.seq, shape.embed), jnp.float32)
    block = lambda params, x: mod.fp8_block(params, x, shape.heads)  # noqa: E731
    plain = ea.optimize(block, cost_model=for_device(device))
    steered = ea.optimize(block, cost_model=mod.Fp8AttentionSteering(for_device(device)))
    fp8_ops = sum(n.op == "attention_fp8" for n in steered.explain(params, x).after.nodes)
    assert fp8_ops == 1
    ref = np.asarray(jax.jit(block)(params, x))
    got = np.asarray(steered(params, x))
    assert np.abs(got - ref).max() <= mod.FP8_BLOCK_RTOL * np.abs(ref).max()
    # the table alone (one extraction, `egraph.refine`) is never costlier than the steered choice
    model = for_device(device)
    assert program_cost(plain.explain(params, x).after, model) <= program_cost(
        steered.explain(params, x).after, model) * (1 + 1e-9)


def test_layout_decision_names_fp8_programs_and_counts_the_chosen_one():
    """`layout_decision` on the fp8 smoke block under the H200 table: a program with fp8
    attention gets its variant (not "other"), and the chosen program's variant is never listed
    as "not found" (its own steered extraction may miss it: the chosen program is one of it)."""
    from eqsat_attn import examples
    from eqsat_attn.cost.roofline import for_device
    from eqsat_attn.qkv_layouts import VARIANTS

    mod = load_bench("end_to_end", "bench_end_to_end_fp8_decision")
    shape = mod.SMOKE_SHAPE
    params = examples.block_params(shape, 0, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (shape.batch, shape.seq, shape.embed), jnp.float32)
    block = lambda params, x: mod.fp8_block(params, x, shape.heads)  # noqa: E731
    for model in (for_device("h200"), mod.Fp8AttentionSteering(for_device("h200"))):
        report = ea.optimize(block, cost_model=model).explain(params, x)
        decision = report.layout_decision
        assert decision.chosen in VARIANTS + ("unmerged", "split")
        assert decision.chosen not in decision.unreachable
        if decision.chosen in VARIANTS:
            assert decision.alternatives[decision.chosen] <= decision.chosen_cost * (1 + 1e-9)
        assert f"not found {decision.chosen} (" not in str(report)


@pytest.mark.parametrize("pallas", [False, True])
def test_straight_through_gradients_reach_the_unrounded_operands(pallas):
    """`attention_fp8_straight_through` (fp8 attention over values rounded in the same program):
    the same output as rounding first, and gradients ``g·s`` of the unrounded float32 values
    (not rounded to fp8), against float64; the Pallas kernel in interpret mode."""
    from eqsat_attn.kernels.fp8_straight_through import attention_fp8_straight_through

    rng = np.random.default_rng(11)
    xs = [jnp.asarray(rng.normal(size=(1, 2, 48, 32)) * a, jnp.float32) for a in (3.0, 0.7, 2.0)]
    scales = [compute_scale(x) for x in xs]
    ys = [x / s for x, s in zip(xs, scales)]
    x8 = [y.astype(jnp.float8_e4m3fn) for y in ys]
    do = jnp.asarray(rng.normal(size=(1, 2, 48, 32)) * 1e-4, jnp.float32)  # small: g·s < 2^-9
    kw = dict(scale=32 ** -0.5, causal=True, v_layout="BHSD")
    run = lambda *y: attention_fp8_straight_through(y, scales, ["float8_e4m3fn"] * 3, pallas=pallas, **kw)  # noqa: E731
    direct = (flash_attention_fp8 if pallas else attention_reference_fp8)(*x8, *scales, **kw)
    np.testing.assert_array_equal(np.asarray(run(*ys), np.float32), np.asarray(direct, np.float32))

    got = jax.grad(lambda *y: jnp.sum(run(*y).astype(jnp.float32) * do), argnums=(0, 1, 2))(*ys)
    _, dq, dk, dv, _ = expected(x8, scales, do, **kw)
    want = [w * float(s) for w, s in zip((dq, dk, dv), scales)]
    assert all(np.abs(w).max() < 2.0 ** -9 for w in want)  # all of them would round to zero in e4m3
    assert all(g.dtype == jnp.float32 for g in got)
    check_grads(got, want)


@pytest.mark.parametrize("straight_through", [False, True])
def test_fp8_op_in_layouts_the_kernel_cannot_read_still_runs_the_kernel(straight_through):
    """An ``attention_fp8`` node whose K (and o) extraction laid out with S minor runs the Pallas
    kernel on transposed operands: the same values as the kernel on the standard layouts (P's
    e4m3 rounding included), whichever of equally priced layouts extraction picked."""
    from eqsat_attn import ir
    from eqsat_attn.lower import lower_attention_fp8

    x8, scales, _ = fp8_inputs(5, 1, 2, 2, 64, 64, 32, "BHSD")
    kw = dict(scale=32 ** -0.5, causal=True)
    want = flash_attention_fp8(*x8, *scales, **kw)
    params = ir.Params(dict(kw, q_layout="BHSD", k_layout="BHDS", v_layout="BHSD", o_layout="BHDS",
                            out_dtype=str(want.dtype)).items())
    node = ir.Node("attention_fp8", (0, 1, 2, 3, 4, 5), params, None)
    args = [x8[0], jnp.swapaxes(x8[1], 2, 3), x8[2], *scales]
    unrounded = [x.astype(jnp.float32) for x in args[:3]] if straight_through else None
    got = lower_attention_fp8(node, args, "pallas", unrounded=unrounded)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jnp.swapaxes(want, 2, 3), np.float32))
    ref = attention_reference_fp8(*x8, *scales, **kw)
    assert not np.array_equal(np.asarray(ref, np.float32), np.asarray(want, np.float32))  # the kernel's own values
