"""The Mosaic GPU backward with score modifications (kernels/mosaic_backward_scores.py): boolean
masks through per-CTA tile lists (both kernels), key lengths, sliding windows, causal plus padding,
soft-cap and an additive bias with its gradient. dQ, dK, dV and dbias in jax's Mosaic GPU
interpreter against jax.vjp of the reference in float64 (scores up to ±30, -inf biases, rows that
keep no key, finite fills, signed zeros); the guarded flash_attention path; the contract; the
compiled kernels lowered for Hopper on CPU; compiled GPU tests behind the gpu marker."""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import flash_attention
from eqsat_attn.kernels.masks import mask_4d
from eqsat_attn.kernels.mosaic_attention import hopper_gpu
from eqsat_attn.kernels.mosaic_backward import mosaic_attention_backward, mosaic_backward_unsupported
from eqsat_attn.kernels.mosaic_backward_scores import (bias_gradient, capped_scores, key_tile_operands,
                                                       list_tile, unbroadcast)
from eqsat_attn.kernels.mosaic_scores import ScoreMods, log2_scores
from eqsat_attn.kernels.reference import MASK_VALUE, attention_reference
from test_kernel_masks import key_padding, no_reference, np_attention  # noqa: F401
from test_kernels import assert_close
from test_mosaic_masks import compiled_case_mods, f64, lengths_mask

fa = importlib.import_module("eqsat_attn.kernels.flash_attention")  # the module, not the function
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
D = 64
TOL = 3e-2  # bf16 operands, bf16 P and dS into the tensor cores, f32 accumulation


def inputs(seed, b, h, hkv, sq, sk, *, logits=30.0):
    """bf16 q, k, v, dO with q·kᵀ/sqrt(D) reaching about ±``logits``; V and dO hold ±0 and a
    denormal."""
    rng = np.random.default_rng(seed)
    a = np.sqrt(logits / 3.6 * 3)
    q = rng.uniform(-a, a, (b, h, sq, D))
    k = rng.uniform(-a, a, (b, hkv, sk, D))
    v = rng.normal(size=(b, hkv, sk, D))
    do = rng.normal(size=(b, h, sq, D))
    v[0, 0, 0, :3] = do[0, 0, 0, :3] = [0.0, -0.0, 1e-40]
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    return rng, bf(q), bf(k), bf(v), bf(do)


def f64_vjp(q, k, v, do, *, scale, causal=False, bias=None, mask=None, softcap=0.0, fill=MASK_VALUE):
    """(o, lse of the visible scores, dq, dk, dv, dbias) in float64: jax.vjp of `attention_reference`
    with x64 on (the NumPy reference of test_kernel_masks where this jax has no enable_x64).
    dbias in the bias's own (broadcast) shape."""
    q64, k64, v64, do64 = (f64(x) for x in (q, k, v, do))
    b64 = None if bias is None else f64(bias)
    keep = None if mask is None else np.asarray(mask, bool)
    ref = np_attention(q64, k64, v64, do64, scale=scale, causal=causal, bias=b64, mask=keep, fill=fill,
                       softcap=softcap)
    g = q.shape[1] // k.shape[1]
    s = q64 @ np.swapaxes(np.repeat(k64, g, axis=1), 2, 3) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if b64 is not None:
        s = s + b64
    hide = np.zeros(s.shape, bool) if keep is None else ~np.broadcast_to(keep, s.shape)
    if causal:
        hide |= np.arange(s.shape[2])[:, None] < np.arange(s.shape[3])[None, :]
    s = np.where(hide, -np.inf, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        top = s.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        lse = (np.log(np.exp(s - top).sum(-1, keepdims=True)) + top)[..., 0]
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # pragma: no cover - older jax
        dbias = None if bias is None else _unbroadcast_np(ref[4], np.shape(bias))
        return ref[0], lse, ref[1], ref[2], ref[3], dbias
    with enable_x64(True):
        def fn(q, k, v, bias):
            return attention_reference(q, k, v, scale=scale, causal=causal, bias=bias, softcap=softcap,
                                       mask=None if keep is None else jnp.asarray(keep), mask_fill=fill)
        def grads(q, k, v, bias, do):
            o, vjp = jax.vjp(fn, q, k, v, bias)
            return o, vjp(do)
        o, (dq, dk, dv, dbias) = jax.jit(grads)(*(jnp.asarray(x) for x in (q64, k64, v64)),
                                                None if b64 is None else jnp.asarray(b64), jnp.asarray(do64))
        assert o.dtype == jnp.float64
    # the reference's scores are float32 (preferred_element_type): it agrees with NumPy's float64
    np.testing.assert_allclose(np.asarray(o), ref[0], atol=1e-4)
    return np.asarray(o), lse, np.asarray(dq), np.asarray(dk), np.asarray(dv), \
        None if dbias is None else np.asarray(dbias)


def _unbroadcast_np(x, shape):  # pragma: no cover - older jax only
    return np.asarray(unbroadcast(jnp.asarray(x), shape))


def tile_mask(rng, b, h, sq, sk):
    """A random [B, H, Sq, Sk] mask (Sk >= 256, H >= 2) whose tiles of both kernels take every
    class (all hidden, all visible, partial), differing per head (the dK/dV kernel walks each
    head's own lists); every row keeps a key."""
    mask = rng.random((b, h, sq, sk)) > 0.4
    mask[:, :, :128, 64:128] = False  # dQ tiling (128 rows x 64 keys): HIDDEN
    mask[:, :, :128, :64] = True  # VISIBLE
    mask[:, 1, :, 128:256] = False  # head 1: keys 128..255 HIDDEN for the dK/dV tiling (128 keys)
    mask[:, 0, :64, 128:256] = True  # head 0: VISIBLE there (64 rows x 128 keys)
    mask[:, :, np.arange(sq), np.arange(sq) % 64] = True
    return mask


CASES = {  # name -> (b, h, hkv, sq, sk, causal, softcap, bias kind, mask kind, kv lengths, window, v layout)
    "causal-bias": (1, 1, 1, 128, 128, True, 0.0, "full", None, None, None, "BHSD"),  # dS above the diagonal never written
    "bias-minus-inf-keys-softcap": (1, 2, 1, 128, 256, False, 20.0, "keys", None, None, None, "BHSD"),
    "random-mask-gqa": (1, 2, 1, 128, 256, False, 0.0, None, "random", None, None, "BHSD"),
    "causal-padding-softcap-bias": (2, 1, 1, 128, 128, True, 30.0, "heads", "padding", None, None, "BHSD"),
    "lengths-window": (2, 1, 1, 128, 128, False, 0.0, None, None, [128, 100], 64, "BHSD"),
    "window-causal-transposed-v": (1, 1, 1, 256, 256, True, 0.0, "full", None, None, 100, "BHDS"),
    "padding-mask-transposed-v-softcap": (2, 2, 1, 128, 128, False, 10.0, None, "padding", None, None, "BHDS"),
    "causal-key-row-bias-transposed-v": (2, 2, 1, 128, 128, True, 0.0, "key-rows", None, None, None, "BHDS"),
}


def case_operands(name, rng):
    b, h, hkv, sq, sk, causal, softcap, bias_kind, mask_kind, lengths, window, v_layout = CASES[name]
    bias = mask = None
    if bias_kind == "full":
        bias = jnp.asarray(rng.normal(size=(b, h, sq, sk)) * 5, jnp.float32)
    elif bias_kind == "heads":  # one bias per head, broadcast over the batch, bf16 as stored
        bias = jnp.asarray(rng.normal(size=(h, sq, sk)) * 5, jnp.bfloat16)
    elif bias_kind == "keys":  # [Sq, Sk]: -inf on one row's first key tile and on a few positions
        x = rng.normal(size=(sq, sk)) * 3
        x[7, :64] = -np.inf
        x[rng.integers(0, sq, 40), rng.integers(0, sk, 40)] = -np.inf
        x[:, 3] = 1e4 - np.arange(sq) * 1e-3  # some rows nearly one-hot on key 3
        x[7, :64] = -np.inf
        bias = jnp.asarray(x, jnp.float32)
    elif bias_kind == "key-rows":  # [B, 1, 1, Sk]: one row for all queries (an additive key mask)
        bias = jnp.asarray(rng.normal(size=(b, 1, 1, sk)) * 5, jnp.float32)
    if mask_kind == "random":
        mask = jnp.asarray(tile_mask(rng, b, h, sq, sk))
    elif mask_kind == "padding":  # a [B, Sk] key-padding mask: half the keys padded in the last batch
        mask = key_padding([sk] * (b - 1) + [sk // 2 + 3], sk)
    kv = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    kw = dict(causal=causal, softcap=softcap, bias=bias, mask=mask, kv_lengths=kv, window=window)
    return (b, h, hkv, sq, sk, v_layout), kw


def reference_keep(kw, sq, sk):
    """The boolean mask (causal aside) the reference gets for the call's hidden positions."""
    keep = None if kw["mask"] is None else np.asarray(kw["mask"])
    if kw["kv_lengths"] is not None or kw["window"] is not None:
        index = lengths_mask(kw["kv_lengths"], sq, sk, kw["window"])
        keep = index if keep is None else keep & index
    return keep


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_masked_backward_matches_float64(name):
    """The kernels alone, fed the float64 residuals: dQ, dK, dV and dbias against jax.vjp of the
    reference in float64 (every row keeps a key with a finite score)."""
    rng = np.random.default_rng(len(name))
    (b, h, hkv, sq, sk, v_layout), kw = case_operands(name, rng)
    _, q, k, v, do = inputs(len(name) + 1, b, h, hkv, sq, sk)
    scale = D ** -0.5
    keep = reference_keep(kw, sq, sk)
    o, lse, *want = f64_vjp(q, k, v, do, scale=scale, causal=kw["causal"], bias=kw["bias"], mask=keep,
                            softcap=kw["softcap"])
    assert np.isfinite(lse).all()
    vt = v_layout == "BHDS"
    got = mosaic_attention_backward(q, k, jnp.swapaxes(v, 2, 3) if vt else v, jnp.asarray(o, jnp.bfloat16),
                                    jnp.asarray(lse, jnp.float32), do, scale=scale, v_layout=v_layout,
                                    interpret=True, **kw)
    dq, dk, dv, dbias = got
    dv = jnp.swapaxes(dv, 2, 3) if vt else dv
    for what, g, w, x in (("dq", dq, want[0], q), ("dk", dk, want[1], k), ("dv", dv, want[2], v)):
        assert g.dtype == jnp.bfloat16 and g.shape == x.shape, what
        assert_close(g, w, TOL, what)
    if kw["bias"] is None:
        assert dbias is None
    else:
        assert dbias.shape == kw["bias"].shape and dbias.dtype == kw["bias"].dtype
        assert_close(dbias, want[3], TOL, "dbias")
        hidden = np.broadcast_to(~np.isfinite(f64(kw["bias"])), dbias.shape)
        assert not np.any(np.asarray(dbias, np.float32)[hidden])  # -inf scores: no weight, no gradient
    if keep is not None and kw["mask"] is not None and np.asarray(kw["mask"]).shape[-2] == 1:
        # padded keys get exactly zero dK, dV
        pad = ~np.asarray(kw["mask"])[-1, 0, 0]
        assert not np.any(np.asarray(dk, np.float32)[-1][:, pad]) and not np.any(np.asarray(dv, np.float32)[-1][:, pad])


def test_hidden_tiles_are_never_read():
    """Q, K, V and dO are NaN where key padding hides whole tiles of batch 1 (its keys 128..255) and
    the bias is NaN there too: had either kernel loaded and multiplied them, NaN would spread into
    the gradients; finite, right gradients show the lists never named those tiles."""
    rng, q, k, v, do = inputs(3, 2, 1, 1, 128, 256)
    k = k.at[1, :, 128:].set(jnp.nan)
    v = v.at[1, :, 128:].set(jnp.nan)
    bias = rng.normal(size=(2, 1, 128, 256))
    bias[1, :, :, 128:] = np.nan
    bias = jnp.asarray(bias, jnp.float32)
    mask = key_padding([256, 128], 256)
    keep = np.asarray(mask)
    kc, vc = jnp.where(keep[:, :, 0, :, None], k, 0), jnp.where(keep[:, :, 0, :, None], v, 0)
    bc = jnp.where(keep, bias, 0.0)
    o, lse, *want = f64_vjp(q, kc, vc, do, scale=0.125, bias=bc, mask=keep)
    dq, dk, dv, dbias = mosaic_attention_backward(q, k, v, jnp.asarray(o, jnp.bfloat16), jnp.asarray(lse), do,
                                                  scale=0.125, causal=False, mask=mask, bias=bias, interpret=True)
    for what, g, w in (("dq", dq, want[0]), ("dk", dk, want[1]), ("dv", dv, want[2]), ("dbias", dbias, want[3])):
        assert np.isfinite(np.asarray(g, np.float32)).all(), what
        assert_close(g, w, TOL, what)


def test_flash_attention_gradients_on_the_mosaic_backward(no_reference, monkeypatch):  # noqa: F811
    """jax.vjp of flash_attention with the Mosaic GPU forward and backward (interpreted): causal, a
    random mask with a row that keeps no key (a finite fill: the uniform average of V, dV gets
    dO / Sk), a differentiable bias broadcast over the heads (dbias summed over them), soft-cap,
    two query heads per kv head. The guard's reference is poisoned, so matching float64 shows the fast path ran; the
    Mosaic GPU backward ran (counted), without a fallback warning."""
    calls = []
    real = fa.mosaic_attention_backward
    monkeypatch.setattr(fa, "mosaic_attention_backward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    rng, q, k, v, do = inputs(4, 1, 2, 1, 128, 256, logits=8.0)
    mask = tile_mask(rng, 1, 2, 128, 256)
    mask[0, 1, 100, :] = False  # a row that keeps no key
    bias = jnp.asarray(rng.normal(size=(1, 1, 128, 256)), jnp.float32)
    fill = -1e4
    kw = dict(scale=D ** -0.5, causal=True, softcap=15.0)

    def fn(q, k, v, bias):
        return flash_attention(q, k, v, bias=bias, mask=jnp.asarray(mask), mask_fill=fill, backend="mosaic_gpu",
                               backward="mosaic_gpu", interpret=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, vjp = jax.vjp(fn, q, k, v, bias)
    dq, dk, dv, dbias = vjp(do)
    assert len(calls) == 1 and calls[0]["bias"] is not None and calls[0]["softcap"] == 15.0
    want_o, _, *want = f64_vjp(q, k, v, do, bias=bias, mask=mask, fill=fill, **kw)
    assert_close(o, want_o, 2e-2, "o")
    for what, g, w in (("dq", dq, want[0]), ("dk", dk, want[1]), ("dv", dv, want[2]), ("dbias", dbias, want[3])):
        assert_close(g, w, TOL, what)


def test_flash_attention_lengths_window_on_the_mosaic_backward(no_reference):  # noqa: F811
    """Key lengths and a sliding window (causal), transposed V, through jax.grad's Mosaic GPU backward."""
    _, q, k, v, do = inputs(6, 1, 1, 1, 128, 128, logits=20.0)
    lengths = jnp.asarray([90], jnp.int32)

    def fn(q, k, v):
        return flash_attention(q, k, jnp.swapaxes(v, 2, 3), scale=D ** -0.5, causal=True, v_layout="BHDS",
                               kv_lengths=lengths, window=48, backend="mosaic_gpu", backward="mosaic_gpu",
                               interpret=True)
    _, vjp = jax.vjp(fn, q, k, v)
    want = f64_vjp(q, k, v, do, scale=D ** -0.5, causal=True, mask=lengths_mask([90], 128, 128, 48))
    for what, g, w in zip(("dq", "dk", "dv"), vjp(do), want[2:5]):
        assert_close(g, w, TOL, what)


def test_unguarded_bias_and_softcap_gradients_on_the_mosaic_backward(monkeypatch):
    """No mask, no fill: flash_attention's plain custom VJP (no guard) with a differentiable bias
    (one per key row, broadcast over the batch and heads) and a soft-cap runs the Mosaic GPU
    backward under EQSAT_ATTN_MOSAIC_BWD=1, where the default would run the plain-JAX
    recomputation: dq, dk, dv, dbias against float64."""
    monkeypatch.setenv(fa.MOSAIC_BWD_ENV, "1")
    calls = []
    real = fa.mosaic_attention_backward
    monkeypatch.setattr(fa, "mosaic_attention_backward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    rng, q, k, v, do = inputs(8, 1, 2, 1, 128, 128)
    bias = jnp.asarray(rng.normal(size=(128, 128)) * 4, jnp.bfloat16)
    kw = dict(scale=D ** -0.5, causal=False, softcap=25.0)
    fn = lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, backend="mosaic_gpu", interpret=True, **kw)  # noqa: E731
    _, vjp = jax.vjp(fn, q, k, v, bias)
    got = vjp(do)
    assert len(calls) == 1
    want = f64_vjp(q, k, v, do, bias=bias, **kw)
    assert got[3].shape == bias.shape and got[3].dtype == jnp.bfloat16
    for what, g, w in zip(("dq", "dk", "dv", "dbias"), got, want[2:]):
        assert_close(g, w, TOL, what)


def test_fill_at_the_scores_level_takes_the_reference_gradients():
    """A fill of -20 among ±30 logits: hidden scores weigh in, so the guard runs the reference for
    the gradients too; with the Mosaic GPU backward asked for they are still the op's."""
    _, q, k, v, do = inputs(7, 1, 1, 1, 128, 128)
    mask = key_padding([64], 128)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=D ** -0.5, causal=False, mask=mask, mask_fill=-20.0,  # noqa: E731
                                         backend="mosaic_gpu", backward="mosaic_gpu", interpret=True)
    _, vjp = jax.vjp(fn, q, k, v)
    want = f64_vjp(q, k, v, do, scale=D ** -0.5, mask=np.asarray(mask), fill=-20.0)
    for what, g, w in zip(("dq", "dk", "dv"), vjp(do), want[2:5]):
        assert_close(g, w, TOL, what)


# --- plain arrays ---------------------------------------------------------------------------

def test_backward_scores_match_the_forwards_and_the_cap_derivative():
    """The backward's per-tile scores are the forward's (`log2_scores`) bit for bit, and its
    soft-cap derivative is 1 - tanh² at ±inf, far past the cap and NaN."""
    s = jnp.asarray([[-jnp.inf, -1e4, -60.0, -1e-3, -0.0, 0.0, 3.0, 59.0, 1e4, jnp.inf, jnp.nan]])
    bias = jnp.asarray(np.linspace(-3, 3, s.shape[1])[None], jnp.bfloat16)
    for mods in (ScoreMods(softcap=30.0), ScoreMods()):
        x, dcap = capped_scores(s, mods, scale=0.5, bias=bias)
        ref = log2_scores(s, mods, scale=0.5, log2_scale=0.5 * np.log2(np.e), bias=bias)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
        if not mods.softcap:
            assert dcap is None
            continue
        t = np.tanh(np.asarray(s, np.float64) * 0.5 / 30)
        np.testing.assert_allclose(np.asarray(dcap), 1 - t * t, atol=1e-6)  # NaN where s is NaN
        assert np.asarray(dcap)[0, 0] == 0.0 and np.asarray(dcap)[0, 9] == 0.0


def test_key_lists_and_bias_gradient_on_plain_arrays():
    """The dK/dV kernel's lists per CTA of keys (VISIBLE query tiles, then PARTIAL; none for keys
    no row keeps); `list_tile` walks them; dbias zeroes hidden (and never written, NaN) positions
    and sums over the bias's broadcast axes."""
    sq, sk = 256, 256
    mask = np.ones((2, 1, sq, sk), bool)
    mask[1, :, :, 100:] = False  # batch 1 keeps keys < 100
    m4 = mask_4d(jnp.asarray(mask), (2, 2, sq, sk))
    counts, index = key_tile_operands(m4, None, sq=sq, sk=sk, causal=True, window=None, cta_keys=128, block_q=64)
    counts, index = np.asarray(counts), np.asarray(index)
    assert counts.shape == (2, 1, 2, 4) and index.shape == (2, 1, 2, 2, 4)
    # batch 0, causal: keys 0..127 see query tiles 0, 1 (partial: the diagonal) and 2, 3 (visible)
    assert counts[0, 0, 0, :3].tolist() == [2, 2, 256] and index[0, 0, 0, 0, :2].tolist() == [2, 3]
    assert index[0, 0, 0, 1, :2].tolist() == [0, 1]
    assert counts[1, 0, 1, :2].tolist() == [0, 0]  # batch 1's keys 128..255: no row keeps one
    walk = [int(list_tile(jnp.int32(i), jnp.asarray(counts[0, 0, 0]), jnp.asarray(index[0, 0, 0]))) for i in range(4)]
    assert walk == [2, 3, 0, 1]
    ds = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 4, 8)), jnp.float32).at[1, :, :, 5:].set(jnp.nan)
    keep = jnp.asarray(np.arange(8) < np.array([8, 5])[:, None])[:, None, None, :]
    got = bias_gradient(ds, keep, jnp.zeros((1, 2, 4, 8), jnp.bfloat16))
    want = np.where(np.asarray(keep), np.asarray(ds), 0.0).sum(0, keepdims=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (1, 2, 4, 8)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)
    assert bias_gradient(ds[:1], None, jnp.zeros((8,))).shape == (8,)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 4, 8)), jnp.float32)
    over_b = (x[0] + x[1]) + x[2]  # the batch slices in order, then the heads
    np.testing.assert_array_equal(np.asarray(unbroadcast(x, (1, 1, 4, 8))), np.asarray(over_b[0] + over_b[1])[None, None])
    np.testing.assert_array_equal(np.asarray(unbroadcast(x, (4, 8))), np.asarray(over_b[0] + over_b[1]))


# --- contract and routing -------------------------------------------------------------------

def test_masked_bias_softcap_calls_take_the_mosaic_backward(monkeypatch):
    """Bias, masks, soft-cap and the guard's fills no longer fall back; a cast prologue, a bias that
    does not broadcast and fp32 operands still do, each with its reason."""
    monkeypatch.delenv(fa.MOSAIC_BWD_ENV, raising=False)
    x = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
    choose = lambda **kw: fa.backward_kernels(x, x, x, backward="mosaic_gpu", forward_backend="mosaic_gpu",  # noqa: E731
                                              interpret=True, **kw)
    for kw in (dict(bias=jnp.zeros((128, 128))), dict(masked=True), dict(softcap=30.0), dict(guarded=True),
               dict(bias=jnp.zeros((2, 1, 128)), masked=True, softcap=5.0, guarded=True)):
        assert choose(**kw) == ("mosaic_gpu", None), kw
    for kw, reason in ((dict(compute_dtype="float16"), "cast prologue"),
                       (dict(bias=jnp.zeros((3, 128, 128))), "does not broadcast"),
                       (dict(softcap=-1.0), "softcap")):
        got, why = choose(**kw)
        assert got == "pallas" and reason in why, (kw, why)
    assert "fill" in mosaic_backward_unsupported(x, x, x, mask_fill=np.nan)
    x32 = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.float32)
    assert "dtype" in mosaic_backward_unsupported(x32, x32, x32)
    with pytest.raises(ValueError, match="window"):
        mosaic_attention_backward(*(jnp.zeros((1, 1, 128, 64), jnp.bfloat16),) * 4, jnp.zeros((1, 1, 128)),
                                  jnp.zeros((1, 1, 128, 64), jnp.bfloat16), scale=0.1, causal=True, window=0,
                                  interpret=True)


# --- the compiled kernels -------------------------------------------------------------------

@pytest.mark.parametrize("d,v_layout,case", [(128, "BHSD", "all"), (64, "BHDS", "all"), (64, "BHSD", "padding"),
                                             (128, "BHDS", "lengths-window"), (64, "BHSD", "bias-softcap"),
                                             (128, "BHDS", "key-row-bias")])
def test_masked_backward_lowers_for_hopper(d, v_layout, case):
    """Bias and mask tiles read from global memory in wgmma's accumulator layout (transposed copies
    for the dK/dV kernel), dS stored for dbias, the tile lists read by the producers and both
    consumers: two Mosaic GPU custom calls."""
    q = jax.ShapeDtypeStruct((2, 4, 512, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 512, d), jnp.bfloat16)
    v = k if v_layout == "BHSD" else jax.ShapeDtypeStruct((2, 2, d, 512), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 4, 512), jnp.float32)
    bias = jax.ShapeDtypeStruct((4, 512, 512), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 4, 512, 512), jnp.bool_)
    pad = jax.ShapeDtypeStruct((2, 1, 1, 512), jnp.bool_)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    extra = {"all": dict(bias=bias, mask=mask), "padding": dict(mask=pad), "lengths-window": dict(kv_lengths=lengths),
             "bias-softcap": dict(bias=bias), "key-row-bias": dict(bias=jax.ShapeDtypeStruct((2, 1, 1, 512), jnp.float32))}[case]
    static = {"all": dict(softcap=30.0, causal=True), "padding": dict(causal=False),
              "lengths-window": dict(window=128, causal=True), "bias-softcap": dict(softcap=10.0, causal=False),
              "key-row-bias": dict(causal=True)}[case]

    def fn(q, k, v, lse, extra):
        return mosaic_attention_backward(q, k, v, q, lse, q, scale=0.1, v_layout=v_layout, **static, **extra)
    text = jax.jit(fn).trace(q, k, v, lse, extra).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("case", ["padding", "random", "causal-softcap-bias", "lengths-window", "bias-transposed-v"])
def test_gpu_compiled_masked_backward_matches_reference(case):
    """The compiled kernels (B2 H8 Hkv2 S1024 D128) through jax.vjp of flash_attention with the
    Mosaic GPU forward and backward, against float64; no fallback warning; deterministic."""
    rng = np.random.default_rng(31)
    b, h, hkv, s, d = 2, 8, 2, 1024, 128
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in
                   ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, h, s, d)))
    kw = dict(causal=False, mask=None, softcap=0.0, kv_lengths=None, window=None, v_layout="BHSD")
    bias = None
    shared = compiled_case_mods(rng, case, b, h, s)
    if shared is not None:
        bias = shared.pop("bias", None)
        kw.update(shared)
    elif case == "lengths-window":
        kw.update(kv_lengths=jnp.asarray([1024, 377], jnp.int32), window=256, causal=True)
    else:
        kw.update(v_layout="BHDS", causal=True)
        bias = jnp.asarray(rng.normal(size=(b, 1, s, s)), jnp.float32)
    vt = kw["v_layout"] == "BHDS"
    fn = jax.jit(lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, scale=d ** -0.5, backend="mosaic_gpu",
                                                       backward="mosaic_gpu", **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, vjp = jax.vjp(fn, q, k, jnp.swapaxes(v, 2, 3) if vt else v, bias)
    grads = vjp(do)
    keep = reference_keep(kw, s, s)
    want = f64_vjp(q, k, v, do, scale=d ** -0.5, causal=kw["causal"], bias=bias, mask=keep, softcap=kw["softcap"])
    got = (grads[0], grads[1], jnp.swapaxes(grads[2], 2, 3) if vt else grads[2], grads[3])
    for what, g, w in zip(("dq", "dk", "dv", "dbias"), got, want[2:]):
        if w is not None:
            assert_close(g, w, TOL, what)
    for first, again in zip(grads, vjp(do)):  # no atomics: the same bits every run
        if first is not None:
            np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(again, np.float32))


def test_bench_masked_backward_rows_count_kept_pairs_and_computed_tiles():
    """bench/tune_backward.py --mosaic-masks: each variant's call and reference mask, and the tiles
    the dQ kernel computes (128 rows x 64 keys) for its per-tile rate: key padding of half the keys
    in half the batch halves those batches' tiles. (The script's rows run a check before timing:
    `masked_errors`; its CPU smoke run is too slow for CI.)"""
    from bench_scripts import load_bench

    mod = load_bench("tune_backward", "bench_tune_backward_masks")
    shape = mod.Shape(4, 2, 256, 64, False)
    a = mod.add_mask_inputs(shape, mod.make_inputs(shape))
    assert np.asarray(a["lengths"]).tolist() == [256, 256, 128, 128]
    per_tile = 2.5 * 4.0 * 64 * 128 * 64
    assert mod.backward_tile_flops(shape, "key padding", 1024, a) == per_tile * (2 * 8 + 2 * 4) * 2
    assert mod.backward_tile_flops(shape, "soft-cap", 1024, a) == per_tile * 4 * 8 * 2
    # causal: a CTA of 128 rows computes the key tiles up to its last row's diagonal (2 + 4), padded
    # batches those below their 128 keys too (2 + 2)
    assert mod.backward_tile_flops(shape, "causal key padding", 1024, a) == per_tile * (2 * 6 + 2 * 4) * 2
    mods, keep, causal = mod.variant_call("sliding window", shape, 100, a)
    assert mods == dict(window=100) and causal and keep.shape == (1, 1, 256, 256)
    mods, keep, causal = mod.variant_call("key padding", shape, 100, a)
    assert keep is a["pad"] and not causal and set(mods) == {"mask"}
    assert mod.variant_call("bias", shape, 100, a)[:2] == ({}, None)
