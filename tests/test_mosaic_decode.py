"""The Mosaic GPU decode path (kernels/mosaic_decode.py) through `decode_attention(backend=
"mosaic_gpu")`: in jax's Mosaic GPU interpreter against float64 NumPy (both V layouts, GQA, Sq > 1,
per-batch cache lengths with an empty cache, a key-padding mask, key chunks that keep nothing,
±0 and large values), its contract and routing, and the compiled form lowered for Hopper on CPU;
compiled GPU tests behind the gpu marker."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels.decode_attention import decode_attention
from eqsat_attn.kernels.mosaic_attention import MosaicBlocks, hopper_gpu
from eqsat_attn.kernels.mosaic_decode import decode_splits, mosaic_decode_unsupported
from eqsat_attn.kernels.reference import MASK_VALUE
from test_decode_kernel import np_attention
from test_kernel_masks import assert_close

da = importlib.import_module("eqsat_attn.kernels.decode_attention")
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
SMALL = MosaicBlocks(block_q=64, block_kv=64, stages=2)
D = 64


def inputs(seed, b, h, hkv, sq, sk):
    """bf16 q, k, v with ±0 and a large value in V, scores about ±10."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, h, sq, D)) * 1.5
    k = rng.normal(size=(b, hkv, sk, D)) * 1.5
    v = rng.normal(size=(b, hkv, sk, D))
    v[0, 0, 0, :3] = [0.0, -0.0, 3e4]
    q[0, 0, 0] = -0.0  # a query of zeros: uniform scores
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    return bf(q), bf(k), bf(v)


def f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
def test_interpreted_mosaic_decode_matches_float64(monkeypatch, v_layout):
    """B2 H4 Hkv2 (GQA) Sq3, 256 keys in 2 chunks of 128: batch 0 keeps keys < 150 by its cache
    length and a padding mask hides a few more (chunk 1 partly kept); batch 1's cache is empty
    (every chunk keeps nothing: the op's finite fill gives V's uniform average). The guard's
    reference fallback is poisoned with NaN: these values came from the Mosaic GPU path."""
    real = da._reference
    monkeypatch.setattr(da, "_reference", lambda *a: real(*a) * jnp.nan)
    b, h, hkv, sq, sk = 2, 4, 2, 3, 256
    q, k, v = inputs(1, b, h, hkv, sq, sk)
    lengths = jnp.asarray([150, 0], jnp.int32)
    mask = np.ones((b, 1, 1, sk), bool)
    mask[0, ..., 5:9] = False
    keep = mask & (np.arange(sk)[None, None, None, :] < np.asarray(lengths)[:, None, None, None])
    want = np_attention(f32(q), f32(k), f32(v), scale=D ** -0.5, keep=keep, fill=MASK_VALUE)
    vv = v if v_layout == "BHSD" else jnp.swapaxes(v, 2, 3)
    got = decode_attention(q, k, vv, scale=D ** -0.5, causal=False, v_layout=v_layout, kv_lengths=lengths,
                           mask=jnp.asarray(mask), backend="mosaic_gpu", mosaic_blocks=SMALL, splits=2,
                           interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (b, h, sq, D)
    assert_close(got, want, 2e-2, "o")


def test_mosaic_decode_contract_and_splits():
    q = jax.ShapeDtypeStruct((2, 8, 1, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 4096, 128), jnp.bfloat16)
    assert mosaic_decode_unsupported(q, k, k, v_layout="BHSD", causal=False) is None
    assert "causal" in mosaic_decode_unsupported(q, k, k, v_layout="BHSD", causal=True)
    heads_mask = jax.ShapeDtypeStruct((2, 8, 1, 4096), jnp.bool_)
    assert "key-padding" in mosaic_decode_unsupported(q, k, k, v_layout="BHSD", causal=False, mask4=heads_mask)
    odd = jax.ShapeDtypeStruct((2, 2, 4000, 128), jnp.bfloat16)
    assert "multiple of 128" in mosaic_decode_unsupported(q, odd, odd, v_layout="BHSD", causal=False)
    assert "cast" in mosaic_decode_unsupported(q, k, k, v_layout="BHSD", causal=False, compute_dtype="float16")
    # chunks: a divisor of the key tiles, at least 512 keys each, about TARGET_CTAS CTAs
    assert decode_splits(2 * 2, 4096, 128) == 8
    assert decode_splits(32 * 8, 32768, 128) == 2  # 264 / 256 CTAs: two chunks
    assert decode_splits(1, 384, 128) == 1
    with pytest.raises(ValueError, match="divisor"):
        decode_splits(4, 4096, 128, splits=3)
    qq, kk = (jnp.zeros(s.shape, s.dtype) for s in (q, k))
    with pytest.raises(ValueError, match="causal"):
        decode_attention(qq, kk, kk, scale=0.1, causal=True, backend="mosaic_gpu", interpret=True)


def test_auto_keeps_decode_on_triton_unless_asked(monkeypatch):
    """"auto" runs the Triton decode kernel until the Mosaic GPU path has run compiled on a GPU:
    only EQSAT_ATTN_MOSAIC_DECODE=1 on a Hopper GPU sends calls inside its contract to it."""
    q = jax.ShapeDtypeStruct((2, 8, 1, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 4096, 128), jnp.bfloat16)
    kw = dict(layouts=dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD"), mask4=None, compute_dtype=None,
              softcap=0.0, interpret=False)
    monkeypatch.setattr(da, "hopper_gpu", lambda: True)
    monkeypatch.delenv(da.MOSAIC_DECODE_ENV, raising=False)
    assert da.decode_backend(q, k, k, backend="auto", causal=False, **kw) == "triton"
    monkeypatch.setenv(da.MOSAIC_DECODE_ENV, "1")
    assert da.decode_backend(q, k, k, backend="auto", causal=False, **kw) == "mosaic_gpu"
    assert da.decode_backend(q, k, k, backend="auto", causal=True, **kw) == "triton"


def test_mosaic_decode_lowers_for_hopper():
    """B32 H32 Hkv8 Sq1 against 4096 keys, transposed V, cache lengths: one Mosaic GPU custom call
    on free views of the cache (the guard's reference branch aside)."""
    q = jax.ShapeDtypeStruct((32, 32, 1, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((32, 8, 4096, 128), jnp.bfloat16)
    vt = jax.ShapeDtypeStruct((32, 8, 128, 4096), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((32,), jnp.int32)

    def fn(q, k, v, lengths):
        return decode_attention(q, k, v, scale=0.1, causal=False, v_layout="BHDS", kv_lengths=lengths,
                                backend="mosaic_gpu", interpret=False)
    text = jax.jit(fn).trace(q, k, vt, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("sq", [1, 16])
def test_gpu_compiled_mosaic_decode_matches_reference(v_layout, sq):
    """B4 H32 Hkv8 against 4096 keys with per-batch cache lengths (one empty), compiled."""
    b, h, hkv, sk = 4, 32, 8, 4096
    q, k, v = inputs(5, b, h, hkv, sq, sk)
    lengths = jnp.asarray([4096, 1000, 0, 2049], jnp.int32)
    keep = np.arange(sk)[None, None, None, :] < np.asarray(lengths)[:, None, None, None]
    want = np_attention(f32(q), f32(k), f32(v), scale=D ** -0.5, keep=keep, fill=MASK_VALUE)
    vv = v if v_layout == "BHSD" else jnp.swapaxes(v, 2, 3)
    got = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, scale=D ** -0.5, causal=False, v_layout=v_layout,
                                                      kv_lengths=n, backend="mosaic_gpu"))(q, k, vv, lengths)
    assert_close(got, want, 2e-2, "o")
