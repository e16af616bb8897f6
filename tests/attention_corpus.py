"""A corpus of attention forms written the way peers and libraries write them, for the raising rules.

Each `Case` is a JAX function, a deterministic argument builder and the verdict: ``positive`` cases
compute softmax attention (``softmax(scale * Q·Kᵀ + bias, masked) · V``, possibly followed by
value-preserving reshapes or scalings) and should be raised to an attention op with equal values;
negative cases are near-misses whose values an attention op would change.

Sources, transcribed as JAX (no code copied): PyTorch Inductor's SFDP patterns
(``torch/_inductor/fx_passes/fuse_attention.py``), XLA's cuDNN fused-MHA rewriter tests
(``xla/service/gpu/transforms/cudnn_fused_mha_rewriter_test.cc``), onnxscript's SDPA rules
(``onnxscript/rewriter/ort_fusions/sdpa.py``), Flax linen and nnx, Equinox and
``jax.nn.dot_product_attention``; the rest are hand-written forms seen in model code.

``KNOWN_UNRAISED`` lists the positives the current rules do not raise (the test file xfails them
strictly, so a case that starts passing must be removed from it).
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import eqsat_attn as ea
from eqsat_attn.attention_misses import softmax_misses
from eqsat_attn.cost import for_device

B, H, S, D = 2, 2, 8, 16
E = H * D
F32, BF16 = jnp.float32, jnp.bfloat16


@dataclass(frozen=True)
class Case:
    """One form: ``fn(*make_args(rng))`` with ``rng`` seeded from the name, and whether it is attention."""

    name: str
    fn: Callable
    make_args: Callable[[np.random.Generator], tuple]
    positive: bool
    family: str
    source: str

    def args(self) -> tuple:
        """The case's arguments, the same on every call (the generator is seeded from the name)."""
        return self.make_args(np.random.default_rng(zlib.crc32(self.name.encode())))


# ---------------------------------------------------------------------------------------------
# argument builders


def _normal(rng: np.random.Generator, shape, dtype=F32) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _extreme(x: jax.Array, rng: np.random.Generator) -> jax.Array:
    """``x`` with a few extreme entries: ±0, denormals (in f32) and large magnitudes."""
    flat = np.asarray(x.astype(F32)).reshape(-1).copy()
    idx = rng.permutation(flat.size)[:6]
    tiny = 1e-40 if x.dtype == F32 else 1e-30
    flat[idx] = [0.0, -0.0, tiny, -tiny, 40.0, -40.0]
    return jnp.asarray(flat.reshape(x.shape)).astype(x.dtype)


def qkv(layout: str = "bhsd", dtype=F32, *, extreme: bool = False, kv_heads: int | None = None,
        heads: int = H, s_q: int = S):
    """A builder of (q, k, v) in ``layout`` ("bhsd", "bshd", "sd", "hsd", "(bh)sd")."""

    def shape(seq: int, n: int) -> tuple[int, ...]:
        return {
            "bhsd": (B, n, seq, D), "bshd": (B, seq, n, D), "sd": (seq, D), "hsd": (n, seq, D),
            "(bh)sd": (B * n, seq, D), "tnh": (seq, n, D),
        }[layout]

    def make(rng: np.random.Generator) -> tuple:
        q = _normal(rng, shape(s_q, heads), dtype)
        k = _normal(rng, shape(S, kv_heads or heads), dtype)
        v = _normal(rng, shape(S, kv_heads or heads), dtype)
        if extreme:
            q, k, v = (_extreme(t, rng) for t in (q, k, v))
        return q, k, v

    return make


def with_extra(base: Callable, *extra: Callable[[np.random.Generator], object]) -> Callable:
    """``base``'s arguments followed by one more from each of ``extra``."""
    return lambda rng: base(rng) + tuple(make(rng) for make in extra)


def normal(shape, dtype=F32) -> Callable:
    return lambda rng: _normal(rng, shape, dtype)


def padding_keep(rng: np.random.Generator) -> jax.Array:
    """[B, S] bool, True for real tokens; batch 0 keeps 5 keys, batch 1 keeps all."""
    return jnp.asarray(np.arange(S)[None, :] < np.array([5, S])[:, None])


def softmax_last(s):
    return jax.nn.softmax(s, axis=-1)


def sdpa_bhsd(q, k, v, scale=D**-0.5):
    """The reference attention in [B, H, S, D]."""
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale), v)


def causal(sq: int = S, sk: int = S) -> jax.Array:
    """[sq, sk] bool lower triangle from iota (query i sees keys ≤ i)."""
    return jnp.arange(sq)[:, None] >= jnp.arange(sk)[None, :]


def bmm(a, b):
    """``a @ b`` over the last two axes, as ``torch.matmul``."""
    return jnp.matmul(a, b)


def kt(k):
    return jnp.swapaxes(k, -1, -2)


CASES: list[Case] = []


def case(name: str, make_args: Callable, *, positive: bool, family: str, source: str):
    """Register the decorated function as a case."""

    def register(fn: Callable) -> Callable:
        CASES.append(Case(name, fn, make_args, positive, family, source))
        return fn

    return register


def grad_case(name: str, fn: Callable, make_args: Callable, *, family: str, source: str, argnums=(0, 1, 2)):
    """``jax.grad`` of ``sum(fn(...) * cotangent)`` with respect to ``argnums`` (a positive case)."""

    def loss(*args):
        *inputs, cot = args
        return jnp.sum(fn(*inputs).astype(F32) * cot)

    def make(rng):
        args = make_args(rng)
        out = jax.eval_shape(fn, *args)
        return args + (_normal(rng, out.shape),)

    CASES.append(Case(name, jax.grad(loss, argnums=argnums), make, True, family, source + " (jax.grad)"))


INDUCTOR = "pytorch torch/_inductor/fx_passes/fuse_attention.py"
XLA = "openxla xla cudnn_fused_mha_rewriter_test.cc"
ONNX = "microsoft onnxscript rewriter/ort_fusions/sdpa.py"
HAND = "hand-written"

# ---------------------------------------------------------------------------------------------
# PyTorch Inductor SFDP patterns (dropout patterns taken with dropout off: p = 0 is the identity)


@case("sfdp01_div_inv_scale", qkv(), positive=True, family="inductor", source=INDUCTOR + " pattern 1")
def sfdp01(q, k, v):
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0), v)


@case("sfdp01_extreme", qkv(extreme=True), positive=True, family="inductor", source=INDUCTOR + " pattern 1")
def sfdp01_extreme(q, k, v):
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0), v)


def _nan_in_query(rng: np.random.Generator) -> tuple:
    q, k, v = qkv()(rng)
    return q.at[1, 0, 3, 5].set(jnp.nan), k, v.at[0, 1, 2, 0].set(jnp.inf)


@case("sfdp01_nan_query_inf_value", _nan_in_query, positive=True, family="inductor",
      source=INDUCTOR + " pattern 1, a NaN in one query row and an Inf in V")
def sfdp01_nan(q, k, v):
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0), v)


@case("sfdp02_mul_scale", qkv(), positive=True, family="inductor", source=INDUCTOR + " pattern 2")
def sfdp02(q, k, v):
    return bmm(softmax_last(bmm(q, kt(k)) * 0.3), v)


@case("sfdp05_additive_mask", with_extra(qkv(), normal((B, 1, S, S))), positive=True, family="inductor",
      source=INDUCTOR + " pattern 5")
def sfdp05(q, k, v, mask):
    return bmm(softmax_last(bmm(q, kt(k)) / np.sqrt(q.shape[-1]) + mask), v)


@case("sfdp08_permuted_bf16_f32_softmax", qkv("bshd", BF16), positive=True, family="inductor",
      source=INDUCTOR + " pattern 8")
def sfdp08(q, k, v):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    s = (bmm(q, kt(k)) / np.sqrt(q.shape[-1])).astype(F32)
    return bmm(softmax_last(s).astype(BF16), v)


@case("sfdp10_permuted_prescaled_q_bf16", qkv("bshd", BF16), positive=True, family="inductor",
      source=INDUCTOR + " pattern 10")
def sfdp10(q, k, v):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q = q / np.sqrt(q.shape[-1])
    return bmm(softmax_last(bmm(q, kt(k)).astype(F32)).astype(BF16), v)


@case("sfdp11_permuted_div", qkv("bshd"), positive=True, family="inductor", source=INDUCTOR + " pattern 11")
def sfdp11(q, k, v):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0), v)


@case("sfdp13_bmm_unscaled", qkv("(bh)sd"), positive=True, family="inductor", source=INDUCTOR + " pattern 13")
def sfdp13(q, k, v):
    return jnp.matmul(softmax_last(jnp.matmul(q, jnp.swapaxes(k, 1, 2))), v)


@case("sfdp14_bert_permuted_div_mask", with_extra(qkv("bshd"), normal((B, 1, 1, S))), positive=True,
      family="inductor", source=INDUCTOR + " pattern 14")
def sfdp14(q, k, v, mask):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0 + mask), v)


@case("sfdp15_distilbert_masked_fill", with_extra(qkv("bshd"), lambda rng: padding_keep(rng).astype(jnp.int32)),
      positive=True, family="inductor", source=INDUCTOR + " pattern 15")
def sfdp15(q, k, v, attn_mask):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    s = bmm(q, kt(k)) / 4.0
    pad = jnp.broadcast_to((attn_mask == 0).reshape(B, 1, 1, S), s.shape)
    return bmm(softmax_last(jnp.where(pad, -jnp.inf, s)), v)


@case("sfdp18_gpt2_where_finfo_min", qkv("bshd"), positive=True, family="inductor", source=INDUCTOR + " pattern 18")
def sfdp18(q, k, v):
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    s = bmm(q, k.transpose(0, 1, 3, 2)) / jnp.full((), v.shape[-1] ** 0.5, F32)
    s = jnp.where(causal()[None, None], s, jnp.finfo(F32).min)
    return bmm(softmax_last(s), v), k, v  # also returns the permuted key and value


@case("sfdp19_causal_where_plus_mask", with_extra(qkv(), normal((B, 1, 1, S))), positive=True,
      family="inductor", source=INDUCTOR + " pattern 19 (GPT-Neo)")
def sfdp19(q, k, v, attn_mask):
    s = jnp.where(causal()[None, None], bmm(q, kt(k)) * 0.25, jnp.finfo(F32).min) + attn_mask
    return bmm(softmax_last(s), v)


def _to_bhsd(*ts):
    return tuple(t.transpose(0, 2, 1, 3) for t in ts)


@case("sfdp06_mask_dropout_deterministic", with_extra(qkv(), normal((B, 1, S, S))), positive=True, family="inductor",
      source=INDUCTOR + " pattern 6 (dropout as flax.linen.Dropout at deterministic=True)")
def sfdp06(q, k, v, mask):
    p = softmax_last(bmm(q, kt(k)) / np.sqrt(q.shape[-1]) + mask)
    return bmm(linen.Dropout(0.1, deterministic=True).apply({}, p), v)


@case("sfdp16_bf16_scores_f32_mask_cast_back", with_extra(qkv("bshd", BF16), normal((B, 1, 1, S))), positive=True,
      family="inductor", source=INDUCTOR + " pattern 16 (bf16 scores + an f32 mask promote to f32; P cast to q's dtype)")
def sfdp16(q, k, v, mask):
    q, k, v = _to_bhsd(q, k, v)
    return bmm(softmax_last(bmm(q, kt(k)) / 4.0 + mask).astype(q.dtype), v)


@case("sfdp21_t5_add_mask_type_as_float_softmax", with_extra(qkv("bshd", BF16), normal((B, H, S, S), BF16)),
      positive=True, family="inductor", source=INDUCTOR + " pattern 21 (T5: (s + mask).type_as(q).float().softmax())")
def sfdp21(q, k, v, mask):
    q, k, v = _to_bhsd(q, k, v)
    score = (bmm(q, k.transpose(0, 1, 3, 2)) + mask).astype(q.dtype)
    return bmm(softmax_last(score.astype(F32)).astype(q.dtype), v)


def sfdp23(q, k, v):
    q, k, v = _to_bhsd(q, k, v)
    score = bmm(q, k.transpose(0, 1, 3, 2)).astype(F32).astype(q.dtype)  # a round trip: the bf16 scores again
    return bmm(softmax_last(score.astype(F32)).astype(q.dtype), v)


case("sfdp23_t5_float_type_as_round_trip", qkv("bshd", BF16), positive=True, family="inductor",
     source=INDUCTOR + " pattern 23 (T5: s.float().type_as(q).float().softmax().type_as(q))")(sfdp23)
grad_case("sfdp23_t5_float_type_as_round_trip_grad", sfdp23, qkv("bshd", BF16), family="inductor",
          source=INDUCTOR + " pattern 23")


def sfdp24(q, k, v, mask):
    b, h, s, d = q.shape
    qf, kf, vf = (t.reshape(b * h, -1, d) for t in (q, k, v))
    w = (jnp.matmul(qf, kf.transpose(0, 2, 1)).reshape(b, h, s, -1) + mask).reshape(b * h, s, -1)
    return jnp.matmul(softmax_last(w), vf).reshape(b, h, s, d)


case("sfdp24_mbart_folded_views_mask_between", with_extra(qkv(), normal((B, 1, S, S))), positive=True,
     family="inductor", source=INDUCTOR + " pattern 24 (MBart: folded bmm, viewed back for the mask, folded again)")(sfdp24)
grad_case("sfdp24_mbart_folded_views_mask_between_grad", sfdp24, with_extra(qkv(), normal((B, 1, S, S))),
          family="inductor", source=INDUCTOR + " pattern 24", argnums=(0, 1, 2, 3))


# ---------------------------------------------------------------------------------------------
# XLA cuDNN fused-MHA rewriter forms (dot_general layouts, bias, masks, training graphs)


@case("xla_bmm1_softmax_bmm2_k_transposed_input", lambda rng: (
        _normal(rng, (B, H, S, D)), _normal(rng, (B, H, D, S)), _normal(rng, (B, H, S, D))),
      positive=True, family="xla-cudnn", source=XLA + " BMM1 with K given as [B,H,D,S]")
def xla_kt(q, kT, v):
    s = jax.lax.dot_general(q, kT, (((3,), (2,)), ((0, 1), (0, 1))))
    return jax.lax.dot_general(softmax_last(s), v, (((3,), (2,)), ((0, 1), (0, 1))))


@case("xla_bmm2_v_transposed_output_bhds", qkv(), positive=True, family="xla-cudnn",
      source=XLA + " BMM2 with the output transposed [B,H,D,S]")
def xla_out_t(q, k, v):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) * 0.25
    return jax.lax.dot_general(v, softmax_last(s), (((2,), (3,)), ((0, 1), (0, 1))))  # [B,H,D,Sq]


@case("xla_scale_bias_softmax", with_extra(qkv(), normal((1, H, S, S))), positive=True, family="xla-cudnn",
      source=XLA + " BMM1-Scale-Bias-Softmax-BMM2 (bias broadcast over batch)")
def xla_bias(q, k, v, bias):
    return sdpa_bhsd_bias(q, k, v, bias)


def sdpa_bhsd_bias(q, k, v, bias):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("xla_scale_mask_select_bf16", qkv("bhsd", BF16), positive=True, family="xla-cudnn",
      source=XLA + " BMM1-Scale-Mask(select)-Softmax-BMM2 bf16")
def xla_mask_bf16(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.25, BF16)
    s = jnp.where(causal()[None, None], s, jnp.asarray(-jnp.inf, BF16))
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


grad_case("xla_training_bmm1_softmax_bmm2_grad", sdpa_bhsd, qkv(), family="xla-cudnn",
          source=XLA + " training graph")
grad_case("xla_training_scale_bias_grad", sdpa_bhsd_bias, with_extra(qkv(), normal((1, H, S, S))),
          family="xla-cudnn", source=XLA + " training graph with bias")


def xla_bias_causal_select(q, k, v, bias):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) * 0.25 + bias[None]
    s = jax.lax.select(jnp.broadcast_to(causal()[None, None], s.shape), s, jnp.full(s.shape, -jnp.inf))
    return jax.lax.dot_general(softmax_last(s), v, (((3,), (2,)), ((0, 1), (0, 1))))


grad_case("xla_training_scale_bias_causal_select_grad", xla_bias_causal_select, with_extra(qkv(), normal((H, S, S))),
          family="xla-cudnn", source=XLA + " training BMM1-Scale-Bias-Mask(select)-Softmax-BMM2", argnums=(0, 1, 2, 3))


@case("xla_unfused_softmax_f32_max_bf16", qkv("bhsd", BF16), positive=True, family="xla-cudnn",
      source=XLA + " bf16 BMM1, softmax written out, max and sum reduced in f32 and converted back")
def xla_unfused_bf16(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    m = jnp.max(s.astype(F32), -1, keepdims=True).astype(BF16)
    e = jnp.exp(s - m)
    return jnp.einsum("bhqk,bhkd->bhqd", e / jnp.sum(e.astype(F32), -1, keepdims=True).astype(BF16), v)


@case("xla_bmm1_q_contracting_dim_not_minor", lambda rng: (
        _normal(rng, (B, H, D, S)), _normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, D))),
      positive=True, family="xla-cudnn", source=XLA + " BMM1 with Q given [B,H,D,S] (lhs contracting dim 2)")
def xla_qt(qT, k, v):
    s = jax.lax.dot_general(qT, k, (((2,), (3,)), ((0, 1), (0, 1))))
    return jax.lax.dot_general(softmax_last(s * 0.3), v, (((3,), (2,)), ((0, 1), (0, 1))))


@case("xla_pred_mask_converted_and_added_bf16",
      with_extra(qkv("bhsd", BF16), lambda rng: jnp.asarray(rng.random((B, 1, S, S)) < 0.8)), positive=True,
      family="xla-cudnn", source=XLA + " a pred mask converted to bf16 and added after BMM1")
def xla_pred_bias(q, k, v, keep):
    bias = (1.0 - keep.astype(BF16)) * jnp.asarray(-1e9, BF16)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.25, BF16) + bias
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


# ---------------------------------------------------------------------------------------------
# onnxscript SDPA rewrite rules


@case("onnx_prescale_q_and_k", qkv(), positive=True, family="onnxscript", source=ONNX + " pre-scaled Q and K")
def onnx_prescale_both(q, k, v):
    r = D**-0.25
    return jnp.matmul(softmax_last(jnp.matmul(q * r, kt(k * r))), v)


@case("onnx_div_q_and_k_by_sqrt_sqrt_d", qkv(), positive=True, family="onnxscript",
      source=ONNX + " Q and K divided by sqrt(sqrt(D))")
def onnx_div_both(q, k, v):
    r = jnp.sqrt(jnp.sqrt(jnp.float32(q.shape[-1])))
    return jnp.matmul(softmax_last(jnp.matmul(q / r, jnp.transpose(k, (0, 1, 3, 2)) / r)), v)


@case("onnx_post_div_additive_mask", with_extra(qkv(), normal((B, H, S, S))), positive=True,
      family="onnxscript", source=ONNX + " post-div with an additive mask")
def onnx_post_div_mask(q, k, v, mask):
    return jnp.matmul(softmax_last(jnp.matmul(q, kt(k)) / np.float32(4.0) + mask), v)


@case("onnx_kt_transpose_then_matmul_mul_scale", qkv("bshd"), positive=True, family="onnxscript",
      source=ONNX + " Q·Kᵀ with K transposed by one perm=(0,2,3,1)")
def onnx_kt_perm(q, k, v):
    qh = q.transpose(0, 2, 1, 3)
    kh_t = k.transpose(0, 2, 3, 1)
    vh = v.transpose(0, 2, 1, 3)
    return jnp.matmul(softmax_last(jnp.matmul(qh, kh_t) * 0.25), vh).transpose(0, 2, 1, 3).reshape(B, S, E)


@case("onnx_masked_pre_mul_kt_given", lambda rng: (
        _normal(rng, (B, H, S, D)), _normal(rng, (B, H, D, S)), _normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, S))),
      positive=True, family="onnxscript", source=ONNX + " masked_pre_mul_sdpa (Kᵀ given, both scaled by D^-1/4)")
def onnx_masked_pre_mul(q, kT, v, mask):
    r = np.float32(D ** -0.25)
    return jnp.matmul(softmax_last(jnp.matmul(q * r, kT * r) + mask), v)


def onnx_masked_pre_div(q, k, v, mask):
    r = np.float32(np.sqrt(np.sqrt(D)))
    return jnp.matmul(softmax_last(jnp.matmul(q / r, kt(k) / r) + mask), v)


case("onnx_masked_pre_div", with_extra(qkv(extreme=True), normal((B, H, S, S))), positive=True, family="onnxscript",
     source=ONNX + " masked_pre_div_sdpa, extreme inputs")(onnx_masked_pre_div)
grad_case("onnx_masked_pre_div_grad", onnx_masked_pre_div, with_extra(qkv(), normal((B, H, S, S))),
          family="onnxscript", source=ONNX + " masked_pre_div_sdpa", argnums=(0, 1, 2, 3))


@case("onnx_unmasked_pre_mul_unequal_scales", qkv(), positive=True, family="onnxscript",
      source=ONNX + " pre-mul with Q and K scales unequal (a custom scale)")
def onnx_unequal(q, k, v):
    return jnp.matmul(softmax_last(jnp.matmul(q * 0.5, kt(k) * 0.25)), v)


# ---------------------------------------------------------------------------------------------
# Libraries: Flax linen, flax.nnx, Equinox, jax.nn.dot_product_attention

LINEN_MHA = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=E)
LINEN_MHA_QK_NORM = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, normalize_qk=True)
LINEN_MHA_BF16 = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, dtype=BF16)


def linen_args(module, *extra):
    def make(rng):
        x = _normal(rng, (B, S, E))
        params = module.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x)
        return (params, x) + tuple(make_extra(rng) for make_extra in extra)

    return make


@case("flax_linen_mha", linen_args(LINEN_MHA), positive=True, family="flax", source="flax.linen MHA")
def flax_linen(params, x):
    return LINEN_MHA.apply(params, x)


@case("flax_linen_mha_causal", linen_args(LINEN_MHA), positive=True, family="flax",
      source="flax.linen MHA with make_causal_mask")
def flax_linen_causal(params, x):
    return LINEN_MHA.apply(params, x, mask=linen.make_causal_mask(x[..., 0]))


@case("flax_linen_mha_padding", linen_args(LINEN_MHA, padding_keep), positive=True, family="flax",
      source="flax.linen MHA with make_attention_mask(pad, pad)")
def flax_linen_padding(params, x, keep):
    return LINEN_MHA.apply(params, x, mask=linen.make_attention_mask(keep, keep))


@case("flax_linen_mha_causal_and_padding", linen_args(LINEN_MHA, padding_keep), positive=True, family="flax",
      source="flax.linen MHA with combine_masks(causal, padding)")
def flax_linen_combined(params, x, keep):
    mask = linen.combine_masks(linen.make_causal_mask(x[..., 0]), linen.make_attention_mask(keep, keep))
    return LINEN_MHA.apply(params, x, mask=mask)


@case("flax_linen_mha_normalize_qk", linen_args(LINEN_MHA_QK_NORM), positive=True, family="flax",
      source="flax.linen MHA normalize_qk=True")
def flax_linen_qk_norm(params, x):
    return LINEN_MHA_QK_NORM.apply(params, x)


@case("flax_linen_mha_bf16", linen_args(LINEN_MHA_BF16), positive=True, family="flax",
      source="flax.linen MHA dtype=bfloat16")
def flax_linen_bf16(params, x):
    return LINEN_MHA_BF16.apply(params, x)


@case("flax_linen_dot_product_attention_bias_mask",
      with_extra(qkv("bshd"), normal((B, H, S, S)), lambda rng: causal()[None, None]),
      positive=True, family="flax", source="flax.linen.dot_product_attention(bias, mask)")
def flax_linen_fn(q, k, v, bias, mask):
    return linen.dot_product_attention(q, k, v, bias=bias, mask=mask, deterministic=True)


grad_case("flax_linen_mha_causal_grad", flax_linen_causal, linen_args(LINEN_MHA), family="flax",
          source="flax.linen MHA causal", argnums=(0, 1))


def _nnx_split(**kwargs):
    module = nnx.MultiHeadAttention(num_heads=H, in_features=E, decode=False, rngs=nnx.Rngs(0), **kwargs)
    return nnx.split(module)


NNX_MHA = _nnx_split()
NNX_GQA = _nnx_split(num_kv_heads=1) if "num_kv_heads" in nnx.MultiHeadAttention.__init__.__code__.co_varnames \
    else None


def nnx_args(split):
    return lambda rng: (split[1], _normal(rng, (B, S, E)))


@case("flax_nnx_mha", nnx_args(NNX_MHA), positive=True, family="flax", source="flax.nnx MultiHeadAttention")
def flax_nnx(state, x):
    return nnx.merge(NNX_MHA[0], state)(x)


@case("flax_nnx_mha_causal_mask", nnx_args(NNX_MHA), positive=True, family="flax",
      source="flax.nnx MultiHeadAttention with nnx.make_causal_mask")
def flax_nnx_causal(state, x):
    return nnx.merge(NNX_MHA[0], state)(x, mask=nnx.make_causal_mask(x[..., 0]))


if NNX_GQA is not None:
    @case("flax_nnx_mha_gqa", nnx_args(NNX_GQA), positive=True, family="flax",
          source="flax.nnx MultiHeadAttention num_kv_heads=1")
    def flax_nnx_gqa(state, x):
        return nnx.merge(NNX_GQA[0], state)(x)


    grad_case("flax_nnx_mha_gqa_grad", flax_nnx_gqa, nnx_args(NNX_GQA), family="flax",
              source="flax.nnx MultiHeadAttention num_kv_heads=1, weights and input", argnums=(0, 1))

    NNX_GQA_4_2 = nnx.split(nnx.MultiHeadAttention(num_heads=4, in_features=E, decode=False, rngs=nnx.Rngs(0),
                                                   num_kv_heads=2))

    @case("flax_nnx_gqa_causal_mask", nnx_args(NNX_GQA_4_2), positive=True, family="flax",
          source="flax.nnx MultiHeadAttention 4 heads, num_kv_heads=2, nnx.make_causal_mask (mask on the merged heads)")
    def flax_nnx_gqa_causal(state, x):
        return nnx.merge(NNX_GQA_4_2[0], state)(x, mask=nnx.make_causal_mask(x[..., 0]))

    def flax_nnx_gqa_4_2(state, x):
        return nnx.merge(NNX_GQA_4_2[0], state)(x)

    grad_case("flax_nnx_gqa_grad", flax_nnx_gqa_4_2, nnx_args(NNX_GQA_4_2), family="flax",
              source="flax.nnx MultiHeadAttention 4 heads, num_kv_heads=2, weights and input", argnums=(0, 1))


EQX_PARAMS, EQX_STATIC = eqx.partition(
    eqx.nn.MultiheadAttention(num_heads=H, query_size=E, key=jax.random.PRNGKey(0)), eqx.is_array)


@case("equinox_mha_vmap", lambda rng: (EQX_PARAMS, _normal(rng, (B, S, E))), positive=True, family="equinox",
      source="equinox.nn.MultiheadAttention under vmap")
def equinox_mha(params, x):
    mha = eqx.combine(params, EQX_STATIC)
    return jax.vmap(lambda t: mha(t, t, t))(x)


@case("equinox_mha_causal_mask", lambda rng: (EQX_PARAMS, _normal(rng, (B, S, E))), positive=True,
      family="equinox", source="equinox.nn.MultiheadAttention with a [S,S] causal mask")
def equinox_mha_causal(params, x):
    mha = eqx.combine(params, EQX_STATIC)
    return jax.vmap(lambda t: mha(t, t, t, mask=causal()))(x)


@case("equinox_mha_cross_shorter_query", lambda rng: (EQX_PARAMS, _normal(rng, (B, 4, E)), _normal(rng, (B, S, E))),
      positive=True, family="equinox", source="equinox.nn.MultiheadAttention cross-attention, Sq=4 Sk=8")
def equinox_mha_cross(params, xq, xkv):
    mha = eqx.combine(params, EQX_STATIC)
    return jax.vmap(lambda a, b: mha(a, b, b))(xq, xkv)


def dpa(**kwargs):
    return lambda q, k, v, *rest: jax.nn.dot_product_attention(q, k, v, *rest, implementation="xla", **kwargs)


JAX_DPA = "jax.nn.dot_product_attention"
CASES += [
    Case("jax_dpa", dpa(), qkv("bshd"), True, "jax.nn", JAX_DPA),
    Case("jax_dpa_causal", dpa(is_causal=True), qkv("bshd"), True, "jax.nn", JAX_DPA + " is_causal"),
    Case("jax_dpa_extreme", dpa(is_causal=True), qkv("bshd", extreme=True), True, "jax.nn",
         JAX_DPA + " is_causal, ±0/denormal/±40 inputs"),
    Case("jax_dpa_bias", dpa(), with_extra(qkv("bshd"), normal((B, H, S, S))), True, "jax.nn", JAX_DPA + " bias"),
    Case("jax_dpa_bool_mask", lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla"),
         with_extra(qkv("bshd"), lambda rng: jnp.asarray(rng.random((B, 1, S, S)) < 0.7) | jnp.eye(S, dtype=bool)),
         True, "jax.nn", JAX_DPA + " mask= (random, diagonal kept)"),
    Case("jax_dpa_scale", dpa(scale=0.1), qkv("bshd"), True, "jax.nn", JAX_DPA + " scale=0.1"),
    Case("jax_dpa_seq_lengths",
         lambda q, k, v, ql, kl: jax.nn.dot_product_attention(
             q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl, implementation="xla"),
         with_extra(qkv("bshd"), lambda rng: jnp.array([S, 6], jnp.int32), lambda rng: jnp.array([5, S], jnp.int32)),
         True, "jax.nn", JAX_DPA + " query_seq_lengths/key_value_seq_lengths (padded query rows fully masked)"),
    Case("jax_dpa_local_window", dpa(local_window_size=(2, 1)), qkv("bshd"), True, "jax.nn",
         JAX_DPA + " local_window_size=(2, 1)"),
    Case("jax_dpa_causal_local_window", dpa(is_causal=True, local_window_size=3), qkv("bshd"), True, "jax.nn",
         JAX_DPA + " is_causal, local_window_size=3"),
    Case("jax_dpa_gqa", dpa(is_causal=True), qkv("bshd", heads=4, kv_heads=2), True, "jax.nn",
         JAX_DPA + " GQA 4 query heads over 2 KV heads"),
    Case("jax_dpa_mqa", dpa(), qkv("bshd", heads=4, kv_heads=1), True, "jax.nn", JAX_DPA + " MQA (1 KV head)"),
    Case("jax_dpa_unbatched_tnh", dpa(), qkv("tnh"), True, "jax.nn", JAX_DPA + " 3-D [T,N,H] inputs"),
    Case("jax_dpa_bf16_causal", dpa(is_causal=True), qkv("bshd", BF16), True, "jax.nn", JAX_DPA + " bf16 causal"),
    Case("jax_dpa_return_residual", lambda q, k, v: dpa(is_causal=True, return_residual=True)(q, k, v)[0],
         qkv("bshd"), True, "jax.nn", JAX_DPA + " return_residual=True (the output used)"),
    Case("jax_dpa_unbatched_bias_mask_scale", dpa(scale=0.2),
         with_extra(qkv("tnh"), normal((H, S, S)), lambda rng: jnp.asarray(rng.random((S, S)) < 0.8) | jnp.eye(S, dtype=bool)),
         True, "jax.nn", JAX_DPA + " unbatched [T,N,H] with bias [N,T,S], mask [T,S] and scale"),
    Case("jax_dpa_window_causal_kv_lengths",
         lambda q, k, v, kl: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(3, 0),
                                                          key_value_seq_lengths=kl, implementation="xla"),
         with_extra(qkv("bshd"), lambda rng: jnp.array([5, S], jnp.int32)), True, "jax.nn",
         JAX_DPA + " is_causal, local_window_size=(3, 0), key_value_seq_lengths"),
]

def linen_fp32_softmax(q, k, v):
    return linen.dot_product_attention(q, k, v, mask=causal()[None, None], force_fp32_for_softmax=True,
                                       deterministic=True)


case("flax_linen_dpa_bf16_force_fp32_softmax", qkv("bshd", BF16), positive=True, family="flax",
     source="flax.linen.dot_product_attention bf16, force_fp32_for_softmax=True (float32 P times bf16 V), "
            "causal")(linen_fp32_softmax)
grad_case("flax_linen_dpa_bf16_force_fp32_softmax_grad", linen_fp32_softmax, qkv("bshd", BF16), family="flax",
          source="flax.linen.dot_product_attention bf16, force_fp32_for_softmax=True, causal")

NNX_MHA_DROPOUT = nnx.split(nnx.MultiHeadAttention(num_heads=H, in_features=E, dropout_rate=0.1, deterministic=True,
                                                   decode=False, rngs=nnx.Rngs(0)))


@case("flax_nnx_mha_dropout_deterministic", nnx_args(NNX_MHA_DROPOUT), positive=True, family="flax",
      source="flax.nnx MultiHeadAttention(dropout_rate=0.1, deterministic=True), causal")
def flax_nnx_dropout(state, x):
    return nnx.merge(NNX_MHA_DROPOUT[0], state)(x, mask=nnx.make_causal_mask(x[..., 0]))


EQX_DROPOUT_PARAMS, EQX_DROPOUT_STATIC = eqx.partition(
    eqx.nn.MultiheadAttention(num_heads=H, query_size=E, dropout_p=0.1, inference=True, key=jax.random.PRNGKey(1)),
    eqx.is_array)


@case("equinox_mha_dropout_inference", lambda rng: (EQX_DROPOUT_PARAMS, _normal(rng, (B, S, E))), positive=True,
      family="equinox", source="equinox.nn.MultiheadAttention(dropout_p=0.1, inference=True), causal")
def equinox_mha_dropout(params, x):
    mha = eqx.combine(params, EQX_DROPOUT_STATIC)
    return jax.vmap(lambda t: mha(t, t, t, mask=causal()))(x)
grad_case("jax_dpa_causal_grad", dpa(is_causal=True), qkv("bshd"), family="jax.nn", source=JAX_DPA + " is_causal")
grad_case("jax_dpa_gqa_grad", dpa(), qkv("bshd", heads=4, kv_heads=2), family="jax.nn", source=JAX_DPA + " GQA")
grad_case("jax_dpa_unbatched_tnh_grad", dpa(), qkv("tnh"), family="jax.nn", source=JAX_DPA + " 3-D [T,N,H] inputs")
grad_case("jax_dpa_bf16_causal_grad", dpa(is_causal=True), qkv("bshd", BF16), family="jax.nn", source=JAX_DPA + " bf16 causal")
grad_case("jax_dpa_mqa_grad", dpa(), qkv("bshd", heads=4, kv_heads=1), family="jax.nn", source=JAX_DPA + " MQA (1 KV head)")
grad_case("jax_dpa_bias_and_mask_grad", dpa(),
          with_extra(qkv("bshd"), normal((B, 1, S, S)), lambda rng: jnp.asarray(rng.random((B, 1, 1, S)) < 0.7)),
          family="jax.nn", source=JAX_DPA + " bias= and a key-padding mask=")


# ---------------------------------------------------------------------------------------------
# Hand-written: scales


@case("scale_div_jnp_sqrt_of_d", qkv(), positive=True, family="scale", source=HAND + " s / jnp.sqrt(D)")
def scale_sqrt(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("scale_mul_lax_rsqrt", qkv(), positive=True, family="scale", source=HAND + " s * lax.rsqrt(float(D))")
def scale_rsqrt(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jax.lax.rsqrt(float(q.shape[-1]))
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("scale_mul_reciprocal_sqrt", qkv(), positive=True, family="scale", source=HAND + " s * (1.0 / jnp.sqrt(D))")
def scale_recip(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / jnp.sqrt(q.shape[-1]))
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("scale_on_k_before_dot", qkv(), positive=True, family="scale", source=HAND + " K scaled before Q·Kᵀ")
def scale_on_k(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.einsum("bhqd,bhkd->bhqk", q, k * D**-0.5)), v)


@case("scale_runtime_scalar_arg", with_extra(qkv(), lambda rng: jnp.float32(0.3)), positive=True,
      family="scale", source=HAND + " scale passed as a traced scalar argument")
def scale_runtime(q, k, v, scale):
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale), v)


@case("scale_per_head_traced", with_extra(qkv(), normal((H, 1, 1))), positive=True, family="scale",
      source="Swin v2: scores times a traced per-head scale [H, 1, 1]")
def scale_per_head(q, k, v, scale):
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.exp(scale)), v)


# ---------------------------------------------------------------------------------------------
# Hand-written: ranks and head layouts


@case("rank2_sd", qkv("sd"), positive=True, family="rank", source=HAND + " [S,D] single head")
def rank2(q, k, v):
    return softmax_last(q @ k.T / 4.0) @ v


@case("rank3_hsd", qkv("hsd"), positive=True, family="rank", source=HAND + " [H,S,D]")
def rank3(q, k, v):
    return jnp.einsum("hqk,hkd->hqd", softmax_last(jnp.einsum("hqd,hkd->hqk", q, k) * 0.25), v)


@case("rank3_bh_flat_scaled", qkv("(bh)sd"), positive=True, family="rank", source=HAND + " [B*H,S,D] scaled")
def rank3_flat(q, k, v):
    return jnp.matmul(softmax_last(jnp.matmul(q, jnp.swapaxes(k, 1, 2)) * 0.25), v)


@case("rank3_bh_flat_from_bshd_reshape", qkv("bshd"), positive=True, family="rank",
      source=HAND + " heads folded into batch by transpose+reshape, unfolded after")
def rank3_folded(q, k, v):
    fold = lambda t: t.transpose(0, 2, 1, 3).reshape(B * H, S, D)  # noqa: E731
    o = jnp.matmul(softmax_last(jnp.matmul(fold(q), jnp.swapaxes(fold(k), 1, 2)) * 0.25), fold(v))
    return o.reshape(B, H, S, D).transpose(0, 2, 1, 3)


@case("matmul_batch_of_one_causal", lambda rng: tuple(_normal(rng, (1, H, S, D)) for _ in range(3)), positive=True,
      family="rank", source=HAND + " [1,H,S,D] through jnp.matmul (it squeezes the unit batch axis), causal")
def matmul_batch_of_one(q, k, v):
    s = jnp.where(causal(), q @ kt(k) / np.sqrt(D), -jnp.inf)
    return softmax_last(s) @ v


grad_case("matmul_batch_of_one_causal_grad", matmul_batch_of_one,
          lambda rng: tuple(_normal(rng, (1, H, S, D)) for _ in range(3)), family="rank",
          source=HAND + " [1,H,S,D] through jnp.matmul: jax.grad sums the cotangent over the unit axis")


@case("rank5_grouped_with_bias", lambda rng: (
        _normal(rng, (B, 2, 2, S, D)), _normal(rng, (B, 2, S, D)), _normal(rng, (B, 2, S, D)),
        _normal(rng, (1, 2, 2, S, S))),
      positive=True, family="rank", source=HAND + " 5-D grouped [B,Hkv,G,S,D] with bias")
def rank5(q, k, v, bias):
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k) * 0.25 + bias
    return jnp.einsum("bhgqk,bhkd->bhgqd", softmax_last(s), v)


@case("query_shared_over_batch", lambda rng: (
        _extreme(_normal(rng, (4, H, D)), rng), _extreme(_normal(rng, (B, S, H, D)), rng), _normal(rng, (B, S, H, D))),
      positive=True, family="rank", source=HAND + " learned latents [N,H,D] without a batch axis (Perceiver, MAP head)")
def shared_query(latents, k, v):
    w = jnp.einsum("nhd,bshd->bhns", latents, k) / np.sqrt(D)
    return jnp.einsum("bhns,bshd->bnhd", softmax_last(w), v)


@case("mqa_kv_without_head_axis", lambda rng: (
        _normal(rng, (B, H, S, D)), _normal(rng, (B, S, D)), _normal(rng, (B, S, D))),
      positive=True, family="rank", source=HAND + " MQA, K/V [B,S,D]")
def mqa(q, k, v):
    return jnp.einsum("bhqk,bkd->bhqd", softmax_last(jnp.einsum("bhqd,bkd->bhqk", q, k) * 0.25), v)


def decode_args(rng: np.random.Generator) -> tuple:
    """A decode step: one query per head (squeezed), a KV cache of S entries, per-batch lengths."""
    return (_normal(rng, (B, H, D)), _normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, D)), jnp.array([5, S]))


@case("decode_squeezed_query_cache_lengths", decode_args, positive=True, family="rank",
      source=HAND + " decode step: q [B,H,D] against a KV cache, positions past each length hidden")
def decode_squeezed(q, k_cache, v_cache, lengths):
    s = jnp.einsum("bhd,bhkd->bhk", q, k_cache) * D**-0.5
    s = jnp.where(jnp.arange(S)[None, None, :] < lengths[:, None, None], s, jnp.finfo(F32).min)
    return jnp.einsum("bhk,bhkd->bhd", jax.nn.softmax(s, -1), v_cache)


@case("decode_single_head_query", decode_args, positive=True, family="rank",
      source=HAND + " decode step of one head: q [H,D] per head, no batch")
def decode_single_head(q, k_cache, v_cache, lengths):
    return jnp.einsum("hk,hkd->hd", jax.nn.softmax(jnp.einsum("hd,hkd->hk", q[0], k_cache[0]), -1), v_cache[0])


@case("gqa_repeat_kv", qkv(heads=4, kv_heads=2), positive=True, family="rank",
      source=HAND + " GQA by jnp.repeat of K/V heads (Llama repeat_kv)")
def gqa_repeat(q, k, v):
    k, v = jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1)
    return sdpa_bhsd(q, k, v)


@case("cross_attention_sq4_sk8", qkv(s_q=4), positive=True, family="rank", source=HAND + " Sq != Sk")
def cross(q, k, v):
    return sdpa_bhsd(q, k, v)


def _ensemble(rng):
    return tuple(_normal(rng, (2, B, S, H, D)) for _ in range(3))


def _causal_bshd(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(D))
    s = jnp.where(jnp.tril(jnp.ones((S, S), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_last(s), v)


@case("rank5_vmapped_over_models", _ensemble, positive=True, family="rank",
      source=HAND + " jax.vmap of causal [B,S,H,D] attention over an ensemble axis ([X,B,H,S,D] dots)")
def rank5_vmapped(q, k, v):
    return jax.vmap(_causal_bshd)(q, k, v)


grad_case("rank5_vmapped_over_models_grad", rank5_vmapped, _ensemble, family="rank",
          source=HAND + " jax.vmap over an ensemble axis")


@case("keys_first_scores_softmax_axis_minus2", qkv(extreme=True), positive=True, family="rank",
      source=HAND + " scores as K·Qᵀ [B,H,Sk,Sq], softmax over axis -2")
def keys_first_scores(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bhkd,bhqd->bhkq", k, q) * 0.25, axis=-2)
    return jnp.einsum("bhkq,bhkd->bhqd", p, v)


@case("haliax_scores_kv_first_softmax_axis_1", qkv("bshd", extreme=True), positive=True, family="rank",
      source="haliax-style named axes: scores [B,KPos,H,QPos], softmax over axis 1")
def haliax_kv_first(q, k, v):
    w = jnp.einsum("bqhd,bkhd->bkhq", q, k) * D**-0.5
    return jnp.einsum("bkhq,bkhd->bqhd", jax.nn.softmax(w, axis=1), v)


grad_case("keys_first_scores_softmax_axis_minus2_grad", keys_first_scores, qkv(extreme=True), family="rank",
          source=HAND + " scores as K·Qᵀ, softmax over axis -2")
grad_case("haliax_scores_kv_first_softmax_axis_1_grad", haliax_kv_first, qkv("bshd", extreme=True), family="rank",
          source="haliax-style scores [B,KPos,H,QPos], softmax over axis 1")
grad_case("decode_squeezed_query_cache_lengths_grad", decode_squeezed, decode_args, family="rank",
          source=HAND + " decode step: q [B,H,D], cache lengths", argnums=(0, 1, 2))
grad_case("decode_single_head_query_grad", decode_single_head, decode_args, family="rank",
          source=HAND + " decode step of one head: q [H,D]", argnums=(0, 1, 2))


def _bloom_alibi(heads: int) -> jax.Array:
    """[B*heads, 1, S]: BLOOM's ALiBi slopes times key positions, tiled over the batch."""
    slopes = jnp.asarray([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], F32)
    return jnp.tile(slopes[:, None] * jnp.arange(S, dtype=F32)[None, :], (B, 1))[:, None, :]


@case("bloom_folded_heads_alibi_causal", qkv("(bh)sd", extreme=True), positive=True, family="models",
      source="HF BLOOM: [B*H,S,D] baddbmm with ALiBi, scores reshaped to [B,H,S,S] for a finfo.min causal mask")
def bloom_folded(q, k, v):
    scores = _bloom_alibi(H) + jnp.matmul(q, kt(k)) * D**-0.5
    scores = jnp.where(causal()[None, None], scores.reshape(B, H, S, S), jnp.finfo(F32).min)
    return jnp.matmul(jax.nn.softmax(scores, axis=-1).reshape(B * H, S, S), v)


grad_case("bloom_folded_heads_alibi_causal_grad", bloom_folded, qkv("(bh)sd", extreme=True), family="models",
          source="HF BLOOM: [B*H,S,D], ALiBi, scores reshaped for the mask")


@case("neox_folded_heads_split_for_mask", qkv("bshd"), positive=True, family="models",
      source="GPT-NeoX/Pythia: [B*H,S,D] baddbmm(zeros, q, kᵀ, alpha), viewed [B,H,S,S] for the mask and P·V")
def neox_folded(q, k, v):
    fold = lambda t: t.transpose(0, 2, 1, 3).reshape(B * H, S, D)  # noqa: E731
    scores = jnp.zeros((B * H, S, S), F32) + D**-0.5 * jnp.matmul(fold(q), kt(fold(k)))
    scores = jnp.where(causal()[None, None], scores.reshape(B, H, S, S), jnp.finfo(F32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_last(scores), v)


grad_case("neox_folded_heads_split_for_mask_grad", neox_folded, qkv("bshd"), family="models",
          source="GPT-NeoX/Pythia: heads folded for the product, split for the mask")


def swin_one_head(q, k, v, rel):
    return softmax_last((q * D**-0.5) @ kt(k) + rel[None]) @ v


grad_case("swin_one_head_relative_bias_grad", swin_one_head,
          lambda rng: tuple(_normal(rng, (4, 1, S, D)) for _ in range(3)) + (_normal(rng, (1, S, S)),),
          family="models", argnums=(0, 1, 2, 3),
          source="Swin with one head: [B*nW,1,N,D] through jnp.matmul, relative bias [1,N,N] (its gradient too)")


# ---------------------------------------------------------------------------------------------
# Hand-written: mixed precision


@case("bf16_scores_f32_softmax_cast_back", qkv("bhsd", BF16), positive=True, family="precision",
      source=HAND + " bf16 scores cast to f32 for softmax, P cast back")
def bf16_f32_softmax(q, k, v):
    s = (jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.25, BF16)).astype(F32)
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s).astype(BF16), v)


@case("scale_after_bias", with_extra(qkv(), normal((1, H, S, S))), positive=True, family="scale",
      source="pallas TPU flash_attention reference: (q·kᵀ + bias) * scale")
def scale_after_bias(q, k, v, bias):
    return _pv(softmax_last((_scores(q, k) + bias) * 0.3), v)


@case("bf16_preferred_element_type_f32", qkv("bhsd", BF16), positive=True, family="precision",
      source=HAND + " bf16 operands, preferred_element_type=f32")
def bf16_pet(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s).astype(BF16), v, preferred_element_type=F32)


@case("precision_highest", qkv(), positive=True, family="precision", source=HAND + " precision=HIGHEST")
def precision_highest(q, k, v):
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=hi) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v, precision=hi)


@case("p_f32_v_bf16", lambda rng: (_normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, D)),
                                   _normal(rng, (B, H, S, D), BF16)),
      positive=True, family="precision", source=HAND + " f32 P times bf16 V (promoted to f32)")
def p_f32_v_bf16(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25), v)


grad_case("bf16_scores_f32_softmax_grad", bf16_f32_softmax, qkv("bhsd", BF16), family="precision",
          source=HAND + " bf16 scores, f32 softmax")


@case("bf16_q_k_widened_to_f32", qkv("bhsd", BF16), positive=True, family="precision",
      source="MaxText float32_qk_product / GPT-J: bf16 Q and K cast to f32 for the scores, P cast back")
def bf16_qk_widened(q, k, v):
    s = jnp.where(causal(), jnp.matmul(q.astype(F32), kt(k.astype(F32))), jnp.finfo(F32).min) / np.sqrt(D)
    return jnp.matmul(softmax_last(s).astype(BF16), v)


grad_case("bf16_q_k_widened_to_f32_grad", bf16_qk_widened, qkv("bhsd", BF16), family="precision",
          source="MaxText float32_qk_product / GPT-J (bf16 Q, K cast to f32)")


def q_f32_kv_bf16(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v.astype(F32))


grad_case("q_f32_kv_bf16_mixed_einsum_grad", q_f32_kv_bf16,
          lambda rng: (_normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, D), BF16), _normal(rng, (B, H, S, D), BF16)),
          family="precision", source=HAND + " f32 Q, bf16 K and V: einsum writes the mixed product Q·Kᵀ itself")


@case("bf16_pet_f32_output_cast_back", qkv("bshd", BF16, extreme=True), positive=True, family="precision",
      source=HAND + " bf16 dot_generals with preferred_element_type=f32, causal, the output cast back to bf16")
def bf16_pet_out_cast(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(D**-0.5, BF16), k, preferred_element_type=F32)
    p = jax.nn.softmax(jnp.where(causal(), s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(BF16), v, preferred_element_type=F32).astype(BF16)


grad_case("bf16_pet_f32_output_cast_back_grad", bf16_pet_out_cast, qkv("bshd", BF16, extreme=True), family="precision",
          source=HAND + " bf16, f32 accumulation, output cast back")


def _int8_qk(rng: np.random.Generator) -> tuple:
    q, k = (jnp.asarray(rng.integers(-127, 128, (B, H, S, D)).astype(np.int8)) for _ in range(2))
    return q, k, _normal(rng, (B, H, S, D))


def int8_qk_scores(q, k, v):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.int32)
    s = jnp.where(causal(), s.astype(F32) * 1e-3, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


grad_case("precision_highest_grad", precision_highest, qkv(), family="precision", source=HAND + " precision=HIGHEST")


@case("precision_f32_algorithm_preset", qkv("bshd"), positive=True, family="precision",
      source=HAND + " precision=DotAlgorithmPreset.F32_F32_F32, [B,S,H,D]")
def precision_f32_preset(q, k, v):
    full = jax.lax.DotAlgorithmPreset.F32_F32_F32
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=full) / jnp.sqrt(jnp.float32(D))
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_last(s), v, precision=full)


@case("precision_highest_bf16_causal", qkv("bhsd", BF16), positive=True, family="precision",
      source=HAND + " precision=HIGHEST over bfloat16, causal where-mask")
def precision_highest_bf16(q, k, v):
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=hi, preferred_element_type=F32) * 0.25
    keep = jnp.tril(jnp.ones((S, S), bool))
    p_ = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p_.astype(BF16), v, precision=hi)


# ---------------------------------------------------------------------------------------------
# Hand-written: masks


def _masked(q, k, v, keep, fill=-jnp.inf):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.where(keep, s, fill)), v)


@case("mask_key_padding_bool", with_extra(qkv(), padding_keep), positive=True, family="mask",
      source=HAND + " boolean key padding from [B,Sk]")
def mask_key_padding(q, k, v, keep):
    return _masked(q, k, v, keep[:, None, None, :], -1e9)


@case("mask_key_padding_all_padded_row", with_extra(qkv(), lambda rng: jnp.asarray(np.array([[False] * S, [True] * S]))),
      positive=True, family="mask", source=HAND + " key padding with one sequence fully padded (uniform rows)")
def mask_all_padded(q, k, v, keep):
    return _masked(q, k, v, keep[:, None, None, :], -1e9)


@case("mask_causal_and_padding", with_extra(qkv(), padding_keep), positive=True, family="mask",
      source=HAND + " causal & padding")
def mask_and(q, k, v, keep):
    return _masked(q, k, v, causal()[None, None] & keep[:, None, None, :], -1e9)


@case("mask_min_of_additive_masks", with_extra(qkv(), padding_keep), positive=True, family="mask",
      source=HAND + " jnp.minimum of two additive masks")
def mask_minimum(q, k, v, keep):
    neg = jnp.finfo(F32).min
    causal_bias = jnp.where(causal(), 0.0, neg)[None, None]
    pad_bias = jnp.where(keep, 0.0, neg)[:, None, None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + jnp.minimum(causal_bias, pad_bias)
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("mask_mul_of_float_masks", with_extra(qkv(), padding_keep), positive=True, family="mask",
      source=HAND + " float masks multiplied, then where(m > 0)")
def mask_mul(q, k, v, keep):
    m = causal().astype(F32)[None, None] * keep.astype(F32)[:, None, None, :]
    return _masked(q, k, v, m > 0, -1e9)


@case("mask_sliding_window", qkv(), positive=True, family="mask", source=HAND + " causal sliding window of 3")
def mask_window(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    return _masked(q, k, v, ((i - j) < 3) & (j <= i))


@case("mask_decode_step_kv_cache", lambda rng: (
        _normal(rng, (B, H, 1, D)), _normal(rng, (B, H, S, D)), _normal(rng, (B, H, S, D)), jnp.int32(5)),
      positive=True, family="mask", source=HAND + " one decode step against a KV cache, keys ≤ pos")
def mask_decode(q, k_cache, v_cache, pos):
    return _masked(q, k_cache, v_cache, (jnp.arange(S) <= pos)[None, None, None, :], -1e9)


@case("mask_triu_k1_where_neg_inf", qkv(), positive=True, family="mask",
      source=HAND + " where(triu(ones, k=1), -inf, s)")
def mask_triu(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    s = jnp.where(jnp.triu(jnp.ones((S, S), bool), k=1), -jnp.inf, s)
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("mask_float_tril_ne_zero", qkv(), positive=True, family="mask", source=HAND + " float tril tested != 0")
def mask_tril_ne(q, k, v):
    return _masked(q, k, v, jnp.tril(jnp.ones((S, S))) != 0)


@case("mask_gpt2_w_times_b_minus_1e10", qkv(), positive=True, family="mask",
      source="openai gpt-2 model.py mask_attn_weights: w*b - 1e10*(1-b)")
def mask_gpt2(q, k, v):
    w = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    b = jnp.tril(jnp.ones((S, S), F32))[None, None]
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(w * b - 1e10 * (1 - b)), v)


@case("mask_causal_where_plus_bias", with_extra(qkv(), normal((1, H, S, S))), positive=True, family="mask",
      source=HAND + " causal where-mask and an additive (ALiBi-like) bias")
def mask_causal_bias(q, k, v, bias):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(jnp.where(causal(), s, -jnp.inf)), v)


@case("mask_causal_as_additive_bias", qkv(), positive=True, family="mask",
      source=HAND + " causal matrix built as an additive 0/-inf bias")
def mask_causal_additive(q, k, v):
    bias = jnp.where(causal(), 0.0, -jnp.inf)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("mask_anti_causal_iota", qkv(), positive=True, family="mask",
      source=HAND + " iota_q <= iota_k: a (non-causal) boolean mask, every row keeps ≥1 key")
def mask_anti_causal(q, k, v):
    return _masked(q, k, v, jnp.arange(S)[:, None] <= jnp.arange(S)[None, :], -1e9)


@case("mask_bool_added_as_01_bias", with_extra(qkv(), padding_keep), positive=True, family="mask",
      source=HAND + " a boolean mask added as 0/1: an additive bias, still attention")
def mask_01_bias(q, k, v, keep):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + keep.astype(F32)[:, None, None, :]
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


grad_case("mask_key_padding_grad", mask_key_padding, with_extra(qkv(), padding_keep), family="mask",
          source=HAND + " key padding")


# ---------------------------------------------------------------------------------------------
# Hand-written: softmax spellings


def _scores(q, k):
    return jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25


def _pv(p, v):
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@case("softmax_no_max_subtraction", qkv(), positive=True, family="softmax",
      source=HAND + " exp(s) / sum(exp(s)) (equal while exp does not overflow)")
def softmax_no_max(q, k, v):
    e = jnp.exp(_scores(q, k))
    return _pv(e / e.sum(-1, keepdims=True), v)


@case("softmax_max_sub_stop_gradient", qkv(extreme=True), positive=True, family="softmax",
      source=HAND + " max subtracted under stop_gradient (flax/t5x style)")
def softmax_stop_grad(q, k, v):
    s = _scores(q, k)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    return _pv(e / e.sum(-1, keepdims=True), v)


@case("softmax_reciprocal_multiply", qkv(), positive=True, family="softmax",
      source=HAND + " e * (1 / sum(e))")
def softmax_recip(q, k, v):
    s = _scores(q, k)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return _pv(e * jnp.reciprocal(e.sum(-1, keepdims=True)), v)


@case("scores_and_pv_by_broadcast_multiply_sum", qkv(extreme=True), positive=True, family="softmax",
      source=HAND + " (q[..., :, None, :] * k[..., None, :, :]).sum(-1), causal, (p[..., None] * v[..., None, :, :]).sum(-2)")
def broadcast_multiply_sums(q, k, v):
    s = jnp.where(causal(), (q[..., :, None, :] * k[..., None, :, :]).sum(-1) * 0.25, -jnp.inf)
    return (jax.nn.softmax(s, axis=-1)[..., None] * v[..., None, :, :]).sum(-2)


@case("softmax_exp_log_softmax", qkv(), positive=True, family="softmax", source=HAND + " exp(log_softmax(s))")
def softmax_exp_log(q, k, v):
    return _pv(jnp.exp(jax.nn.log_softmax(_scores(q, k), axis=-1)), v)


grad_case("softmax_max_sub_stop_gradient_grad", softmax_stop_grad, qkv(extreme=True), family="softmax",
          source=HAND + " the backward of exp(s - sg(max)) / sum, as jax.grad writes a quotient")


@case("softmax_exp_s_minus_logsumexp", qkv(), positive=True, family="softmax",
      source=HAND + " exp(s - logsumexp(s))")
def softmax_lse(q, k, v):
    s = _scores(q, k)
    return _pv(jnp.exp(s - jax.nn.logsumexp(s, axis=-1, keepdims=True)), v)


@case("softmax_deferred_normalisation", qkv(), positive=True, family="softmax",
      source=HAND + " (exp(s - m) · V) / sum(exp(s - m)) (flash-style)")
def softmax_deferred(q, k, v):
    s = _scores(q, k)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return _pv(e, v) / e.sum(-1)[..., None]


@case("softmax_post_where_after_pre_mask", qkv(), positive=True, family="softmax",
      source=HAND + " where(mask, softmax(where(mask, s, -inf)), 0): post-mask changes nothing")
def softmax_post_where(q, k, v):
    m = causal()
    p = softmax_last(jnp.where(m, _scores(q, k), -jnp.inf))
    return _pv(jnp.where(m, p, 0.0), v)


@case("softmax_post_where_causal_bias_extreme", with_extra(qkv(extreme=True), normal((1, H, S, S))), positive=True,
      family="softmax", source=HAND + " where(causal, softmax(where(causal, s + bias, -inf)), 0), extreme inputs")
def softmax_post_where_bias(q, k, v, bias):
    m = causal()
    p = softmax_last(jnp.where(m, _scores(q, k) + bias, -jnp.inf))
    return _pv(jnp.where(m, p, 0.0), v)


@case("softmax_where_argument_causal", qkv(extreme=True), positive=True, family="softmax",
      source=HAND + " jax.nn.softmax(s, where=causal) · V, extreme inputs")
def softmax_where_arg(q, k, v):
    return _pv(jax.nn.softmax(_scores(q, k), axis=-1, where=causal()), v)


def window(width: int = 4) -> jax.Array:
    """[S, S] bool sliding window from iota: query i sees keys i - width < j <= i (the diagonal always)."""
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    return (j <= i) & (i - j < width)


@case("softmax_where_argument_window", qkv(extreme=True), positive=True, family="softmax",
      source=HAND + " jax.nn.softmax(s, where=sliding window) · V, extreme inputs: every row keeps its diagonal")
def softmax_where_window(q, k, v):
    return _pv(jax.nn.softmax(_scores(q, k), axis=-1, where=window()), v)


grad_case("softmax_where_argument_window_grad", softmax_where_window, qkv(extreme=True), family="softmax",
          source=HAND + " the backward of jax.nn.softmax(s, where=sliding window) · V, extreme inputs")


@case("mask_static_causal_lt_plus1", qkv(extreme=True), positive=True, family="mask",
      source=HAND + " where(j < i + 1, s, -inf): causal spelled with lt and an offset (the causal flag by evaluation)")
def mask_causal_lt_plus1(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    return _pv(softmax_last(jnp.where(j < i + 1, _scores(q, k), -jnp.inf)), v)


@case("p_times_per_head_mask", with_extra(qkv(), lambda rng: jnp.array([1.0, 0.0], F32)), positive=True,
      family="softmax", source="huggingface head_mask: P * m[h] = m[h] * attention")
def p_head_mask(q, k, v, head_mask):
    return _pv(softmax_last(_scores(q, k)) * head_mask[None, :, None, None], v)


@case("logit_soft_cap_tanh", qkv(extreme=True), positive=True, family="softmax",
      source="gemma-2 attention logit soft-capping c * tanh(s / c)")
def soft_cap(q, k, v):
    c = 50.0
    return _pv(softmax_last(c * jnp.tanh(_scores(q, k) / c)), v)


grad_case("softmax_exp_s_minus_logsumexp_grad", softmax_lse, qkv(), family="softmax",
          source=HAND + " exp(s - logsumexp(s))")


# ---------------------------------------------------------------------------------------------
# Model code of other JAX libraries (written again here from their published form)

MAXTEXT_MASK_VALUE = -0.7 * float(jnp.finfo(F32).max)


@case("maxtext_additive_mask_compared_back", qkv("bshd"), positive=True, family="models",
      source="MaxText attentions.py: an additive 0/-0.7·max mask compared back to booleans (>= half of it)")
def maxtext_mask(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    additive = jnp.where(causal(), 0.0, MAXTEXT_MASK_VALUE)[None, None]
    s = jnp.where(additive >= MAXTEXT_MASK_VALUE * 0.5, s, MAXTEXT_MASK_VALUE)
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_last(s), v)


@case("pallas_mha_reference_scale_after_mask", qkv("bshd", extreme=True), positive=True, family="models",
      source="jax.experimental.pallas.ops.gpu.attention.mha_reference: -inf where-mask, then the scale")
def pallas_reference(q, k, v):
    logits = jnp.where(jnp.tril(jnp.ones((1, 1, S, S), bool)), jnp.einsum("bqhc,bkhc->bhqk", q, k), float("-inf"))
    return jnp.einsum("bhqk,bkhc->bqhc", softmax_last(logits * 0.25), v)


def segment_ids(rng: np.random.Generator) -> jax.Array:
    """[B, S] int32 ids of sequences packed into one row."""
    return jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32))


@case("packed_segments_causal", with_extra(qkv(), segment_ids), positive=True, family="models",
      source="packed sequences (t5x, MaxText): same segment id and causal, filled with -1e9")
def packed_segments(q, k, v, ids):
    keep = (ids[:, :, None] == ids[:, None, :])[:, None] & causal()[None, None]
    s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", softmax_last(s), v)


@case("haiku_mha_fill_1e30", with_extra(qkv("bshd"), padding_keep), positive=True, family="models",
      source="haiku MultiHeadAttention: logits / sqrt(key_size), where(mask, logits, -1e30), heads merged")
def haiku_mha(q, k, v, keep):
    logits = jnp.einsum("...thd,...Thd->...htT", q, k) / np.sqrt(D).astype(np.float32)
    logits = jnp.where(keep[:, None, None, :], logits, -1e30)
    return jnp.einsum("...htT,...Thd->...thd", softmax_last(logits), v).reshape(B, S, E)


@case("t5_unscaled_position_bias_and_padding", with_extra(qkv(), normal((1, H, S, S)), padding_keep),
      positive=True, family="models", source="HF FlaxT5Attention: no scale, position bias plus a finfo.min padding bias")
def t5_attention(q, k, v, position_bias, keep):
    bias = position_bias + jnp.where(keep[:, None, None, :], 0.0, jnp.finfo(F32).min)
    weights = softmax_last((jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias).astype(F32))
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


@case("hf_flax_bert_head_mask_of_ones", with_extra(qkv("bshd", extreme=True), padding_keep), positive=True,
      family="models", source="HF FlaxBertSelfAttention: a select-built finfo.min padding bias, linen's "
      "dot_product_attention_weights, then P times the default head_mask (ones cast to int32) by einsum")
def hf_flax_bert(q, k, v, keep):
    shape = (B, 1, 1, S)
    bias = jax.lax.select(jnp.broadcast_to(keep[:, None, None, :], shape), jnp.full(shape, 0.0, F32),
                          jnp.full(shape, jnp.finfo(F32).min, F32))
    weights = linen.dot_product_attention_weights(q, k, bias=bias, deterministic=True, dtype=F32)
    head_mask = jnp.array(jnp.ones((1, H))[0], dtype="i4")  # FlaxBertModel's default: ones((layers, heads))
    weights = jnp.einsum("...hqk,h->...hqk", weights, head_mask)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


grad_case("hf_flax_bert_head_mask_of_ones_grad", hf_flax_bert, with_extra(qkv("bshd"), padding_keep), family="models",
          source="HF FlaxBertSelfAttention with its default head mask of ones")


GEMMA_K_MASK = -2.3819763e38  # gemma's finite mask fill


@case("gemma_gqa_btkgs_causal", qkv("bshd", extreme=True, heads=4, kv_heads=2), positive=True, family="models",
      source="gemma (google-deepmind/gemma) GQA: logits einsum BTKGH,BSKH->BTKGS merged to [B,T,N,S] for the mask")
def gemma_gqa(q, k, v):
    n_kv = k.shape[2]
    groups = q.reshape(B, S, n_kv, q.shape[2] // n_kv, D) * D ** -0.5
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", groups, k).reshape(B, S, q.shape[2], S)
    logits = jnp.where(causal()[None, :, None, :], logits, GEMMA_K_MASK)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1).reshape(B, S, n_kv, q.shape[2] // n_kv, S)
    return jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(q.shape)


grad_case("gemma_gqa_btkgs_causal_grad", gemma_gqa, qkv("bshd", heads=4, kv_heads=2), family="models",
          source="gemma GQA, logits merged to [B,T,N,S] for the mask")


N_WINDOWS = 2


def swin_window_args(rng: np.random.Generator) -> tuple:
    """Q, K, V [B·nW, H, S, D] (extreme entries), a relative-position bias [H, S, S] and a 0/-100
    window mask [nW, S, S]."""
    q, k, v = (_extreme(_normal(rng, (B * N_WINDOWS, H, S, D)), rng) for _ in range(3))
    relative = _normal(rng, (H, S, S))
    window = jnp.asarray(np.where(rng.random((N_WINDOWS, S, S)) < 0.3, -100.0, 0.0).astype(np.float32))
    return q, k, v, relative, window


@case("swin_window_bias_then_mask", swin_window_args, positive=True, family="models",
      source="Swin window attention: a relative-position bias, then a window mask added on a [B, nW, H, S, S] view")
def swin_window(q, k, v, relative, window):
    heads = q.shape[1]
    scores = (q * D ** -0.5) @ jnp.swapaxes(k, -2, -1) + relative[None]
    scores = scores.reshape(B, N_WINDOWS, heads, S, S) + window[None, :, None]
    return jax.nn.softmax(scores.reshape(-1, heads, S, S), axis=-1) @ v


grad_case("swin_window_bias_then_mask_grad", swin_window, swin_window_args, family="models",
          source="Swin window attention, relative bias then window mask")


# ---------------------------------------------------------------------------------------------
# Negatives: near-misses whose values an attention op would change


@case("neg_weights_also_returned", qkv(), positive=False, family="negative",
      source=HAND + " (o, p): weights are a second output")
def neg_weights_returned(q, k, v):
    p = softmax_last(_scores(q, k))
    return _pv(p, v), p


@case("neg_weights_head_averaged_used", qkv(), positive=False, family="negative",
      source="torch MHA need_weights: head-averaged weights used downstream")
def neg_weights_used(q, k, v):
    p = softmax_last(_scores(q, k))
    return _pv(p, v) + p.mean(axis=1)[:, None, :, :D // 2].sum(-1, keepdims=True)


@case("neg_softmax_over_query_axis", qkv(), positive=False, family="negative", source=HAND + " softmax over axis -2")
def neg_softmax_axis(q, k, v):
    return _pv(jax.nn.softmax(_scores(q, k), axis=-2), v)


@case("mask_where_fill_minus_3", qkv(), positive=True, family="mask",
      source=HAND + " where(causal, s, -3): the op keeps the fill exactly, hidden keys still weigh in")
def mask_small_fill(q, k, v):
    return _masked(q, k, v, causal(), -3.0)


@case("neg_tanh_between_softmax_and_pv", qkv(), positive=False, family="negative",
      source=HAND + " tanh(P) · V")
def neg_op_between(q, k, v):
    return _pv(jnp.tanh(softmax_last(_scores(q, k))), v)


@case("neg_p_plus_constant", qkv(), positive=False, family="negative", source=HAND + " (P + 0.1) · V")
def neg_p_plus(q, k, v):
    return _pv(softmax_last(_scores(q, k)) + 0.1, v)


@case("neg_dropout_like_random_multiply", with_extra(qkv(), lambda rng: jnp.asarray(
        (rng.random((B, H, S, S)) < 0.9).astype(np.float32) / 0.9)), positive=False, family="negative",
      source=HAND + " P * keep / (1 - rate) with a random keep mask (dropout)")
def neg_dropout(q, k, v, keep_scaled):
    return _pv(softmax_last(_scores(q, k)) * keep_scaled, v)


@case("neg_dropout_bernoulli_key", with_extra(qkv(), lambda rng: jax.random.PRNGKey(int(rng.integers(1 << 30)))),
      positive=False, family="negative", source="flax dropout: jax.random.bernoulli on P")
def neg_dropout_key(q, k, v, key):
    p = softmax_last(_scores(q, k))
    keep = jax.random.bernoulli(key, 0.9, p.shape)
    return _pv(jnp.where(keep, p / 0.9, 0.0), v)


@case("neg_post_softmax_mask_only", qkv(), positive=False, family="negative",
      source=HAND + " where(causal, softmax(s), 0) without a pre-softmax mask: rows not renormalised")
def neg_post_mask(q, k, v):
    return _pv(jnp.where(causal(), softmax_last(_scores(q, k)), 0.0), v)


@case("neg_post_where_key_padding", with_extra(qkv(), lambda rng: jnp.array([[True] * S, [False] * S])),
      positive=False, family="negative",
      source=HAND + " where(pad, softmax(where(pad, s, -inf)), 0) with a fully padded sequence: its rows are 0, not NaN")
def neg_post_where_padding(q, k, v, keep):
    m = keep[:, None, None, :]
    return _pv(jnp.where(m, softmax_last(jnp.where(m, _scores(q, k), -jnp.inf)), 0.0), v)


@case("neg_post_where_causal_finite_fill", qkv(extreme=True), positive=False, family="negative",
      source=HAND + " where(causal, softmax(where(causal, s, -1e9)), 0): a row at the fill's level weighs hidden keys")
def neg_post_where_finite(q, k, v):
    m = causal()
    return _pv(jnp.where(m, softmax_last(jnp.where(m, _scores(q, k), -1e9)), 0.0), v)


@case("neg_softmax_where_argument_padding", with_extra(qkv(), lambda rng: jnp.array([[True] * S, [False] * S])),
      positive=False, family="negative",
      source=HAND + " jax.nn.softmax(s, where=pad) with a fully padded sequence: its rows are 0, not NaN")
def neg_softmax_where_padding(q, k, v, keep):
    return _pv(jax.nn.softmax(_scores(q, k), axis=-1, where=keep[:, None, None, :]), v)


@case("neg_max_over_wrong_axis", qkv(), positive=False, family="negative",
      source=HAND + " exp(s - max over queries) normalised over keys: not shift-invariant per row")
def neg_max_axis(q, k, v):
    s = _scores(q, k)
    e = jnp.exp(s - s.max(-2, keepdims=True))
    return _pv(e / e.sum(-1, keepdims=True), v)


@case("neg_sum_over_wrong_axis", qkv(), positive=False, family="negative",
      source=HAND + " exp normalised by the sum over queries")
def neg_sum_axis(q, k, v):
    s = _scores(q, k)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return _pv(e / e.sum(-2, keepdims=True), v)


@case("neg_pv_contracts_query_axis", qkv(), positive=False, family="negative",
      source=HAND + " P contracted with V over the query axis")
def neg_pv_wrong_axis(q, k, v):
    return jnp.einsum("bhqk,bhqd->bhkd", softmax_last(_scores(q, k)), v)


@case("neg_scores_squared", qkv(), positive=False, family="negative", source=HAND + " softmax(s²) · V")
def neg_scores_squared(q, k, v):
    return _pv(softmax_last(_scores(q, k) ** 2), v)


@case("neg_sigmoid_attention", qkv(), positive=False, family="negative", source=HAND + " sigmoid(s) · V")
def neg_sigmoid(q, k, v):
    return _pv(jax.nn.sigmoid(_scores(q, k)), v)


# ---------------------------------------------------------------------------------------------

# jax.grad of forward spellings whose backward needed its own rules (rules/attention.py: softcap_backward,
# traced_scale_backward, the hand-written spellings of softmax_vjps, max_backward)

grad_case("logit_soft_cap_tanh_grad", soft_cap, qkv(extreme=True), family="softmax",
          source="gemma-2 logit soft-capping: tanh's derivative (jax 0.12's one_minus_square) in the backward")
grad_case("scale_per_head_traced_grad", scale_per_head, with_extra(qkv(), normal((H, 1, 1))), family="scale",
          source="Swin v2: a traced per-head scale multiplies the scores' cotangent per head")
grad_case("scale_runtime_scalar_arg_grad", scale_runtime, with_extra(qkv(), lambda rng: jnp.float32(0.3)), family="scale",
          source=HAND + " a traced scalar scale multiplies the scores' cotangent")
grad_case("scale_runtime_scalar_wrt_scale_grad", scale_runtime, with_extra(qkv(extreme=True), lambda rng: jnp.float32(0.3)),
          family="scale", argnums=(0, 1, 2, 3),
          source="CLIP's learned logit_scale: the traced scalar's own gradient, sum(g ⊙ Q·Kᵀ), from the op's dQ")
grad_case("scale_per_head_wrt_scale_grad", scale_per_head, with_extra(qkv(), normal((H, 1, 1))),
          family="scale", argnums=(0, 1, 2, 3),
          source="Swin v2's per-head logit_scale: its own gradient, summed per head, from the op's dQ")
grad_case("softmax_exp_log_softmax_grad", softmax_exp_log, qkv(), family="softmax",
          source=HAND + " the backward of exp(log_softmax(s)): log_softmax's VJP")
grad_case("softmax_reciprocal_multiply_grad", softmax_recip, qkv(extreme=True), family="softmax",
          source=HAND + " the backward of E * (1 / sum(E)) with the max not under stop_gradient")



def _custom_vjp_attention(distributed: bool) -> Callable:
    """Attention under jax.custom_vjp whose backward writes softmax's VJP by hand (saving P), as a
    kernel's pure-JAX fallback does: ``P * (dP - sum(P * dP))``, or ``P * dP - P * sum(P * dP)``."""

    @jax.custom_vjp
    def attention(q, k, v):
        return _pv(softmax_last(_scores(q, k)), v)

    def forward(q, k, v):
        p = softmax_last(_scores(q, k))
        return _pv(p, v), (q, k, v, p)

    def backward(saved, do):
        q, k, v, p = saved
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, v)
        row = jnp.sum(p * dp, axis=-1, keepdims=True)
        ds = (p * dp - p * row) if distributed else p * (dp - row)
        ds = ds * 0.25  # _scores' scale
        return jnp.einsum("bhqk,bhkd->bhqd", ds, k), jnp.einsum("bhqk,bhqd->bhkd", ds, q), jnp.einsum("bhqk,bhqd->bhkd", p, do)

    attention.defvjp(forward, backward)
    return attention


grad_case("custom_vjp_textbook_softmax_backward_grad", _custom_vjp_attention(False), qkv(extreme=True),
          family="softmax", source=HAND + " custom_vjp attention, backward P * (dP - sum(P * dP)) written out")
grad_case("custom_vjp_textbook_distributed_backward_grad", _custom_vjp_attention(True), qkv(),
          family="softmax", source=HAND + " custom_vjp attention, backward P * dP - P * sum(P * dP) written out")

# ---------------------------------------------------------------------------------------------

LSE = "logsumexp's is_finite guard makes a row holding +inf [NaN, 0, ...] where softmax is all NaN (not exact)"

#: positives the rules do not raise, with the reason (tests xfail them strictly)
KNOWN_UNRAISED: dict[str, str] = {
    "softmax_exp_s_minus_logsumexp_grad": LSE,
    "sfdp19_causal_where_plus_mask": "the bias is added after the where-mask, so the fill becomes fill + bias (not one value)",
    "mask_gpt2_w_times_b_minus_1e10": "a multiplicative mask: s * 0 is NaN where s is inf, which a where-mask hides (not exact)",
    "softmax_no_max_subtraction": "exp(s) overflows above 88 where the op's stable softmax does not (not exact)",
    "p_times_per_head_mask": "P * m[h] before P·V is not m[h] * (P·V) in signed zeros and NaN (not exact)",
    "softmax_exp_s_minus_logsumexp": LSE,
    "scale_runtime_scalar_wrt_scale_grad": "dQ, dK and dV are raised; the scale's own gradient sum(g ⊙ Q·Kᵀ) read from "
                                           "the op's dQ sums across the op's boundary (not exact)",
    "scale_per_head_wrt_scale_grad": "dQ, dK and dV are raised; the per-head scale's gradient read from the op's dQ "
                                     "sums across the op's boundary (not exact)",
    "softmax_where_argument_window_grad": "dQ and dK are raised; V's gradient reads P zeroed where the mask hides, "
                                          "the op's P is NaN there in a row of NaN scores (not exact)",
}

#: the positives above that ``precision="fast_math"`` raises (README, "Precision policy"): equal but
#: where the program meets Inf or NaN, signed zeros and exp's rounding (rules/attention.py,
#: `attention_fast_math`)
FAST_MATH_RAISED: frozenset[str] = frozenset(KNOWN_UNRAISED)

#: negatives fast_math raises with equal values, and why that is right
FAST_MATH_RAISED_NEGATIVES: dict[str, str] = {
    "neg_max_over_wrong_axis": "exp(x) / sum(exp(x)) is softmax(x) for any x: here x = s - max over queries, "
                               "attention with that bias",
}

#: negatives raised with equal values, and why that is right
WEIGHTS_NEEDED = ("their output O is attention, but the weights P are needed too, so the chosen program computes "
                  "QKᵀ and softmax twice where the cost model prices that lower")
KNOWN_RAISED_NEGATIVES: dict[str, str] = {
    "neg_weights_also_returned": WEIGHTS_NEEDED,
    "neg_weights_head_averaged_used": WEIGHTS_NEEDED,
}

#: the longest cases (5-D gradients, two runs each), run first so that parallel workers balance
SLOW: frozenset[str] = frozenset({
    "jax_dpa_causal_grad",
    "jax_dpa_gqa_grad",
    "jax_dpa_mqa_grad",
})

BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
assert KNOWN_UNRAISED.keys() <= {c.name for c in CASES if c.positive}, KNOWN_UNRAISED.keys() - BY_NAME.keys()
assert KNOWN_RAISED_NEGATIVES.keys() | FAST_MATH_RAISED_NEGATIVES.keys() <= {c.name for c in CASES if not c.positive}
assert SLOW <= BY_NAME.keys()


# ---------------------------------------------------------------------------------------------
# running a case (shared by tests/test_attention_corpus.py and bench/attention_coverage.py)

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}


def tolerance(*trees) -> float:
    """rtol = atol for the least precise floating dtype among the leaves of ``trees``."""
    dtypes = [jnp.dtype(x.dtype).name for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
    return max((TOLERANCE.get(d, 2e-5) for d in dtypes), default=2e-5)


@dataclass(frozen=True)
class Outcome:
    """What optimizing one case did: raised or not, the largest value error, and how long it took."""

    raised: int  # attention ops in the chosen program
    softmax_left: int  # softmaxes of the chosen program outside attention (`softmax_misses`)
    reasons: tuple[str, ...]  # the report's `not_attention`: why each softmax left is not attention
    max_error: float  # max |optimized - original| - tol * |original|, <= 0 when within tolerance
    seconds: float  # wall time of optimizing (explain: trace, e-graph, extraction, lowering)
    cpu_seconds: float  # this process's CPU time over the same span (less sensitive to machine load)
    egraph_nodes: int
    saturated: bool
    cost: float  # the chosen program's predicted cost (the H100 model's seconds)
    fallbacks: tuple[str, ...]  # RuntimeWarnings: optimization failed and the original program ran
    notes: tuple[str, ...]  # the report's warnings (e.g. saturation stopped at a limit)
    after: str

    @property
    def fully_raised(self) -> bool:
        """Attention found and no softmax left outside it (a gradient with P still computed for
        one of dQ, dK, dV is not raised)."""
        return self.raised >= 1 and self.softmax_left == 0

    @property
    def values_equal(self) -> bool:
        return self.max_error <= 0.0


def excess_error(got, want, tol: float) -> float:
    """The largest ``|got - want| - tol - tol*|want|`` over all leaves; inf when shapes, NaN
    positions or infinities differ."""
    worst = -np.inf
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape or not np.array_equal(np.isnan(g), np.isnan(w)):
            return np.inf
        infinite = np.isinf(g) | np.isinf(w)
        if np.any(g[infinite] != w[infinite]):
            return np.inf
        finite = np.isfinite(w)
        diff = np.abs(g[finite] - w[finite]) - tol - tol * np.abs(w[finite])
        worst = max(worst, float(diff.max(initial=-np.inf)))
    return worst


LIMITS = ea.Limits(iterations=30, seconds=600)
"""Work limits decide (the same program on any machine); the clock is only a far safety net."""


def evaluate(case: Case, limits: ea.Limits | None = None, precision: str = "exact") -> Outcome:
    """Optimize ``case`` priced for an H100 and compare the optimized values with the original's."""
    args = case.args()
    optimized = ea.optimize(case.fn, cost_model=for_device("h100"), limits=limits or LIMITS, precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start, cpu_start = time.perf_counter(), time.process_time()
        report = optimized.explain(*args)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        got = optimized(*args)
    want = case.fn(*args)
    return Outcome(
        raised=len(report.attention),
        softmax_left=len(softmax_misses(report.after)),
        reasons=tuple(report.not_attention),
        max_error=excess_error(got, want, tolerance(args, want)),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        egraph_nodes=report.egraph_nodes,
        saturated=report.saturated,
        cost=report.cost_after,
        fallbacks=tuple(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)),
        notes=tuple(report.warnings),
        after=str(report.after),
    )
