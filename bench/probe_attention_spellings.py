"""Probe the attention raising with spellings the corpus does not hold (issue 19's held-out set).

    python bench/probe_attention_spellings.py [--only SUBSTR ...] [--no-grad] [--json out.json]
    python bench/probe_attention_spellings.py --table out.json [more.json ...]   # markdown table

Each probe is an attention program written the way a library or model file writes it (Llama,
Gemma, Mistral, T5, ViT, Whisper, nanoGPT, BLOOM/ALiBi, BERT, DistilBERT, Equinox, Penzai- and
Haliax-style named axes, `jax.nn.dot_product_attention` options, nested scan/checkpoint, ...),
run forward and as ``jax.grad`` of ``sum(out * cotangent)`` with respect to its inputs through
``tests/attention_corpus.py``'s ``evaluate`` (exact; a probe exact leaves unraised is also run
under ``precision="fast_math"``). One line per run: name, raised fully/partly/not, values equal,
seconds, and the report's reasons. This is a probe, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention_corpus import Case, Outcome, _extreme, _normal, evaluate  # noqa: E402

B, H, S, D = 2, 4, 16, 8
E = H * D
F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


@dataclass(frozen=True)
class Probe:
    name: str
    style: str
    fn: Callable
    make_args: Callable[[np.random.Generator], tuple]
    grad_argnums: tuple[int, ...] | None  # None: no gradient probe (e.g. integer-only inputs)


PROBES: list[Probe] = []


def probe(name: str, style: str, make_args: Callable, grad_argnums: tuple[int, ...] | None = (0, 1, 2)):
    def register(fn: Callable) -> Callable:
        PROBES.append(Probe(name, style, fn, make_args, grad_argnums))
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# argument builders


def tensors(*shapes, dtype=F32, extreme: bool = False, extra: tuple[Callable, ...] = ()):
    """Normal tensors of ``shapes`` (a few extreme entries each when ``extreme``), then ``extra``."""

    def make(rng: np.random.Generator) -> tuple:
        out = tuple(_normal(rng, s, dtype) for s in shapes)
        if extreme:
            out = tuple(_extreme(t, rng) for t in out)
        return out + tuple(e(rng) for e in extra)

    return make


BHSD = (B, H, S, D)
BSHD = (B, S, H, D)


def lengths(*values):
    return lambda rng: jnp.asarray(values, jnp.int32)


def pad_mask_int(rng):
    """[B, S] int32 attention_mask as tokenizers give it: 1 real, 0 padding (batch 0 keeps 11)."""
    return jnp.asarray((np.arange(S)[None, :] < np.array([11, S])[:, None]).astype(np.int32))


def rope(x, positions, base=10000.0):
    """Rotary embedding on the last axis of x [B, S, H, D] (half-split form, as Llama in JAX)."""
    half = x.shape[-1] // 2
    freq = 1.0 / (base ** (jnp.arange(half, dtype=F32) / half))
    angle = positions[..., None].astype(F32) * freq  # [B, S, half]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def tri(sq=S, sk=S):
    return jnp.tril(jnp.ones((sq, sk), dtype=bool))


# ---------------------------------------------------------------------------------------------
# Llama / EasyLM / HF Flax Llama


@probe("llama_rope_gqa_repeat_finfo_min", "EasyLM/HF FlaxLlama", tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D)))
def llama(xq, xk, xv):
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    xq, xk = rope(xq, pos), rope(xk, pos)
    xk, xv = jnp.repeat(xk, H // 2, axis=2), jnp.repeat(xv, H // 2, axis=2)
    mask = jnp.tril(jnp.ones((S, S), dtype="bool"))[None, None]
    bias = jax.lax.select(mask, jnp.full(mask.shape, 0.0, F32), jnp.full(mask.shape, jnp.finfo(F32).min))
    w = jnp.einsum("...qhd,...khd->...hqk", xq / jnp.sqrt(D).astype(F32), xk) + bias
    w = jax.nn.softmax(w.astype(F32), axis=-1).astype(xv.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", w, xv).reshape(B, S, E)


@probe("llama_official_triu_full_neginf", "meta llama model.py", tensors(BSHD, BSHD, BSHD))
def llama_official(xq, xk, xv):
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (xq, xk, xv))
    mask = jnp.triu(jnp.full((S, S), -jnp.inf), k=1)
    scores = jnp.matmul(q, jnp.swapaxes(k, 2, 3)) / math.sqrt(D)
    scores = scores + mask
    scores = jax.nn.softmax(scores.astype(F32), axis=-1).astype(q.dtype)
    return jnp.swapaxes(jnp.matmul(scores, v), 1, 2).reshape(B, S, -1)


@probe("llama_gqa_broadcast_reshape_repeat_kv", "HF repeat_kv (expand+reshape)",
       tensors((B, 2, S, D), (B, 2, S, D), (B, 2, S, D)), grad_argnums=(0, 1, 2))
def gqa_expand(q2, k, v):
    q = jnp.concatenate([q2, q2 * 0.5], axis=1)  # 4 query heads

    def repeat_kv(x, n):
        b, h, s, d = x.shape
        return jnp.broadcast_to(x[:, :, None], (b, h, n, s, d)).reshape(b, h * n, s, d)

    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    w = jnp.matmul(q, jnp.swapaxes(k, 2, 3)) / math.sqrt(D) + jnp.where(tri(), 0.0, jnp.finfo(F32).min)[None, None]
    return jnp.matmul(jax.nn.softmax(w, axis=-1), v)


@probe("llama_kv_cache_hstack_zeros_mask", "meta llama model.py decode with start_pos",
       tensors((B, H, 4, D), (B, H, S, D), (B, H, S, D)))
def llama_cache(q, k, v):
    start = S - 4
    mask = jnp.triu(jnp.full((4, 4), -jnp.inf), k=1)
    mask = jnp.hstack([jnp.zeros((4, start)), mask])
    scores = jnp.matmul(q, jnp.swapaxes(k, 2, 3)) / math.sqrt(D) + mask
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)


# ---------------------------------------------------------------------------------------------
# Gemma


GEMMA_K_MASK = -2.3819763e38


@probe("gemma_prescale_softcap_window_kmask", "gemma (google-deepmind/gemma) Attention", tensors(BSHD, BSHD, BSHD))
def gemma(q, k, v):
    q = q * 16.0 ** -0.5  # query_pre_attn_scalar
    logits = jnp.einsum("BTNH,BSNH->BTNS", q, k)
    logits = jnp.tanh(logits / 50.0) * 50.0
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    window = (j > i - 4) & (j < i + 4)
    mask = (j <= i)[None, :, None, :] & window[None, :, None, :]
    logits = jnp.where(mask, logits, GEMMA_K_MASK)
    p = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
    return jnp.einsum("BTNS,BSNH->BTNH", p, v)


@probe("gemma_gqa_kgh_einsum", "gemma GQA einsum BTKGH,BSKH", tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D)))
def gemma_gqa(q, k, v):
    q = q * D ** -0.5
    qg = q.reshape(B, S, 2, H // 2, D)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k).reshape(B, S, H, S)
    logits = jnp.where(tri()[None, :, None, :], logits, GEMMA_K_MASK)
    p = jax.nn.softmax(logits.astype(F32), axis=-1)
    pg = p.reshape(B, S, 2, H // 2, S)
    return jnp.einsum("BTKGS,BSKH->BTKGH", pg, v).reshape(B, S, H, D)


@probe("gemma_bf16_softcap_causal", "gemma bf16 with soft-cap", tensors(BSHD, BSHD, BSHD, dtype=BF16))
def gemma_bf16(q, k, v):
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * jnp.asarray(D ** -0.5, BF16), k)
    logits = (jnp.tanh(logits.astype(F32) / 50.0) * 50.0)
    logits = jnp.where(tri()[None, :, None, :], logits, GEMMA_K_MASK)
    p = jax.nn.softmax(logits, axis=-1).astype(BF16)
    return jnp.einsum("BTNS,BSNH->BTNH", p, v)


# ---------------------------------------------------------------------------------------------
# Mistral sliding window, decode against a cache


@probe("mistral_sliding_window_causal", "mistral sliding window", tensors(BHSD, BHSD, BHSD))
def mistral_window(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    keep = (j <= i) & (j > i - 5)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
    s = jnp.where(keep, s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


@probe("decode_per_batch_positions_window", "mistral decode, per-batch cache positions",
       tensors((B, H, 1, D), BHSD, BHSD, extra=(lengths(9, 14),)), grad_argnums=(0, 1, 2))
def decode_window(q, kc, vc, pos):
    j = jnp.arange(S)[None, :]
    keep = (j <= pos[:, None]) & (j > pos[:, None] - 6)  # [B, S]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, kc) * D ** -0.5
    s = jnp.where(keep[:, None, None, :], s, jnp.finfo(F32).min)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), vc)


@probe("decode_sq1_length_mask", "decode step, cache lengths",
       tensors((B, 1, H, D), BSHD, BSHD, extra=(lengths(5, 16),)))
def decode_lengths(q, kc, vc, length):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kc) / jnp.sqrt(jnp.float32(D))
    valid = jnp.arange(S)[None, :] < length[:, None]
    s = jnp.where(valid[:, None, None, :], s, -1e10)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vc)


@probe("decode_sq1_squeezed_query", "decode step, query [B,H,D] without a seq axis",
       tensors((B, H, D), BHSD, BHSD, extra=(lengths(7, 12),)))
def decode_squeezed(q, kc, vc, length):
    s = jnp.einsum("bhd,bhkd->bhk", q, kc) * D ** -0.5
    s = jnp.where(jnp.arange(S)[None, None, :] < length[:, None, None], s, -jnp.inf)
    return jnp.einsum("bhk,bhkd->bhd", jax.nn.softmax(s, axis=-1), vc)


# ---------------------------------------------------------------------------------------------
# T5, BERT, DistilBERT, ALiBi


def t5_bucket(relative, num_buckets=32, max_distance=128):
    """Bidirectional T5 relative position buckets."""
    num_buckets //= 2
    ret = (relative > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(F32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


@probe("t5_bucket_bias_from_table", "HF FlaxT5 relative attention bias",
       tensors(BHSD, BHSD, BHSD, (32, H)))
def t5_buckets(q, k, v, table):
    rel = jnp.arange(S)[None, :] - jnp.arange(S)[:, None]
    bias = jnp.transpose(table[t5_bucket(rel)], (2, 0, 1))[None]  # [1, H, S, S]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s.astype(F32), axis=-1), v)


@probe("bert_extended_mask_minus_10000", "HF BERT extended attention mask",
       tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)), grad_argnums=(0, 1, 2))
def bert(q, k, v, attention_mask):
    ext = (1.0 - attention_mask[:, None, None, :].astype(F32)) * -10000.0
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) / math.sqrt(D) + ext
    return jnp.matmul(jax.nn.softmax(s, axis=-1), v)


@probe("distilbert_q_prescaled_masked_fill", "HF DistilBERT", tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)))
def distilbert(q, k, v, attention_mask):
    q = q / math.sqrt(D)
    scores = jnp.matmul(q, jnp.swapaxes(k, 2, 3))
    hide = (attention_mask == 0).reshape(B, 1, 1, S)
    scores = jnp.where(hide, jnp.finfo(scores.dtype).min, scores)
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)


@probe("distilbert_masked_fill_neg_inf_extreme", "HF DistilBERT (old, -inf), extreme inputs",
       tensors(BHSD, BHSD, BHSD, extreme=True, extra=(pad_mask_int,)))
def distilbert_inf(q, k, v, attention_mask):
    scores = jnp.matmul(q / math.sqrt(D), jnp.swapaxes(k, 2, 3))
    scores = jnp.where((attention_mask == 0)[:, None, None, :], -jnp.inf, scores)
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)


def alibi_slopes(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return jnp.asarray([start * start ** i for i in range(n)], F32)


@probe("bloom_alibi_folded_baddbmm", "HF BLOOM: [B*H,S,D], alibi + q·kᵀ/√D, finfo.min causal",
       tensors((B * H, S, D), (B * H, S, D), (B * H, S, D)))
def bloom(q, k, v):
    alibi = (alibi_slopes(H)[:, None] * jnp.arange(S, dtype=F32)[None, :])  # [H, S]
    alibi = jnp.tile(alibi, (B, 1))[:, None, :]  # [B*H, 1, S]
    scores = alibi + jnp.matmul(q, jnp.swapaxes(k, 1, 2)) * (1.0 / math.sqrt(D))
    scores = scores.reshape(B, H, S, S)
    scores = jnp.where(tri()[None, None], scores, jnp.finfo(F32).min)
    p = jax.nn.softmax(scores.astype(F32), axis=-1).reshape(B * H, S, S)
    return jnp.matmul(p, v)


@probe("alibi_relative_distance_causal", "MusicGen/MPT ALiBi -slope*(i-j)", tensors(BHSD, BHSD, BHSD))
def alibi_rel(q, k, v):
    dist = (jnp.arange(S)[None, :] - jnp.arange(S)[:, None]).astype(F32)  # j - i <= 0 where kept
    bias = alibi_slopes(H)[:, None, None] * dist[None]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5 + bias[None]
    s = jnp.where(tri(), s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------------
# ViT / big_vision, Whisper, nanoGPT


@probe("vit_bqhd_einsum_no_mask", "ViT / big_vision", tensors(BSHD, BSHD, BSHD))
def vit(q, k, v):
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w), v).reshape(B, S, E)


@probe("big_vision_map_head_learned_query", "big_vision MAP head: one learned query, no batch axis",
       tensors((1, H, D), BSHD, BSHD))
def map_head(probe_q, k, v):
    w = jnp.einsum("qhd,bkhd->bhqk", probe_q, k) * D ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w, -1), v)


@probe("whisper_split_scale_cross", "openai whisper: q*s, kᵀ*s with s = D**-0.25, Sq != Sk",
       tensors((B, 6, E), (B, S, E), (B, S, E)))
def whisper(xq, xk, xv):
    scale = D ** -0.25
    q = xq.reshape(B, 6, H, D).transpose(0, 2, 1, 3) * scale
    k = xk.reshape(B, S, H, D).transpose(0, 2, 3, 1) * scale
    v = xv.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    w = jax.nn.softmax((q @ k).astype(F32), axis=-1).astype(q.dtype)
    return (w @ v).transpose(0, 2, 1, 3).reshape(B, 6, E)


@probe("whisper_decoder_causal_additive_bf16", "openai whisper decoder: qk + mask[:n,:n] (triu -inf), f16",
       tensors((B, S, E), (B, S, E), (B, S, E), dtype=F16))
def whisper_causal(xq, xk, xv):
    scale = D ** -0.25
    mask = jnp.triu(jnp.full((32, 32), -jnp.inf), 1)
    q = xq.reshape(B, S, H, D).transpose(0, 2, 1, 3) * scale
    k = xk.reshape(B, S, H, D).transpose(0, 2, 3, 1) * scale
    v = xv.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    qk = q @ k + mask[:S, :S].astype(F16)
    w = jax.nn.softmax(qk.astype(F32), axis=-1).astype(F16)
    return (w @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


BLOCK = 32
NANOGPT_BIAS = jnp.tril(jnp.ones((BLOCK, BLOCK))).reshape(1, 1, BLOCK, BLOCK)


@probe("nanogpt_buffer_tril_masked_fill", "karpathy nanoGPT CausalSelfAttention (slow path)",
       tensors((B, S, E), (3 * E, E)), grad_argnums=(0, 1))
def nanogpt(x, w_attn):
    q, k, v = jnp.split(x @ w_attn.T, 3, axis=2)
    q, k, v = (t.reshape(B, S, H, D).transpose(0, 2, 1, 3) for t in (q, k, v))
    att = (q @ jnp.swapaxes(k, -2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
    att = jnp.where(NANOGPT_BIAS[:, :, :S, :S] == 0, float("-inf"), att)
    att = jax.nn.softmax(att, axis=-1)
    return (att @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


@probe("mingpt_fixed_qkv_linear_bias", "minGPT: three Linear layers with bias",
       tensors((B, S, E), (E, E), (E,), (E, E)), grad_argnums=(0, 1))
def mingpt(x, wq, bq, wk):
    q = (x @ wq + bq).reshape(B, S, H, D).transpose(0, 2, 1, 3)
    k = (x @ wk).reshape(B, S, H, D).transpose(0, 2, 1, 3)
    v = x.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    att = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(D))
    att = jnp.where(jnp.tril(jnp.ones((S, S))) == 0, -jnp.inf, att)
    return (jax.nn.softmax(att, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


# ---------------------------------------------------------------------------------------------
# Equinox, Penzai-like, Haliax-like


EQX4 = eqx.nn.MultiheadAttention(num_heads=H, query_size=E, use_query_bias=True, use_output_bias=True,
                                 key=jax.random.PRNGKey(1))
EQX4_PARAMS, EQX4_STATIC = eqx.partition(EQX4, eqx.is_array)


@probe("equinox_mha_padding_mask_vmap", "equinox MultiheadAttention, per-example [S,S] padding mask",
       lambda rng: (EQX4_PARAMS, _normal(rng, (B, S, E)), pad_mask_int(rng)), grad_argnums=(1,))
def eqx_padding(params, x, attention_mask):
    mha = eqx.combine(params, EQX4_STATIC)

    def one(t, m):
        keep = (m[:, None] * m[None, :]).astype(bool) | jnp.eye(S, dtype=bool)
        return mha(t, t, t, mask=keep)

    return jax.vmap(one)(x, attention_mask)


@probe("penzai_named_axes_vmapped_2d", "penzai-style: named axes as vmap, 2-D dots inside",
       tensors(BSHD, BSHD, BSHD))
def penzai(q, k, v):
    def one(qs, ks, vs):  # [S, D] each
        logits = jnp.einsum("sd,td->st", qs, ks) * D ** -0.5
        logits = jnp.where(jnp.arange(S)[:, None] >= jnp.arange(S)[None, :], logits, -1e9)
        return jnp.einsum("st,td->sd", jax.nn.softmax(logits, axis=-1), vs)

    per_head = jax.vmap(one, in_axes=(1, 1, 1), out_axes=1)  # over heads
    return jax.vmap(per_head)(q, k, v)  # over batch


@probe("haliax_gqa_named_dims", "levanter/haliax: [B,S,KVH,G,D] heads as separate dims",
       tensors((B, S, 2, 2, D), (B, S, 2, D), (B, S, 2, D)))
def haliax(q, k, v):
    w = jnp.einsum("bskgd,btkd->bkgst", q, k) / jnp.sqrt(D)
    w = jnp.where(tri()[None, None, None], w, -1e9)
    w = jax.nn.softmax(w, axis=-1)
    return jnp.einsum("bkgst,btkd->bskgd", w, v)


@probe("haliax_axis_order_kv_first", "haliax: scores laid out [B,KPos,H,QPos], softmax over axis 1",
       tensors(BSHD, BSHD, BSHD))
def haliax_order(q, k, v):
    w = jnp.einsum("bqhd,bkhd->bkhq", q, k) * D ** -0.5
    w = jax.nn.softmax(w, axis=1)
    return jnp.einsum("bkhq,bkhd->bqhd", w, v)


# ---------------------------------------------------------------------------------------------
# Layouts, ranks, vmaps


@probe("seq_first_sbhd", "Megatron/fairseq seq-first [S,B,H,D]", tensors((S, B, H, D), (S, B, H, D), (S, B, H, D)))
def seq_first(q, k, v):
    w = jnp.einsum("sbhd,tbhd->bhst", q, k) * D ** -0.5
    w = jnp.where(tri(), w, -jnp.inf)
    return jnp.einsum("bhst,tbhd->sbhd", jax.nn.softmax(w, -1), v)


@probe("vmap_single_head_over_heads", "jax.vmap of single-head [S,D] attention over heads and batch",
       tensors(BHSD, BHSD, BHSD))
def vmap_heads(q, k, v):
    def head(qh, kh, vh):
        return jax.nn.softmax(qh @ kh.T / math.sqrt(D), axis=-1) @ vh

    return jax.vmap(jax.vmap(head))(q, k, v)


@probe("single_head_2d_causal_jnp_dot", "[S,D] single head, jnp.dot, causal", tensors((S, D), (S, D), (S, D)))
def single_head(q, k, v):
    s = jnp.dot(q, k.T) * D ** -0.5
    s = jnp.where(jnp.tril(jnp.ones((S, S))) > 0, s, -jnp.inf)
    return jnp.dot(jax.nn.softmax(s, axis=-1), v)


@probe("transposed_scores_k_q", "scores as K·Qᵀ [B,H,Sk,Sq], softmax over axis -2",
       tensors(BHSD, BHSD, BHSD))
def transposed_scores(q, k, v):
    st = jnp.einsum("bhkd,bhqd->bhkq", k, q) * D ** -0.5
    p = jax.nn.softmax(st, axis=-2)
    return jnp.einsum("bhkq,bhkd->bhqd", p, v)


@probe("perceiver_latent_query_no_batch", "Perceiver cross-attention: latents [N,H,D] shared over batch",
       tensors((6, H, D), BSHD, BSHD))
def perceiver(latents, k, v):
    w = jnp.einsum("nhd,bshd->bhns", latents, k) / math.sqrt(D)
    return jnp.einsum("bhns,bshd->bnhd", jax.nn.softmax(w, axis=-1), v)


@probe("self_attention_q_eq_k_eq_v", "softmax(x xᵀ/√D) x with one input", tensors(BHSD), grad_argnums=(0,))
def same_input(x):
    return jnp.matmul(jax.nn.softmax(jnp.matmul(x, jnp.swapaxes(x, -1, -2)) / math.sqrt(D), -1), x)


@probe("scores_by_broadcast_multiply_sum", "scores as (q[:,:,:,None]*k[:,:,None]).sum(-1)",
       tensors(BHSD, BHSD, BHSD))
def mul_sum(q, k, v):
    s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------------
# Precision


@probe("lax_dot_general_highest", "lax.dot_general with dimension numbers and precision=HIGHEST",
       tensors(BHSD, BHSD, BHSD))
def dot_general_highest(q, k, v):
    hi = jax.lax.Precision.HIGHEST
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))), precision=hi) * D ** -0.5
    p = jax.nn.softmax(s, axis=-1)
    return jax.lax.dot_general(p, v, (((3,), (2,)), ((0, 1), (0, 1))), precision=hi)


@probe("lax_dot_general_v_first_transposed_out", "P·V as dot_general(v, p) then transpose",
       tensors(BHSD, BHSD, BHSD))
def dot_general_v_first(q, k, v):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) * D ** -0.5
    p = jax.nn.softmax(s, axis=-1)
    o = jax.lax.dot_general(v, p, (((2,), (3,)), ((0, 1), (0, 1))))  # [B, H, D, Sq]
    return jnp.swapaxes(o, -1, -2)


@probe("bf16_all_the_way_no_f32", "bf16 scores, softmax in bf16, no casts", tensors(BHSD, BHSD, BHSD, dtype=BF16))
def bf16_plain(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(D ** -0.5, BF16)
    s = jnp.where(tri(), s, jnp.finfo(BF16).min)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("bf16_dot_general_pet_f32_out_cast", "bf16 dot_general preferred f32, output cast back to bf16",
       tensors(BSHD, BSHD, BSHD, dtype=BF16))
def bf16_pet_out(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(D ** -0.5, BF16), k, preferred_element_type=F32)
    s = jnp.where(tri(), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(BF16), v, preferred_element_type=F32).astype(BF16)


@probe("f16_scores_f32_softmax", "f16 model, scores upcast for softmax", tensors(BHSD, BHSD, BHSD, dtype=F16))
def f16(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(F32) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(F16), v)


# ---------------------------------------------------------------------------------------------
# Softmax spellings, masks


@probe("softmax_positive_axis_3", "jax.nn.softmax(s, axis=3)", tensors(BHSD, BHSD, BHSD))
def softmax_axis3(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.3, axis=3), v)


@probe("softmax_hand_f32_sum_expand_dims", "by hand: max/sum without keepdims, expand_dims, masked",
       tensors(BHSD, BHSD, BHSD, extreme=True))
def softmax_hand(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jnp.where(tri(), s, -1e30)
    e = jnp.exp(s - jnp.max(s, axis=-1)[..., None])
    p = e / jnp.expand_dims(jnp.sum(e, axis=-1), -1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@probe("softmax_where_arg_sliding_window", "jax.nn.softmax(s, where=window) (diagonal always kept)",
       tensors(BHSD, BHSD, BHSD))
def softmax_where_window(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1, where=(j <= i) & (i - j < 4)), v)


@probe("temperature_divide_traced", "s / temperature, a traced scalar argument",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.float32(0.7),)))
def temperature(q, k, v, tau):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / tau, -1), v)


@probe("per_head_logit_scale_cosine", "Swin v2 cosine attention: normalized q,k times exp(per-head scale)",
       tensors(BHSD, BHSD, BHSD, (H, 1, 1)))
def cosine(q, k, v, logit_scale):
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
    s = jnp.einsum("bhqd,bhkd->bhqk", qn, kn) * scale
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("bidirectional_local_abs_window", "local attention |i-j| < W (not causal)", tensors(BHSD, BHSD, BHSD))
def local_abs(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(jnp.abs(i - j) < 3, s, -jnp.inf), -1), v)


@probe("prefix_lm_mask", "prefix-LM: causal or key in prefix", tensors(BHSD, BHSD, BHSD))
def prefix_lm(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    keep = (j <= i) | (j < 5)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, -1e9), -1), v)


@probe("chunked_prefill_offset_causal", "chunked prefill: query chunk at offset 8 over all keys",
       tensors((B, H, 8, D), BHSD, BHSD))
def chunked_prefill(q, k, v):
    qpos = 8 + jnp.arange(8)[:, None]
    keep = jnp.arange(S)[None, :] <= qpos
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, -jnp.inf), -1), v)


@probe("block_causal_chunks_of_4", "blockwise causal (i//4 >= j//4)", tensors(BHSD, BHSD, BHSD))
def block_causal(q, k, v):
    i, j = jnp.arange(S)[:, None] // 4, jnp.arange(S)[None, :] // 4
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(i >= j, s, -jnp.inf), -1), v)


@probe("int_mask_where_eq_zero_1e9", "int32 [B,1,1,S] mask, where(mask == 0, -1e9, s)",
       tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)))
def int_mask(q, k, v, m):
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) / math.sqrt(D)
    s = jnp.where(m[:, None, None, :] == 0, -1e9, s)
    return jnp.matmul(jax.nn.softmax(s, -1), v)


@probe("mask_bool_astype_then_select", "mask.astype(bool) from float, lax.select", tensors(BHSD, BHSD, BHSD))
def float_mask_astype(q, k, v):
    m = jnp.broadcast_to(jnp.tril(jnp.ones((S, S), F32)).astype(bool), (B, H, S, S))
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jax.lax.select(m, s, jnp.full_like(s, -jnp.inf))
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------------
# Nested: scan over layers, checkpoint


def _sdpa_causal(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jnp.where(tri(), s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("checkpoint_wrapped_attention", "jax.checkpoint(attention) (remat)", tensors(BHSD, BHSD, BHSD))
def checkpointed(q, k, v):
    return jax.checkpoint(_sdpa_causal)(q, k, v)


@probe("checkpoint_policy_dots_saveable", "jax.checkpoint with policy=dots_with_no_batch_dims_saveable",
       tensors(BHSD, BHSD, BHSD))
def checkpoint_policy(q, k, v):
    return jax.checkpoint(_sdpa_causal, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)(q, k, v)


@probe("scan_over_layers_stacked_weights", "lax.scan over 2 layers of projections + attention",
       tensors((B, S, E), (2, E, 3 * E)), grad_argnums=(0, 1))
def scan_layers(x, ws):
    return jax.lax.scan(_projected_attention_layer, x, ws)[0]


def _projected_attention_layer(h, w):
    """One residual layer for `lax.scan`: merged Q/K/V projection, causal attention, carry h + o."""
    q, k, v = jnp.split(h @ w, 3, axis=-1)
    q, k, v = (t.reshape(B, S, H, D).transpose(0, 2, 1, 3) for t in (q, k, v))
    o = _sdpa_causal(q, k, v).transpose(0, 2, 1, 3).reshape(B, S, E)
    return h + o, None


# ---------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention options, forward and gradient


def dpa(**kw):
    return lambda q, k, v, *rest: jax.nn.dot_product_attention(q, k, v, *rest, **kw)


PROBES += [
    Probe("jax_dpa_default_implementation", "jax.nn.dot_product_attention implementation=None",
          dpa(is_causal=True), tensors(BSHD, BSHD, BSHD), (0, 1, 2)),
    Probe("jax_dpa_bias_grad", "jax.nn.dot_product_attention bias=", dpa(implementation="xla"),
          tensors(BSHD, BSHD, BSHD, (1, H, S, S)), (0, 1, 2)),
    Probe("jax_dpa_mask_and_causal", "jax.nn.dot_product_attention mask= and is_causal",
          lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=True, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, extra=(lambda rng: (jnp.asarray(pad_mask_int(rng)) > 0)[:, None, None, :],)),
          (0, 1, 2)),
    Probe("jax_dpa_bias_mask_causal_scale", "jax.nn.dot_product_attention bias, mask, is_causal, scale",
          lambda q, k, v, b, m: jax.nn.dot_product_attention(q, k, v, bias=b, mask=m, is_causal=True, scale=0.2,
                                                             implementation="xla"),
          tensors(BSHD, BSHD, BSHD, (B, 1, S, S),
                  extra=(lambda rng: (jnp.asarray(pad_mask_int(rng)) > 0)[:, None, None, :],)), (0, 1, 2)),
    Probe("jax_dpa_kv_seq_lengths_grad", "jax.nn.dot_product_attention key_value_seq_lengths",
          lambda q, k, v, kl: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kl, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, extra=(lengths(5, 16),)), (0, 1, 2)),
    Probe("jax_dpa_local_window_grad", "jax.nn.dot_product_attention local_window_size=(3, 0) causal",
          dpa(is_causal=True, local_window_size=(3, 0), implementation="xla"), tensors(BSHD, BSHD, BSHD), (0, 1, 2)),
    Probe("jax_dpa_bf16_gqa_grad", "jax.nn.dot_product_attention bf16 GQA causal",
          dpa(is_causal=True, implementation="xla"),
          tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D), dtype=BF16), (0, 1, 2)),
    Probe("jax_dpa_cross_sq_ne_sk", "jax.nn.dot_product_attention Sq=6 Sk=16 with scale",
          dpa(scale=0.5, implementation="xla"), tensors((B, 6, H, D), BSHD, BSHD), (0, 1, 2)),
    Probe("jax_dpa_extreme_mask", "jax.nn.dot_product_attention random mask, extreme inputs",
          lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, extreme=True,
                  extra=(lambda rng: jnp.asarray(rng.random((B, H, S, S)) < 0.6) | jnp.eye(S, dtype=bool),)),
          (0, 1, 2)),
]


# ---------------------------------------------------------------------------------------------
# More model forms: MLA, sinks, faithful Gemma masks, scan with remat, bf16 gradients


@probe("scan_remat_layers_grad_maxtext", "MaxText/Flax: lax.scan over jax.checkpoint(layer)",
       tensors((B, S, E), (2, E, 3 * E)), grad_argnums=(0, 1))
def scan_remat(x, ws):
    return jax.lax.scan(jax.checkpoint(_projected_attention_layer), x, ws)[0]


@probe("gemma_sliding_mask_triu_tril_times_input_mask",
       "gemma: sliding = triu(ones,-W+1) * tril(ones,W-1) on an input mask",
       tensors(BSHD, BSHD, BSHD, extra=(lambda rng: jnp.broadcast_to(tri(), (B, S, S)),)))
def gemma_sliding(q, k, v, attn_mask):
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * D ** -0.5, k)
    ones = jnp.ones_like(attn_mask)
    sliding = jnp.triu(ones, -4 + 1) * jnp.tril(ones, 4 - 1)
    attn_mask = sliding * attn_mask
    logits = jnp.where(jnp.expand_dims(attn_mask, -2), logits, GEMMA_K_MASK)
    return jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1).astype(k.dtype), v)


@probe("mla_concat_nope_rope_dv_ne_dqk", "DeepSeek MLA: q=[q_nope,q_pe], k=[k_nope, shared k_pe], Dv != Dqk",
       tensors(BHSD, (B, H, S, 4), BHSD, (B, 1, S, 4), (B, H, S, 12)))
def mla_concat(q_nope, q_pe, k_nope, k_pe, v):
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (B, H, S, 4))], axis=-1)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 12 ** -0.5
    s = jnp.where(tri(), s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("mla_sum_of_two_score_einsums", "DeepSeek MLA: scores = q_nope·k_noneᵀ + q_pe·k_peᵀ (two einsums added)",
       tensors(BHSD, (B, H, S, 4), BHSD, (B, S, 4), BHSD))
def mla_sum(q_nope, q_pe, k_nope, k_pe, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q_nope, k_nope) + jnp.einsum("bhqr,bkr->bhqk", q_pe, k_pe)
    s = jnp.where(tri(), s * 12 ** -0.5, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("value_dim_ne_qk_dim", "V head dim 12 with Q/K head dim 8", tensors(BHSD, BHSD, (B, H, S, 12)))
def dv_ne(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("attention_sinks_gpt_oss",
       "gpt-oss sinks: a per-head logit column concatenated, then dropped (not plain attention)",
       tensors(BHSD, BHSD, BHSD, (H,)))
def sinks(q, k, v, sink):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jnp.where(tri(), s, -jnp.inf)
    col = jnp.broadcast_to(sink[None, :, None, None], (B, H, S, 1))
    p = jax.nn.softmax(jnp.concatenate([s, col], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@probe("cross_attention_encoder_padding", "encoder-decoder cross-attention, Sq=6, key padding from [B,Sk] ints",
       tensors((B, H, 6, D), BHSD, BHSD, extra=(pad_mask_int,)))
def cross_pad(q, k, v, enc_mask):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jnp.where(enc_mask[:, None, None, :].astype(bool), s, jnp.finfo(F32).min)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


PROBES += [
    Probe("jax_dpa_bf16_causal_grad", "jax.nn.dot_product_attention bf16 causal (no GQA)",
          dpa(is_causal=True, implementation="xla"), tensors(BSHD, BSHD, BSHD, dtype=BF16), (0, 1, 2)),
    Probe("jax_dpa_bias_and_mask_grad", "jax.nn.dot_product_attention bias= and mask= (no causal, no scale)",
          lambda q, k, v, b, m: jax.nn.dot_product_attention(q, k, v, bias=b, mask=m, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, (B, 1, S, S),
                  extra=(lambda rng: (jnp.asarray(pad_mask_int(rng)) > 0)[:, None, None, :],)), (0, 1, 2)),
    Probe("jax_dpa_bias_causal_grad", "jax.nn.dot_product_attention bias= and is_causal",
          lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b, is_causal=True, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, (B, 1, S, S)), (0, 1, 2)),
]


# ---------------------------------------------------------------------------------------------
# Vision windows, relative positions, blockwise, broadcasting matmuls


@probe("mla_sum_shared_k_pe_no_scale", "DeepSeek MLA unscaled: q_nope·k_nopeᵀ + q_pe·k_peᵀ, k_pe shared by heads",
       tensors(BHSD, BHSD, BHSD, (B, S, D), BHSD))
def mla_shared(q_nope, q_pe, k_nope, k_pe, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q_nope, k_nope) + jnp.einsum("bhqd,bkd->bhqk", q_pe, k_pe)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("mqa_unit_head_matmul_broadcast", "MQA by matmul broadcasting: K, V [B,1,S,D] (torch unsqueeze(1) ports)",
       tensors(BHSD, (B, 1, S, D), (B, 1, S, D)))
def mqa_unit(q, k, v):
    s = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(D)
    s = jnp.where(tri(), s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v


@probe("max_subtracted_then_jax_softmax",
       "s - max(s) by hand, then jax.nn.softmax", tensors(BHSD, BHSD, BHSD, extreme=True))
def pre_max(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


NW, NT = 2, 8  # Swin: 2 windows of 8 tokens each per image


@probe("swin_window_attention_view_mask", "Swin: [B*nW,H,N,D], rel. bias [H,N,N], view to [B,nW,H,N,N] + 0/-100 mask",
       tensors((B * NW, H, NT, D), (B * NW, H, NT, D), (B * NW, H, NT, D), (H, NT, NT),
               extra=(lambda rng: jnp.asarray(np.where(rng.random((NW, NT, NT)) < 0.3, -100.0, 0.0), F32),)))
def swin(q, k, v, rel_bias, mask):
    attn = (q * D ** -0.5) @ jnp.swapaxes(k, -2, -1)
    attn = attn + rel_bias[None]
    attn = attn.reshape(B, NW, H, NT, NT) + mask[None, :, None]
    attn = jax.nn.softmax(attn.reshape(-1, H, NT, NT), axis=-1)
    return attn @ v


@probe("shaw_relative_position_scores", "Shaw/Transformer-XL: q·kᵀ + q·R[q,k]ᵀ (a bias computed from q)",
       tensors(BHSD, BHSD, BHSD, (S, S, D)))
def shaw(q, k, v, rel):
    s = (jnp.einsum("bhqd,bhkd->bhqk", q, k) + jnp.einsum("bhqd,qkd->bhqk", q, rel)) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("blockwise_two_key_chunks_online_softmax", "memory-efficient attention by hand: two key chunks, online softmax",
       tensors(BHSD, BHSD, BHSD))
def blockwise(q, k, v):
    half = S // 2
    outs, maxes, sums = [], [], []
    for c in range(2):
        kc, vc = k[:, :, c * half:(c + 1) * half], v[:, :, c * half:(c + 1) * half]
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kc) * D ** -0.5
        m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
        e = jnp.exp(s - m)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", e, vc))
        maxes.append(m)
        sums.append(e.sum(-1, keepdims=True))
    m = jnp.maximum(maxes[0], maxes[1])
    w0, w1 = jnp.exp(maxes[0] - m), jnp.exp(maxes[1] - m)
    return (outs[0] * w0 + outs[1] * w1) / (sums[0] * w0 + sums[1] * w1)


@probe("einsum_precision_string_highest", "jnp.einsum(..., precision='highest') (a string)", tensors(BSHD, BSHD, BSHD))
def precision_string(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(D)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v, precision="highest")


PROBES += [
    Probe("jax_dpa_unbatched_causal_grad", "jax.nn.dot_product_attention 3-D [T,N,H] is_causal",
          dpa(is_causal=True, implementation="xla"), tensors((S, H, D), (S, H, D), (S, H, D)), (0, 1, 2)),
]


# ---------------------------------------------------------------------------------------------
# Soundness hazards: forms near attention where a loose rule would change values


def _sdpa_mask(q, k, v, keep, fill=-jnp.inf):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, fill), -1), v)


SQ6 = tensors((B, H, 6, D), BHSD, BHSD)


@probe("causal_top_left_sq6_sk16", "tril(ones(6, 16)): top-left aligned causal, Sq != Sk", SQ6)
def causal_top_left(q, k, v):
    return _sdpa_mask(q, k, v, jnp.tril(jnp.ones((6, S), bool)))


@probe("causal_bottom_right_sq6_sk16", "tril(ones(6, 16), k=10): bottom-right aligned causal (decode chunk)", SQ6)
def causal_bottom_right(q, k, v):
    return _sdpa_mask(q, k, v, jnp.tril(jnp.ones((6, S), bool), k=S - 6))


@probe("jax_dpa_causal_sq6_sk16", "jax.nn.dot_product_attention is_causal with Sq=6, Sk=16",
       tensors((B, 6, H, D), BSHD, BSHD))
def dpa_causal_cross(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


@probe("strict_causal_first_row_empty_finite", "iota_q > iota_k (diagonal hidden: row 0 has no key), fill -1e9",
       tensors(BHSD, BHSD, BHSD))
def strict_causal(q, k, v):
    return _sdpa_mask(q, k, v, jnp.arange(S)[:, None] > jnp.arange(S)[None, :], -1e9)


@probe("strict_causal_first_row_empty_neginf", "iota_q > iota_k with -inf: row 0 is NaN", tensors(BHSD, BHSD, BHSD))
def strict_causal_inf(q, k, v):
    return _sdpa_mask(q, k, v, jnp.arange(S)[:, None] > jnp.arange(S)[None, :])


@probe("post_zero_strict_after_causal",
       "where(i > j, softmax(where(causal, s, -inf)), 0): post-mask hides the diagonal too",
       tensors(BHSD, BHSD, BHSD))
def post_strict(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    p = jax.nn.softmax(jnp.where(j <= i, s, -jnp.inf), -1)
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.where(i > j, p, 0.0), v)


@probe("softcap_after_mask", "c·tanh(where(causal, s, -inf)/c): masked logits become -c, not -inf",
       tensors(BHSD, BHSD, BHSD, extreme=True))
def softcap_after_mask(q, k, v):
    s = jnp.where(tri(), jnp.einsum("bhqd,bhkd->bhqk", q, k), -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(5.0 * jnp.tanh(s / 5.0), -1), v)


@probe("per_head_bool_mask", "a boolean mask that differs per head [1,H,S,S]",
       tensors(BHSD, BHSD, BHSD,
               extra=(lambda rng: jnp.asarray(rng.random((1, H, S, S)) < 0.5) | jnp.eye(S, dtype=bool),)))
def per_head_mask(q, k, v, keep):
    return _sdpa_mask(q, k, v, keep, -1e9)


@probe("window_without_diagonal_neginf", "past-only window (0 < i-j <= 3), -inf: row 0 NaN", tensors(BHSD, BHSD, BHSD))
def window_past_only(q, k, v):
    d = jnp.arange(S)[:, None] - jnp.arange(S)[None, :]
    return _sdpa_mask(q, k, v, (d > 0) & (d <= 3))


@probe("negative_scale", "s * -0.5 (a negative scale)", tensors(BHSD, BHSD, BHSD, extreme=True))
def negative_scale(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(tri(), s, -jnp.inf), -1), v)


@probe("mask_then_negative_scale", "where(causal, s, -1e9) * -0.5: the fill becomes +5e8", tensors(BHSD, BHSD, BHSD))
def mask_neg_scale(q, k, v):
    s = jnp.where(tri(), jnp.einsum("bhqd,bhkd->bhqk", q, k), -1e9) * -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("bf16_fill_1e9_all_masked_rows", "bf16 scores, where(pad, s, -1e9) with a fully padded sequence",
       tensors(BHSD, BHSD, BHSD, dtype=BF16, extra=(lambda rng: jnp.array([[True] * S, [False] * S]),)))
def bf16_fill(q, k, v, keep):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    s = jnp.where(keep[:, None, None, :], s, -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("bias_with_neg_inf_then_where", "bias holding -inf entries, then a causal where with a finite fill",
       tensors(BHSD, BHSD, BHSD,
               extra=(lambda rng: jnp.where(jnp.asarray(rng.random((1, H, S, S)) < 0.2), -jnp.inf, 0.0),)))
def bias_inf(q, k, v, bias):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5 + bias
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(tri(), s, -1e4), -1), v)


@probe("two_wheres_different_fills", "where(pad, where(causal, s, -inf), -1e9): two fills", 
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.array([[True] * S, [False] * S]),)))
def two_fills(q, k, v, keep):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    s = jnp.where(keep[:, None, None, :], jnp.where(tri(), s, -jnp.inf), -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------------
# Library modules' gradients (the corpus has their forwards)

from attention_corpus import LINEN_MHA_BF16, LINEN_MHA_QK_NORM, NNX_MHA, linen_args, padding_keep  # noqa: E402
from flax import nnx  # noqa: E402
import flax.linen as linen  # noqa: E402

PROBES += [
    Probe("flax_linen_mha_bf16_causal", "flax.linen MultiHeadDotProductAttention dtype=bf16, causal",
          lambda params, x: LINEN_MHA_BF16.apply(params, x, mask=linen.make_causal_mask(x[..., 0])),
          lambda rng: linen_args(LINEN_MHA_BF16)(rng), (1,)),
    Probe("flax_nnx_mha_causal_grad_x", "flax.nnx MultiHeadAttention causal",
          lambda state, x: nnx.merge(NNX_MHA[0], state)(x, mask=nnx.make_causal_mask(x[..., 0])),
          lambda rng: (NNX_MHA[1], _normal(rng, (2, 8, 32))), (1,)),
]


# ---------------------------------------------------------------------------------------------
# Reference implementations inside JAX libraries (their attention written out)

MASK_07 = -0.7 * float(jnp.finfo(F32).max)


@probe("pallas_tpu_reference_bias_then_scale",
       "Pallas TPU flash-attention reference: logits += ab; logits *= sm_scale; causal where",
       tensors(BHSD, BHSD, BHSD, (B, H, S, S)))
def pallas_tpu_ref(q, k, v, ab):
    logits = jnp.einsum("bhqc,bhkc->bhqk", q, k)
    logits = logits + ab
    logits = logits * 0.3
    logits = jnp.where(tri(), logits, MASK_07)
    return jnp.einsum("bhqk,bhkc->bhqc", jax.nn.softmax(logits, axis=-1), v)


@probe("maxtext_local_attention_gqa_deferred",
       "MaxText apply_attention_dot: 5-D GQA, exp(s - max) · V / sum (max not stopped)",
       tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D)))
def maxtext_local(q, k, v):
    qg = (q * D ** -0.5).reshape(B, S, 2, H // 2, D)
    w = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    additive = jnp.where(tri(), 0.0, MASK_07)[None, None, None]
    w = jnp.where(additive >= MASK_07 * 0.5, w, MASK_07)
    local_max = jnp.max(w, axis=-1, keepdims=True)
    local_exps = jnp.exp(w - local_max)
    local_sum = jnp.sum(local_exps, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->bkgtd", local_exps, v) / local_sum
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, H, D)


@probe("maxtext_normalize_after_moveaxis",
       "MaxText: local sums moved to [B,T,N,1] by moveaxis+reshape, output normalised after its reshape",
       tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D)))
def maxtext_normalize(q, k, v):
    qg = (q * D ** -0.5).reshape(B, S, 2, H // 2, D)
    w = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    w = jnp.where(tri()[None, None, None], w, MASK_07)
    local_max = jnp.max(w, axis=-1, keepdims=True)
    local_exps = jnp.exp(w - local_max)
    local_sum = jnp.moveaxis(jnp.sum(local_exps, axis=-1, keepdims=True), -2, 1)  # [B,T,K,G,1]
    local_sum = local_sum.reshape(B, S, H, 1)
    out = jnp.einsum("bkgts,bskd->btkgd", local_exps, v).reshape(B, S, H, D)
    return out / local_sum


# ---------------------------------------------------------------------------------------------
# More library and user spellings: Flax decode cache, Equinox RoPE, tensordot, 3-operand einsums

LINEN_DEC = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, decode=True)
_DEC_VARS = LINEN_DEC.init(jax.random.PRNGKey(2), jnp.zeros((B, S, E)))


def _decode_args(rng):
    """Params and a cache filled with 5 earlier steps, then one new token."""
    variables = {"params": _DEC_VARS["params"], "cache": _DEC_VARS["cache"]}
    for _ in range(5):
        _, upd = LINEN_DEC.apply(variables, _normal(rng, (B, 1, E)), mutable=["cache"])
        variables = {"params": variables["params"], "cache": upd["cache"]}
    return variables, _normal(rng, (B, 1, E))


@probe("flax_linen_decode_cache_step", "flax.linen MHA decode=True: one step against the cache", _decode_args,
       grad_argnums=None)
def flax_decode(variables, x):
    out, _ = LINEN_DEC.apply(variables, x, mutable=["cache"])
    return out


EQX_ROPE = eqx.nn.RotaryPositionalEmbedding(embedding_size=E // H)


def _rope_heads(q, k, v):
    rot = jax.vmap(EQX_ROPE, in_axes=1, out_axes=1)
    return rot(q), rot(k), v


@probe("equinox_mha_process_heads_rope", "equinox MultiheadAttention with process_heads=RoPE, causal",
       lambda rng: (EQX4_PARAMS, _normal(rng, (B, S, E))), grad_argnums=(1,))
def eqx_rope(params, x):
    mha = eqx.combine(params, EQX4_STATIC)
    return jax.vmap(lambda t: mha(t, t, t, mask=tri(), process_heads=_rope_heads))(x)


@probe("tensordot_single_head", "jnp.tensordot for Q·Kᵀ and P·V, [S,D]", tensors((S, D), (S, D), (S, D)))
def tensordot(q, k, v):
    p = jax.nn.softmax(jnp.tensordot(q, k, axes=[[1], [1]]) * D ** -0.5, axis=-1)
    return jnp.tensordot(p, v, axes=1)


@probe("einsum_three_operands_pv_out_proj", "one einsum for P·V and the output projection (bhqk,bkhd,hde->bqe)",
       tensors(BSHD, BSHD, BSHD, (H, D, E)))
def einsum_three(q, k, v, wo):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5, -1)
    return jnp.einsum("bhqk,bkhd,hde->bqe", p, v, wo)


@probe("nan_to_zero_after_softmax", "p = where(isnan(p), 0, p) after a -inf padding mask (rows fully padded)",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.array([[True] * S, [False] * S]),)))
def nan_to_zero(q, k, v, keep):
    s = jnp.where(keep[:, None, None, :], jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5, -jnp.inf)
    p = jax.nn.softmax(s, -1)
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.where(jnp.isnan(p), 0.0, p), v)


@probe("post_zero_strict_both_sides", "where(i > j, softmax(where(i > j, s, -inf)), 0): row 0 NaN in softmax, 0 after",
       tensors(BHSD, BHSD, BHSD))
def post_zero_strict_both(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    p = jax.nn.softmax(jnp.where(i > j, jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5, -jnp.inf), -1)
    return jnp.einsum("bhqk,bhkd->bhqd", jnp.where(i > j, p, 0.0), v)


@probe("softmax_where_strict_causal", "jax.nn.softmax(s, where=i > j): row 0 has no key (0 in the program)",
       tensors(BHSD, BHSD, BHSD))
def softmax_where_strict(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1, where=i > j), v)


def _int8_qk(rng):
    q, k = (jnp.asarray(rng.integers(-127, 128, BHSD).astype(np.int8)) for _ in range(2))
    return q, k, _normal(rng, BHSD)


@probe("int8_qk_int32_scores_aqt", "AQT-style int8 Q·Kᵀ with int32 accumulation, widened and scaled",
       _int8_qk, grad_argnums=(2,))
def int8_qk(q, k, v):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.int32)
    s = jnp.where(tri(), s.astype(F32) * 1e-3, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


def _f16_overflowing(rng):
    """f16 Q, K, V where one query and one key have entries 300: their score 8·300² = 720000
    overflows f16 (max 65504) in the program's f16 Q·Kᵀ."""
    q, k, v = (_normal(rng, BHSD, F16) for _ in range(3))
    return q.at[0, 0, 3].set(300.0), k.at[0, 0, 2].set(300.0), v


@probe("f16_scores_overflow",
       "f16 attention whose f16 scores overflow to inf (NaN row in the program)", _f16_overflowing)
def f16_overflow(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("f16_scores_overflow_then_f32_softmax", "f16 scores (overflowed) widened to f32 for the softmax, P cast back",
       _f16_overflowing)
def f16_overflow_f32(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(F32) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(F16), v)


def _f16_padded(rng):
    q, k, v = (_normal(rng, BHSD, F16) * 4 for _ in range(3))
    return q, k, v, jnp.array([[True] * S, [False] * S])  # batch 1 fully padded


@probe("f16_finfo_min_padding_bias_fully_padded",
       "f16 HF-style additive padding bias finfo(f16).min, one sequence all padding",
       _f16_padded)
def f16_padding_bias(q, k, v, keep):
    bias = jnp.where(keep, 0.0, jnp.finfo(F16).min).astype(F16)[:, None, None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(D ** -0.5, F16) + bias
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s.astype(F32), -1).astype(F16), v)


def _iota_qk():
    return jnp.arange(S)[:, None], jnp.arange(S)[None, :]


def _masked_by(keep_fn, fill=-jnp.inf):
    def f(q, k, v):
        return _sdpa_mask(q, k, v, keep_fn(), fill)

    return f


TRICKY_MASKS = {  # name: (keep builder, fill, what it is)
    "mask_causal_or_batch1": (lambda: (_iota_qk()[0] >= _iota_qk()[1])[None, None]
                              | (jnp.arange(B) == 1)[:, None, None, None], -jnp.inf,
                              "causal for batch 0 only (or with an iota over the batch): not the causal flag"),
    "mask_offset_causal_plus3": (lambda: _iota_qk()[0] + 3 >= _iota_qk()[1], -jnp.inf, "i + 3 >= j: not causal"),
    "mask_offset_causal_minus2": (lambda: _iota_qk()[0] - 2 >= _iota_qk()[1], -1e9,
                                  "i - 2 >= j (rows 0-1 empty), fill -1e9"),
    "mask_anti_diagonal": (lambda: _iota_qk()[0] + _iota_qk()[1] >= S - 1, -jnp.inf, "i + j >= S-1"),
    "mask_per_head_offset_causal": (lambda: (_iota_qk()[0][None] + jnp.arange(H)[:, None, None]
                                             >= _iota_qk()[1][None])[None],
                                    -jnp.inf, "i + h >= j: a different offset per head"),
    "mask_causal_lt_plus1": (lambda: _iota_qk()[1] < _iota_qk()[0] + 1, -jnp.inf,
                             "j < i + 1: causal, spelled with lt and an offset"),
}
PROBES += [Probe(name, what, _masked_by(keep, fill), tensors(BHSD, BHSD, BHSD), (0, 1, 2))
           for name, (keep, fill, what) in TRICKY_MASKS.items()]


# ---------------------------------------------------------------------------------------------
# Session 16 (issue 19): more model files' spellings (bench/results/attention-probe-2026-12-07-session16.md)

FMIN = float(jnp.finfo(F32).min)


def alibi_slope_vector(n=H):
    return 1.0 / 2 ** (jnp.arange(1, n + 1, dtype=F32) * 8 / n)


@probe("bart_scaled_q_folded_heads_mask_view",
       "HF Bart/Whisper: q_proj(x)·scaling, [B·H,S,D] bmm, weights viewed [B,H,S,S] + 4-D finfo.min mask",
       tensors(BSHD, BSHD, BSHD, extra=(pad_mask_int,)))
def bart_folded(q, k, v, attention_mask):
    def heads_folded(t):
        return t.transpose(0, 2, 1, 3).reshape(B * H, S, D)

    q, k, v = heads_folded(q * D ** -0.5), heads_folded(k), heads_folded(v)
    w = jnp.matmul(q, k.transpose(0, 2, 1))
    keep = tri()[None, None] & (attention_mask[:, None, None, :] > 0)
    w = (w.reshape(B, H, S, S) + jnp.where(keep, 0.0, FMIN)).reshape(B * H, S, S)
    out = jnp.matmul(jax.nn.softmax(w, axis=-1), v)
    return out.reshape(B, H, S, D).transpose(0, 2, 1, 3).reshape(B, S, E)


@probe("clip_text_causal_then_padding_two_adds",
       "HF CLIP text: + causal (triu finfo.min) then + (1-mask)·finfo.min: -inf where both hide",
       tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)))
def clip_text(q, k, v, attention_mask):
    s = jnp.einsum("bhqd,bhkd->bhqk", q * D ** -0.5, k)
    s = s + jnp.triu(jnp.full((S, S), FMIN), 1)[None, None]
    s = s + (1.0 - attention_mask[:, None, None, :].astype(F32)) * FMIN
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("neox_partial_rotary_baddbmm_alpha",
       "GPT-NeoX/Pythia: rotary on half the head dim, [B·H] folded, baddbmm(zeros, q, kᵀ, alpha=1/√D)",
       tensors(BSHD, BSHD, BSHD))
def neox(q, k, v):
    rot = D // 2
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    q = jnp.concatenate([rope(q[..., :rot], pos), q[..., rot:]], -1)
    k = jnp.concatenate([rope(k[..., :rot], pos), k[..., rot:]], -1)
    qf, kf = (t.transpose(0, 2, 1, 3).reshape(B * H, S, D) for t in (q, k))
    scores = jnp.zeros((B * H, S, S), F32) + (1.0 / math.sqrt(D)) * jnp.matmul(qf, kf.transpose(0, 2, 1))
    scores = jnp.where(tri()[None, None], scores.reshape(B, H, S, S), jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)


@probe("mistral_window_gqa_repeat_additive", "Mistral: GQA repeat_kv, (j <= i) & (j > i - W) as a finfo.min bias",
       tensors(BHSD, (B, 2, S, D), (B, 2, S, D)))
def mistral_swa_gqa(q, k, v):
    k, v = jnp.repeat(k, H // 2, axis=1), jnp.repeat(v, H // 2, axis=1)
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    mask = jnp.where((j <= i) & (j > i - 4), 0.0, FMIN)[None, None]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D) + mask
    return jax.nn.softmax(s.astype(F32), -1).astype(q.dtype) @ v


@probe("falcon40b_grouped_fused_qkv", "Falcon-40B: fused QKV [B,S,KV,G+2,D], K/V broadcast over the group, causal",
       tensors((B, S, E + 2 * 2 * D)), grad_argnums=(0,))
def falcon40b(fused):
    x = fused.reshape(B, S, 2, H // 2 + 2, D)
    q = x[:, :, :, :-2].reshape(B, S, H, D)
    k = jnp.broadcast_to(x[:, :, :, -2:-1], (B, S, 2, H // 2, D)).reshape(B, S, H, D)
    v = jnp.broadcast_to(x[:, :, :, -1:], (B, S, 2, H // 2, D)).reshape(B, S, H, D)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    s = jnp.where(tri(), q @ k.swapaxes(-1, -2) / math.sqrt(D), -jnp.inf)
    return (jax.nn.softmax(s, -1) @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


@probe("mpt_alibi_from_arange_key_only", "MPT build_alibi_bias: arange(1-S, 1)·slopes [1,H,1,S], masked_fill(~causal)",
       tensors(BHSD, BHSD, BHSD))
def mpt_alibi(q, k, v):
    alibi = jnp.arange(1 - S, 1, dtype=F32)[None, None, None, :] * alibi_slope_vector()[None, :, None, None]
    s = (q @ k.swapaxes(-1, -2)) * (1 / math.sqrt(D)) + alibi
    s = jnp.where(~tri()[None, None], jnp.finfo(s.dtype).min, s)
    return jax.nn.softmax(s, -1) @ v


@probe("falcon_alibi_added_then_scaled", "Falcon with ALiBi: (q·kᵀ + alibi) · 1/√D + float causal mask",
       tensors(BHSD, BHSD, BHSD))
def falcon_alibi(q, k, v):
    alibi = alibi_slope_vector()[:, None, None] * jnp.arange(S, dtype=F32)[None, None, :]
    logits = (q @ k.swapaxes(-1, -2) + alibi[None]) * (1 / math.sqrt(D))
    p = jax.nn.softmax(logits + jnp.where(tri(), 0.0, FMIN)[None, None], -1)
    return p @ v


@probe("gemma2_hf_softcap_div_tanh_mul_window_bias",
       "HF Gemma2: scaling by query_pre_attn_scalar, s/cap, tanh, ·cap, + sliding-window finfo.min bias, f32 softmax",
       tensors(BHSD, BHSD, BHSD))
def gemma2_hf(q, k, v):
    s = (q @ k.swapaxes(2, 3)) * 256 ** -0.5
    s = jnp.tanh(s / 50.0) * 50.0
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    causal = jnp.where(j > i, FMIN, 0.0)
    mask = jnp.where(jnp.tril(jnp.ones((S, S), bool), -6), FMIN, causal)
    p = jax.nn.softmax((s + mask[None, None]).astype(F32), -1).astype(q.dtype)
    return p @ v


def _nnx_decode():
    m = nnx.MultiHeadAttention(num_heads=H, in_features=E, qkv_features=E, decode=True, rngs=nnx.Rngs(3))
    m.init_cache((B, S, E))
    rng = np.random.default_rng(5)
    m.cached_key.value = _normal(rng, (B, S, H, D))
    m.cached_value.value = _normal(rng, (B, S, H, D))
    m.cache_index.value = jnp.asarray(6, jnp.int32)
    return nnx.split(m)


NNX_DECODE = _nnx_decode()


@probe("flax_nnx_mha_decode_step_cache", "flax.nnx MultiHeadAttention(decode=True): one step against a filled cache",
       lambda rng: (NNX_DECODE[1], _normal(rng, (B, 1, E))), grad_argnums=(1,))
def nnx_decode(state, x):
    return nnx.merge(NNX_DECODE[0], state, copy=True)(x)  # copy: the step writes the cache (a jax.grad trace too)


@probe("einsum_k_pretransposed_bhdk", "einsum bhqd,bhdk->bhqk with K given as [B,H,D,S]",
       tensors(BHSD, (B, H, D, S), BHSD))
def einsum_kt(q, kt, v):
    s = jnp.einsum("bhqd,bhdk->bhqk", q, kt) / jnp.sqrt(jnp.float32(D))
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("einsum_operands_k_first", "einsum bkhd,bqhd->bhqk and bkhd,bhqk->bqhd (K and V written first)",
       tensors(BSHD, BSHD, BSHD))
def einsum_k_first(q, k, v):
    s = jnp.einsum("bkhd,bqhd->bhqk", k, q) * D ** -0.5
    return jnp.einsum("bkhd,bhqk->bqhd", v, jax.nn.softmax(s, -1))


@probe("softmax_by_hand_none_index_max_grad", "exp(s - s.max(-1)[..., None]) / sum(-1)[..., None], max not stopped",
       tensors(BHSD, BHSD, BHSD))
def softmax_none_index(q, k, v):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    ex = jnp.exp(s - s.max(-1)[..., None])
    return (ex / ex.sum(-1)[..., None]) @ v


@probe("bf16_where_finfo_bf16_min_f32_softmax",
       "bf16 Q/K/V: where(causal, s, finfo(s.dtype).min) in bf16, softmax(s.astype(f32)).astype(bf16)",
       tensors(BHSD, BHSD, BHSD, dtype=BF16))
def bf16_finfo(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(D ** -0.5, BF16)
    s = jnp.where(tri(), s, jnp.finfo(s.dtype).min)
    return jax.nn.softmax(s.astype(F32), -1).astype(BF16) @ v


@probe("dot_general_seq_first_batch_dims_1_2", "lax.dot_general on [S,B,H,D] with batch dims (1, 2) both ways",
       tensors((S, B, H, D), (S, B, H, D), (S, B, H, D)))
def dg_seq_first(q, k, v):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((1, 2), (1, 2)))) * D ** -0.5  # [B,H,Sq,Sk]
    p = jax.nn.softmax(s, -1)
    return jax.lax.dot_general(p, v, (((3,), (0,)), ((0, 1), (1, 2))))  # [B,H,Sq,D]


def _vmapped_one_head(q, k, v, keep):
    s = q @ k.T / math.sqrt(D)
    return jax.nn.softmax(jnp.where(keep[None, :], s, -1e9), -1) @ v


@probe("vmap_batch_single_head_padding", "jax.vmap over the batch of single-head [S,D] attention, per-example padding",
       tensors((B, S, D), (B, S, D), (B, S, D), extra=(lambda rng: pad_mask_int(rng) > 0,)))
def vmap_batch_padding(q, k, v, keep):
    return jax.vmap(_vmapped_one_head)(q, k, v, keep)


def _swin_index(wh=4, ww=4):
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + np.array([wh - 1, ww - 1])
    return jnp.asarray(rel[..., 0] * (2 * ww - 1) + rel[..., 1], jnp.int32).reshape(-1)


SWIN_INDEX = _swin_index()


@probe("swin_bias_table_gather", "Swin: bias_table[index].reshape(N,N,H).transpose(2,0,1) added; grad w.r.t. the table",
       tensors(BHSD, BHSD, BHSD, (49, H)), grad_argnums=(0, 1, 2, 3))
def swin_table(q, k, v, table):
    bias = table[SWIN_INDEX].reshape(S, S, H).transpose(2, 0, 1)
    s = (q * D ** -0.5) @ k.swapaxes(-2, -1) + bias[None]
    return jax.nn.softmax(s, -1) @ v


@probe("timm_vit_qkv_reshape_permute_index", "timm ViT: qkv(x).reshape(B,N,3,H,D).permute(2,0,3,1,4), q,k,v = qkv[0..2]",
       tensors((B, S, E), (E, 3 * E)), grad_argnums=(0, 1))
def timm_vit(x, w_qkv):
    qkv = (x @ w_qkv).reshape(B, S, 3, H, D).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = jax.nn.softmax((q * D ** -0.5) @ k.swapaxes(-2, -1), axis=-1)
    return (attn @ v).swapaxes(1, 2).reshape(B, S, E)


@probe("flax_attention_weights_bias_then_einsum", "flax nn.dot_product_attention_weights(q, k, bias) then einsum with V",
       tensors(BSHD, BSHD, BSHD, (1, H, S, S)), grad_argnums=(0, 1, 2, 3))
def flax_weights_bias(q, k, v, bias):
    w = linen.dot_product_attention_weights(q, k, bias=bias)
    return jnp.einsum("...hqk,...khd->...qhd", w, v)


@probe("jax_dpa_bias_and_local_window", "jax.nn.dot_product_attention(bias=..., local_window_size=(3, 0))",
       tensors(BSHD, BSHD, BSHD, (1, H, S, S)), grad_argnums=(0, 1, 2, 3))
def dpa_bias_window(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, local_window_size=(3, 0), implementation="xla")


def _bos_tokens(rng):
    t = rng.integers(2, 50, (B, S)).astype(np.int32)
    t[0, [0, 5, 11]] = 1
    t[1, [0, 9]] = 1
    return jnp.asarray(t)


@probe("packed_docs_cumsum_bos_causal", "packed documents: seg = cumsum(tokens == BOS), causal within a document",
       tensors(BHSD, BHSD, BHSD, extra=(_bos_tokens,)))
def packed_bos(q, k, v, tokens):
    seg = jnp.cumsum(tokens == 1, axis=-1)
    keep = (seg[:, None, :, None] == seg[:, None, None, :]) & tri()[None, None]
    s = jnp.where(keep, q @ k.swapaxes(-1, -2) * D ** -0.5, -jnp.inf)
    return jax.nn.softmax(s, -1) @ v


@probe("hf_opt_mask_add_then_clamp_finfo_min",
       "HF OPT / early Llama: s + causal·padding finfo.min mask, then max(s, finfo.min) (no -inf left)",
       tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)))
def opt_clamp(q, k, v, attention_mask):
    keep = tri()[None, None] & (attention_mask[:, None, None, :] > 0)
    s = (q * D ** -0.5) @ k.swapaxes(-1, -2) + jnp.where(keep, 0.0, FMIN)
    s = jnp.maximum(s, jnp.finfo(F32).min)
    return jax.nn.softmax(s.astype(F32), -1).astype(q.dtype) @ v


@probe("lax_batch_matmul_folded_heads", "jax.lax.batch_matmul on [B·H,S,D] for both products, causal",
       tensors((B * H, S, D), (B * H, S, D), (B * H, S, D)))
def lax_batch_matmul(q, k, v):
    s = jax.lax.batch_matmul(q, jnp.swapaxes(k, 1, 2)) * D ** -0.5
    return jax.lax.batch_matmul(jax.nn.softmax(jnp.where(tri()[None], s, -jnp.inf), -1), v)


def _prefix_lm_inputs(rng):
    mask_ar = np.zeros((B, S), np.int32)
    mask_ar[0, 6:] = 1  # batch 0: a 6-token prefix, then causal
    mask_ar[1, 10:] = 1
    input_mask = np.arange(S)[None, :] < np.array([14, S])[:, None]
    return jnp.asarray(input_mask), jnp.asarray(mask_ar)


@probe("big_vision_make_attn_mask_prefix_lm",
       "big_vision/PaliGemma make_attn_mask: cumsum(mask_ar) comparison & input_mask, [B,1,S,S] where",
       lambda rng: tensors(BSHD, BSHD, BSHD)(rng) + _prefix_lm_inputs(rng))
def prefix_lm_cumsum(q, k, v, input_mask, mask_ar):
    cumsum = jnp.cumsum(mask_ar, axis=1)
    attn_mask = (cumsum[:, None, :] <= cumsum[:, :, None]) & (input_mask[:, None, :] & input_mask[:, :, None])
    logits = jnp.einsum("BTNH,BSNH->BNTS", q * D ** -0.5, k)
    logits = jnp.where(attn_mask[:, None, :, :], logits, -2.3819763e38)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)



# ---------------------------------------------------------------------------------------------
# Session 17 (issue 19): libraries' and model files' spellings not probed before, and negatives
# (bench/results/attention-probe-2026-12-07-session17.md). Negatives say so in their style: their
# values must stay, raised or not.

MASK_LARGE_NEG = -0.7 * float(jnp.finfo(F32).max)  # praxis get_large_negative_number, MaxText DEFAULT_MASK_VALUE


def causal_padding_bts(rng):
    """[B, T, S] boolean attention mask as gemma's transformer builds it: causal & key padding."""
    return tri()[None] & (pad_mask_int(rng) > 0)[:, None, :]


def additive_padding_b11s(rng):
    """[B, 1, 1, S] float padding mask, 0 kept and a large negative number hidden (praxis's atten_mask)."""
    return jnp.where(pad_mask_int(rng) > 0, 0.0, MASK_LARGE_NEG)[:, None, None, :].astype(F32)


@probe("gemma_attn_mask_bts_input_expanded", "gemma: logits BTNS, where(attn_mask[..., None, :], logits, K_MASK), "
       "attn_mask a [B,T,S] input", tensors(BSHD, BSHD, BSHD, extra=(causal_padding_bts,)))
def gemma_bts_mask(q, k, v, attn_mask):
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * 16.0 ** -0.5, k)
    padded = jnp.where(attn_mask[..., None, :], logits, GEMMA_K_MASK)
    probs = jax.nn.softmax(padded, axis=-1).astype(k.dtype)
    return jnp.einsum("BTNS,BSNH->BTNH", probs, v)


@probe("gemma_gqa_query_btkgh_mask_input", "gemma GQA: q reshaped [B,T,K,G,H], BTKGH,BSKH->BTKGS, reshaped to BTNS "
       "for a [B,T,S] input mask, probs reshaped back", tensors(BSHD, (B, S, 2, D), (B, S, 2, D),
                                                               extra=(causal_padding_bts,)))
def gemma_gqa_input_mask(q, k, v, attn_mask):
    qg = (q * D ** -0.5).reshape(B, S, 2, H // 2, D)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k).reshape(B, S, H, S)
    logits = jnp.where(attn_mask[:, :, None, :], logits, GEMMA_K_MASK)
    probs = jax.nn.softmax(logits, axis=-1).reshape(B, S, 2, H // 2, S)
    return jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(B, S, H, D)


@probe("praxis_softcap_then_additive_mask_input", "praxis: cap·tanh(logits/cap), then apply_mask_to_logits with an "
       "additive [B,1,1,S] float input: where(mask >= min·0.5, logits, min)",
       tensors(BSHD, BSHD, BSHD, extra=(additive_padding_b11s,)))
def praxis_softcap_mask(q, k, v, atten_mask):
    logits = jnp.einsum("BTNH,BSNH->BNTS", q * jax.lax.rsqrt(jnp.float32(D)), k)
    logits = 20.0 * jnp.tanh(logits / 20.0)
    logits = jnp.where(atten_mask >= MASK_LARGE_NEG * 0.5, logits, MASK_LARGE_NEG)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1).astype(q.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


@probe("maxtext_additive_mask_deferred_mha", "MaxText MHA (no GQA): where(causal, 0, DEFAULT_MASK_VALUE) added, "
       "local max/exps/sums, (exps·V)/sums", tensors(BSHD, BSHD, BSHD))
def maxtext_deferred_mha(q, k, v):
    attn = jnp.einsum("btnd,bsnd->bnts", q, k) * D ** -0.5
    attn = attn + jnp.where(tri(), 0.0, MASK_LARGE_NEG)[None, None]
    local_max = jnp.max(attn, axis=-1, keepdims=True)
    local_exps = jnp.exp(attn - local_max)
    local_sums = jnp.sum(local_exps, axis=-1, keepdims=True)
    out = jnp.einsum("bnts,bsnd->bntd", local_exps, v) / local_sums
    return out.transpose(0, 2, 1, 3)


@probe("haiku_mha_bf16_sqrt_astype_1e30", "Haiku MHA in bf16: logits / np.sqrt(key_size).astype(bf16), "
       "where(mask, logits, -1e30) in bf16, softmax in bf16",
       tensors(BSHD, BSHD, BSHD, dtype=BF16, extra=(lambda rng: (pad_mask_int(rng) > 0)[:, None, None, :],)))
def haiku_bf16(q, k, v, mask):
    logits = jnp.einsum("...thd,...Thd->...htT", q, k)
    logits = logits / np.sqrt(D).astype(k.dtype)
    logits = jnp.where(mask, logits, -1e30)
    w = jax.nn.softmax(logits)
    return jnp.einsum("...htT,...Thd->...thd", w, v)


LINEN_MHA_DROPOUT = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, dropout_rate=0.1)


def _linen_dropout_args(rng):
    x = _normal(rng, (B, S, E))
    return LINEN_MHA_DROPOUT.init(jax.random.PRNGKey(7), x, deterministic=True), x


@probe("flax_linen_mha_dropout_rate_deterministic", "flax.linen MHA(dropout_rate=0.1) at deterministic=True, causal",
       _linen_dropout_args, grad_argnums=(0, 1))
def linen_dropout_eval(params, x):
    return LINEN_MHA_DROPOUT.apply(params, x, mask=linen.make_causal_mask(x[..., 0]), deterministic=True)


@probe("neg_flax_linen_mha_dropout_training", "NEGATIVE flax.linen MHA(dropout_rate=0.1), deterministic=False: "
       "dropout on the weights", lambda rng: _linen_dropout_args(rng) + (jax.random.PRNGKey(11),), grad_argnums=(1,))
def linen_dropout_train(params, x, key):
    return LINEN_MHA_DROPOUT.apply(params, x, deterministic=False, rngs={"dropout": key})


@probe("flax_linen_mha_normalize_qk_padding", "flax.linen MHA(normalize_qk=True) with a padding mask (the corpus's "
       "B2 S8 E16), gradient w.r.t. params and x", linen_args(LINEN_MHA_QK_NORM, padding_keep),
       grad_argnums=(0, 1))
def linen_qk_norm_pad(params, x, keep):
    return LINEN_MHA_QK_NORM.apply(params, x, mask=linen.make_attention_mask(keep, keep))


@probe("t5_cross_attention_zero_bias_padding", "HF FlaxT5 cross-attention: no scale, position_bias = zeros "
       "[1,H,Sq,Sk] + (1-mask)·finfo.min, Sq=6", tensors((B, 6, H, D), BSHD, BSHD, extra=(pad_mask_int,)))
def t5_cross(q, k, v, encoder_mask):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    position_bias = jnp.zeros((1, H, 6, S), F32)
    position_bias = position_bias + (1.0 - encoder_mask[:, None, None, :].astype(F32)) * FMIN
    w = jax.nn.softmax((scores + position_bias).astype(F32), axis=-1).astype(scores.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


@probe("hf_eager_mask_sliced_to_key_len", "HF eager_attention_forward: attention_mask[:, :, :, :Sk] sliced from a "
       "longer [B,1,S,S+4] float mask, added", tensors(BHSD, BHSD, BHSD, extra=(
           lambda rng: jnp.where(jnp.tril(jnp.ones((S, S + 4), bool)) & (np.arange(S + 4) < 11)[None]
                                 | (np.arange(B) == 1)[:, None, None] & jnp.tril(jnp.ones((S, S + 4), bool)),
                                 0.0, FMIN)[:, None].astype(F32),)))
def hf_eager(q, k, v, attention_mask):
    w = jnp.matmul(q, k.swapaxes(2, 3)) * D ** -0.5
    w = w + attention_mask[:, :, :, : k.shape[-2]]
    w = jax.nn.softmax(w.astype(F32), axis=-1).astype(q.dtype)
    return jnp.matmul(w, v).swapaxes(1, 2)


PROBES += [
    Probe("jax_dpa_query_and_kv_seq_lengths_causal", "jax.nn.dot_product_attention query_seq_lengths, "
          "key_value_seq_lengths and is_causal together",
          lambda q, k, v, ql, kl: jax.nn.dot_product_attention(q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl,
                                                               is_causal=True, implementation="xla"),
          tensors(BSHD, BSHD, BSHD, extra=(lengths(9, 16), lengths(12, 16))), (0, 1, 2)),
    Probe("jax_dpa_bf16_gqa_scale_kv_lengths", "jax.nn.dot_product_attention bf16 GQA with scale=0.3 and "
          "key_value_seq_lengths",
          lambda q, k, v, kl: jax.nn.dot_product_attention(q, k, v, scale=0.3, key_value_seq_lengths=kl,
                                                           implementation="xla"),
          tensors(BSHD, (B, S, 2, D), (B, S, 2, D), dtype=BF16, extra=(lengths(7, 16),)), (0, 1, 2)),
]


@probe("clip_cosine_scalar_logit_scale", "CLIP/Swin-v2 cosine attention: normalize(q)·normalize(k)ᵀ · "
       "exp(min(logit_scale, log 100)), logit_scale a scalar input (grad too)",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.float32(math.log(1 / 0.07)),)), grad_argnums=(0, 1, 2, 3))
def clip_cosine(q, k, v, logit_scale):
    def normalize(t):
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    scale = jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
    attn = (normalize(q) @ normalize(k).swapaxes(-2, -1)) * scale
    return jax.nn.softmax(attn, axis=-1) @ v


@probe("swin_v2_per_head_logit_scale_wrt_scale", "Swin-v2 cosine attention, per-head logit_scale [H,1,1] "
       "clamped at log(1/0.01) and exponentiated; grad w.r.t. the scale too",
       tensors(BHSD, BHSD, BHSD, (H, 1, 1)), grad_argnums=(0, 1, 2, 3))
def swin_v2_scale(q, k, v, logit_scale):
    def normalize(t):
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    attn = normalize(q) @ normalize(k).swapaxes(-2, -1)
    attn = attn * jnp.exp(jnp.minimum(logit_scale, jnp.log(jnp.asarray(1.0 / 0.01, F32))))
    return jax.nn.softmax(attn, axis=-1) @ v


@probe("f16_softmax_in_f16_no_casts", "f16 Q/K/V, scores and softmax in f16 (no f32 anywhere)",
       tensors(BHSD, BHSD, BHSD, dtype=F16))
def f16_all(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.float16(D ** -0.5)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(tri(), s, -jnp.inf), -1), v)


@probe("einsum_v_transposed_bhdk", "V given as [B,H,D,S]: einsum bhqk,bhdk->bhqd", tensors(BHSD, BHSD, (B, H, D, S)))
def einsum_vt(q, k, vt):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return jnp.einsum("bhqk,bhdk->bhqd", jax.nn.softmax(s, -1), vt)


@probe("sparse_transformer_strided_causal", "Sparse Transformer fixed/strided pattern: causal & (i-j < 4 | "
       "(i-j) % 4 == 0), -inf", tensors(BHSD, BHSD, BHSD))
def strided(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    keep = (j <= i) & (((i - j) < 4) | ((i - j) % 4 == 0))
    s = jnp.where(keep, q @ k.swapaxes(-1, -2) * D ** -0.5, -jnp.inf)
    return jax.nn.softmax(s, -1) @ v


@probe("longformer_window_or_global_tokens", "Longformer/BigBird-style: |i-j| <= 2 or a global token "
       "(an input [B,S] flag) on either side, finfo.min",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.asarray(np.arange(S)[None, :] == np.array([[0], [3]])),)))
def longformer(q, k, v, is_global):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    keep = (jnp.abs(i - j) <= 2)[None] | is_global[:, None, :] | is_global[:, :, None]
    s = jnp.where(keep[:, None], q @ k.swapaxes(-1, -2) * D ** -0.5, FMIN)
    return jax.nn.softmax(s, -1) @ v


def _sdpa_one_example(q, k, v):
    s = jnp.where(tri(), q @ k.swapaxes(-1, -2) * D ** -0.5, -jnp.inf)
    return jax.nn.softmax(s, -1) @ v


@probe("lax_map_over_batch", "jax.lax.map of [H,S,D] causal attention over the batch (a scan)",
       tensors(BHSD, BHSD, BHSD))
def lax_map_batch(q, k, v):
    return jax.lax.map(lambda a: _sdpa_one_example(*a), (q, k, v))


@probe("qwen_logn_per_query_scores_scale", "Qwen-style log-n scaling as a per-query factor on the scores "
       "(constant along keys), causal", tensors(BHSD, BHSD, BHSD))
def qwen_logn(q, k, v):
    logn = jnp.maximum(jnp.log(jnp.arange(1, S + 1, dtype=F32)) / math.log(4.0), 1.0)
    s = (q @ k.swapaxes(-1, -2)) * D ** -0.5 * logn[None, None, :, None]
    return jax.nn.softmax(jnp.where(tri(), s, -jnp.inf), -1) @ v


@probe("mosaicbert_symmetric_alibi_abs", "MosaicBERT bidirectional ALiBi: -slope·|i-j| added, key padding",
       tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)))
def symmetric_alibi(q, k, v, attention_mask):
    dist = jnp.abs(jnp.arange(S)[None, :] - jnp.arange(S)[:, None]).astype(F32)
    alibi = -alibi_slope_vector()[:, None, None] * dist[None]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D) + alibi[None]
    s = s + (1.0 - attention_mask[:, None, None, :].astype(F32)) * -10000.0
    return jax.nn.softmax(s, -1) @ v


@probe("topk_attention_mask_from_scores", "top-k attention: keep scores >= the 4th largest of their row "
       "(a mask computed from the scores)", tensors(BHSD, BHSD, BHSD))
def topk(q, k, v):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    kth = jax.lax.top_k(s, 4)[0][..., -1:]
    return jax.nn.softmax(jnp.where(s >= kth, s, -jnp.inf), -1) @ v


@probe("linalg_vecdot_broadcast_scores", "array-API scores: jnp.linalg.vecdot(q[..., :, None, :], "
       "k[..., None, :, :])", tensors(BHSD, BHSD, BHSD))
def vecdot_scores(q, k, v):
    s = jnp.linalg.vecdot(q[..., :, None, :], k[..., None, :, :]) * D ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("cross_attention_single_memory_slot", "cross-attention to one key (Sk=1): softmax over one entry",
       tensors(BHSD, (B, H, 1, D), (B, H, 1, D)))
def single_slot(q, k, v):
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, -1) @ v


@probe("einsum_three_operands_query_projection", "scores with the query projection in one einsum: "
       "einsum('bse,ehd,bthd->bhst', x, Wq, k)", tensors((B, S, E), (E, H, D), BSHD, BSHD), grad_argnums=(0, 1, 2, 3))
def einsum_wq(x, wq, k, v):
    s = jnp.einsum("bse,ehd,bthd->bhst", x, wq, k) * D ** -0.5
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(s, -1), v)


@jax.jit
def _jitted_sdpa(q, k, v):
    return jax.nn.softmax(jnp.where(tri(), q @ k.swapaxes(-1, -2) / math.sqrt(D), -jnp.inf), -1) @ v


@probe("nested_jit_attention_function", "a library's @jax.jit attention function called inside the program",
       tensors(BHSD, BHSD, BHSD))
def nested_jit(q, k, v):
    return _jitted_sdpa(jnp.tanh(q), k, v) * 2.0


@jax.custom_vjp
def _custom_vjp_sdpa(q, k, v):
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, -1) @ v


def _custom_fwd(q, k, v):
    p = jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, -1)
    return p @ v, (q, k, v, p)


def _custom_bwd(res, do):
    q, k, v, p = res
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - jnp.sum(p * dp, -1, keepdims=True)) * D ** -0.5
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ do


_custom_vjp_sdpa.defvjp(_custom_fwd, _custom_bwd)


@probe("custom_vjp_reference_attention", "a jax.custom_vjp attention (reference forward, hand-written backward "
       "saving P), as kernels' fallbacks write it", tensors(BHSD, BHSD, BHSD))
def custom_vjp_attn(q, k, v):
    return _custom_vjp_sdpa(q, k, v)


@probe("pv_by_broadcast_multiply_sum", "P·V as (p[..., None] * v[:, :, None]).sum(-2)", tensors(BHSD, BHSD, BHSD))
def pv_mul_sum(q, k, v):
    p = jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, -1)
    return (p[..., None] * v[:, :, None, :, :]).sum(-2)


@probe("shared_weights_two_values", "one softmax read by two P·V products (two value streams)",
       tensors(BHSD, BHSD, BHSD, BHSD), grad_argnums=(0, 1, 2, 3))
def two_values(q, k, v1, v2):
    p = jax.nn.softmax(jnp.where(tri(), q @ k.swapaxes(-1, -2) * D ** -0.5, -jnp.inf), -1)
    return jnp.concatenate([p @ v1, p @ v2], axis=-1)


MAX_LEN = 24
FLAX_CAUSAL_BUFFER = linen.make_causal_mask(jnp.ones((1, MAX_LEN), dtype="bool"), dtype="bool")  # [1,1,24,24]


@probe("hf_flax_llama_dynamic_slice_causal_buffer", "HF FlaxLlama: lax.dynamic_slice of a [1,1,L,L] causal buffer at "
       "a traced mask_shift, & padding, then lax.select to a finfo.min bias",
       tensors(BSHD, BSHD, BSHD, extra=(lambda rng: jnp.asarray(0, jnp.int32), pad_mask_int)))
def flax_llama_buffer(q, k, v, mask_shift, attention_mask):
    causal = jax.lax.dynamic_slice(FLAX_CAUSAL_BUFFER, (0, 0, mask_shift, 0), (1, 1, S, MAX_LEN))[..., :S]
    mask = jnp.broadcast_to(causal, (B, 1, S, S)) & (attention_mask[:, None, None, :] > 0)
    bias = jax.lax.select(mask, jnp.full(mask.shape, 0.0, F32), jnp.full(mask.shape, FMIN))
    w = linen.dot_product_attention_weights(q, k, bias=bias)
    return jnp.einsum("...hqk,...khd->...qhd", w, v)


@probe("praxis_per_dim_scale_query", "praxis PerDimScale: q · softplus(per_dim_scale) · 1.442695/√D "
       "(grad w.r.t. per_dim_scale too)", tensors(BSHD, BSHD, BSHD, (D,)), grad_argnums=(0, 1, 2, 3))
def praxis_per_dim(q, k, v, per_dim_scale):
    q = q * (jax.nn.softplus(per_dim_scale) * (1.442695041 / math.sqrt(D)))
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)
    logits = jnp.where(tri()[None, None], logits, MASK_LARGE_NEG)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)


@probe("neg_talking_heads_mixed_after_softmax", "NEGATIVE talking-heads: weights mixed across heads "
       "(einsum with [H,H]) between softmax and P·V", tensors(BHSD, BHSD, BHSD, (H, H)), grad_argnums=(0, 1, 2, 3))
def talking_heads(q, k, v, mix):
    p = jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, -1)
    return jnp.einsum("bhqk,hg->bgqk", p, mix) @ v


@probe("neg_softmax_over_heads_axis", "NEGATIVE softmax over the heads axis of [B,H,S,S]", tensors(BHSD, BHSD, BHSD))
def softmax_heads(q, k, v):
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5, axis=1) @ v


@probe("neg_scores_times_float_keep", "NEGATIVE s · keep (a 0/1 float 'mask' multiplied: masked logits become 0)",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: (pad_mask_int(rng) > 0).astype(F32)[:, None, None, :],)))
def scores_times_keep(q, k, v, keep):
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) * D ** -0.5 * keep, -1) @ v


@probe("neg_relu_squared_attention", "NEGATIVE ReLU² attention (Primer-style weights, no softmax): relu(s)²/S · V",
       tensors(BHSD, BHSD, BHSD))
def relu_sq(q, k, v):
    return (jax.nn.relu(q @ k.swapaxes(-1, -2) * D ** -0.5) ** 2 / S) @ v


@probe("neg_softmax_plus_one_denominator", "NEGATIVE 'softmax1' (off by one): exp(s-m) / (exp(-m) + Σ exp(s-m))",
       tensors(BHSD, BHSD, BHSD))
def softmax1(q, k, v):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    m = jax.lax.stop_gradient(jnp.maximum(s.max(-1, keepdims=True), 0.0))
    e = jnp.exp(s - m)
    return (e / (jnp.exp(-m) + e.sum(-1, keepdims=True))) @ v


@probe("where_fill_is_the_scores_minus_10", "where(keep, s, s - 10): a penalty, not a fill (values must stay)",
       tensors(BHSD, BHSD, BHSD, extra=(lambda rng: (pad_mask_int(rng) > 0)[:, None, None, :],)))
def soft_penalty(q, k, v, keep):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    return jax.nn.softmax(jnp.where(keep, s, s - 10.0), -1) @ v


# ---------------------------------------------------------------------------------------------
# running


# ---------------------------------------------------------------------------------------------
# Session 18: the peers' own lists, written as JAX users write them (Inductor's SFDP forms not
# yet probed, XLA cuDNN rewriter test forms, onnxscript's eight SDPA rules, library options)


def _bshd(*ts):
    return tuple(t.transpose(0, 2, 1, 3) for t in ts)


@probe("sfdp04_mul_scale_dropout_rate_0", "Inductor 4: softmax(QKᵀ·c) through eqx.nn.Dropout(p=0.0, inference=True)",
       tensors(BHSD, BHSD, BHSD))
def sfdp04(q, k, v):
    p = jax.nn.softmax(jnp.matmul(q, k.swapaxes(-2, -1)) * 0.35, axis=-1)
    return jnp.matmul(eqx.nn.Dropout(0.0, inference=True)(p), v)


@probe("sfdp06_additive_mask_dropout_deterministic", "Inductor 6: (QKᵀ/√D + mask), linen.Dropout(0.1, deterministic)",
       tensors(BHSD, BHSD, BHSD, (B, 1, S, S)), grad_argnums=(0, 1, 2, 3))
def sfdp06(q, k, v, mask):
    p = jax.nn.softmax(q @ k.swapaxes(-2, -1) / math.sqrt(q.shape[-1]) + mask, axis=-1)
    return linen.Dropout(0.1, deterministic=True).apply({}, p) @ v


@probe("sfdp16_bf16_scores_f32_mask_cast_back", "Inductor 16 (BERT): bf16 QKᵀ/c + an f32 mask (promoted to f32), "
       "softmax, P .astype(q.dtype)", lambda rng: tensors(BSHD, BSHD, BSHD, dtype=BF16)(rng) + (_normal(rng, (B, 1, 1, S)),),
       grad_argnums=(0, 1, 2))
def sfdp16(q, k, v, mask):
    q, k, v = _bshd(q, k, v)
    p = jax.nn.softmax(jnp.matmul(q, k.swapaxes(-2, -1)) / 2.8 + mask, axis=-1)
    return jnp.matmul(p.astype(q.dtype), v)


@probe("sfdp21_t5_bf16_add_mask_type_as_float_softmax", "Inductor 21 (T5): bf16 QKᵀ + bf16 mask, type_as(q), "
       ".float().softmax().type_as(q)", tensors(BSHD, BSHD, BSHD, (B, H, S, S), dtype=BF16), grad_argnums=(0, 1, 2, 3))
def sfdp21(q, k, v, mask):
    q, k, v = _bshd(q, k, v)
    score = (jnp.matmul(q, k.transpose(0, 1, 3, 2)) + mask).astype(q.dtype)
    return jnp.matmul(jax.nn.softmax(score.astype(F32), axis=-1).astype(q.dtype), v)


@probe("sfdp21_t5_bf16_scores_f32_mask_rounded_back", "Inductor 21 (T5): bf16 QKᵀ + f32 mask (f32), type_as(q) "
       "rounds it to bf16, .float().softmax().type_as(q)",
       lambda rng: tensors(BSHD, BSHD, BSHD, dtype=BF16)(rng) + (_normal(rng, (B, H, S, S)),), grad_argnums=(0, 1, 2))
def sfdp21_f32_mask(q, k, v, mask):
    q, k, v = _bshd(q, k, v)
    score = (jnp.matmul(q, k.transpose(0, 1, 3, 2)) + mask).astype(q.dtype)
    return jnp.matmul(jax.nn.softmax(score.astype(F32), axis=-1).astype(q.dtype), v)


@probe("sfdp23_t5_bf16_float_type_as_float_round_trip", "Inductor 23 (T5, zero mask folded): bf16 scores .float()"
       ".type_as(q).float().softmax().type_as(q)", tensors(BSHD, BSHD, BSHD, dtype=BF16))
def sfdp23(q, k, v):
    q, k, v = _bshd(q, k, v)
    score = jnp.matmul(q, k.transpose(0, 1, 3, 2)).astype(F32).astype(q.dtype)
    return jnp.matmul(jax.nn.softmax(score.astype(F32), axis=-1).astype(q.dtype), v)


@probe("sfdp24_mbart_folded_views_mask_between", "Inductor 24 (MBart): Q/K/V viewed [B·H,S,D], bmm, viewed [B,H,S,S] "
       "+ mask, viewed back, softmax, bmm, view", tensors(BHSD, BHSD, BHSD, (B, 1, S, S)), grad_argnums=(0, 1, 2, 3))
def sfdp24(q, k, v, mask):
    b, h, s, d = q.shape
    qf, kf, vf = q.reshape(b * h, -1, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    w = jnp.matmul(qf, kf.transpose(0, 2, 1))
    w = (w.reshape(b, h, s, -1) + mask).reshape(b * h, s, -1)
    return jnp.matmul(jax.nn.softmax(w, axis=-1), vf).reshape(b, h, s, d)


@probe("sfdp24_mbart_f16_inputs_f32_mask", "Inductor 24 (MBart, half): f16 bmm, + f32 mask (f32), softmax, "
       "cast to f16, bmm", lambda rng: tensors(BHSD, BHSD, BHSD, dtype=F16)(rng) + (_normal(rng, (B, 1, S, S)),),
       grad_argnums=(0, 1, 2))
def sfdp24_f16(q, k, v, mask):
    b, h, s, d = q.shape
    qf, kf, vf = q.reshape(b * h, -1, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    w = (jnp.matmul(qf, kf.transpose(0, 2, 1)).reshape(b, h, s, -1) + mask).reshape(b * h, s, -1)
    return jnp.matmul(jax.nn.softmax(w, axis=-1).astype(F16), vf).reshape(b, h, s, d)


@probe("sfdp19_gpt2_where_finfo_min_then_bias_extreme", "Inductor 19 (GPT-2 with a padding bias): where(causal, s/c, "
       "finfo.min) + mask, softmax .type(v.dtype), extreme inputs",
       tensors(BHSD, BHSD, BHSD, (B, 1, 1, S), extreme=True), grad_argnums=(0, 1, 2, 3))
def sfdp19_gpt2(q, k, v, mask):
    w = q @ k.transpose(0, 1, 3, 2) / jnp.full((), math.sqrt(D), F32)
    w = jnp.where(tri()[None, None], w, jnp.finfo(F32).min) + mask
    return jax.nn.softmax(w, axis=-1).astype(v.dtype) @ v


@probe("sfdp19_where_neg_inf_then_padding_bias", "GPT-2 style: where(causal, s, -inf) + a finite padding bias "
       "(-1e9 where padded)", tensors(BHSD, BHSD, BHSD, extra=(pad_mask_int,)), grad_argnums=(0, 1, 2))
def sfdp19_neginf(q, k, v, attention_mask):
    w = jnp.where(tri()[None, None], q @ k.transpose(0, 1, 3, 2) * D ** -0.5, -jnp.inf)
    w = w + ((1.0 - attention_mask[:, None, None, :]) * -1e9)
    return jax.nn.softmax(w, axis=-1) @ v


@probe("xla_training_scale_bias_causal_select_grad", "XLA rewriter: training BMM1-Scale-Bias-Mask(select)-Softmax-BMM2 "
       "(bias [H,S,S] broadcast, causal select)", tensors(BHSD, BHSD, BHSD, (H, S, S)), grad_argnums=(0, 1, 2, 3))
def xla_bias_causal(q, k, v, bias):
    s = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) * 0.125 + bias[None]
    s = jax.lax.select(jnp.broadcast_to(tri()[None, None], s.shape), s, jnp.full(s.shape, -jnp.inf))
    return jax.lax.dot_general(jax.nn.softmax(s, -1), v, (((3,), (2,)), ((0, 1), (0, 1))))


@probe("xla_unfused_softmax_f32_reduce_bf16", "XLA rewriter: bf16 BMM1, softmax written out with the max and the sum "
       "reduced in f32 and converted back, BMM2", tensors(BHSD, BHSD, BHSD, dtype=BF16))
def xla_unfused_bf16(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    m = jnp.max(s.astype(F32), -1, keepdims=True).astype(BF16)
    e = jnp.exp(s - m)
    return jnp.einsum("bhqk,bhkd->bhqd", e / jnp.sum(e.astype(F32), -1, keepdims=True).astype(BF16), v)


@probe("xla_bmm1_lhs_contracting_not_minor", "XLA rewriter: BMM1 with Q given [B,H,D,S] (contracting dim 2)",
       tensors((B, H, D, S), BHSD, BHSD))
def xla_qt(qT, k, v):
    s = jax.lax.dot_general(qT, k, (((2,), (3,)), ((0, 1), (0, 1))))
    return jax.lax.dot_general(jax.nn.softmax(s * 0.3, -1), v, (((3,), (2,)), ((0, 1), (0, 1))))


@probe("xla_mask_converted_pred_added", "XLA rewriter: a pred mask converted to bf16 (-1e9·(1-m)) added after BMM1",
       tensors(BHSD, BHSD, BHSD, dtype=BF16, extra=(lambda rng: jnp.asarray(rng.random((B, 1, S, S)) < 0.8),)),
       grad_argnums=(0, 1, 2))
def xla_pred_bias(q, k, v, keep):
    bias = (1.0 - keep.astype(BF16)) * jnp.asarray(-1e9, BF16)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(0.35, BF16) + bias
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


def _onnx_mask(rng):
    return _normal(rng, (B, H, S, S))


@probe("onnx_masked_pre_mul_kt_given", "onnxscript masked_pre_mul_sdpa: Q·c and Kᵀ·c (K given transposed), + mask",
       tensors(BHSD, (B, H, D, S), BHSD, (B, H, S, S)), grad_argnums=(0, 1, 2, 3))
def onnx_masked_pre_mul(q, kT, v, mask):
    c = math.sqrt(1 / math.sqrt(D))
    return jnp.matmul(jax.nn.softmax(jnp.matmul(q * c, kT * c) + mask, -1), v)


@probe("onnx_masked_pre_div", "onnxscript masked_pre_div_sdpa: Q/c and Kᵀ/c, + mask",
       tensors(BHSD, BHSD, BHSD, (B, H, S, S)), grad_argnums=(0, 1, 2, 3))
def onnx_masked_pre_div(q, k, v, mask):
    c = math.sqrt(math.sqrt(D))
    return jnp.matmul(jax.nn.softmax(jnp.matmul(q / c, k.swapaxes(-1, -2) / c) + mask, -1), v)


@probe("onnx_masked_post_mul_custom_scale", "onnxscript masked_post_mul_sdpa with a custom scale (0.1)",
       tensors(BHSD, BHSD, BHSD, (B, H, S, S)), grad_argnums=(0, 1, 2, 3))
def onnx_masked_post_mul(q, k, v, mask):
    return jnp.matmul(jax.nn.softmax(jnp.matmul(q, k.swapaxes(-1, -2)) * np.float32(0.1) + mask, -1), v)


@probe("onnx_unmasked_pre_mul_unequal_scales", "pre-scaled Q·a and K·b with a ≠ b", tensors(BHSD, BHSD, BHSD))
def onnx_unequal(q, k, v):
    return jnp.matmul(jax.nn.softmax(jnp.matmul(q * 0.5, k.swapaxes(-1, -2) * 0.25), -1), v)


def _seq_lengths(rng):
    return jnp.asarray([11, S], jnp.int32)


@probe("jax_dpa_local_window_int_bshd", "jax.nn.dot_product_attention(local_window_size=3) (symmetric int window)",
       tensors(BSHD, BSHD, BSHD))
def jax_dpa_window_int(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, local_window_size=3)


@probe("jax_dpa_window_causal_kv_lengths", "jax.nn.dot_product_attention(is_causal, local_window_size=(4, 0), "
       "key_value_seq_lengths)", tensors(BSHD, BSHD, BSHD, extra=(_seq_lengths,)), grad_argnums=(0, 1, 2))
def jax_dpa_window_causal_len(q, k, v, lengths):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(4, 0),
                                        key_value_seq_lengths=lengths)


@probe("jax_dpa_bias_bool_mask_scale_unbatched", "jax.nn.dot_product_attention unbatched [T,N,H] with bias [N,T,S], "
       "bool mask [T,S] and scale", tensors((S, H, D), (S, H, D), (S, H, D), (H, S, S),
                                         extra=(lambda rng: jnp.asarray(rng.random((S, S)) < 0.8).at[:, 0].set(True),)),
       grad_argnums=(0, 1, 2, 3))
def jax_dpa_unbatched_bias_mask(q, k, v, bias, mask):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.2)


@probe("jax_dpa_return_residual", "jax.nn.dot_product_attention(return_residual=True): the output only used",
       tensors(BSHD, BSHD, BSHD))
def jax_dpa_residual(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)[0]


NNX_MHA_DROPOUT = nnx.split(nnx.MultiHeadAttention(num_heads=H, in_features=E, dropout_rate=0.1, deterministic=True,
                                                   decode=False, rngs=nnx.Rngs(0)))


@probe("flax_nnx_mha_dropout_deterministic", "nnx.MultiHeadAttention(dropout_rate=0.1, deterministic=True), causal",
       lambda rng: (NNX_MHA_DROPOUT[1], _normal(rng, (B, S, E))), grad_argnums=(0, 1))
def nnx_dropout(state, x):
    return nnx.merge(NNX_MHA_DROPOUT[0], state)(x, mask=nnx.make_causal_mask(x[..., 0]))


EQX_MHA_DROPOUT = eqx.nn.MultiheadAttention(H, E, dropout_p=0.1, inference=True, key=jax.random.PRNGKey(1))


@probe("equinox_mha_dropout_inference", "eqx.nn.MultiheadAttention(dropout_p=0.1, inference=True), vmapped, "
       "causal mask", lambda rng: (_normal(rng, (B, S, E)),), grad_argnums=(0,))
def eqx_dropout(x):
    mask = jnp.tril(jnp.ones((S, S), bool))
    return jax.vmap(lambda t: EQX_MHA_DROPOUT(t, t, t, mask=mask))(x)


@probe("flash_custom_vjp_lse_backward", "a jax.custom_vjp attention whose backward recomputes P = exp(s - lse) from a "
       "saved log-sum-exp (the flash form)", tensors(BHSD, BHSD, BHSD))
def flash_custom_vjp(q, k, v):
    return _flash_sdpa(q, k, v)


@jax.custom_vjp
def _flash_sdpa(q, k, v):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    return jax.nn.softmax(s, -1) @ v


def _flash_fwd(q, k, v):
    s = q @ k.swapaxes(-1, -2) * D ** -0.5
    lse = jax.nn.logsumexp(s, -1, keepdims=True)
    o = jnp.exp(s - lse) @ v
    return o, (q, k, v, o, lse)


def _flash_bwd(res, do):
    q, k, v, o, lse = res
    p = jnp.exp(q @ k.swapaxes(-1, -2) * D ** -0.5 - lse)
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - jnp.sum(do * o, -1, keepdims=True)) * D ** -0.5
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ do


_flash_sdpa.defvjp(_flash_fwd, _flash_bwd)


@probe("scan_over_layers_no_checkpoint", "lax.scan over 2 layers of causal attention with stacked projections "
       "(grad without jax.checkpoint: P saved across the scans)",
       tensors((B, S, E), (2, E, 3 * E)), grad_argnums=(0, 1))
def scan_layers(x, w):
    def layer(h, wl):
        q, k, v = jnp.split((h @ wl).reshape(B, S, 3 * H, D).transpose(0, 2, 1, 3), 3, axis=1)
        s = jnp.where(tri(), q @ k.swapaxes(-1, -2) * D ** -0.5, -jnp.inf)
        return h + (jax.nn.softmax(s, -1) @ v).transpose(0, 2, 1, 3).reshape(B, S, E), None

    return jax.lax.scan(layer, x, w)[0]


@probe("neg_p_used_by_pv_and_returned_bf16", "NEGATIVE (XLA: activation with more than one user): P also returned",
       tensors(BHSD, BHSD, BHSD, dtype=BF16), grad_argnums=None)
def neg_two_users(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.35, -1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v), p


@probe("neg_dropout_random_mask_p", "NEGATIVE Inductor 3 with real dropout: where(bernoulli, P/(1-r), 0)",
       tensors(BHSD, BHSD, BHSD), grad_argnums=None)
def neg_dropout(q, k, v):
    p = jax.nn.softmax(q @ k.swapaxes(-1, -2) * 0.35, -1)
    keep = jax.random.bernoulli(jax.random.PRNGKey(0), 0.9, p.shape)
    return jnp.where(keep, p / 0.9, 0.0) @ v


@probe("neg_bias_mask_then_softmax_over_queries", "NEGATIVE: scores + bias, softmax over the query axis",
       tensors(BHSD, BHSD, BHSD, (B, H, S, S)), grad_argnums=None)
def neg_query_axis(q, k, v, bias):
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) + bias, axis=-2) @ v



@probe("flax_linen_dpa_bf16_force_fp32_softmax", "flax.linen.dot_product_attention bf16, force_fp32_for_softmax=True, "
       "causal mask", tensors(BSHD, BSHD, BSHD, dtype=BF16))
def linen_fp32_softmax(q, k, v):
    return linen.dot_product_attention(q, k, v, mask=tri()[None, None], force_fp32_for_softmax=True, deterministic=True)


@probe("flax_linen_dpa_precision_highest_bias", "flax.linen.dot_product_attention(precision=HIGHEST) with a bias",
       tensors(BSHD, BSHD, BSHD, (B, H, S, S)), grad_argnums=(0, 1, 2, 3))
def linen_highest(q, k, v, bias):
    return linen.dot_product_attention(q, k, v, bias=bias, precision=jax.lax.Precision.HIGHEST, deterministic=True)


@probe("jax_dpa_f16_causal", "jax.nn.dot_product_attention on float16 inputs, is_causal", tensors(BSHD, BSHD, BSHD, dtype=F16))
def jax_dpa_f16(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


@probe("flax_linen_dpa_dtype_f32_from_bf16", "flax.linen.dot_product_attention(dtype=float32) on bf16 inputs",
       tensors(BSHD, BSHD, BSHD, dtype=BF16))
def linen_dtype(q, k, v):
    return linen.dot_product_attention(q, k, v, dtype=F32, deterministic=True)


def grad_fn(fn: Callable, argnums: tuple[int, ...]) -> Callable:
    def loss(*args):
        *inputs, cot = args
        return jnp.sum(fn(*inputs).astype(F32) * cot)

    return jax.grad(loss, argnums=argnums)


def grad_args(fn: Callable, make_args: Callable) -> Callable:
    def make(rng):
        args = make_args(rng)
        out = jax.eval_shape(fn, *args)
        return args + (_normal(rng, out.shape),)

    return make


def cases(p: Probe, with_grad: bool) -> list[Case]:
    out = [Case(p.name, p.fn, p.make_args, True, "probe", p.style)]
    if with_grad and p.grad_argnums is not None:
        out.append(Case(p.name + "_grad", grad_fn(p.fn, p.grad_argnums), grad_args(p.fn, p.make_args), True,
                        "probe", p.style + " (jax.grad)"))
    return out


def raised_word(o: Outcome) -> str:
    return "fully" if o.fully_raised else ("partly" if o.raised else "not")


def line(name: str, precision: str, o: Outcome) -> str:
    why = "; ".join(o.reasons + o.fallbacks) or "-"
    return (f"{name:48s} {precision:9s} raised={raised_word(o):6s} ops={o.raised} left={o.softmax_left} "
            f"equal={'yes' if o.values_equal else 'NO (' + f'{o.max_error:.3g}' + ')'} "
            f"{o.seconds:6.2f}s nodes={o.egraph_nodes} | {why}")


def verdict(row: dict | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "ERROR"
    word = {"fully": "yes", "partly": "partly", "not": "no"}[row["raised"]]
    if row["fallbacks"]:
        word += " (fell back)"
    return word if row["equal"] else word + ", VALUES CHANGED"


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per probe: forward and gradient under exact (and fast_math where exact left it)."""
    by = {(r["name"], r["precision"]): r for r in rows}
    names = list(dict.fromkeys(r["name"].removesuffix("_grad") if (r["name"].removesuffix("_grad"), "exact") in by
                               else r["name"] for r in rows))
    lines = ["| probe | style | forward (exact) | grad (exact) | fast_math (fwd / grad) | seconds (fwd / grad) |",
             "|---|---|---|---|---|---|"]
    for n in names:
        fwd, grad = by.get((n, "exact")), by.get((n + "_grad", "exact"))
        fast = [by.get((n, "fast_math")), by.get((n + "_grad", "fast_math"))]
        secs = " / ".join(f"{r['seconds']:.2f}" if r and "seconds" in r else "-" for r in (fwd, grad))
        fm = " / ".join(verdict(r) for r in fast) if any(fast) else "-"
        style = (fwd["style"] if fwd else "").replace("|", "\\|")
        lines.append(f"| {n} | {style} | {verdict(fwd)} | {verdict(grad)} | {fm} | {secs} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs="*", help="print the markdown table of these --json files and stop")
    parser.add_argument("--only", nargs="*", default=[], help="run probes whose name holds one of these")
    parser.add_argument("--no-grad", action="store_true", help="forward probes only")
    parser.add_argument("--json", help="write every outcome here")
    args = parser.parse_args()
    if args.table:
        print("\n".join(markdown_table([r for f in args.table for r in json.loads(pathlib.Path(f).read_text())])))
        return
    rows = []
    for p in PROBES:
        if args.only and not any(s in p.name for s in args.only):
            continue
        for c in cases(p, not args.no_grad):
            for precision in ("exact", "fast_math"):
                try:
                    o = evaluate(c, precision=precision)
                except Exception as exc:  # noqa: BLE001 - a probe reports, it does not stop
                    print(f"{c.name:48s} {precision:9s} ERROR {type(exc).__name__}: {exc}"[:400], flush=True)
                    rows.append({"name": c.name, "style": c.source, "precision": precision, "error": repr(exc)})
                    break
                print(line(c.name, precision, o), flush=True)
                rows.append({"name": c.name, "style": c.source, "precision": precision,
                             "raised": raised_word(o), "ops": o.raised, "left": o.softmax_left,
                             "equal": o.values_equal, "max_error": o.max_error, "seconds": o.seconds,
                             "nodes": o.egraph_nodes, "reasons": list(o.reasons), "fallbacks": list(o.fallbacks)})
                if o.fully_raised and o.values_equal:
                    break
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
