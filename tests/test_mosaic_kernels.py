"""The Mosaic GPU (Hopper) attention kernel: values in jax's Mosaic GPU interpreter against float64,
gradients through the shared backward, the compiled kernel's lowering (wgmma, TMA, shared-memory
budget) checked on CPU, backend choice and its errors, and the compiled kernel on a Hopper GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqsat_attn.kernels import flash_attention
from eqsat_attn.kernels.flash_attention import pallas_backend
from eqsat_attn.kernels.mosaic_attention import (BLOCK_TABLE, MosaicBlocks, default_blocks,
                                                 hopper_gpu, mosaic_attention, mosaic_unsupported)
from test_kernels import assert_close, make_inputs, np_attention

pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
on_gpu = jax.default_backend() == "gpu"
SMALL = MosaicBlocks(block_q=64, block_kv=64, stages=2)


def np_lse(q, k, *, scale, causal):
    """float64 natural-log log-sum-exp of the scores, [B,H,Sq]."""
    q, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k))
    kr = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = q @ np.swapaxes(kr, 2, 3) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sq)[:, None] >= np.arange(sk)[None, :], s, -np.inf)
    top = s.max(-1, keepdims=True)
    return (np.log(np.exp(s - top).sum(-1, keepdims=True)) + top)[..., 0]


@pytest.mark.parametrize("v_layout,causal,d,dtype,h,hkv,sq,sk,blocks", [
    ("BHSD", False, 64, jnp.bfloat16, 2, 2, 128, 192, SMALL),    # 3 key steps, 2 slots
    ("BHDS", False, 64, jnp.bfloat16, 2, 2, 128, 192, SMALL),    # transposed V, same values
    ("BHDS", True, 64, jnp.bfloat16, 4, 2, 256, 256, SMALL),     # causal, GQA, masked tiles
    ("BHSD", True, 128, jnp.float16, 2, 1, 256, 256, SMALL),     # D128, f16, MQA
    ("BHDS", True, 64, jnp.float16, 2, 2, 128, 256, MosaicBlocks(64, 64, 3)),  # Sq < Sk, 3 slots
    ("BHDS", False, 64, jnp.bfloat16, 2, 2, 128, 128, MosaicBlocks(64, 128, 1)),  # one slot
    ("BHSD", False, 128, jnp.bfloat16, 1, 1, 128, 192, MosaicBlocks(64, 64, 1)),  # one slot, 3 steps
    ("BHSD", True, 64, jnp.bfloat16, 2, 2, 256, 128, MosaicBlocks(64, 64, 2)),  # Sq > Sk
    ("BHDS", True, 256, jnp.bfloat16, 2, 2, 128, 128, None),  # D256 with its table tiles
    ("BHDS", False, 128, jnp.bfloat16, 2, 2, 128, 320, None),  # key tile fitted to Sk: 64
])
def test_interpreted_forward_matches_float64(v_layout, causal, d, dtype, h, hkv, sq, sk, blocks):
    _, q, k, v, do = make_inputs(3, 1, h, hkv, sq, sk, d, d, v_layout, dtype)
    scale = d ** -0.5
    o, lse = mosaic_attention(q, k, v, scale=scale, causal=causal, v_layout=v_layout,
                              blocks=blocks, interpret=True)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    want = np_attention(q, k, v, do, scale=scale, causal=causal, v_layout=v_layout)
    assert_close(o, want[0], 2e-2, "o")
    np.testing.assert_allclose(np.asarray(lse), np_lse(q, k, scale=scale, causal=causal),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("v_layout,causal,d,dtype,h,hkv,sq,sk,blocks", [
    ("BHDS", True, 64, jnp.bfloat16, 4, 2, 256, 256, MosaicBlocks(64, 64, 2, overlap=True)),
    ("BHSD", False, 128, jnp.float16, 1, 1, 128, 192, MosaicBlocks(64, 64, 1, overlap=True)),
    ("BHDS", True, 64, jnp.bfloat16, 2, 2, 128, 256, MosaicBlocks(64, 64, 3, overlap=True)),
    ("BHSD", True, 64, jnp.bfloat16, 2, 2, 256, 128, MosaicBlocks(64, 64, 2, overlap=True)),
    ("BHDS", False, 64, jnp.bfloat16, 2, 2, 128, 64, MosaicBlocks(64, 64, 2, overlap=True)),
])
def test_interpreted_overlapped_schedule_matches_float64(v_layout, causal, d, dtype, h, hkv, sq,
                                                         sk, blocks):
    """FlashAttention-3's intra-warpgroup overlap (Q·Kᵀ of tile j issued with P·V of tile j-1,
    strict turns between the warpgroups): causal with GQA and a warpgroup that releases tiles it
    does not need, one slot, three slots, Sq > Sk, a single key tile."""
    test_interpreted_forward_matches_float64(v_layout, causal, d, dtype, h, hkv, sq, sk, blocks)


@pytest.mark.parametrize("v_layout,d,h,hkv,sq,sk,blocks", [
    ("BHDS", 64, 4, 2, 384, 384, MosaicBlocks(64, 64, 2, heavy_first=True)),  # 3 query tiles, GQA
    ("BHSD", 64, 2, 2, 256, 128, MosaicBlocks(64, 64, 2, heavy_first=True)),  # Sq > Sk
    ("BHDS", 128, 2, 1, 384, 256, MosaicBlocks(64, 64, 2, overlap=True, heavy_first=True)),
])
def test_interpreted_heavy_first_order_matches_float64(v_layout, d, h, hkv, sq, sk, blocks):
    """Causal with the query tiles run in reverse (the CTAs with the most key tiles first): the
    producer and both consumers agree on each CTA's tile; values against float64."""
    test_interpreted_forward_matches_float64(v_layout, True, d, jnp.bfloat16, h, hkv, sq, sk, blocks)


@pytest.mark.parametrize("qko,v_layout,causal", [
    ("BSHD", "BSHD", True),  # Flax's layout everywhere: strided TMA boxes, no copies
    ("BSHD", "HDBS", False),  # V^T as [H, D, B, S]
    ("SBHD", "BHDS", True),
])
def test_interpreted_forward_reads_any_layout_in_place(qko, v_layout, causal):
    from eqsat_attn.kernels.reference import layout_shape

    _, q, k, v, do = make_inputs(8, 1, 4, 2, 128, 192, 64, 64, "BHSD", jnp.bfloat16)
    kw = dict(scale=0.125, causal=causal, q_layout=qko, k_layout=qko, o_layout=qko,
              v_layout=v_layout, blocks=SMALL, interpret=True)
    o, lse = mosaic_attention(_physical(q, qko), _physical(k, qko), _physical(v, v_layout), **kw)
    assert o.shape == layout_shape(qko, {"B": 1, "H": 4, "S": 128, "D": 64})
    want = np_attention(q, k, v, do, scale=0.125, causal=causal)
    assert_close(_logical(o, qko), want[0], 2e-2, "o")
    np.testing.assert_allclose(np.asarray(lse), np_lse(q, k, scale=0.125, causal=causal),
                               rtol=1e-5, atol=1e-4)


def _physical(x, layout):
    """A logical [B,H,S,D] array stored in ``layout`` (V^T: a layout with S minor)."""
    return jnp.transpose(x, ["BHSD".index(a) for a in layout])


def _logical(x, layout):
    return jnp.transpose(x, [layout.index(a) for a in "BHSD"])


@pytest.mark.parametrize("qko,v_layout,causal", [
    ("BHSD", "BHDS", True), ("BHSD", "BHSD", False), ("BSHD", "HDBS", True),
])
def test_gradients_through_mosaic_forward(qko, v_layout, causal):
    """jax.grad: Mosaic GPU forward (interpreted), the Triton backward kernels on its residuals,
    gradients in the operands' own layouts."""
    _, q, k, v, do = make_inputs(4, 1, 4, 2, 128, 128, 64, 64, "BHSD", jnp.bfloat16)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.125, causal=causal, v_layout=v_layout,
                                         q_layout=qko, k_layout=qko, o_layout=qko,
                                         backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True)
    o, vjp = jax.vjp(fn, _physical(q, qko), _physical(k, qko), _physical(v, v_layout))
    want = np_attention(q, k, v, do, scale=0.125, causal=causal)
    assert_close(_logical(o, qko), want[0], 2e-2, "o")
    grads = vjp(_physical(do, qko))
    for name, got, w, layout in zip("qkv", grads, want[1:4], (qko, qko, v_layout)):
        assert got.dtype == jnp.bfloat16
        assert_close(_logical(got, layout), w, 3e-2, f"d{name}")


@pytest.mark.parametrize("d", sorted(BLOCK_TABLE))
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_kernel_lowers_for_hopper(d, v_layout, causal):
    """The compiled path (P from registers, pl.run_state accumulators, V^T read K-major) lowers
    to one Mosaic GPU custom call with every tuned tile inside Hopper's shared memory."""
    q = jax.ShapeDtypeStruct((1, 4, 512, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 512, d), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 2, 512, d) if v_layout == "BHSD" else (1, 2, d, 512), jnp.bfloat16)
    fn = lambda q, k, v: mosaic_attention(q, k, v, scale=0.1, causal=causal, v_layout=v_layout)
    text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("overlap", [False, True])
def test_heavy_first_order_lowers_for_hopper(overlap):
    q = jax.ShapeDtypeStruct((1, 4, 512, 128), jnp.bfloat16)
    vt = jax.ShapeDtypeStruct((1, 4, 128, 512), jnp.bfloat16)
    blocks = MosaicBlocks(64, 128, 2, overlap=overlap, heavy_first=True)
    fn = lambda q, k, v: mosaic_attention(q, k, v, scale=0.1, causal=True, v_layout="BHDS", blocks=blocks)
    assert jax.jit(fn).trace(q, q, vt).lower(lowering_platforms=("cuda",)).as_text().count(
        "custom_call @mosaic_gpu") == 1


def test_compiled_kernel_lowers_with_strided_layouts():
    """[B,S,H,D] q, k, o and V^T [H,D,B,S]: strided TMA boxes, one custom call, no transposes."""
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    vt = jax.ShapeDtypeStruct((2, 128, 1, 512), jnp.bfloat16)
    fn = lambda q, k, v: mosaic_attention(q, k, v, scale=0.1, causal=True, v_layout="HDBS",
                                          q_layout="BSHD", k_layout="BSHD", o_layout="BSHD")
    text = jax.jit(fn).trace(q, k, vt).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1 and "stablehlo.transpose" not in text


@pytest.mark.parametrize("d,v_layout,causal", [(64, "BHDS", True), (128, "BHSD", False),
                                                (128, "BHDS", True), (256, "BHDS", False)])
def test_overlapped_kernel_lowers_for_hopper(d, v_layout, causal):
    """The overlapped schedule's compiled form (two wgmma groups in flight, the scores awaited
    alone with wgmma_wait 1, softmax state carried through pl.run_state) lowers for Hopper."""
    q = jax.ShapeDtypeStruct((1, 4, 512, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 512, d), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 2, 512, d) if v_layout == "BHSD" else (1, 2, d, 512), jnp.bfloat16)
    blocks = default_blocks(jnp.bfloat16, d, 512, overlap=True)
    fn = lambda q, k, v: mosaic_attention(q, k, v, scale=0.1, causal=causal, v_layout=v_layout,
                                          blocks=blocks)
    text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_oversized_tiles_fail_lowering_with_the_shared_memory_reason():
    q = jax.ShapeDtypeStruct((1, 1, 512, 128), jnp.bfloat16)
    fn = lambda q, k, v: mosaic_attention(q, k, v, scale=0.1, causal=False,
                                          blocks=MosaicBlocks(64, 256, 2))
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(fn).trace(q, q, q).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("change,reason", [
    (dict(dtype=jnp.float32), "share one dtype"),
    (dict(d=32), "head dims"),
    (dict(sq=200), "multiple of 128"),
    (dict(sk=200), "multiple of block_kv"),
    (dict(mask=True, dtype=jnp.float8_e4m3fn), "fp8 operands take no bias, mask or soft-cap"),
    (dict(q_layout="BHDS"), "only with D as its minor"),
    (dict(compute_dtype="float32"), "cast prologue"),
])
def test_unsupported_calls_say_why(change, reason):
    shape = dict(dtype=jnp.bfloat16, d=128, sq=256, sk=256)
    shape.update({n: change.pop(n) for n in list(change) if n in shape})
    q = jax.ShapeDtypeStruct((1, 2, shape["sq"], shape["d"]), shape["dtype"])
    k = jax.ShapeDtypeStruct((1, 2, shape["sk"], shape["d"]), shape["dtype"])
    assert reason in (mosaic_unsupported(q, k, k, scale=0.1, **change) or "")


@pytest.mark.parametrize("dtype,d,sk,block_kv", [
    (jnp.bfloat16, 64, 4096, 256), (jnp.bfloat16, 64, 128, 128), (jnp.bfloat16, 128, 320, 64),
    (jnp.float8_e4m3fn, 128, 384, 128), (jnp.float8_e4m3fn, 128, 320, 256),  # no fit: stays
])
def test_default_key_tile_is_fitted_to_the_key_length(dtype, d, sk, block_kv):
    assert default_blocks(dtype, d, sk).block_kv == block_kv


@pytest.mark.parametrize("d,sk,block_kv", [(64, 4096, 128), (128, 4096, 128), (256, 4096, 64),
                                           (64, 320, 64)])
def test_overlapped_default_tiles_cap_the_key_tile(d, sk, block_kv):
    """Two score tiles live at once in the overlapped schedule: D64's 256-key tile is halved."""
    blocks = default_blocks(jnp.bfloat16, d, sk, overlap=True)
    assert blocks.overlap and blocks.block_kv == block_kv


def test_a_call_inside_the_contract_is_supported():
    q = jax.ShapeDtypeStruct((2, 8, 1024, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 2, 1024, 128), jnp.bfloat16)
    vt = jax.ShapeDtypeStruct((2, 2, 128, 1024), jnp.bfloat16)
    assert mosaic_unsupported(q, kv, kv, scale=0.1, causal=True) is None
    assert mosaic_unsupported(q, kv, vt, v_layout="BHDS", scale=0.1) is None


def test_forcing_mosaic_outside_its_contract_raises():
    _, q, k, v, _ = make_inputs(5, 1, 2, 2, 100, 100, 64, 64, "BHSD", jnp.bfloat16)
    with pytest.raises(ValueError, match="backend='mosaic_gpu' cannot run this call: Sq=100"):
        flash_attention(q, k, v, scale=0.1, causal=False, backend="mosaic_gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, k, v, scale=0.1, causal=False, backend="cuda")


def test_auto_backend_off_hopper_is_triton(monkeypatch):
    monkeypatch.setenv("EQSAT_ATTN_AUTO_MOSAIC", "1")  # even when opted in
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
    expected = "mosaic_gpu" if hopper_gpu() else "triton"
    assert pallas_backend(q, q, q, scale=0.1) == expected
    assert pallas_backend(q, q, q, scale=0.1, backend="triton") == "triton"
    assert pallas_backend(q, q, q, scale=0.1, tiles_given=True) == "triton"  # Triton tiles asked for
    assert pallas_backend(q, q, q, scale=0.1, backend="mosaic_gpu", interpret=True) == "mosaic_gpu"


# --- GPU only: the compiled kernel on Hopper ----------------------------------------------------

# Forward only here, one compile each (a device call's minutes are few); gradients once below.
@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16), (128, jnp.float16), (256, jnp.bfloat16)])
def test_gpu_compiled_mosaic_matches_reference(overlap, v_layout, causal, d, dtype):
    """Both schedules compiled on Hopper with their default tiles: o and lse against float64."""
    _, q, k, v, do = make_inputs(11, 2, 8, 2, 1024, 1024, d, d, v_layout, dtype)
    scale = d ** -0.5
    blocks = default_blocks(dtype, d, 1024, overlap=overlap)
    o, lse = jax.jit(lambda q, k, v: mosaic_attention(q, k, v, scale=scale, causal=causal,
                                                       v_layout=v_layout, blocks=blocks))(q, k, v)
    want = np_attention(q, k, v, do, scale=scale, causal=causal, v_layout=v_layout)
    assert_close(o, want[0], 2e-2, "o")
    np.testing.assert_allclose(np.asarray(lse), np_lse(q, k, scale=scale, causal=causal),
                               rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_compiled_heavy_first_order_matches_reference(overlap):
    """Causal with the query tiles in reverse (`MosaicBlocks.heavy_first`), compiled."""
    _, q, k, v, do = make_inputs(13, 2, 8, 2, 1024, 1024, 128, 128, "BHDS", jnp.bfloat16)
    blocks = MosaicBlocks(64, 128, 2, overlap=overlap, heavy_first=True)
    o, lse = jax.jit(lambda q, k, v: mosaic_attention(q, k, v, scale=128 ** -0.5, causal=True,
                                                       v_layout="BHDS", blocks=blocks))(q, k, v)
    want = np_attention(q, k, v, do, scale=128 ** -0.5, causal=True, v_layout="BHDS")
    assert_close(o, want[0], 2e-2, "o")
    np.testing.assert_allclose(np.asarray(lse), np_lse(q, k, scale=128 ** -0.5, causal=True),
                               rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
def test_gpu_gradients_through_compiled_mosaic_forward(v_layout):
    """jax.grad through `flash_attention(backend="mosaic_gpu")`: the compiled forward's residuals
    feed the Triton backward kernels (causal, GQA)."""
    _, q, k, v, do = make_inputs(12, 2, 8, 2, 1024, 1024, 128, 128, v_layout, jnp.bfloat16)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=128 ** -0.5, causal=True, v_layout=v_layout,
                                         backend="mosaic_gpu")
    want = np_attention(q, k, v, do, scale=128 ** -0.5, causal=True, v_layout=v_layout)
    o, vjp = jax.vjp(jax.jit(fn), q, k, v)
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:4]):
        assert_close(got, w, 3e-2, f"d{name}")


def _bhsd_attention(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.125
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def test_report_names_the_pallas_backend_of_each_attention():
    import eqsat_attn as ea
    from eqsat_attn.cost import for_device

    _, q, k, v, _ = make_inputs(6, 1, 2, 2, 128, 128, 64, 64, "BHSD", jnp.bfloat16)
    optimized = ea.optimize(_bhsd_attention, backend="pallas", cost_model=for_device("h100"))
    (info,) = optimized.explain(q, k, v).attention
    assert info.kernel == "pallas"
    if not hopper_gpu():  # interpret mode off Hopper: "auto" keeps Triton
        assert info.backend == "triton"
    assert info.backend in ("triton", "mosaic_gpu")
    assert f"kernel=pallas ({info.backend})" in str(info)
    assert_close(optimized(q, k, v), np.asarray(_bhsd_attention(q, k, v), np.float32), 2e-2, "o")


# --- fp8 (issue 10): transposed V only ---------------------------------------------------------

@pytest.mark.parametrize("causal,h,hkv,sq,sk,overlap", [
    (False, 2, 2, 128, 256, False), (True, 4, 2, 256, 256, False), (True, 2, 2, 256, 256, True)])
def test_interpreted_fp8_forward_and_gradients(causal, h, hkv, sq, sk, overlap):
    """fp8 q, k, V^T with per-tensor descales: the Mosaic GPU forward (P staged as e4m3 in shared
    memory) within the fp8 tolerance of float64 on the dequantized operands; gradients through the
    shared bf16 backward kernels."""
    from test_fp8_kernels import check, check_grads, expected, fp8_inputs, vmax

    from eqsat_attn.kernels.fp8_attention import FP8_ATOL, flash_attention_fp8_vjp

    x8, scales, do = fp8_inputs(7, 1, h, hkv, sq, sk, 128, "BHDS")
    kw = dict(scale=128 ** -0.5, causal=causal, v_layout="BHDS")
    o, grads = flash_attention_fp8_vjp(*x8, *scales, do, backend="mosaic_gpu",
                                       mosaic_blocks=MosaicBlocks(64, 128, 2, overlap=overlap),
                                       **kw)
    assert o.dtype == jnp.bfloat16
    o_want, dq, dk, dv, _ = expected(x8, scales, do, **kw)
    check(o, o_want, "o", atol=FP8_ATOL * vmax(x8, scales))
    check_grads(grads, (dq, dk, dv))


@pytest.mark.parametrize("causal,overlap", [(False, False), (True, False), (True, True)])
def test_compiled_fp8_kernel_lowers_with_transposed_v(causal, overlap):
    q = jax.ShapeDtypeStruct((1, 4, 512, 128), jnp.float8_e4m3fn)
    vt = jax.ShapeDtypeStruct((1, 4, 128, 512), jnp.float8_e4m3fn)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = lambda q, k, v, a, b: mosaic_attention(q, k, v, scale=0.1, causal=causal, v_layout="BHDS",
                                                descales=(a, b),
                                                blocks=MosaicBlocks(64, 128, 2, overlap=overlap))
    text = jax.jit(fn).trace(q, q, vt, scalar, scalar).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_quad_exchange_plan_turns_the_accumulator_layout_into_wgmmas_8bit_operand():
    """`_quad_exchange_to_8bit`'s plan, replayed on all 128 lanes of a warpgroup for a [64, 32]
    tile: each lane packs its WGMMA-layout pairs (columns 8j + 2t, +1; rows 16w + r and +8) into a
    word per 16-column block, reads the words of lanes lane ^ d0 and lane ^ d1 (shfl.bfly) and
    byte-permutes them (prmt: bytes 0-3 from the first word, 4-7 from the second). Every lane must
    end with wgmma's 8-bit A fragment: columns 16k + 4t .. 4t+3 of its rows."""
    from eqsat_attn.kernels.mosaic_attention import QUAD_EXCHANGE_DISTANCES, QUAD_EXCHANGE_HALVES

    tile = np.arange(64 * 32).reshape(64, 32)  # distinct values stand for the fp8 bytes
    words = {}
    for lane in range(128):
        w, r, t = lane // 32, lane % 32 // 4, lane % 4
        for k in range(2):
            for h in range(2):
                row = tile[16 * w + 8 * h + r]
                words[lane, k, h] = [row[16 * k + 2 * t], row[16 * k + 2 * t + 1],
                                     row[16 * k + 8 + 2 * t], row[16 * k + 8 + 2 * t + 1]]
    for lane in range(128):
        w, r, t = lane // 32, lane % 32 // 4, lane % 4
        d0, d1 = QUAD_EXCHANGE_DISTANCES[t]
        selector = QUAD_EXCHANGE_HALVES[t]
        for k in range(2):
            for h in range(2):
                source = words[lane ^ d0, k, h] + words[lane ^ d1, k, h]
                got = [source[(selector >> 4 * i) & 0xF] for i in range(4)]
                row = tile[16 * w + 8 * h + r]
                assert got == list(row[16 * k + 4 * t:16 * k + 4 * t + 4]), (lane, k, h)


@pytest.mark.parametrize("causal,overlap", [(False, False), (True, True), (False, True)])
def test_fp8_p_in_registers_lowers_for_hopper(causal, overlap):
    """``fp8_p_registers``: P goes to the P·V wgmma in registers through the quad exchange (its
    byte permutes appear only then); compiled only (the interpreter takes wgmma's A operand from
    shared memory alone), checked on a GPU by test_gpu_compiled_mosaic_fp8_matches_reference."""
    q = jax.ShapeDtypeStruct((1, 4, 512, 128), jnp.float8_e4m3fn)
    vt = jax.ShapeDtypeStruct((1, 4, 128, 512), jnp.float8_e4m3fn)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def lowered(p_registers):
        blocks = MosaicBlocks(64, 128, 2, overlap=overlap, fp8_p_registers=p_registers)
        fn = lambda q, k, v, a, b: mosaic_attention(q, k, v, scale=0.1, causal=causal, v_layout="BHDS",
                                                    descales=(a, b), blocks=blocks)
        return jax.jit(fn).trace(q, q, vt, scalar, scalar).lower(lowering_platforms=("cuda",)).as_text()
    registers, staged = lowered(True), lowered(False)
    assert registers.count("custom_call @mosaic_gpu") == 1
    assert "prmt.b32" in registers and "prmt.b32" not in staged


def test_fp8_with_sequence_major_v_is_refused_by_wgmma_itself(monkeypatch):
    """The contract's fp8 rule is Hopper's: with the check bypassed, Mosaic GPU's lowering of the
    standard-layout fp8 P·V fails (wgmma transposes only 16-bit operands)."""
    import eqsat_attn.kernels.mosaic_attention as mosaic

    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.float8_e4m3fn)
    assert "transposed V" in mosaic_unsupported(q, q, q, scale=0.1)
    monkeypatch.setattr(mosaic, "mosaic_unsupported", lambda *a, **k: None)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = lambda q, k, v, a, b: mosaic.mosaic_attention(q, k, v, scale=0.1, causal=False,
                                                       v_layout="BHSD", descales=(a, b))
    with pytest.raises(ValueError, match="transpose"):
        jax.jit(fn).trace(q, q, q, scalar, scalar).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_auto_backend_takes_mosaic_on_hopper_unless_opted_out(dtype, monkeypatch):
    """The compiled Mosaic GPU kernel passed its GPU tests and outran Triton (H200, 2026-11-26):
    "auto" takes it for a Hopper call inside its contract, 16-bit and fp8 alike;
    EQSAT_ATTN_AUTO_MOSAIC=0 keeps Triton, backend="triton" forces it per call."""
    import importlib

    fa = importlib.import_module("eqsat_attn.kernels.flash_attention")  # the module, not the function
    monkeypatch.delenv("EQSAT_ATTN_AUTO_MOSAIC", raising=False)
    fp8 = jnp.dtype(dtype).name.startswith("float8")
    monkeypatch.setattr(fa, "hopper_gpu", lambda: True)  # as if compiling on an H100
    vt = jax.ShapeDtypeStruct((1, 2, 128, 256), dtype)
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), dtype)
    call = dict(scale=0.1, v_layout="BHDS", interpret=False)
    assert fa.auto_takes_mosaic(fp8) and pallas_backend(q, q, vt, **call) == "mosaic_gpu"
    assert pallas_backend(q, q, vt, backend="triton", **call) == "triton"
    monkeypatch.setenv("EQSAT_ATTN_AUTO_MOSAIC", "0")
    assert not fa.auto_takes_mosaic(fp8) and pallas_backend(q, q, vt, **call) == "triton"
    monkeypatch.setattr(fa, "hopper_gpu", lambda: False)  # no Hopper: Triton even when opted in
    monkeypatch.setenv("EQSAT_ATTN_AUTO_MOSAIC", "1")
    assert pallas_backend(q, q, vt, **call) == "triton"


def test_tuned_tiles_follow_the_measured_schedule():
    """`TUNED_BLOCKS` (H200 sweep): the overlapped schedule only at D128 without a causal mask,
    256-key fp8 tiles only without one; an explicit ``overlap`` still picks either schedule."""
    assert default_blocks(jnp.bfloat16, 128, 4096).overlap
    assert not default_blocks(jnp.bfloat16, 128, 4096, causal=True).overlap
    assert not default_blocks(jnp.float16, 64, 4096).overlap
    assert not default_blocks(jnp.bfloat16, 128, 4096, overlap=False).overlap
    assert default_blocks(jnp.bfloat16, 128, 4096, causal=True, overlap=True).overlap
    assert default_blocks(jnp.float8_e4m3fn, 128, 4096).block_kv == 256
    assert default_blocks(jnp.float8_e4m3fn, 128, 4096, causal=True).block_kv == 128
    assert default_blocks(jnp.float8_e4m3fn, 128, 384).block_kv == 128  # 256 does not divide 384


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("overlap,p_registers,block_kv", [(False, False, 128), (True, False, 128),
                                                          (False, True, 128), (True, True, 128),
                                                          (False, True, 256)])
def test_gpu_compiled_mosaic_fp8_matches_reference(causal, overlap, p_registers, block_kv):
    from test_fp8_kernels import check, expected, fp8_inputs, vmax

    from eqsat_attn.kernels.fp8_attention import FP8_ATOL, flash_attention_fp8

    x8, scales, do = fp8_inputs(12, 2, 8, 2, 1024, 1024, 128, "BHDS")
    kw = dict(scale=128 ** -0.5, causal=causal, v_layout="BHDS")
    blocks = MosaicBlocks(64, block_kv, 2, overlap=overlap, fp8_p_registers=p_registers)
    o = jax.jit(lambda *a: flash_attention_fp8(*a, backend="mosaic_gpu", mosaic_blocks=blocks,
                                               **kw))(*x8, *scales)
    check(o, expected(x8, scales, do, **kw)[0], "o", atol=FP8_ATOL * vmax(x8, scales))


@pytest.mark.parametrize("packed_layout,o_layout,causal", [("BS3HD", "BSHD", True), ("BSH3D", "BHSD", False)])
def test_packed_qkv_read_in_place_and_gradients(packed_layout, o_layout, causal):
    """One fused QKV array passed three times, each tile read at its entry of the packed axis:
    interpreted forward and gradients (the shared backward) against float64."""
    from eqsat_attn.kernels.packed import packed_flash_attention

    _, q, k, v, do = make_inputs(9, 1, 2, 2, 128, 128, 64, 64, "BHSD", jnp.bfloat16)
    own = packed_layout.replace("3", "")
    qkv = jnp.stack([_physical(x, own) for x in (q, k, v)], axis=packed_layout.index("3"))
    fn = lambda qkv: packed_flash_attention(qkv, packed_layout=packed_layout, scale=0.125,
                                            causal=causal, o_layout=o_layout, interpret=True,
                                            backend="mosaic_gpu")
    o, vjp = jax.vjp(fn, qkv)
    want = np_attention(q, k, v, do, scale=0.125, causal=causal)
    assert_close(_logical(o, o_layout), want[0], 2e-2, "o")
    (dqkv,) = vjp(_physical(do, o_layout))
    for i, (name, w) in enumerate(zip("qkv", want[1:4])):
        got = jnp.take(dqkv, i, axis=packed_layout.index("3"))
        assert_close(_logical(got, own), w, 3e-2, f"d{name}")


def test_packed_compiled_kernel_lowers():
    qkv = jax.ShapeDtypeStruct((1, 512, 3, 4, 128), jnp.bfloat16)
    from eqsat_attn.kernels.mosaic_attention import mosaic_packed_attention

    fn = lambda qkv: mosaic_packed_attention(qkv, packed_layout="BS3HD", scale=0.1, causal=True,
                                             o_layout="BSHD")
    text = jax.jit(fn).trace(qkv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1 and "stablehlo.slice" not in text


# --- random calls inside the contract (hypothesis) -----------------------------------------------

_LAYOUTS_D_MINOR = ("BHSD", "BSHD", "SBHD", "HBSD")
_LAYOUTS_S_MINOR = ("BHDS", "HDBS", "DBHS")


@st.composite
def _calls(draw):
    hkv = draw(st.sampled_from([1, 2]))
    return dict(
        h=hkv * draw(st.sampled_from([1, 2])),
        hkv=hkv,
        sq=128 * draw(st.integers(1, 2)),
        sk=64 * draw(st.integers(1, 4)),
        d=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float16])),
        causal=draw(st.booleans()),
        qko=draw(st.sampled_from(_LAYOUTS_D_MINOR)),
        v_layout=draw(st.sampled_from(_LAYOUTS_D_MINOR + _LAYOUTS_S_MINOR)),
        stages=draw(st.integers(1, 3)),
        overlap=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# derandomized: the same eight calls every run (CI must not meet a new shape by chance); widen
# locally with a larger max_examples and derandomize=False
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(call=_calls())
def test_random_calls_inside_the_contract_match_float64(call):
    """Random shapes, GQA groups, head dims, dtypes, layouts, causal flags, pipeline depths and
    schedules, interpreted, against float64 (o and lse) on random inputs."""
    _, q, k, v, do = make_inputs(call["seed"], 1, call["h"], call["hkv"], call["sq"], call["sk"],
                                 call["d"], call["d"], "BHSD", call["dtype"])
    qko, vl = call["qko"], call["v_layout"]
    blocks = dataclasses.replace(default_blocks(call["dtype"], call["d"], call["sk"]),
                                 stages=call["stages"], overlap=call["overlap"])
    o, lse = mosaic_attention(_physical(q, qko), _physical(k, qko), _physical(v, vl),
                              scale=call["d"] ** -0.5, causal=call["causal"], v_layout=vl,
                              q_layout=qko, k_layout=qko, o_layout=qko, blocks=blocks,
                              interpret=True)
    want = np_attention(q, k, v, do, scale=call["d"] ** -0.5, causal=call["causal"])
    assert_close(_logical(o, qko), want[0], 2e-2, "o")
    np.testing.assert_allclose(np.asarray(lse), np_lse(q, k, scale=call["d"] ** -0.5,
                                                       causal=call["causal"]), rtol=1e-5, atol=1e-4)
