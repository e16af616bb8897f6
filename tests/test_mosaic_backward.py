"""The Mosaic GPU (Hopper) attention backward: dQ, dK, dV in jax's Mosaic GPU interpreter against
jax.vjp of the reference in float64, the opt-in wiring into flash_attention (the switch, the
fallback to the Triton backward with its reason), the compiled kernels' lowering for Hopper on
CPU, and the compiled kernels on a Hopper GPU."""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import flash_attention
from eqsat_attn.kernels.mosaic_attention import hopper_gpu
from eqsat_attn.kernels.mosaic_backward import (MosaicBwdBlocks, mosaic_attention_backward,
                                                mosaic_backward_unsupported)
from eqsat_attn.kernels.reference import attention_reference
from test_kernels import assert_close, np_attention

fa = importlib.import_module("eqsat_attn.kernels.flash_attention")  # the module, not the function
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
#: bf16 operands and bf16 P / dS into the tensor cores, f32 accumulation: |error| below this
#: fraction of (1 + the largest gradient entry)
TOL = 2e-2


def _physical(x, layout):
    """A logical [B,H,S,D] array stored in ``layout``."""
    return jnp.transpose(x, ["BHSD".index(a) for a in layout])


def _logical(x, layout):
    return jnp.transpose(x, [layout.index(a) for a in "BHSD"])


def stressed_inputs(seed, b, h, hkv, sq, sk, d, dtype):
    """Random q, k, v, dO; a few query rows scaled up so that their scores reach about ±30 (after
    the 1/sqrt(d) scale), which makes their softmax nearly one-hot and stresses the exponentials."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, h, sq, d))
    loud = rng.choice(sq, size=max(2, sq // 16), replace=False)
    q[:, :, loud] *= 10.0
    k, v = (rng.normal(size=(b, hkv, sk, d)) for _ in range(2))
    do = rng.normal(size=(b, h, sq, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, do))


def f64_reference(q, k, v, do, *, scale, causal):
    """(o, lse, (dq, dk, dv)) in float64: jax.vjp of `attention_reference` with x64 on (the
    independent numpy reference of test_kernels where this jax has no enable_x64)."""
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    q64, k64, v64, do64 = (as64(x) for x in (q, k, v, do))
    g = q.shape[1] // k.shape[1]
    s = q64 @ np.swapaxes(np.repeat(k64, g, axis=1), 2, 3) * scale
    if causal:
        s = np.where(np.arange(s.shape[2])[:, None] >= np.arange(s.shape[3])[None, :], s, -np.inf)
    top = s.max(-1, keepdims=True)
    lse = (np.log(np.exp(s - top).sum(-1, keepdims=True)) + top)[..., 0]
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # pragma: no cover - older jax
        o, dq, dk, dv, _ = np_attention(q, k, v, do, scale=scale, causal=causal)
        return o, lse, (dq, dk, dv)
    with enable_x64(True):
        fn = lambda q, k, v: attention_reference(q, k, v, scale=scale, causal=causal)  # noqa: E731
        o, vjp = jax.vjp(fn, *(jnp.asarray(x) for x in (q64, k64, v64)))
        assert o.dtype == jnp.float64
        return np.asarray(o), lse, tuple(np.asarray(x) for x in vjp(jnp.asarray(do64)))


CASES = [  # v_layout, causal, b, h, hkv, sq, sk, d, dtype
    ("BHSD", False, 1, 2, 2, 128, 128, 64, jnp.bfloat16),
    ("BHSD", True, 1, 4, 2, 256, 256, 64, jnp.bfloat16),     # GQA: dK, dV summed over the group
    ("BHSD", False, 2, 4, 2, 128, 128, 128, jnp.bfloat16),   # GQA, D128, two batches
    ("BHSD", True, 1, 2, 2, 128, 256, 128, jnp.float16),     # causal Sq < Sk: keys no row sees get zero
    ("BHSD", True, 1, 2, 1, 256, 128, 64, jnp.bfloat16),     # MQA, causal Sq > Sk
    ("BHDS", False, 1, 2, 2, 128, 128, 64, jnp.bfloat16),    # transposed V: dV written as dVᵀ
    ("BHDS", True, 1, 4, 2, 128, 256, 128, jnp.bfloat16),    # transposed V, causal, GQA, D128
]


@pytest.mark.parametrize("v_layout,causal,b,h,hkv,sq,sk,d,dtype", CASES)
def test_interpreted_backward_matches_float64(v_layout, causal, b, h, hkv, sq, sk, d, dtype):
    q, k, v, do = stressed_inputs(sq + d + h, b, h, hkv, sq, sk, d, dtype)
    scale = d ** -0.5
    o, lse, want = f64_reference(q, k, v, do, scale=scale, causal=causal)
    assert np.abs(q.astype(jnp.float32) @ jnp.swapaxes(jnp.repeat(k, h // hkv, 1), 2, 3)
                  .astype(jnp.float32) * scale).max() > 25  # the stressed rows are there
    vt = v_layout == "BHDS"
    grads = mosaic_attention_backward(q, k, jnp.swapaxes(v, 2, 3) if vt else v, jnp.asarray(o, dtype),
                                      jnp.asarray(lse, jnp.float32), do, scale=scale, causal=causal,
                                      v_layout=v_layout, interpret=True)
    assert grads[2].shape == (v.shape[:2] + v.shape[:1:-1] if vt else v.shape)
    grads = (*grads[:2], jnp.swapaxes(grads[2], 2, 3) if vt else grads[2])
    for name, got, w, x in zip("qkv", grads, want, (q, k, v)):
        assert got.dtype == dtype and got.shape == x.shape
        assert_close(got, w, TOL, f"d{name}")
    if causal and sk > sq:  # keys past the last query row get no gradient at all
        assert not np.any(np.asarray(grads[1][:, :, sq:], np.float32))
        assert not np.any(np.asarray(grads[2][:, :, sq:], np.float32))


def test_interpreted_backward_reads_and_writes_any_layout_in_place():
    """q, k, o, dO as [B,S,H,D] (Flax's order), V^T as [H,D,B,S], one slot: gradients in the
    operands' layouts."""
    q, k, v, do = stressed_inputs(5, 1, 4, 2, 128, 128, 64, jnp.bfloat16)
    o, lse, want = f64_reference(q, k, v, do, scale=0.125, causal=True)
    lay, vlay = "BSHD", "HDBS"
    grads = mosaic_attention_backward(
        _physical(q, lay), _physical(k, lay), _physical(v, vlay),
        _physical(jnp.asarray(o, jnp.bfloat16), lay), jnp.asarray(lse, jnp.float32), _physical(do, lay),
        scale=0.125, causal=True, q_layout=lay, k_layout=lay, v_layout=vlay, o_layout=lay,
        blocks=MosaicBwdBlocks(stages=1), interpret=True)
    for name, got, w, layout in zip("qkv", grads, want, (lay, lay, vlay)):
        assert_close(_logical(got, layout), w, TOL, f"d{name}")


@pytest.mark.parametrize("change,reason", [
    (dict(dtype=jnp.float32), "share one dtype"),
    (dict(d=256), "head dims"),
    (dict(sq=192), "Sq=192 must be a multiple of 128"),
    (dict(sk=64), "Sk=64 must be a multiple of 128"),
    (dict(q_layout="BHDS"), "D as its minor"),
])
def test_unsupported_calls_say_why(change, reason):
    c = dict(dtype=jnp.bfloat16, d=64, sq=128, sk=128, v_layout="BHSD", q_layout="BHSD") | change
    q = jax.ShapeDtypeStruct((1, 2, c["sq"], c["d"]) if c["q_layout"] == "BHSD" else (1, 2, c["d"], c["sq"]),
                             c["dtype"])
    k = jax.ShapeDtypeStruct((1, 2, c["sk"], c["d"]), c["dtype"])
    v = jax.ShapeDtypeStruct((1, 2, c["sk"], c["d"]) if c["v_layout"] == "BHSD" else (1, 2, c["d"], c["sk"]),
                             c["dtype"])
    got = mosaic_backward_unsupported(q, k, v, v_layout=c["v_layout"], q_layout=c["q_layout"])
    assert got is not None and reason in got
    ok = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
    assert mosaic_backward_unsupported(ok, ok, ok) is None


def test_direct_call_outside_the_contract_raises_with_the_reason():
    x = jnp.zeros((1, 1, 128, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims must be equal and one of"):
        mosaic_attention_backward(x, x, x, x, jnp.zeros((1, 1, 128)), x, scale=0.1, causal=False)
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicBwdBlocks(block_q=96)


def test_backward_choice_is_opt_in(monkeypatch):
    """The Triton backward stays the default; EQSAT_ATTN_MOSAIC_BWD=1 takes the Mosaic GPU one only
    behind a Mosaic GPU forward; backward="mosaic_gpu" asks for it whatever the forward."""
    x = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
    choose = lambda **kw: fa.backward_kernels(x, x, x, interpret=True, **kw)  # noqa: E731
    monkeypatch.delenv(fa.MOSAIC_BWD_ENV, raising=False)
    assert choose(backward="pallas", forward_backend="mosaic_gpu") == ("pallas", None)
    monkeypatch.setenv(fa.MOSAIC_BWD_ENV, "1")
    assert choose(backward="pallas", forward_backend="mosaic_gpu") == ("mosaic_gpu", None)
    assert choose(backward="pallas", forward_backend="triton") == ("pallas", None)
    assert choose(backward="jax", forward_backend="mosaic_gpu") == ("jax", None)
    monkeypatch.setenv(fa.MOSAIC_BWD_ENV, "0")
    assert choose(backward="pallas", forward_backend="mosaic_gpu") == ("pallas", None)
    assert choose(backward="mosaic_gpu", forward_backend="triton") == ("mosaic_gpu", None)
    # what it still lacks (masks, bias, soft-cap: tests/test_mosaic_backward_masks.py)
    for extra, reason in ((dict(compute_dtype="float16"), "cast"), (dict(softcap=-1.0), "softcap")):
        got, why = choose(backward="mosaic_gpu", forward_backend="mosaic_gpu", **extra)
        assert got == "pallas" and reason in why
    monkeypatch.setattr(fa, "hopper_gpu", lambda: False)  # compiled, and no Hopper GPU
    got, why = fa.backward_kernels(x, x, x, backward="mosaic_gpu", forward_backend="triton")
    assert got == "pallas" and "Hopper" in why
    with pytest.raises(ValueError, match="backward must be one of"):
        choose(backward="cuda", forward_backend="triton")


def _counting_backward(monkeypatch):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(kwargs["causal"])
        return mosaic_attention_backward(*args, **kwargs)
    monkeypatch.setattr(fa, "mosaic_attention_backward", wrapped)
    return calls


def test_jax_grad_of_flash_attention_runs_the_mosaic_backward_when_switched_on(monkeypatch):
    """jax.grad of the public entry, Mosaic GPU forward (interpreted) with EQSAT_ATTN_MOSAIC_BWD=1:
    the Mosaic GPU backward runs (counted) and matches float64."""
    monkeypatch.setenv(fa.MOSAIC_BWD_ENV, "1")
    calls = _counting_backward(monkeypatch)
    q, k, v, do = stressed_inputs(11, 1, 4, 2, 128, 128, 64, jnp.bfloat16)
    _, _, want = f64_reference(q, k, v, do, scale=0.125, causal=True)

    def loss(q, k, v):
        o = flash_attention(q, k, v, scale=0.125, causal=True, backend="mosaic_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert calls == [True]
    for name, got, w in zip("qkv", grads, want):
        assert got.dtype == jnp.bfloat16
        assert_close(got, w, TOL, f"d{name}")


def test_refused_call_falls_back_to_the_triton_backward_with_the_reason(monkeypatch):
    """backward="mosaic_gpu" with Sq = 64 (outside its contract): a warning with the reason, the
    Triton backward's gradients (still right), the Mosaic GPU backward never called."""
    calls = _counting_backward(monkeypatch)
    q, k, v, do = stressed_inputs(12, 1, 2, 2, 64, 128, 64, jnp.bfloat16)
    _, _, want = f64_reference(q, k, v, do, scale=0.125, causal=True)
    with pytest.warns(UserWarning, match="Mosaic GPU attention backward cannot run this call: "
                                         "Sq=64 must be a multiple of 128.*Triton backward runs instead"):
        fn = lambda q, k, v: flash_attention(q, k, v, scale=0.125, causal=True,  # noqa: E731
                                             backward="mosaic_gpu", interpret=True)
        _, vjp = jax.vjp(fn, q, k, v)
    assert calls == []
    for name, got, w in zip("qkv", vjp(do), want):
        assert_close(got, w, TOL, f"d{name}")


@pytest.mark.parametrize("d,causal,v_layout", [(64, False, "BHSD"), (128, True, "BHSD"),
                                                (64, True, "BHDS"), (128, False, "BHDS")])
def test_compiled_backward_lowers_for_hopper(d, causal, v_layout):
    """The compiled form (P and dS from registers, pl.run_state accumulators; transposed V's
    operands read transposed from shared memory) lowers to two Mosaic GPU custom calls (dQ; dK and
    dV) with its tiles inside Hopper's shared memory, and no transposes around them."""
    q = jax.ShapeDtypeStruct((1, 4, 512, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 512, d), jnp.bfloat16)
    v = k if v_layout == "BHSD" else jax.ShapeDtypeStruct((1, 2, d, 512), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 4, 512), jnp.float32)
    fn = lambda q, k, v, o, lse, do: mosaic_attention_backward(q, k, v, o, lse, do, scale=0.1,  # noqa: E731
                                                               causal=causal, v_layout=v_layout)
    text = jax.jit(fn).trace(q, k, v, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2 and "stablehlo.transpose" not in text


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("v_layout,d,dtype,hkv", [("BHSD", 64, jnp.bfloat16, 2), ("BHSD", 128, jnp.bfloat16, 8),
                                                  ("BHSD", 128, jnp.float16, 2), ("BHDS", 128, jnp.bfloat16, 2),
                                                  ("BHDS", 64, jnp.bfloat16, 8)])
def test_gpu_compiled_backward_matches_reference(causal, v_layout, d, dtype, hkv):
    """The compiled kernels (B2 H8 S1024, GQA) through jax.grad of flash_attention with the
    Mosaic GPU forward and backward, against float64; no fallback warning; deterministic."""
    q, k, v, do = stressed_inputs(21, 2, 8, hkv, 1024, 1024, d, dtype)
    scale = d ** -0.5
    _, _, want = f64_reference(q, k, v, do, scale=scale, causal=causal)
    vt = v_layout == "BHDS"
    fn = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, backend="mosaic_gpu",  # noqa: E731
                                         backward="mosaic_gpu", v_layout=v_layout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, vjp = jax.vjp(jax.jit(fn), q, k, jnp.swapaxes(v, 2, 3) if vt else v)
    dq, dk, dv = vjp(do)
    for name, got, w in zip("qkv", (dq, dk, jnp.swapaxes(dv, 2, 3) if vt else dv), want):
        assert got.dtype == dtype
        assert_close(got, w, TOL, f"d{name}")
    for first, again in zip((dq, dk, dv), vjp(do)):  # no atomics: the same bits every run
        np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(again, np.float32))
