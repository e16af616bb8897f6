"""The decode kernel (kernels/decode_attention.py) in interpret mode on CPU against an independent
float64 NumPy implementation: Sq 1..16, both V layouts, GQA, per-batch cache lengths (an empty
cache included), masks, causal, soft-cap, extreme values; the guard's fallback; gradients; routing
(dispatch, lowering, report, cost model); its Triton lowering for a GPU."""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import attention, attention_reference
from eqsat_attn.kernels.decode_attention import (DECODE_MAX_QUERIES, DECODE_MIN_KEYS, combine_splits,
                                                 decode_attention, decode_tiles, takes_decode)
from eqsat_attn.kernels.reference import MASK_VALUE, layout_shape
from test_kernel_masks import assert_close  # one NaN-aware comparison for the interpreted kernels

da = importlib.import_module("eqsat_attn.kernels.decode_attention")
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
on_gpu = jax.default_backend() == "gpu"
B, HKV, D, SK = 3, 2, 16, 200  # SK: not a multiple of the 16-key tiles


def np_attention(q, k, v, do=None, *, scale, causal=False, keep=None, fill=MASK_VALUE, softcap=0.0):
    """float64 o (and, given do, the gradients of sum(o * do) w.r.t. q, k, v); [B,H,Sq,D] layouts."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        s = q @ np.swapaxes(kr, 2, 3) * scale
        t = None
        if softcap:
            t = np.tanh(s / softcap)
            s = softcap * t
        hide = np.zeros(s.shape, bool)
        if keep is not None:
            hide |= ~np.broadcast_to(np.asarray(keep, bool), s.shape)
        if causal:
            hide |= np.arange(s.shape[2])[:, None] < np.arange(s.shape[3])[None, :]
        s = np.where(hide, fill, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = p @ vr
        if do is None:
            return o
        do = np.asarray(do, np.float64)
        dp = do @ np.swapaxes(vr, 2, 3)
        ds = np.where(hide, 0.0, p * (dp - (dp * p).sum(-1, keepdims=True)))
        dsr = ds if t is None else ds * (1 - t * t)
        b, _, sq, sk = s.shape
        dq = dsr @ kr * scale
        dk = (np.swapaxes(dsr, 2, 3) @ q * scale).reshape(b, -1, g, sk, q.shape[-1]).sum(2)
        dv = (np.swapaxes(p, 2, 3) @ do).reshape(b, -1, g, sk, v.shape[-1]).sum(2)
    return o, dq, dk, dv


def inputs(seed, sq, groups, sk=SK):
    """q [B,H,Sq,D], k, v [B,Hkv,Sk,D], with ±0, denormals and large values placed in them."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, HKV * groups, sq, D))
    q[0, 0, 0] = -0.0  # a query of zeros: uniform scores
    q[1, -1, -1, :3] = [1e-42, -1e-41, 0.0]
    k = rng.normal(size=(B, HKV, sk, D))
    k[0, 1, :5, :2] = [[1e-40, -0.0]] * 5
    v = rng.normal(size=(B, HKV, sk, D))
    v[0, 0, 0, :4] = [0.0, -0.0, 1e-40, -6e4]  # ±0, a denormal, a large value (f16 max)
    v[2, 1, -1, :2] = [3e4, -1e-39]
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def lengths_keep(lengths, sk=SK):
    return (np.arange(sk)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


@pytest.fixture
def no_reference(monkeypatch):
    """The guard's fallback poisoned with NaN: a test that still matches ran the kernel's path."""
    real = da._reference
    monkeypatch.setattr(da, "_reference", lambda *a: real(*a) * jnp.nan)


@pytest.fixture
def sentinel_reference(monkeypatch):
    """The guard's fallback replaced by a constant 7: a result of all 7s took the fallback."""
    monkeypatch.setattr(da, "_reference", lambda q, *a: jnp.full(q.shape, 7.0, q.dtype))


def run(q, k, v, v_layout="BHSD", *, kv_lengths=None, mask=None, **kw):
    """decode_attention in interpret mode, jitted whole (one compilation), V stored in v_layout."""
    if v_layout == "BHDS":
        v = jnp.swapaxes(v, 2, 3)
    kw.setdefault("block_k", 16)
    fn = lambda q, k, v, kv_lengths, mask: decode_attention(  # noqa: E731
        q, k, v, v_layout=v_layout, kv_lengths=kv_lengths, mask=mask, interpret=True, **kw)
    return jax.jit(fn)(q, k, v, kv_lengths, mask)


# --- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sq", [1, 4, 16])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
def test_decode_matches_float64(no_reference, sq, groups, v_layout):
    """Cache lengths per batch (full, ragged, empty: the empty one is V's uniform average, the
    op's value with its finite fill), on the kernel's path; 4 splits of 4 key tiles."""
    q, k, v = inputs(sq * 10 + groups, sq, groups)
    lengths = [SK, 77, 0]
    got = run(q, k, v, v_layout, scale=0.3, causal=False, kv_lengths=jnp.asarray(lengths), splits=4)
    want = np_attention(q, k, v, scale=0.3, keep=lengths_keep(lengths))
    assert_close(got, want, 2e-5, "o")
    assert_close(got[2], np.broadcast_to(np.repeat(np.asarray(v[2], np.float64).mean(1), groups, 0)[:, None],
                                         want[2].shape), 2e-5, "uniform rows of the empty cache")


@pytest.mark.parametrize("splits", [None, 1, 3, 13])
def test_split_counts_agree(no_reference, splits):
    """Any number of splits (13: every key tile its own split, the last ones empty past the
    cache length) gives the float64 result; None: `decode_tiles`' choice."""
    q, k, v = inputs(5, 2, 4)
    got = run(q, k, v, scale=0.25, causal=False, kv_lengths=jnp.asarray([150, 16, 1]), splits=splits)
    assert_close(got, np_attention(q, k, v, scale=0.25, keep=lengths_keep([150, 16, 1])), 2e-5, "o")


def test_causal_softcap_and_masks(no_reference):
    """Causal (top-left aligned as the op defines it for Sq != Sk: query i sees keys j <= i),
    soft-cap, a per-head per-query boolean mask with a finite fill, and cache lengths at once."""
    sq, groups = 4, 4
    q, k, v = inputs(7, sq, groups)
    rng = np.random.default_rng(7)
    mask = rng.random((B, HKV * groups, sq, SK)) > 0.3
    mask[:, :, :, 0] = True  # key 0 kept: no row is empty under causal
    for causal in (False, True):
        got = run(q, k, v, "BHDS", scale=0.25, causal=causal, mask=jnp.asarray(mask), mask_fill=-1e9,
                  softcap=5.0, kv_lengths=jnp.asarray([SK, 120, 40]), splits=4)
        keep = mask & lengths_keep([SK, 120, 40])
        want = np_attention(q, k, v, scale=0.25, causal=causal, keep=keep, fill=-1e9, softcap=5.0)
        assert_close(got, want, 2e-5, f"o causal={causal}")


def test_several_row_blocks(no_reference):
    """8 query heads per kv head x 16 queries = 128 rows: two row blocks of 64, each with its own
    rows of a per-head per-query mask and its own query positions for the causal flag."""
    q, k, v = (x[:1] for x in inputs(20, 16, 8, sk=64))
    mask = np.random.default_rng(20).random((1, 16, 16, 64)) > 0.4
    mask[..., 0] = True
    assert decode_tiles(1, HKV, 8 * 16, 64, D).block_rows == 64
    got = run(q, k, v, "BHDS", scale=0.3, causal=True, mask=jnp.asarray(mask), splits=2)
    assert_close(got, np_attention(q, k, v, scale=0.3, causal=True, keep=mask), 2e-5, "o")


def test_key_padding_mask_with_empty_row(no_reference):
    """A [B,1,1,Sk] key-padding mask (read once per kv head) hiding every key of one batch; the
    programs walk only the tiles up to the last kept key (a padded cache given as a mask)."""
    q, k, v = inputs(8, 3, 4)
    keep = lengths_keep([SK, 9, 0])
    keep[1, ..., 30] = True  # a hole-y mask: keys 0-8 and 30
    got = run(q, k, v, scale=0.5, causal=False, mask=jnp.asarray(keep), splits=2)
    assert_close(got, np_attention(q, k, v, scale=0.5, keep=keep), 2e-5, "o")
    ends = da._key_end(B, 3, SK, False, jnp.asarray([SK, SK, 5]), jnp.asarray(keep))
    np.testing.assert_array_equal(np.asarray(ends), [SK, 31, 0])


def test_near_overflow_scores_on_the_kernel_path(no_reference):
    """Scores near float32's max after scaling: the softmax is one-hot on each row's largest."""
    q, k, v = inputs(9, 4, 4)
    q = q.at[..., 0].set(3e18)
    k = k.at[..., 0].set(jnp.asarray(np.random.default_rng(9).uniform(-20, 20, (B, HKV, SK)), jnp.float32))
    got = run(q, k, v, scale=5e18, causal=False, kv_lengths=jnp.asarray([SK, 100, 3]), splits=4)
    want = np_attention(q, k, v, scale=5e18, keep=lengths_keep([SK, 100, 3]))
    assert np.abs(np.asarray(q[..., :1] * k[:, :1, :1, :1] * 5e18)).max() > 1e36
    assert_close(got, want, 2e-5, "o")


def test_guard_takes_the_reference_where_hidden_keys_matter(sentinel_reference):
    """Kept scores far below the fill: the hidden keys carry the weight in the op, so the kernel's
    zero weight for them is wrong and the guard runs the reference (here the sentinel 7)."""
    q, k, v = inputs(10, 1, 4)
    q, k = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5  # every q·k > 0: every score below -1e36
    got = run(q, k, v, scale=-1e36, causal=False, kv_lengths=jnp.asarray([SK, 100, 3]), mask_fill=-1e9)
    assert np.all(np.asarray(got) == 7.0)
    got = run(q, k, v, scale=-1e36, causal=False, mask_fill=-1e9)
    assert not np.any(np.asarray(got) == 7.0)  # nothing hidden: the kernel's result stands
    assert_close(got, np_attention(q, k, v, scale=-1e36), 2e-5, "o")


def test_guard_fallback_values_and_non_finite_inputs():
    """The fallback's values are the op's (float64 check), and NaN / Inf inputs give the
    reference's own result (the kernel's is never returned when it is not finite)."""
    q, k, v = inputs(11, 2, 4)
    q = q.at[..., 0].set(-1e19)
    k = k.at[..., 0].set(jnp.abs(k[..., 0]) + 1.0)  # every score below -1e19 * 1e19 * scale
    got = run(q, k, v, scale=1.0, causal=False, kv_lengths=jnp.asarray([SK, 100, 3]), mask_fill=-1e30)
    assert_close(got, np_attention(q, k, v, scale=1.0, keep=lengths_keep([SK, 100, 3]), fill=-1e30),
                 2e-5, "fallback o")
    q, k, v = inputs(12, 2, 1)
    k = k.at[0, 0, 5, 0].set(jnp.inf).at[1, 1, 7, 3].set(jnp.nan)
    got = run(q, k, v, scale=0.5, causal=False)
    want = attention_reference(q, k, v, scale=0.5, causal=False)
    np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(np.asarray(want)))
    assert np.isnan(np.asarray(got)).any()
    fin = ~np.isnan(np.asarray(want))
    np.testing.assert_allclose(np.asarray(got)[fin], np.asarray(want)[fin], rtol=1e-5, atol=1e-5)


def test_minus_inf_fill_and_empty_cache_is_nan():
    """With a -inf fill a row that keeps no key is NaN in the op; the kernel's result agrees."""
    q, k, v = inputs(13, 1, 1)
    got = np.asarray(run(q, k, v, scale=0.5, causal=False, kv_lengths=jnp.asarray([SK, 0, 50]),
                         mask_fill=-math.inf))
    want = np_attention(q, k, v, scale=0.5, keep=lengths_keep([SK, 0, 50]), fill=-math.inf)
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()
    assert_close(got, want, 2e-5, "o")


def test_layouts_and_compute_dtype(no_reference):
    """q, k, o in [B,S,H,D] and V as [H,D,B,S] (read in place), a bfloat16 cast prologue."""
    q, k, v = inputs(14, 4, 4)
    bshd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    v_hdbs = jnp.transpose(v, (1, 3, 0, 2))
    got = decode_attention(bshd(q), bshd(k), v_hdbs, scale=0.25, causal=False, q_layout="BSHD", k_layout="BSHD",
                           v_layout="HDBS", o_layout="BSHD", compute_dtype="bfloat16",
                           kv_lengths=jnp.asarray([SK, 60, 0]), block_k=16, interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (B, 4, 8, D)
    cast = lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    want = np_attention(cast(q), cast(k), cast(v), scale=0.25, keep=lengths_keep([SK, 60, 0]))
    assert_close(bshd(got), want, 1e-2, "o")


def test_head_dims_off_the_tiles_and_rank_one_mask(no_reference):
    """D 20 and Dv 12 (zero-padded to 32 and 16 inside), a mask given as one [Sk] row."""
    rng = np.random.default_rng(21)
    q, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 4, 3, 20), (2, 2, 90, 20)))
    v = jnp.asarray(rng.normal(size=(2, 2, 90, 12)), jnp.float32)
    keep = rng.random(90) > 0.5
    got = run(q, k, v, "BHDS", scale=0.2, causal=False, mask=jnp.asarray(keep), splits=3)
    assert got.shape == (2, 4, 3, 12)
    assert_close(got, np_attention(q, k, v, scale=0.2, keep=keep), 2e-5, "o")


def test_gradients_are_the_flash_kernels(no_reference):
    """Decode is inference; its vjp recomputes through flash_attention's kernels: float64 grads."""
    q, k, v = (x[:1, :2] for x in inputs(15, 2, 2, sk=48))  # one batch, one kv head: a small grid
    do = jnp.asarray(np.random.default_rng(15).normal(size=(1, 2, 2, D)), jnp.float32)
    fn = lambda q, k, v: run(q, k, v, "BHDS", scale=0.25, causal=True)  # noqa: E731
    # one jitted forward and backward (compiles once: half the time of eager vjp calls)
    o, (dq, dk, dv) = jax.jit(lambda q, k, v, do: (lambda o, vjp: (o, vjp(do)))(*jax.vjp(fn, q, k, v)))(q, k, v, do)
    want = np_attention(q, k, v, do, scale=0.25, causal=True)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in (("dq", dq, want[1]), ("dk", dk, want[2]), ("dv", dv, want[3])):
        assert_close(got, w, 1e-4, name)


def test_combine_splits_is_exact_and_handles_empty_splits():
    rng = np.random.default_rng(16)
    lse = rng.normal(size=(2, 5, 3)) * 30
    lse[0, 1:] = -np.inf  # only split 0 holds keys
    lse[1] = -np.inf  # no split holds keys
    o = rng.normal(size=(2, 5, 3, 4))
    got_o, got_lse = combine_splits(jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32))
    with np.errstate(invalid="ignore"):
        w = np.exp(lse - lse.max(1, keepdims=True))
        want_o = (w[..., None] * o).sum(1) / w.sum(1)[..., None]
    np.testing.assert_allclose(np.asarray(got_o)[0], want_o[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse)[0], lse[0, 0], rtol=1e-6)
    assert np.all(np.asarray(got_o)[1] == 0.0) and np.all(np.isneginf(np.asarray(got_lse)[1]))


def test_rejects_bad_arguments():
    q, k, v = inputs(17, 1, 1)
    with pytest.raises(ValueError, match="kv_lengths"):
        decode_attention(q, k, v, scale=1.0, causal=False, kv_lengths=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="kv_lengths"):
        decode_attention(q, k, v, scale=1.0, causal=False, kv_lengths=jnp.ones((B,), jnp.float32))
    with pytest.raises(ValueError, match="mask_fill"):
        decode_attention(q, k, v, scale=1.0, causal=False, mask_fill=math.nan)
    with pytest.raises(ValueError, match="splits"):
        decode_attention(q, k, v, scale=1.0, causal=False, splits=0)
    with pytest.raises(ValueError, match="transpose"):
        decode_attention(q, k, v, scale=1.0, causal=False, k_layout="BHDS")


# --- tiling, routing, pricing -----------------------------------------------------------------

def test_tiles_and_routing_threshold():
    t = decode_tiles(32, 8, 4, 32768, 128)  # the benchmark's B32 GQA-4 step
    assert (t.block_rows, t.block_k, t.splits) == (16, 64, 2) and t.blocks_per_split * t.splits >= 32768 // 64
    t = decode_tiles(1, 1, 1, 4096, 128)
    assert t.splits == 4096 // 64 // 4 and t.blocks_per_split == 4  # few programs: split to the minimum chunk
    assert decode_tiles(1, 1, 64 * 4, 4096, 64).block_rows == 64  # 4 row blocks
    assert takes_decode(1, DECODE_MIN_KEYS) and takes_decode(DECODE_MAX_QUERIES, 32768)
    assert not takes_decode(DECODE_MAX_QUERIES + 1, 32768) and not takes_decode(1, DECODE_MIN_KEYS - 1)
    assert not takes_decode(1, 32768, has_bias=True)


def test_environment_switch_keeps_decode_calls_on_flash(monkeypatch):
    monkeypatch.setenv("EQSAT_ATTN_DECODE", "0")
    assert not takes_decode(1, 32768)
    q = jax.ShapeDtypeStruct((1, 4, 1, D), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 2, 2048, D), jnp.float32)
    text = str(jax.make_jaxpr(lambda q, k: attention(q, k, k, scale=0.1, causal=False, kernel="pallas"))(q, k))
    assert "decode_attention" not in text and "flash_attention" in text


def _decode_program(sq: int, sk: int):
    from eqsat_attn.ir import ProgramBuilder, TensorType

    b = ProgramBuilder()
    q = b.input(TensorType((1, 2, sq, D), "float32"))
    k = b.input(TensorType((1, sk, 1, D), "float32"))  # a [B, S, H, D] cache, read in place
    v = b.input(TensorType((1, 1, D, sk), "float32"))  # transposed V
    m = b.input(TensorType((1, 1, 1, sk), "bool"))  # key padding: the cache's filled part
    out = b.add("attention", [q, k, v, m], TensorType((1, 2, sq, D), "float32"), q_layout="BHSD",
                k_layout="BSHD", v_layout="BHDS", o_layout="BHSD", scale=0.25, causal=False, mask_kind="bool")
    return b.build([out])


def test_lowered_decode_node_runs_the_decode_kernel(no_reference):
    """A decode-shaped attention node lowers to the decode kernel on the Pallas backend (its
    pallas_call in the jaxpr, the report's backend), values exact; a shorter cache keeps flash."""
    import eqsat_attn as ea

    sk = DECODE_MIN_KEYS
    program = _decode_program(2, sk)
    rng = np.random.default_rng(18)
    q, k, vt = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 2, 2, D), (1, sk, 1, D), (1, 1, D, sk)))
    keep = jnp.asarray(np.arange(sk) < 700)[None, None, None, :]
    fn = ea.lower(program, attention_kernel="pallas")
    text = str(jax.make_jaxpr(fn)(q, k, vt, keep))
    assert "decode_attention_bhds" in text and "flash_attention" not in text
    (got,) = fn(q, k, vt, keep)
    want = np_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(vt, 2, 3), scale=0.25, keep=keep)
    assert_close(got, want, 2e-5, "o")
    (info,) = ea.report.attention_infos(program, "pallas")
    assert (info.kernel, info.backend) == ("pallas", "triton decode")
    short = _decode_program(2, DECODE_MIN_KEYS // 2)
    assert "decode_attention" not in str(jax.make_jaxpr(ea.lower(short, attention_kernel="pallas"))(
        q, k[:, :sk // 2], vt[..., :sk // 2], keep[..., :sk // 2]))
    assert ea.report.attention_infos(short, "pallas")[0].backend == "triton"


def test_dispatch_sends_only_bias_free_decode_calls():
    q = jax.ShapeDtypeStruct((1, 4, 1, D), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 2, 2048, D), jnp.float32)
    names = lambda **kw: str(jax.make_jaxpr(lambda q, k: attention(q, k, k, scale=0.1, causal=False,  # noqa: E731
                                                                   kernel="pallas", **kw))(q, k))
    assert "decode_attention" in names()
    assert "decode_attention" not in names(bias=jnp.zeros((1, 1, 1, 2048), jnp.float32))


def test_roofline_prices_decode_once_per_kv_head():
    from eqsat_attn import ir
    from eqsat_attn.cost.model import OpView
    from eqsat_attn.cost.roofline import for_device

    def node(sk, causal=False):
        q = ir.TensorType((32, 32, 1, 128), "bfloat16")
        k = ir.TensorType((32, 8, sk, 128), "bfloat16")
        p = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD", scale=0.1, causal=causal,
                 mask_kind="none")
        return OpView("attention", p, (q, k, k), q)

    h100 = for_device("h100")
    big = h100.breakdown(node(32768))
    assert big.variant == "decode"
    cache = 2 * 32 * 8 * 32768 * 128 * 2
    assert cache < big.bytes < 1.01 * cache  # the cache once, plus q, o and the small partials
    assert big.memory_s > big.compute_s and big.seconds >= big.bytes / h100.device.bandwidth
    assert h100.breakdown(node(32768, causal=True)).bytes < cache / 100  # causal reads keys j < Sq
    assert h100.breakdown(node(512)).variant == "standard"
    assert for_device("cpu").breakdown(node(32768)).variant != "decode"
    assert for_device("h100", "reference").breakdown(node(32768)).variant == "reference"
    fp8 = node(32768)
    fp8 = OpView("attention_fp8", fp8.params, tuple(ir.TensorType(t.shape, "float8_e4m3fn") for t in fp8.inputs),
                 fp8.output)
    assert h100.breakdown(fp8).variant == "standard"  # lowered to the flash fp8 kernel, priced as it


# --- Triton lowering without a GPU ------------------------------------------------------------

@pytest.mark.skipif(on_gpu, reason="the GPU run compiles the real kernel")
@pytest.mark.parametrize("v_layout,masked,sq,extras", [
    ("BHSD", False, 1, {}),
    ("BHDS", True, 1, {}),
    ("BHDS", False, 16, dict(causal=True, softcap=30.0)),  # 64 rows: G 4 x Sq 16
])
def test_decode_kernel_lowers_to_triton(monkeypatch, v_layout, masked, sq, extras):
    from test_kernels import _pretend_hopper

    _pretend_hopper(monkeypatch)
    sizes = lambda hh: {"B": 4, "H": hh, "S": 4096, "D": 128}  # noqa: E731
    q = jax.ShapeDtypeStruct((4, 32, sq, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct(layout_shape("BHSD", sizes(8)), jnp.bfloat16)
    v = jax.ShapeDtypeStruct(layout_shape(v_layout, sizes(8)), jnp.bfloat16)
    m = jax.ShapeDtypeStruct((4, 1, 1, 4096), jnp.bool_)
    kw = {"causal": False, **extras}
    fn = lambda q, k, v, m: decode_attention(q, k, v, scale=0.1, v_layout=v_layout, interpret=False,  # noqa: E731
                                             mask=m if masked else None, kv_lengths=jnp.array([4096, 7, 0, 100]),
                                             **kw)
    text = jax.jit(fn).trace(q, k, v, m).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 1 and "decode_attention" in text


# --- GPU only: the compiled kernel --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU backend")
@pytest.mark.parametrize("v_layout,sq,groups,masked", [("BHSD", 1, 4, False), ("BHDS", 1, 4, True),
                                                       ("BHSD", 16, 4, True), ("BHDS", 4, 1, False)])
def test_gpu_compiled_decode_matches_reference(v_layout, sq, groups, masked):
    """bf16 caches of 4096 keys, ragged and empty cache lengths (or the same as a key-padding
    mask), against the float64 result; compiled Triton kernel and combine."""
    rng = np.random.default_rng(30)
    b, hkv, sk, d = 4, 2, 4096, 128
    q = jnp.asarray(rng.normal(size=(b, hkv * groups, sq, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, hkv, sk, d)), jnp.bfloat16) for _ in range(2))
    lengths = [4096, 3000, 1, 0]
    kw = dict(mask=jnp.asarray(lengths_keep(lengths, sk))) if masked else dict(kv_lengths=jnp.asarray(lengths))
    vv = jnp.swapaxes(v, 2, 3) if v_layout == "BHDS" else v
    got = jax.jit(lambda q, k, v: decode_attention(q, k, v, scale=d ** -0.5, causal=False, v_layout=v_layout,
                                                   **kw))(q, k, vv)
    want = np_attention(q, k, v, scale=d ** -0.5, keep=lengths_keep(lengths, sk))
    assert_close(got, want, 2e-2, "o")


def test_bench_decode_rows_smoke(tmp_path):
    """bench/attention.py --decode on CPU (interpret mode): our rows check out against the reference."""
    from bench_scripts import load_bench

    mod = load_bench("attention", "bench_attention_decode")
    out = tmp_path / "decode.md"
    mod.main(["--decode", "--cpu-smoke", "--head-dims", "32", "--match", r"ours decode \(", "--reps", "1",
              "--out", str(out)])  # one shape, one row: compilation dominates on CPU
    text = out.read_text()
    assert "Decode attention benchmark (issue 21)" in text and "KV cache GB/s" in text and "FAIL" not in text
    assert sum("| ours decode (V [B,H,S,D]) |" in line and "| ok |" in line for line in text.splitlines()) == 1
