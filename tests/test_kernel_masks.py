"""Boolean masks, soft-cap and exact fills on the Pallas Triton kernels (interpret mode on CPU),
forward and gradients, against an independent float64 NumPy implementation written here; the
run-time guard's two paths; the per-tile map; Triton lowering; routing; compiled GPU tests."""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import attention, attention_reference, flash_attention
from eqsat_attn.kernels.masks import HIDDEN, PARTIAL, VISIBLE, mask_4d, tile_classes, tile_lists, tile_map
from eqsat_attn.kernels.mosaic_attention import mosaic_unsupported
from eqsat_attn.kernels.reference import MASK_VALUE, layout_shape

fa = importlib.import_module("eqsat_attn.kernels.flash_attention")  # the module, not the function
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
on_gpu = jax.default_backend() == "gpu"
B, H, HKV, D = 2, 4, 2, 16


def np_attention(q, k, v, do, *, scale, causal=False, bias=None, mask=None, fill=MASK_VALUE, softcap=0.0):
    """float64 o and the gradients of sum(o * do) w.r.t. q, k, v and the (broadcast) bias."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    g = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ np.swapaxes(kr, 2, 3) * scale
    t = None
    if softcap:
        t = np.tanh(s / softcap)
        s = softcap * t
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    keep = np.ones(s.shape, bool)
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask, bool), s.shape)
    if causal:
        keep &= np.arange(s.shape[2])[:, None] >= np.arange(s.shape[3])[None, :]
    s = np.where(keep, s, fill)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = p @ vr
        dp = do @ np.swapaxes(vr, 2, 3)
        ds = np.where(keep, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0)  # d/d(capped s + bias)
        dsr = ds if t is None else ds * (1 - t * t)
        b, _, sq, sk = s.shape
        dq = dsr @ kr * scale
        dk = (np.swapaxes(dsr, 2, 3) @ q * scale).reshape(b, -1, g, sk, q.shape[-1]).sum(2)
        dv = (np.swapaxes(p, 2, 3) @ do).reshape(b, -1, g, sk, v.shape[-1]).sum(2)
    return o, dq, dk, dv, ds


def unbroadcast(x, shape):
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True)


def inputs(seed, sq, sk, *, spread=1.0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, H, sq, D)) * spread, jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, HKV, sk, D)), jnp.float32)
    v = rng.normal(size=(B, HKV, sk, D))
    v[0, 0, 0, :4] = [0.0, -0.0, 1e-40, -6e4]  # ±0, a denormal, a large value (f16 max)
    return rng, q, k, jnp.asarray(v, jnp.float32), jnp.asarray(rng.normal(size=(B, H, sq, D)), jnp.float32)


def assert_close(got, want, tol, what):
    """Equal NaN pattern; elsewhere within tol relative to the largest magnitude of `want`."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN pattern differs"
    fin = ~np.isnan(want)
    if fin.any():
        err = np.abs(got[fin] - want[fin]).max()
        bound = tol * (1.0 + np.abs(want[fin]).max())
        assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def check(seed, sq, sk, *, scale=0.25, causal=False, mask=None, bias=None, fill=MASK_VALUE, softcap=0.0,
          spread=1.0, tol=(2e-5, 1e-4)):
    """Forward and gradients (q, k, v, and the bias when given) of the interpreted kernels."""
    rng, q, k, v, do = inputs(seed, sq, sk, spread=spread)
    kw = dict(scale=scale, causal=causal, mask=mask, mask_fill=fill, softcap=softcap)
    fn = lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, block_q=16, block_k=16, interpret=True, **kw)
    o, vjp = jax.vjp(fn, q, k, v, bias)
    grads = vjp(do)
    want = np_attention(q, k, v, do, scale=scale, causal=causal, bias=bias, mask=mask, fill=fill, softcap=softcap)
    assert_close(o, want[0], tol[0], "o")
    for name, got, w in zip("qkv", grads, want[1:4]):
        assert_close(got, w, tol[1], f"d{name}")
    if bias is not None:
        assert grads[3].shape == bias.shape
        assert_close(grads[3], unbroadcast(want[4], bias.shape), tol[1], "dbias")
    return o, grads


@pytest.fixture
def no_reference(monkeypatch):
    """The guard's fallback poisoned with NaN (forward and gradients): a test that still matches
    the float64 result ran the kernels' fast path."""
    real = fa._reference
    monkeypatch.setattr(fa, "_reference", lambda *a: real(*a) * jnp.nan)


@pytest.fixture
def sentinel_reference(monkeypatch):
    """The guard's fallback replaced by a constant 7: a result of all 7s took the fallback."""
    monkeypatch.setattr(fa, "_reference", lambda cfg, mask, q, k, v, bias: jnp.full(q.shape, 7.0, q.dtype))


def key_padding(lengths, sk):
    return jnp.asarray(np.arange(sk)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


# --- the per-tile map -----------------------------------------------------------------------

def test_tile_map_classes_and_lists():
    rng = np.random.default_rng(0)
    sq, sk = 40, 56  # ragged: padded rows are ignored, padded keys hidden
    mask = rng.random((2, 1, sq, sk)) > 0.3
    mask[:, :, 16:32, :] = False  # a row of hidden tiles
    mask[0, :, :, 0:16] = True  # visible tiles
    got = np.asarray(tile_map(mask_4d(jnp.asarray(mask), (2, 3, sq, sk)), sq, True, 16, 16))
    assert got.shape == (2, 1, 3, 4)
    keep = mask & (np.arange(sq)[:, None] >= np.arange(sk)[None, :])
    for b in range(2):
        for i in range(3):
            for j in range(4):
                tile = np.zeros((16, 16), bool)  # padded keys hidden
                real = keep[b, 0, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
                tile[:real.shape[0], :real.shape[1]] = real
                tile = tile[:real.shape[0]]  # padded rows do not count
                want = VISIBLE if tile.all() else PARTIAL if tile.any() else HIDDEN
                assert got[b, 0, i, j] == want, (b, i, j)
    assert {HIDDEN, VISIBLE, PARTIAL} <= set(got.ravel().tolist())
    counts, index = tile_lists(jnp.asarray(got))
    counts, index = np.asarray(counts), np.asarray(index)
    assert index.shape[-1] == 4 and counts.shape == got.shape[:3] + (2,)
    for b in range(2):
        for i in range(3):
            for c, cls in enumerate((VISIBLE, PARTIAL)):
                want = np.flatnonzero(got[b, 0, i] == cls)
                assert counts[b, 0, i, c] == len(want)
                assert np.array_equal(index[b, 0, i, c, :len(want)], want)


def test_mask_4d_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not broadcast"):
        mask_4d(jnp.ones((3, 8), bool), (1, 2, 4, 8))
    assert mask_4d(jnp.ones((8,), bool), (1, 2, 4, 8)).shape == (1, 1, 1, 8)


# --- forward and gradients ------------------------------------------------------------------

def test_key_padding_fast_path(no_reference):
    sk = 48
    mask = key_padding([48, 17], sk)  # [B, 1, 1, Sk]: one broadcast row, not materialized over Sq
    check(1, 32, sk, mask=mask)


def test_bias_with_one_row_for_all_queries_is_read_as_that_row(no_reference):
    """An additive key-padding bias [B, 1, 1, Sk] (finfo.min on padded keys): values and gradients,
    and the forward kernel reads it as one [1, Sk] row, never materialised over the queries."""
    sk = 40
    rows = np.where(np.arange(sk)[None, :] < np.array([[sk], [13]]), 0.0, np.finfo(np.float32).min)
    bias = jnp.asarray(rows + np.random.default_rng(4).normal(size=(B, sk)), jnp.float32)[:, None, None, :]
    check(3, 32, sk, bias=bias)
    q = jnp.zeros((B, H, 32, D), jnp.float32)
    k = jnp.zeros((B, HKV, sk, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, bias: flash_attention(q, k, k, scale=0.25, causal=False, bias=bias, block_q=16,
                                                            block_k=16, interpret=True))(q, k, bias)
    shapes = [tuple(v.aval.shape) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call" for v in e.invars]
    assert (B, 1, 1, 48) in shapes and not any(s[-2:] == (32, 48) for s in shapes), shapes


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_key_padding_with_bias_grad(no_reference):
    rng = np.random.default_rng(2)
    bias = jnp.asarray(rng.normal(size=(1, H, 32, 40)) * 3, jnp.float32)
    check(2, 32, 40, mask=key_padding([40, 9], 40), bias=bias)


def test_causal_and_padding_ragged(no_reference):
    mask = key_padding([40, 23], 40)
    check(3, 40, 40, causal=True, mask=mask)


def random_mask(seed, sq, sk, hidden_row: bool):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, H, sq, sk)) > 0.35
    mask[:, :, 16:32, 32:48] = False  # fully hidden tiles
    mask[:, :, 0:16, 0:16] = True  # fully visible tiles
    mask[1, 2, :, 16:32] = False
    for b in range(B):  # a visible key in every row
        for h in range(H):
            mask[b, h, np.arange(sq), np.arange(sq) % sk] = True
    if hidden_row:
        mask[0, 1, 5, :] = False
    return jnp.asarray(mask)


def test_hidden_tiles_are_never_read():
    """V is NaN in a key tile that every row hides: the forward and backward kernels skip it (a
    visited tile would give 0 · NaN = NaN in P·V), so o and the gradients equal those of V zeroed
    there. (The reference's P·V does give NaN here: skipping hidden keys drops NaN / Inf values of
    V at them, as the causal kernels always did above the diagonal.)"""
    _, q, k, v, do = inputs(22, 48, 64)
    mask = np.ones((B, 1, 48, 64), bool)
    mask[:, :, :, 32:48] = False
    mask = jnp.asarray(mask)
    poisoned = v.at[:, :, 32:48, :].set(jnp.nan)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.25, causal=False, mask=mask, block_q=16, block_k=16,
                                         interpret=True)
    o, vjp = jax.vjp(fn, q, k, poisoned)
    want = np_attention(q, k, v.at[:, :, 32:48, :].set(0.0), do, scale=0.25, mask=mask)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")


def test_jit_with_traced_mask_and_lengths(no_reference):
    """Under jit, with the mask and key lengths traced arguments (tile maps computed in the graph)."""
    _, q, k, v, do = inputs(23, 40, 48)
    mask, lengths = random_mask(23, 40, 48, hidden_row=True), jnp.asarray([48, 30], jnp.int32)

    @jax.jit
    def grads(q, k, v, mask, lengths):
        fn = lambda q, k, v: flash_attention(q, k, v, scale=0.25, causal=True, mask=mask, kv_lengths=lengths,
                                             mask_fill=-1e9, block_q=16, block_k=16, interpret=True)
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)

    o, (dq, dk, dv) = grads(q, k, v, mask, lengths)
    keep = np.asarray(mask) & np_index_keep(40, 48, [48, 30])
    want = np_attention(q, k, v, do, scale=0.25, causal=True, mask=keep, fill=-1e9)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", (dq, dk, dv), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")


def test_random_mask_fast_path_uses_all_tile_classes(no_reference):
    mask = random_mask(4, 48, 64, hidden_row=False)
    classes = np.asarray(tile_map(mask_4d(mask, (B, H, 48, 64)), 48, False, 16, 16))
    assert {HIDDEN, VISIBLE, PARTIAL} <= set(classes.ravel().tolist())
    check(4, 48, 64, mask=mask)


@pytest.mark.parametrize("fill,with_bias", [(MASK_VALUE, False), (float(np.finfo(np.float32).min), True),
                                            (-1e9, False)])
def test_fully_hidden_row_is_a_uniform_average(no_reference, fill, with_bias):
    """A row that keeps no key (finite fill): the kernels' fast path sets it to the mean of V
    (and its V gradient dO / Sk); no fallback to the reference."""
    mask = random_mask(5, 48, 64, hidden_row=True)
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(H, 48, 64)), jnp.float32) if with_bias else None
    o, _ = check(5, 48, 64, mask=mask, fill=fill, bias=bias)
    _, _, _, v, _ = inputs(5, 48, 64)
    assert_close(o[0, 1, 5], np.asarray(v, np.float64)[0, 0].mean(0), 2e-5, "uniform row")


def test_fully_hidden_row_with_minus_inf_fill_falls_back(sentinel_reference):
    _, q, k, v, _ = inputs(5, 48, 64)
    o = flash_attention(q, k, v, scale=0.25, causal=False, mask=random_mask(5, 48, 64, True), block_q=16,
                        block_k=16, interpret=True, mask_fill=-math.inf)
    assert np.all(np.asarray(o) == 7.0)


def test_padded_query_rows_in_other_layouts(no_reference):
    """A query-and-key padding mask [B,1,Sq,Sk] (padded query rows keep no key), q/k/o in
    [B,S,H,D] and V transposed [B,H,D,S]: the uniform rows land in the right places."""
    _, q, k, v, do = inputs(21, 40, 40)
    qvalid, kvalid = np.arange(40) < np.array([[40], [29]]), np.arange(40) < np.array([[40], [17]])
    mask = jnp.asarray(qvalid[:, None, :, None] & kvalid[:, None, None, :])
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    fn = lambda q, k, v: flash_attention(t(q), t(k), jnp.swapaxes(v, 2, 3), scale=0.25, causal=False, mask=mask,
                                         q_layout="BSHD", k_layout="BSHD", v_layout="BHDS", o_layout="BSHD",
                                         block_q=16, block_k=16, interpret=True)
    o, vjp = jax.vjp(fn, q, k, v)
    want = np_attention(q, k, v, do, scale=0.25, mask=mask)
    assert_close(t(o), want[0], 2e-5, "o")
    for name, got, w in zip("qkv", vjp(t(do)), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")


def test_minus_inf_fill_hidden_row_is_nan():
    mask = random_mask(6, 48, 64, hidden_row=True)
    o, grads = check(6, 48, 64, mask=mask, fill=-math.inf)
    assert np.isnan(np.asarray(o)[0, 1, 5]).all() and np.isfinite(np.asarray(o)[0, 1, 4]).all()
    _, q, k, v, do = inputs(6, 48, 64)  # gradients as the reference's own (NaN where it is)
    ref = lambda q, k, v: attention_reference(q, k, v, scale=0.25, causal=False, mask=mask, mask_fill=-math.inf)
    for name, got, w in zip("qkv", grads, jax.vjp(ref, q, k, v)[1](do)):
        assert_close(got, w, 1e-4, f"reference d{name}")


def test_minus_inf_fill_fast_path(no_reference):
    check(7, 48, 64, mask=random_mask(7, 48, 64, hidden_row=False), fill=-math.inf, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_extreme_scores(no_reference, causal):
    """Scores up to ~1e3 capped at 30: tanh saturates; the gradient's 1 - tanh² underflows there."""
    check(8, 40, 48, softcap=30.0, causal=causal, spread=300.0, tol=(2e-5, 2e-4))


def test_softcap_mask_bias_grads(no_reference):
    rng = np.random.default_rng(9)
    bias = jnp.asarray(rng.normal(size=(B, 1, 48, 64)), jnp.float32)
    check(9, 48, 64, softcap=5.0, mask=random_mask(9, 48, 64, False), bias=bias, spread=4.0)


def test_finite_fill_above_scores_takes_the_reference(sentinel_reference):
    """Fill -1e4 with visible scores near -1e6 (bias): the hidden scores dominate; only the
    reference has them, so the guard must take it."""
    _, q, k, v, _ = inputs(10, 32, 48)
    o = flash_attention(q, k, v, scale=0.25, causal=True, bias=jnp.full((32, 48), -1e6), mask_fill=-1e4,
                        block_q=16, block_k=16, interpret=True)
    assert np.all(np.asarray(o) == 7.0)


@pytest.mark.parametrize("masked", [False, True])
def test_finite_fill_below_scores_guard_path(masked):
    """The guard path's values: forward and gradients (bias included) are the op's."""
    mask = random_mask(11, 32, 48, hidden_row=False) if masked else None
    bias = jnp.asarray(np.random.default_rng(11).normal(size=(32, 48)) - 1e6, jnp.float32)
    check(11, 32, 48, causal=True, mask=mask, bias=bias, fill=-1e4, tol=(2e-5, 2e-4))


@pytest.mark.parametrize("masked", [False, True])
def test_finite_fill_above_threshold_fast_path(no_reference, masked):
    mask = random_mask(12, 32, 48, hidden_row=False) if masked else None
    check(12, 32, 48, causal=True, mask=mask, fill=-1e4)


def test_bf16_masked_softcapped():
    rng, q, k, v, do = inputs(13, 48, 64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = random_mask(13, 48, 64, hidden_row=False)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.25, causal=True, mask=mask, softcap=20.0,
                                         block_q=16, block_k=16, interpret=True)
    o, vjp = jax.vjp(fn, q, k, v)
    want = np_attention(q, k, v, do, scale=0.25, causal=True, mask=mask, softcap=20.0)
    assert o.dtype == jnp.bfloat16
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", vjp(do.astype(jnp.bfloat16)), want[1:4]):
        assert_close(got, w, 3e-2, f"d{name}")


def np_index_keep(sq, sk, lengths=None, window=None):
    keep = np.ones((len(lengths) if lengths is not None else 1, 1, sq, sk), bool)
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    if lengths is not None:
        keep &= (j < np.asarray(lengths)[:, None, None])[:, None]
    if window is not None:
        keep &= (j <= i) & (j > i - window)
    return keep


def check_index_mask(seed, sq, sk, *, lengths=None, window=None, mask=None, bias=None, causal=False, **kw):
    """The kernels given kv_lengths / window match the float64 result for the equivalent mask."""
    rng, q, k, v, do = inputs(seed, sq, sk)
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    fn = lambda q, k, v, bias: flash_attention(q, k, v, scale=0.25, causal=causal, bias=bias, mask=mask,
                                               kv_lengths=lens, window=window, block_q=16, block_k=16,
                                               interpret=True, **kw)
    o, vjp = jax.vjp(fn, q, k, v, bias)
    grads = vjp(do)
    keep = np_index_keep(sq, sk, lengths, window) & (True if mask is None else np.asarray(mask))
    want = np_attention(q, k, v, do, scale=0.25, causal=causal, bias=bias, mask=keep,
                        fill=kw.get("mask_fill", MASK_VALUE), softcap=kw.get("softcap", 0.0))
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", grads, want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")
    if bias is not None:
        assert_close(grads[3], unbroadcast(want[4], bias.shape), 1e-4, "dbias")
    return o


@pytest.mark.parametrize("window", [9, 25])  # 9: tiles that key length and window each cut, jointly hide
def test_index_tile_map_matches_brute_force(window):
    sq, sk, bq, bk = 40, 56, 16, 16
    lengths = np.array([56, 20, 0])
    got = np.asarray(tile_classes(sq, sk, bq, bk, 48, 64, causal=False, kv_lengths=jnp.asarray(lengths),
                                  window=window))
    keep = np_index_keep(sq, sk, lengths, window)
    for b in range(3):
        for i in range(3):
            for j in range(4):
                tile = np.zeros((16, 16), bool)
                real = keep[b, 0, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
                tile[:real.shape[0], :real.shape[1]] = real
                tile = tile[:real.shape[0]]
                want = VISIBLE if tile.all() else PARTIAL if tile.any() else HIDDEN
                assert got[b, 0, i, j] == want, (b, i, j)
    assert {HIDDEN, PARTIAL} | ({VISIBLE} if window > bq else set()) <= set(got.ravel().tolist())


def test_kv_lengths_fast_path(no_reference):
    check_index_mask(16, 40, 48, lengths=[48, 13])


def test_window_fast_path(no_reference):
    check_index_mask(17, 48, 48, window=20, softcap=10.0)


def test_window_longer_queries_than_keys(no_reference):
    """Sq > Sk + window: the last rows keep no key (uniform averages, fast path)."""
    check_index_mask(24, 64, 32, window=16)


def test_kv_lengths_window_mask_and_bias(no_reference):
    """Every condition at once, with a bias (the plain-JAX backward, dbias included)."""
    bias = jnp.asarray(np.random.default_rng(18).normal(size=(1, H, 48, 64)), jnp.float32)
    check_index_mask(18, 48, 64, lengths=[64, 40], window=33, mask=random_mask(18, 48, 64, False),
                     bias=bias, mask_fill=-1e9)


def test_zero_kv_length_rows_average_uniformly(no_reference):
    """kv_lengths 0: no row of that batch keeps a key: uniform averages, on the fast path."""
    o = check_index_mask(19, 32, 48, lengths=[48, 0])
    _, _, _, v, _ = inputs(19, 32, 48)
    assert_close(o[1, :, 3], np.broadcast_to(np.asarray(v, np.float64)[1].mean(1)[[0, 0, 1, 1]], (H, D)),
                 2e-5, "uniform")


def test_index_masks_reject_bad_arguments():
    _, q, k, v, _ = inputs(20, 16, 16)
    with pytest.raises(ValueError, match="kv_lengths"):
        flash_attention(q, k, v, scale=1.0, causal=False, kv_lengths=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="kv_lengths"):
        flash_attention(q, k, v, scale=1.0, causal=False, kv_lengths=jnp.ones((B,), jnp.float32))
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, scale=1.0, causal=False, window=0)


# --- dispatch and routing -------------------------------------------------------------------

def test_dispatcher_runs_masked_softcapped_calls_on_pallas(no_reference):
    _, q, k, v, do = inputs(14, 32, 32)
    mask = random_mask(14, 32, 32, hidden_row=False)
    got = attention(q, k, v, scale=0.25, causal=True, mask=mask, mask_fill=-1e9, softcap=10.0, kernel="pallas")
    want = np_attention(q, k, v, do, scale=0.25, causal=True, mask=mask, fill=-1e9, softcap=10.0)[0]
    assert_close(got, want, 2e-5, "o")
    with pytest.raises(ValueError, match="mask_fill"):
        flash_attention(q, k, v, scale=0.25, causal=True, mask=mask, mask_fill=math.nan)
    got = attention(q, k, v, scale=0.25, causal=True, mask=mask, mask_fill=math.nan, kernel="pallas")
    assert np.isnan(np.asarray(got)).any()  # the reference ran it (the NaN fill where hidden)


def test_mosaic_contract_takes_score_mods():
    """The Mosaic GPU forward takes masks, soft-caps and guarded fills too (tests/test_mosaic_masks.py);
    off a GPU "auto" stays on Triton, and forcing Mosaic GPU is allowed."""
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
    for kw in (dict(mask=True), dict(softcap=30.0), dict(causal=True, mask_fill=-1e4)):
        assert mosaic_unsupported(q, q, q, scale=0.1, **kw) is None, kw
    assert fa.pallas_backend(q, q, q, scale=0.1, mask=True) == "triton"
    assert fa.pallas_backend(q, q, q, scale=0.1, mask=True, backend="mosaic_gpu", interpret=True) == "mosaic_gpu"


def test_lowered_masked_node_runs_the_guarded_kernel(no_reference):
    """An attention node with a boolean mask, a finite fill and a soft-cap, q/k/o in [B,S,H,D]:
    lower_attention passes them to the Pallas kernel (fast path), the report says so."""
    import eqsat_attn as ea
    from eqsat_attn.ir import ProgramBuilder, TensorType

    _, q, k, v, do = inputs(15, 32, 32)
    mask = random_mask(15, 32, 32, hidden_row=False)[:, :1]  # [B, 1, Sq, Sk]
    bshd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    b = ProgramBuilder()
    ins = [b.input(TensorType(bshd(x).shape, "float32")) for x in (q, k, v)]
    ins.append(b.input(TensorType(mask.shape, "bool")))
    out = b.add("attention", ins, TensorType((B, 32, H, D), "float32"), q_layout="BSHD", k_layout="BSHD",
                v_layout="BSHD", o_layout="BSHD", scale=0.25, causal=True, mask_kind="bool",
                mask_fill=-1e4, softcap=8.0)
    program = b.build([out])
    (got,) = ea.lower(program, attention_kernel="pallas")(bshd(q), bshd(k), bshd(v), mask)
    want = np_attention(q, k, v, do, scale=0.25, causal=True, mask=mask, fill=-1e4, softcap=8.0)[0]
    assert_close(bshd(got), want, 2e-5, "o")
    (info,) = ea.report.attention_infos(program, "pallas")
    assert (info.kernel, info.backend) == ("pallas", "triton")


# --- Triton lowering without a GPU ------------------------------------------------------------

@pytest.mark.skipif(on_gpu, reason="the GPU tests compile the real kernels")
@pytest.mark.parametrize("mask_shape,causal,softcap,qko,index", [
    ((2, 1, 1000, 1000), False, 0.0, "BHSD", False),
    ((2, 4, 1, 1000), True, 30.0, "BSHD", False),  # per-head key padding, strided tiles
    ((1000, 1000), True, 0.0, "BHSD", True),  # with kv_lengths and a window
])
def test_masked_kernels_lower_to_triton(monkeypatch, mask_shape, causal, softcap, qko, index):
    from test_kernels import _pretend_hopper

    _pretend_hopper(monkeypatch)
    sizes = lambda hh: {"B": 2, "H": hh, "S": 1000, "D": 64}
    q = jax.ShapeDtypeStruct(layout_shape(qko, sizes(4)), jnp.bfloat16)
    k = jax.ShapeDtypeStruct(layout_shape(qko, sizes(2)), jnp.bfloat16)
    m = jax.ShapeDtypeStruct(mask_shape, jnp.bool_)
    fn = lambda q, k, v, m: flash_attention(q, k, v, scale=0.1, causal=causal, q_layout=qko, k_layout=qko,
                                            v_layout=qko, o_layout=qko, interpret=False, mask=m,
                                            softcap=softcap, mask_fill=-1e4,
                                            kv_lengths=jnp.array([1000, 300]) if index else None,
                                            window=128 if index else None)
    loss = lambda q, k, v, m: fn(q, k, v, m).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, m).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ


# --- GPU only: compiled Triton kernels ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU backend")
@pytest.mark.parametrize("case", ["padding", "random", "causal-softcap", "fill-guard", "padded-queries",
                                  "lengths-window"])
def test_gpu_compiled_masks_match_reference(case):
    rng = np.random.default_rng(20)
    b, h, hkv, s, d = 2, 8, 2, 1000, 128
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in
                   ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, h, s, d)))
    mask, causal, softcap, fill, bias, lengths, window = None, False, 0.0, MASK_VALUE, None, None, None
    if case == "padding":
        mask = key_padding([1000, 377], s)
    elif case == "random":
        m = rng.random((b, h, s, s)) > 0.5
        m[:, :, 200:600, 300:900] = False
        m[:, :, np.arange(s), np.arange(s)] = True
        mask = jnp.asarray(m)
    elif case == "causal-softcap":
        mask, causal, softcap = key_padding([1000, 600], s), True, 30.0
    elif case == "fill-guard":
        causal, fill, bias = True, -1e4, jnp.full((s, s), -1e6, jnp.float32)
    elif case == "padded-queries":  # rows that keep no key: uniform averages on the fast path
        valid = np.arange(s) < np.array([[1000], [611]])
        mask = jnp.asarray(valid[:, None, :, None] & valid[:, None, None, :])
    else:
        lengths, window = [1000, 377], 256
    fn = lambda q, k, v: flash_attention(q, k, v, scale=d ** -0.5, causal=causal, mask=mask, softcap=softcap,
                                         mask_fill=fill, bias=bias, window=window,
                                         kv_lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32))
    o, vjp = jax.vjp(jax.jit(fn), q, k, v)
    keep = mask if lengths is None else np_index_keep(s, s, lengths, window)
    want = np_attention(q, k, v, do, scale=d ** -0.5, causal=causal, mask=keep, fill=fill, softcap=softcap,
                        bias=bias)
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:4]):
        assert_close(got, w, 3e-2, f"d{name}")
