"""Score modifications on the Mosaic GPU forward (kernels/mosaic_scores.py): soft-cap, additive bias,
boolean masks, key lengths and sliding windows through per-CTA tile lists. Values in jax's Mosaic
GPU interpreter against float64 NumPy (extreme scores, -inf biases, fully hidden rows, the op's
finite fills through `flash_attention`'s guard), gradients through the shared backward, the tile
operands, the contract and routing, the compiled form lowered for Hopper on CPU, and compiled GPU
tests behind the gpu marker."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import flash_attention
from eqsat_attn.kernels.masks import HIDDEN, PARTIAL, VISIBLE, mask_4d, tile_classes
from eqsat_attn.kernels.mosaic_attention import (MosaicBlocks, default_blocks, hopper_gpu, mosaic_attention,
                                                 mosaic_unsupported)
from eqsat_attn.kernels.mosaic_scores import (ScoreMods, bias_operand, kept, log2_scores, prepare, safe_max,
                                             tile_operands)
from eqsat_attn.kernels.reference import MASK_VALUE
from test_kernel_masks import assert_close, key_padding, no_reference, np_attention, sentinel_reference  # noqa: F401

fa = importlib.import_module("eqsat_attn.kernels.flash_attention")  # the module, not the function
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
B, H, HKV, D = 2, 2, 1, 64
SMALL = MosaicBlocks(block_q=64, block_kv=64, stages=2)
OVERLAP = MosaicBlocks(block_q=64, block_kv=64, stages=2, overlap=True)


def inputs(seed, sq, sk, *, logits=30.0):
    """bf16 q, k, v, dO; q·kᵀ·scale (scale = 1 / sqrt(D)) reaches about ±``logits`` (uniform
    entries of ±a: the scores' spread is a²/3, their extremes about 3.6 times that); V holds ±0 and
    a denormal."""
    rng = np.random.default_rng(seed)
    a = np.sqrt(logits / 3.6 * 3)
    q = rng.uniform(-a, a, (B, H, sq, D))
    k = rng.uniform(-a, a, (B, HKV, sk, D))
    v = rng.normal(size=(B, HKV, sk, D))
    v[0, 0, 0, :3] = [0.0, -0.0, 1e-40]
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    return rng, bf(q), bf(k), bf(v), bf(rng.normal(size=(B, H, sq, D)))


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def np_lse(q, k, *, scale, causal=False, bias=None, mask=None, softcap=0.0):
    """float64 log-sum-exp of the visible scores (hidden ones weigh nothing), [B,H,Sq]."""
    q, k = f64(q), f64(k)
    s = q @ np.swapaxes(np.repeat(k, q.shape[1] // k.shape[1], axis=1), 2, 3) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + f64(bias)
    keep = np.ones(s.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), s.shape)
    if causal:
        keep = keep & (np.arange(s.shape[2])[:, None] >= np.arange(s.shape[3])[None, :])
    s = np.where(keep, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.max(s, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        return (np.log(np.exp(s - top).sum(-1, keepdims=True)) + top)[..., 0]


def lengths_mask(lengths, sq, sk, window=None):
    """The boolean mask key lengths and a sliding window stand for, [B or 1, 1, Sq, Sk]."""
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    keep = np.ones((1, 1, sq, sk), bool)
    if lengths is not None:
        keep = keep & (j < np.asarray(lengths)[:, None, None, None])
    if window is not None:
        keep = keep & (j <= i) & (j > i - window)
    return keep


def tile_mask(rng, sq, sk):
    """A random [B, H, Sq, Sk] mask whose 128 x 64 tiles (a CTA's rows by a key tile) take every
    class: all hidden, all visible, partial; a query row that keeps no key."""
    mask = rng.random((B, H, sq, sk)) > 0.4
    mask[:, :, 0:128, 64:128] = False  # HIDDEN
    mask[:, :, 0:128, 0:64] = True  # VISIBLE
    mask[1, 1, 5, :] = False  # a row that keeps no key
    return mask


CASES = {  # name -> (causal, softcap, bias?, mask kind, kv lengths, window)
    "softcap": (False, 20.0, None, None, None, None),
    "bias": (False, 0.0, "full", None, None, None),
    "key-bias-minus-inf": (False, 0.0, "keys", None, None, None),
    "key-padding-as-bias": (False, 0.0, "key-rows", None, None, None),
    "alibi-key-rows-causal": (True, 0.0, "alibi", None, None, None),
    "random-mask": (False, 0.0, None, "random", None, None),
    "key-padding": (False, 0.0, None, "padding", None, None),
    "causal-padding-softcap-bias": (True, 30.0, "heads", "padding", None, None),
    "window": (True, 0.0, None, None, None, 100),
    "lengths-window": (False, 0.0, None, None, [256, 70], 64),
}


def case_operands(name, rng, sq, sk):
    causal, softcap, bias_kind, mask_kind, lengths, window = CASES[name]
    bias = mask = None
    if bias_kind == "full":
        bias = jnp.asarray(rng.normal(size=(B, H, sq, sk)) * 5, jnp.float32)
    elif bias_kind == "heads":  # one bias per head, broadcast over the batch, bf16 as stored
        bias = jnp.asarray(rng.normal(size=(H, sq, sk)) * 5, jnp.bfloat16)
    elif bias_kind == "keys":  # an additive key mask: -inf on a row's first key tile, a whole row
        b = rng.normal(size=(sq, sk)) * 3
        b[7, :64] = -np.inf  # the row's first tile is all -inf (the running max stays -inf)
        b[9, :] = -np.inf  # no finite score: NaN in the op
        bias = jnp.asarray(b, jnp.float32)
    elif bias_kind == "key-rows":  # BERT's additive padding mask [B, 1, 1, Sk]: finfo.min on padded keys
        b = np.where(np.arange(sk)[None, :] < np.array([[sk], [sk // 2]]), 0.0, np.finfo(np.float32).min)
        bias = jnp.asarray((b + rng.normal(size=(B, sk)))[:, None, None, :], jnp.float32)
    elif bias_kind == "alibi":  # BLOOM's ALiBi: slope·j per head, one row for all queries, bf16
        slopes = 2.0 ** -np.arange(1, H + 1)
        bias = jnp.asarray((slopes[:, None] * np.arange(sk))[None, :, None, :], jnp.bfloat16)
    if mask_kind == "random":
        mask = jnp.asarray(tile_mask(rng, sq, sk))
    elif mask_kind == "padding":  # a [B, Sk] key-padding mask, half the keys padded in one batch
        mask = jnp.asarray(np.arange(sk)[None, :] < np.array([[sk], [sk // 2]]))[:, None, None, :]
    kv = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    return dict(causal=causal, softcap=softcap, bias=bias, mask=mask, kv_lengths=kv, window=window)


@pytest.mark.parametrize("name,sq,sk,blocks", [
    ("softcap", 128, 256, SMALL), ("softcap", 128, 256, OVERLAP),
    ("bias", 128, 128, SMALL),
    ("key-bias-minus-inf", 128, 256, SMALL), ("key-bias-minus-inf", 128, 256, OVERLAP),
    ("key-padding-as-bias", 128, 256, SMALL), ("alibi-key-rows-causal", 256, 256, OVERLAP),
    ("random-mask", 256, 256, SMALL), ("random-mask", 256, 256, OVERLAP),
    ("key-padding", 128, 256, SMALL),
    ("causal-padding-softcap-bias", 256, 256, SMALL), ("causal-padding-softcap-bias", 256, 256, OVERLAP),
    ("window", 256, 256, SMALL),
    ("window", 256, 256, MosaicBlocks(64, 64, 1, heavy_first=True)),  # one slot, last query tile first
    ("lengths-window", 256, 256, SMALL), ("lengths-window", 256, 256, OVERLAP),
], ids=lambda x: "overlapped" if x is OVERLAP else "alternating" if x is SMALL else
   "one-slot-heavy-first" if isinstance(x, MosaicBlocks) else None)
def test_interpreted_score_mods_match_float64(name, sq, sk, blocks):
    """The kernel alone: hidden positions weigh exactly nothing (the op with fill -inf), so a row
    that keeps no score is NaN with lse -inf; ±30 logits; both schedules."""
    rng, q, k, v, do = inputs(1, sq, sk)
    kw = case_operands(name, rng, sq, sk)
    scale = D ** -0.5
    o, lse = mosaic_attention(q, k, v, scale=scale, blocks=blocks, interpret=True, **kw)
    keep = kw["mask"]
    if kw["kv_lengths"] is not None or kw["window"] is not None:
        index_keep = lengths_mask(kw["kv_lengths"], sq, sk, kw["window"])
        keep = index_keep if keep is None else np.asarray(keep) & index_keep
    ref = dict(scale=scale, causal=kw["causal"], bias=None if kw["bias"] is None else f64(kw["bias"]),
               mask=keep, softcap=kw["softcap"])
    want = np_attention(f64(q), f64(k), f64(v), f64(do), fill=-np.inf, **ref)[0]
    assert_close(o, want, 2e-2, "o")
    want_lse = np_lse(q, k, **ref)
    assert np.array_equal(np.isfinite(np.asarray(lse)), np.isfinite(want_lse)), "lse: -inf rows differ"
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], rtol=1e-4, atol=2e-3)


def test_hidden_tiles_are_never_loaded():
    """K and V are NaN at batch 1's padded keys, two whole key tiles: had they been loaded and
    multiplied, 0·NaN in P·V would make the rows NaN, so a finite result shows the CTAs' lists
    never named them (no TMA, no wgmma)."""
    rng, q, k, v, do = inputs(2, 128, 256)
    k = k.at[1, :, 128:].set(jnp.nan)
    v = v.at[1, :, 128:].set(jnp.nan)
    mask = key_padding([256, 128], 256)
    o, lse = mosaic_attention(q, k, v, scale=0.125, mask=mask, causal=False, blocks=SMALL, interpret=True)
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
    want = np_attention(f64(q)[1:], f64(k)[1:, :, :128], f64(v)[1:, :, :128], f64(do)[1:], scale=0.125)[0]
    assert_close(o[1:], want, 2e-2, "o")


@pytest.mark.parametrize("fill", [-1e4, -1e9, float(np.finfo(np.float32).min), MASK_VALUE, -np.inf])
def test_flash_attention_on_mosaic_gives_the_ops_fills(no_reference, fill):  # noqa: F811
    """Through `flash_attention(backend="mosaic_gpu")`: causal, a random mask with a row that
    keeps no key (finite fill: the uniform average of V) and ±30 logits run the fast path (the
    guard's fallback is poisoned) and give the op's value for each fill. A -inf fill leaves the
    empty row NaN, which only the fallback gives (poisoned: NaN everywhere); that fill is checked
    without its empty row."""
    rng, q, k, v, do = inputs(3, 256, 256)
    mask = tile_mask(rng, 256, 256)
    if fill == -np.inf:
        mask[1, 1, 5, 0] = True
    got = flash_attention(q, k, v, scale=D ** -0.5, causal=True, mask=jnp.asarray(mask), mask_fill=fill,
                          backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True)
    want = np_attention(f64(q), f64(k), f64(v), f64(do), scale=D ** -0.5, causal=True, mask=mask, fill=fill)[0]
    assert_close(got, want, 2e-2, "o")


def test_masked_call_reads_other_layouts_in_place(no_reference):  # noqa: F811
    """q, k, o as [B,S,H,D] and V transposed as [B,H,D,S], with a key-padding mask, a causal flag
    and a bias: the tiles the mask and bias give are logical, whatever the operands' layouts."""
    rng, q, k, v, do = inputs(8, 128, 256)
    mask = key_padding([256, 100], 256)
    bias = jnp.asarray(rng.normal(size=(256,)), jnp.float32)  # one bias per key, broadcast
    bshd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    got = flash_attention(bshd(q), bshd(k), jnp.swapaxes(v, 2, 3), scale=D ** -0.5, causal=True, mask=mask,
                          bias=bias, q_layout="BSHD", k_layout="BSHD", o_layout="BSHD", v_layout="BHDS",
                          backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True)
    want = np_attention(f64(q), f64(k), f64(v), f64(do), scale=D ** -0.5, causal=True, mask=np.asarray(mask),
                        bias=f64(bias))[0]
    assert_close(bshd(got), want, 2e-2, "o")


def fill_level_call(case):
    """Calls whose hidden scores are not negligible beside a visible row: a fill of -20 among ±30
    logits, or a row biased down to -1e4 beside a fill of -1e4. (flash_attention's arguments,
    the float64 result.)"""
    rng, q, k, v, do = inputs(4, 128, 128)
    mask = np.asarray(key_padding([128, 64], 128))
    bias, fill = None, -20.0
    if case == "row-at-fill":
        b = np.zeros((128, 128), np.float32)
        b[17] = -1e4
        bias, fill = jnp.asarray(b), -1e4
    args = dict(q=q, k=k, v=v, scale=D ** -0.5, causal=False, mask=jnp.asarray(mask), mask_fill=fill, bias=bias)
    want = np_attention(f64(q), f64(k), f64(v), f64(do), scale=D ** -0.5, mask=mask, fill=fill,
                        bias=None if bias is None else f64(bias))[0]
    return args, want


@pytest.mark.parametrize("case", ["fill-among-scores", "row-at-fill"])
def test_fill_at_the_scores_level_takes_the_reference(sentinel_reference, case):  # noqa: F811
    """The guard sends such a call to `attention_reference` (here a sentinel of 7s)."""
    args, _ = fill_level_call(case)
    got = flash_attention(**args, backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True)
    assert np.all(np.asarray(got, np.float32) == 7.0)


@pytest.mark.parametrize("case", ["fill-among-scores", "row-at-fill"])
def test_fill_at_the_scores_level_is_exact(case):
    args, want = fill_level_call(case)
    got = flash_attention(**args, backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True)
    assert_close(got, want, 2e-2, "o")


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_through_the_masked_mosaic_forward(no_reference, with_bias):  # noqa: F811
    """jax.grad: the Mosaic GPU forward's residuals (o, lse) feed the shared backward. Without a
    bias, a random mask with a row that keeps no key (fill -1e9: a uniform average, dV gets
    dO / Sk) on the Triton masked backward; with one, key padding, causal, soft-cap and a
    differentiable bias on the plain-JAX recomputation. Gradients against float64."""
    rng, q, k, v, do = inputs(5, 128, 128, logits=8.0)
    if with_bias:
        mask = np.asarray(key_padding([128, 96], 128))
        bias = jnp.asarray(rng.normal(size=(1, H, 128, 128)), jnp.float32)
        kw = dict(scale=D ** -0.5, causal=True, softcap=10.0)
    else:
        mask = tile_mask(rng, 128, 128)
        bias, kw = None, dict(scale=D ** -0.5, causal=False, softcap=0.0)
    fn = lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, mask=jnp.asarray(mask), mask_fill=-1e9,  # noqa: E731
                                               backend="mosaic_gpu", mosaic_blocks=SMALL, interpret=True, **kw)
    o, vjp = jax.vjp(fn, q, k, v, bias)
    dq, dk, dv, dbias = vjp(do)
    want = np_attention(f64(q), f64(k), f64(v), f64(do), bias=None if bias is None else f64(bias), mask=mask,
                        fill=-1e9, **kw)
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", (dq, dk, dv), want[1:4]):
        assert_close(got, w, 3e-2, f"d{name}")
    if with_bias:
        assert dbias.shape == bias.shape
        assert_close(dbias, want[4].sum(axis=0, keepdims=True), 3e-2, "dbias")


# --- the tile operands ----------------------------------------------------------------------

def test_tile_operands_list_each_ctas_tiles_and_never_leave_one_empty():
    """Per CTA (128 rows by 64 keys here) the VISIBLE tiles, then the PARTIAL ones; a CTA whose
    tiles are all hidden gets tile 0 as PARTIAL, so every CTA runs a step; a one-row mask is
    repeated over a warpgroup's rows; the key lengths ride in the counts."""
    sq, sk = 256, 256
    mask = np.ones((2, 1, sq, sk), bool)
    mask[0, :, 128:, :] = False  # batch 0's second CTA keeps nothing
    mask[1, :, :, 100:] = False  # batch 1: tiles 0 visible, 1 partial, 2 and 3 hidden
    m4 = mask_4d(jnp.asarray(mask), (2, 4, sq, sk))
    kmask, counts, index = tile_operands(m4, jnp.asarray([256, 200], jnp.int32), sq=sq, sk=sk, causal=False,
                                         window=None, cta_rows=128, block_kv=64, block_q=64)
    classes = np.asarray(tile_classes(sq, sk, 128, 64, sq, sk, causal=False, mask4=m4,
                                      kv_lengths=jnp.asarray([256, 200]), window=None))
    assert counts.shape == (2, 1, 2, 4) and index.shape == (2, 1, 2, 2, 4) and kmask.shape == (2, 1, sq, sk)
    counts, index = np.asarray(counts), np.asarray(index)
    for b in range(2):
        for i in range(2):
            visible = np.flatnonzero(classes[b, 0, i] == VISIBLE)
            partial = np.flatnonzero(classes[b, 0, i] == PARTIAL)
            if not len(visible) + len(partial):
                assert (classes[b, 0, i] == HIDDEN).all()
                partial = np.array([0])
            assert counts[b, 0, i, :3].tolist() == [len(visible), len(partial), [256, 200][b]]
            assert index[b, 0, i, 0, :len(visible)].tolist() == visible.tolist()
            assert index[b, 0, i, 1, :len(partial)].tolist() == partial.tolist()
    assert counts[0, 0, 1, :2].tolist() == [0, 1]  # the empty CTA
    assert counts[1, 0, 0, :2].tolist() == [1, 1]
    row = tile_operands(mask_4d(key_padding([256, 7], sk), (2, 4, sq, sk)), None, sq=sq, sk=sk, causal=True,
                        window=None, cta_rows=128, block_kv=64, block_q=64)[0]
    assert row.shape == (2, 1, 64, sk) and (np.asarray(row)[1, 0, :, 7:] == 0).all()


def test_tile_math_on_plain_arrays():
    """The kernel's per-tile score math: kept positions under every condition at once, soft-capped
    log2 scores at ±inf and far past the cap, and the safe max of an all -inf row."""
    rng = np.random.default_rng(6)
    rows, cols = np.meshgrid(np.arange(8) + 8, np.arange(16), indexing="ij")
    mask = rng.random((8, 16)) > 0.3
    mods = ScoreMods(window=5, has_lengths=True, lists_bh=(False, False))
    got = kept(rows, cols, mods, causal=True, mask=mask.astype(np.int8), kv_len=12)
    assert np.array_equal(got, mask & (rows >= cols) & (cols < 12) & (cols > rows - 5))
    with pytest.raises(ValueError, match="masked tile"):
        kept(rows, cols, ScoreMods(), causal=False)
    s = jnp.asarray([[-jnp.inf, -1e4, -60.0, -1e-3, 0.0, 3.0, 59.0, 1e4, jnp.inf, jnp.nan]])
    cap = functools.partial(log2_scores, mods=ScoreMods(softcap=30.0), scale=0.5, log2_scale=None)
    capped = np.asarray(cap(s))
    want = 30 * np.tanh(np.asarray(s, np.float64) * 0.5 / 30) * np.log2(np.e)
    np.testing.assert_allclose(capped, want, rtol=0, atol=30 * 1e-6)  # NaN where s is NaN
    assert "tanh" not in str(jax.make_jaxpr(cap)(s))  # Mosaic GPU's approx_math tanh is too coarse
    bias = jnp.asarray([[1.0, -jnp.inf, 2.0, 0.0, 0.0, 0.0]], jnp.bfloat16)
    s = jnp.asarray([[-jnp.inf, -1e4, 0.0, 3.0, 1e4, jnp.inf]])
    plain = np.asarray(log2_scores(s, ScoreMods(), scale=0.5, log2_scale=0.5 * np.log2(np.e), bias=bias))
    assert plain[0, 1] == -np.inf and plain[0, 5] == np.inf
    np.testing.assert_allclose(plain[0, 2:4], (np.array([0.0, 1.5]) + [2.0, 0.0]) * np.log2(np.e), rtol=1e-6)
    assert np.asarray(safe_max(jnp.asarray([-jnp.inf, -3.0]))).tolist() == [0.0, -3.0]


def test_bias_keeps_broadcast_axes_and_rejects_bad_shapes():
    assert bias_operand(jnp.zeros((128, 256), jnp.bfloat16), (2, 4, 128, 256)).shape == (1, 1, 128, 256)
    assert bias_operand(jnp.zeros((4, 1, 256), jnp.float16), (2, 4, 128, 256)).shape == (1, 4, 128, 256)
    assert bias_operand(jnp.zeros((2, 1, 1, 256), jnp.int32), (2, 4, 128, 256)).dtype == jnp.float32
    # one row for all queries: that row repeated for a warpgroup's tile, never over Sq
    assert bias_operand(jnp.zeros((2, 1, 1, 256)), (2, 4, 1024, 256), block_q=64).shape == (2, 1, 64, 256)
    assert bias_operand(jnp.zeros((4, 1024, 256)), (2, 4, 1024, 256), block_q=64).shape == (1, 4, 1024, 256)
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 256)), jnp.float32)
    mods, (kernel_bias,) = prepare(b=2, h=4, sq=1024, sk=256, causal=False, cta_rows=128, block_q=64, block_kv=64,
                                   bias=rows)
    assert not mods.bias_rows and kernel_bias.shape == (2, 1, 64, 256)
    assert np.array_equal(np.asarray(kernel_bias[:, :, 37]), np.asarray(rows[:, :, 0]))
    assert prepare(b=2, h=4, sq=1024, sk=256, causal=False, cta_rows=128, block_q=64, block_kv=64,
                   bias=jnp.zeros((4, 1024, 256)))[0].bias_rows
    with pytest.raises(ValueError, match="does not broadcast"):
        bias_operand(jnp.zeros((3, 1, 1, 256)), (2, 4, 128, 256))
    with pytest.raises(ValueError, match="softcap"):
        ScoreMods(softcap=-1.0)


# --- contract and routing -------------------------------------------------------------------

def test_contract_takes_score_mods_and_names_what_still_misses():
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    for kw in (dict(mask=True), dict(softcap=30.0), dict(bias=bias), dict(causal=True, mask_fill=-1e4),
               dict(mask=True, bias=bias, softcap=5.0, causal=True, mask_fill=-np.inf)):
        assert mosaic_unsupported(q, q, q, scale=0.1, **kw) is None, kw
    f8 = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.float8_e4m3fn)
    f8t = jax.ShapeDtypeStruct((1, 2, 128, 256), jnp.float8_e4m3fn)
    assert "fp8" in mosaic_unsupported(f8, f8, f8t, v_layout="BHDS", scale=0.1, mask=True)
    assert "fill" in mosaic_unsupported(q, q, q, scale=0.1, mask=True, mask_fill=np.nan)
    assert "multiple of 128" in mosaic_unsupported(jax.ShapeDtypeStruct((1, 2, 200, 128), jnp.bfloat16),
                                                   q, q, scale=0.1, mask=True)
    with pytest.raises(ValueError, match="window"):
        mosaic_attention(q, q, q, scale=0.1, causal=True, window=0)


def test_auto_sends_masked_calls_to_mosaic_on_hopper(monkeypatch):
    """Where a Hopper GPU compiles the call, "auto" keeps masked, biased and soft-capped forwards
    on Triton until the compiled Mosaic kernel has run on a GPU (`AUTO_MOSAIC_SCORE_MODS`), and
    with EQSAT_ATTN_AUTO_MOSAIC=1 runs them on Mosaic GPU inside its contract, on Triton outside
    it (here: Sq not a multiple of 128); unmasked calls take Mosaic GPU as before."""
    monkeypatch.delenv("EQSAT_ATTN_AUTO_MOSAIC", raising=False)
    monkeypatch.setattr(fa, "hopper_gpu", lambda: True)
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    mods = (dict(mask=True), dict(softcap=30.0), dict(bias=bias, causal=True, mask_fill=-1e4))
    assert fa.pallas_backend(q, q, q, scale=0.1, interpret=False, causal=True) == "mosaic_gpu"
    for kw in mods:
        assert fa.pallas_backend(q, q, q, scale=0.1, interpret=False, **kw) == \
            ("mosaic_gpu" if fa.AUTO_MOSAIC_SCORE_MODS else "triton"), kw
    monkeypatch.setenv("EQSAT_ATTN_AUTO_MOSAIC", "1")
    for kw in mods:
        assert fa.pallas_backend(q, q, q, scale=0.1, interpret=False, **kw) == "mosaic_gpu", kw
    odd = jax.ShapeDtypeStruct((1, 2, 200, 128), jnp.bfloat16)
    assert fa.pallas_backend(odd, q, q, scale=0.1, interpret=False, mask=True) == "triton"


# --- the compiled kernel --------------------------------------------------------------------

@pytest.mark.parametrize("d,overlap,case", [
    (128, False, "all"), (128, True, "all"), (64, False, "padding"), (64, True, "window"), (256, False, "bias"),
    (128, True, "key-row-bias"),
])
def test_masked_kernels_lower_for_hopper(d, overlap, case):
    """Soft-cap, bias tiles and mask tiles read from global memory in wgmma's accumulator layout,
    the per-CTA tile lists read by the producer and both consumers: one Mosaic GPU custom call,
    inside Hopper's shared memory, for each schedule."""
    q = jax.ShapeDtypeStruct((2, 4, 512, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 512, d), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((4, 512, 512), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 1, 512, 512), jnp.bool_)
    pad = jax.ShapeDtypeStruct((2, 1, 1, 512), jnp.bool_)
    blocks = default_blocks(jnp.bfloat16, d, 512, overlap=overlap)
    rows = jax.ShapeDtypeStruct((2, 1, 1, 512), jnp.float32)
    extra = {"all": dict(bias=bias, mask=mask), "padding": dict(mask=pad), "window": {}, "bias": dict(bias=bias),
             "key-row-bias": dict(bias=rows)}[case]
    static = {"all": dict(softcap=30.0, causal=True), "padding": dict(causal=False), "bias": dict(causal=False),
              "window": dict(window=128, causal=True), "key-row-bias": dict(causal=True)}[case]

    def fn(q, k, v, extra):
        return mosaic_attention(q, k, v, scale=0.1, blocks=blocks, **static, **extra)
    text = jax.jit(fn).trace(q, k, k, extra).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def compiled_case_mods(rng: np.random.Generator, case: str, b: int, h: int, s: int) -> dict | None:
    """The score modifications of the compiled GPU tests' shared cases (forward here, backward in
    test_mosaic_backward_masks.py): a [B, Sk] key padding, a random mask with a hidden block and
    its diagonal kept, or causal plus padding, soft-cap and a bias; None for any other case."""
    if case == "padding":
        return dict(mask=key_padding([1024, 512], s))
    if case == "random":
        m = rng.random((b, h, s, s)) > 0.5
        m[:, :, 256:640, 256:896] = False
        m[:, :, np.arange(s), np.arange(s)] = True
        return dict(mask=jnp.asarray(m))
    if case == "causal-softcap-bias":
        return dict(mask=key_padding([1024, 600], s), causal=True, softcap=30.0,
                    bias=jnp.asarray(rng.normal(size=(h, s, s)), jnp.bfloat16))
    return None


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("case", ["padding", "random", "causal-softcap-bias", "fill-guard", "lengths-window"])
def test_gpu_compiled_masked_mosaic_matches_reference(case, overlap):
    rng = np.random.default_rng(21)
    b, h, hkv, s, d = 2, 8, 2, 1024, 128
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in
                   ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, h, s, d)))
    kw = dict(causal=False, mask=None, softcap=0.0, mask_fill=MASK_VALUE, bias=None, kv_lengths=None, window=None)
    shared = compiled_case_mods(rng, case, b, h, s)
    if shared is not None:
        kw.update(shared)
    elif case == "fill-guard":
        kw.update(causal=True, mask_fill=-1e4, bias=jnp.full((s, s), -1e6, jnp.float32))
    else:
        kw.update(kv_lengths=jnp.asarray([1024, 377], jnp.int32), window=256, causal=True)
    blocks = default_blocks(jnp.bfloat16, d, s, overlap=overlap, causal=kw["causal"])
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, scale=d ** -0.5, backend="mosaic_gpu",
                                                 mosaic_blocks=blocks, **kw))
    got = fn(q, k, v)
    keep = kw["mask"]
    if kw["kv_lengths"] is not None:
        keep = jnp.asarray(lengths_mask(np.asarray(kw["kv_lengths"]), s, s, kw["window"]))
    want = fa.attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                  scale=d ** -0.5, causal=kw["causal"], mask=keep, mask_fill=kw["mask_fill"],
                                  softcap=kw["softcap"], bias=kw["bias"])
    assert_close(got, np.asarray(want, np.float64), 2e-2, "o")


def test_bench_masked_rows_smoke(tmp_path):
    """bench/attention.py --masks on CPU (interpret mode): our Mosaic GPU key-padding row checks out
    against its own reference (a padded batch included), and the page reports its rate on the
    tiles it computes."""
    from bench_scripts import load_bench

    mod = load_bench("attention", "bench_attention_masks")
    out = tmp_path / "masks.md"
    mod.main(["--masks", "--cpu-smoke", "--match", "ours Mosaic GPU key padding$", "--reps", "1", "--out", str(out)])
    text = out.read_text()
    assert "(issue 21)" in text and "on computed tiles" in text and "FAIL" not in text
    lines = text.splitlines()
    assert sum("| ours Mosaic GPU key padding |" in line and "| ok |" in line for line in lines) == 1
    row = "| bfloat16 B2 H2 S128 D64 | True | ours Mosaic GPU key padding | "
    assert sum(line.startswith(row) for line in lines) == 2  # the rows table and the computed-tiles one
