"""ALiBi computed from per-head slopes (kernels/alibi.py) instead of a bias read from memory.

* Recognition (eqsat_attn/alibi_bias.py): the spellings taken give bit-for-bit the bias the
  program computes (±0, overflow to ±inf, bf16 rounding); the ones that could round differently
  (a bf16 product, two multiplies, positions from inputs or past 2^24, wrapping integers) are not
  taken.
* The Mosaic GPU forward and backward in jax's interpreter against float64 (extreme slopes that
  overflow to -inf, GQA, per-batch slopes, transposed V), `flash_attention` on both backends,
  lowering of an optimized program, and the compiled kernels lowered for Hopper on CPU.
"""

from __future__ import annotations

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.alibi_bias import alibi_of
from eqsat_attn.capture import capture
from eqsat_attn.ir import Node, Params
from eqsat_attn.kernels import flash_attention
from eqsat_attn.kernels.alibi import Alibi
from eqsat_attn.kernels.mosaic_attention import MosaicBlocks, default_blocks, hopper_gpu, mosaic_attention
from eqsat_attn.kernels.mosaic_backward import mosaic_attention_backward
from eqsat_attn.mask_kinds import mask_kind
from test_kernel_masks import assert_close, no_reference, np_attention  # noqa: F401
from test_mosaic_backward_masks import TOL, f64_vjp, inputs
from test_mosaic_masks import f64, np_lse

lower_module = importlib.import_module("eqsat_attn.lower")  # the module, not the function
pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
D = 64
SMALL = MosaicBlocks(block_q=64, block_kv=64, stages=2)
OVERLAP = MosaicBlocks(block_q=64, block_kv=64, stages=2, overlap=True)
F32 = jnp.float32
#: slopes with extremes: 3e38·(j - i) overflows to -inf below the diagonal (+inf above), 0·x
#: keeps signed zeros, a negative slope flips the sign
EXTREME = [3e38, -0.0]


# --- recognition -------------------------------------------------------------------------------

def _bias_program(fn, s=128):
    """The program of ``fn(x)`` (a bias built from constants) and the id of its output."""
    program = capture(fn, jnp.zeros((s,), F32)).program
    return program, program.outputs[0]


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _same_bits(alibi: Alibi, want, sq: int, sk: int):
    """The materialised form (the kernels' operations) equals the program's bias bit for bit."""
    got = np.asarray(alibi.bias(sq, sk))
    want = np.asarray(want)
    want = want.reshape((1,) * (4 - want.ndim) + want.shape)
    shape = np.broadcast_shapes(got.shape, want.shape)
    assert got.dtype == want.dtype
    assert np.array_equal(_bits(np.broadcast_to(got, shape)), _bits(np.broadcast_to(want, shape))), "bias bits differ"


SLOPES = np.asarray([0.5, -0.25, 3e38, -0.0], np.float32)


def relative(x):  # the paper's slope·(j - i), int32 positions converted
    pos = jnp.arange(128)[None, :] - jnp.arange(128)[:, None]
    return jnp.asarray(SLOPES)[:, None, None] * pos[None].astype(F32)


def bloom_bf16(x):  # BLOOM: slope·j over float positions, one row, cast to bf16, [B*H] folded
    row = jnp.asarray(SLOPES)[:, None] * jnp.arange(128, dtype=F32)[None, :]
    return row.reshape(1, 4, 1, 128).astype(jnp.bfloat16)


def mpt_negated(x):  # MPT-style slope·(j - (Sk - 1)), negated, slopes per batch and head
    pos = jnp.arange(1 - 128, 1, dtype=jnp.int32)
    slopes = jnp.asarray(np.stack([SLOPES, SLOPES[::-1]]))  # [B=2, H=4]
    return -(slopes[:, :, None, None] * pos.astype(F32)[None, None, None, :])


def numpy_positions(x):  # positions captured as a NumPy constant, times float16 rounding
    pos = np.arange(128)[None, :] - 2 * np.arange(128)[:, None] + 7
    return (jnp.asarray(SLOPES)[:, None, None] * jnp.asarray(pos, F32)).astype(jnp.float16)


@pytest.mark.parametrize("fn,form", [
    (relative, (-1, 1, 0, "float32")), (bloom_bf16, (0, 1, 0, "bfloat16")),
    (mpt_negated, (0, 1, -127, "float32")), (numpy_positions, (-2, 1, 7, "float16")),
])
def test_recognised_alibi_has_the_programs_bits(fn, form):
    program, bias = _bias_program(fn)
    alibi = alibi_of(program, bias)
    assert alibi is not None
    assert (alibi.row_coef, alibi.col_coef, alibi.offset, alibi.dtype) == form
    want = jax.jit(fn)(jnp.zeros((128,), F32))
    _same_bits(alibi, want, 128, 128)
    assert mask_kind(program, bias, additive=True) == f"ALiBi {alibi.describe()}"  # what the report says


def bf16_product(x):  # rounded per multiply in bf16: positions above 256 are already inexact
    return (jnp.asarray(SLOPES, jnp.bfloat16)[:, None] * jnp.arange(128, dtype=jnp.bfloat16)[None, :])[None, :, None]


def two_products(x):  # slope·j - slope·i rounds twice: not slope·(j - i)
    s = jnp.asarray(SLOPES)[:, None, None]
    return s * jnp.arange(128, dtype=F32)[None, None, :] - s * jnp.arange(128, dtype=F32)[None, :, None]


def input_positions(x):  # positions from a runtime value
    return jnp.asarray(SLOPES)[:, None, None] * (x[None, :] - x[:, None])[None]


def slopes_over_queries(x):  # "slopes" that vary over the query axis
    return jnp.arange(128, dtype=F32)[:, None] * jnp.arange(128, dtype=F32)[None, :]


def past_2_24(x):  # positions reach 2^24: float32 would round them
    return jnp.asarray(SLOPES)[:, None] * (jnp.arange(128, dtype=jnp.int32) + 2 ** 24 - 64).astype(F32)[None, :]


def wrapping_int8(x):  # int8 positions wrap past 127 in the program
    return jnp.asarray(SLOPES)[:, None] * jnp.arange(200, dtype=jnp.int32).astype(jnp.int8).astype(F32)[None, :]


def almost_affine_constant(x):  # a NumPy position table with one entry off the affine form
    pos = np.arange(128)[None, :] - np.arange(128)[:, None]
    pos[3, 5] += 1
    return jnp.asarray(SLOPES)[:, None, None] * jnp.asarray(pos, F32)


@pytest.mark.parametrize("fn", [bf16_product, two_products, input_positions, slopes_over_queries, past_2_24,
                                wrapping_int8, almost_affine_constant])
def test_spellings_that_may_round_differently_are_not_alibi(fn):
    program, bias = _bias_program(fn)
    assert alibi_of(program, bias) is None


def test_alibi_form_checks():
    assert Alibi.from_array([1.0], row_coef=-1).describe() == "slope·(j - i)"
    assert Alibi.from_array([1.0], offset=-127, dtype="bfloat16").describe() == "slope·(j - 127) bfloat16"
    with pytest.raises(ValueError, match="2\\^24"):
        Alibi.from_array([1.0], offset=2 ** 24).check(1, 1, 1, 1)
    with pytest.raises(ValueError, match="broadcast"):
        Alibi.from_array([1.0, 2.0]).check(1, 3, 8, 8)
    with pytest.raises(ValueError, match="dtype"):
        Alibi.from_array([1.0], dtype="int32")
    q = jnp.zeros((1, 1, 128, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, q, q, scale=1.0, causal=False, bias=jnp.zeros((128, 128)), alibi=Alibi.from_array([1.0]))


# --- the kernels in jax's Mosaic GPU interpreter -------------------------------------------------

FORWARD = {  # name -> (b, h, hkv, causal, alibi, v layout, blocks)
    "relative-bf16-causal-extreme": (1, 2, 1, True, Alibi.from_array(EXTREME, row_coef=-1, dtype="bfloat16"),
                                     "BHSD", OVERLAP),
    "mpt-per-batch-gqa-transposed-v": (2, 2, 1, False,
                                       Alibi.from_array([[-0.5, 0.125], [2.0 ** -8, -3.0]], offset=-255),
                                       "BHDS", SMALL),
}


@pytest.mark.parametrize("name", list(FORWARD))
def test_interpreted_forward_matches_float64(name):
    b, h, hkv, causal, alibi, v_layout, blocks = FORWARD[name]
    sq, sk = 128, 256
    _, q, k, v, do = inputs(7, b, h, hkv, sq, sk)
    vt = v_layout == "BHDS"
    o, lse = mosaic_attention(q, k, jnp.swapaxes(v, 2, 3) if vt else v, scale=D ** -0.5, causal=causal,
                              v_layout=v_layout, blocks=blocks, interpret=True, alibi=alibi)
    bias = alibi.bias_f64(sq, sk)
    want = np_attention(f64(q), f64(k), f64(v), f64(do), scale=D ** -0.5, causal=causal, bias=bias, fill=-np.inf)[0]
    assert_close(o, want, 2e-2, "o")
    want_lse = np_lse(q, k, scale=D ** -0.5, causal=causal, bias=bias)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-4, atol=2e-3)
    if name.endswith("extreme"):  # head 0: each row sees only its diagonal key (-inf below it):
        # V's row exactly (up to its denormal and -0, which the f32 accumulator does not keep)
        np.testing.assert_allclose(np.asarray(o[0, 0], np.float32), np.asarray(v[0, 0, :sq], np.float32),
                                   rtol=0, atol=1e-38)


def test_interpreted_backward_matches_float64():
    """dQ, dK, dV with the bias computed in both kernels (the dK/dV kernel's tiles transposed);
    slopes that overflow to -inf below the diagonal give those positions no gradient."""
    b, h, hkv, sq, sk = 1, 2, 1, 128, 256
    _, q, k, v, do = inputs(9, b, h, hkv, sq, sk)
    alibi = Alibi.from_array([-0.75, 3e38], row_coef=-1, offset=-1, dtype="bfloat16")
    o, lse, *want = f64_vjp(q, k, v, do, scale=D ** -0.5, causal=True, bias=alibi.bias_f64(sq, sk))
    dq, dk, dv, dbias = mosaic_attention_backward(q, k, v, jnp.asarray(o, jnp.bfloat16), jnp.asarray(lse, F32), do,
                                                  scale=D ** -0.5, causal=True, interpret=True, alibi=alibi)
    assert dbias is None
    for what, g, w in (("dq", dq, want[0]), ("dk", dk, want[1]), ("dv", dv, want[2])):
        assert_close(g, w, TOL, what)


@pytest.mark.parametrize("backend,backward", [("mosaic_gpu", "mosaic_gpu"), ("triton", "pallas")])
def test_flash_attention_with_alibi_and_gradients(no_reference, backend, backward):  # noqa: F811
    """Through `flash_attention`: on Mosaic GPU the kernels compute the bias (forward and
    backward), on Triton it is materialised (one row here: no query term); a key-padding mask
    runs guarded (its fallback poisoned: the fast path gave these values)."""
    b, h, hkv, sq, sk = 1, 2, 1, 128, 128
    _, q, k, v, do = inputs(11, b, h, hkv, sq, sk)
    alibi = Alibi.from_array([-0.5, 2.0 ** -6], dtype="bfloat16")
    mask = np.ones((b, 1, 1, sk), bool)
    mask[..., 100:] = False
    bias = alibi.bias_f64(sq, sk)
    o, _, *want = f64_vjp(q, k, v, do, scale=D ** -0.5, bias=bias, mask=mask)

    def fn(q, k, v):
        return flash_attention(q, k, v, scale=D ** -0.5, causal=False, alibi=alibi, mask=jnp.asarray(mask),
                               backend=backend, backward=backward, interpret=True, mosaic_blocks=SMALL)
    out, pullback = jax.vjp(fn, q, k, v)
    assert_close(out, o, TOL, "o")
    for what, g, w in zip(("dq", "dk", "dv"), pullback(do), want[:3]):
        assert_close(g, w, TOL, what)


def test_alibi_kernels_lower_for_hopper():
    """The forward and both backward kernels with the bias computed in wgmma's layout: one Mosaic
    GPU custom call each, inside Hopper's shared memory."""
    q = jax.ShapeDtypeStruct((2, 4, 512, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2, 512, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 4, 512), F32)
    alibi = Alibi.from_array([0.5, 0.25, 0.125, 2.0 ** -4], row_coef=-1, dtype="bfloat16")
    blocks = default_blocks(jnp.bfloat16, 128, 512, overlap=True)

    def forward(q, k, v):
        return mosaic_attention(q, k, v, scale=0.1, causal=True, blocks=blocks, alibi=alibi)
    text = jax.jit(forward).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1

    def backward(q, k, v, o, lse, do):
        return mosaic_attention_backward(q, k, v, o, lse, do, scale=0.1, causal=True, alibi=alibi)[:3]
    text = jax.jit(backward).trace(q, k, k, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not hopper_gpu(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
def test_gpu_compiled_alibi_matches_float64(v_layout):
    """The compiled kernels (B2 H8 Hkv2 S1024 D128, causal, the paper's slopes and slope·(j - i) in
    bf16) through jax.vjp of flash_attention on the Mosaic GPU forward and backward: o, dq, dk, dv
    against float64; no fallback warning."""
    rng = np.random.default_rng(41)
    b, h, hkv, s, d = 2, 8, 2, 1024, 128
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in
                   ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, h, s, d)))
    alibi = Alibi.from_array([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], row_coef=-1, dtype="bfloat16")
    vt = v_layout == "BHDS"
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, scale=d ** -0.5, causal=True, alibi=alibi, v_layout=v_layout,
                                                 backend="mosaic_gpu", backward="mosaic_gpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, vjp = jax.vjp(fn, q, k, jnp.swapaxes(v, 2, 3) if vt else v)
    dq, dk, dv = vjp(do)
    o, _, *want = f64_vjp(q, k, v, do, scale=d ** -0.5, causal=True, bias=alibi.bias_f64(s, s))
    assert_close(out, o, TOL, "o")
    for what, g, w in (("dq", dq, want[0]), ("dk", dk, want[1]), ("dv", jnp.swapaxes(dv, 2, 3) if vt else dv, want[2])):
        assert_close(g, w, TOL, what)


# --- lowering an optimized program -----------------------------------------------------------------

def test_optimized_alibi_attention_passes_slopes(monkeypatch):
    """An attention whose bias is the paper's ALiBi (causal, slopes with extremes) lowers with the
    slopes, not the bias; values and gradients equal the program's (bf16 inputs with ±0)."""
    import eqsat_attn as ea

    seen = []
    real = lower_module.attention

    def spy(*args, **kw):
        seen.append(kw.get("alibi"))
        return real(*args, **kw)
    monkeypatch.setattr(lower_module, "attention", spy)
    b, h, s = 1, 2, 128
    slopes = np.asarray([-0.5, 3e38], np.float32)

    def fn(q, k, v):
        pos = jnp.arange(s)[None, :] - jnp.arange(s)[:, None]
        bias = jnp.asarray(slopes)[:, None, None] * pos[None].astype(F32)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * D ** -0.5 + bias[None]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1).astype(v.dtype), v)
    rng = np.random.default_rng(4)
    q, k, v = (np.asarray(rng.normal(size=(b, h, s, D)) * 3, np.float32) for _ in range(3))
    q[0, 0, 0, :2] = k[0, 0, 1, :2] = [0.0, -0.0]
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got, pullback = jax.vjp(ea.optimize(fn), q, k, v)  # one optimized program: forward and gradients
    want, want_pullback = jax.vjp(fn, q, k, v)
    assert any(a is not None and a.row_coef == -1 and a.col_coef == 1 for a in seen)
    np.testing.assert_allclose(np.asarray(got, F32), np.asarray(want, F32), atol=1e-2, rtol=1e-2)
    do = jnp.asarray(rng.normal(size=want.shape), want.dtype)
    for g, w in zip(pullback(do), want_pullback(do)):
        np.testing.assert_allclose(np.asarray(g, F32), np.asarray(w, F32), atol=5e-2, rtol=2e-2)


def test_several_devices_get_the_bias_materialised(monkeypatch):
    """Under a device mesh the kernel runs per shard of the heads, so lowering passes ALiBi as
    its materialised bias (sliced with the heads), never slopes for all heads to one shard."""
    seen = []
    real = lower_module.attention

    def spy(*args, **kw):
        seen.append((kw.get("alibi"), kw.get("bias")))
        return real(*args, **kw)
    monkeypatch.setattr(lower_module, "attention", spy)
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    alibi = Alibi.from_array([0.5, -0.25], row_coef=-1)
    params = Params(dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD", scale=0.125,
                         causal=True, mask_kind="bias"))
    q = jnp.ones((1, 2, 16, 8), F32)
    out = lower_module.lower_attention(Node("attention", (0, 1, 2, 3), params, None), [q, q, q, None],
                                       "reference", alibi)
    (got_alibi, bias), = seen
    assert got_alibi is None and bias is not None
    np.testing.assert_array_equal(np.asarray(bias), alibi.bias_f64(16, 16).astype(np.float32))
    assert out.shape == q.shape
