"""Real model architectures in Flax linen with random weights, for bench/models.py (issue 22).

``transformers`` is not installed and no weights can be downloaded, so the three families are
written here after their reference implementations (Hugging Face's modeling files):

- GPT-2 small: learned positions, pre-norm LayerNorm, fused QKV projection (``c_attn``), causal
  softmax attention with the mask filled by the dtype's minimum, tanh-GELU MLP, final LayerNorm,
  logits through the tied token embedding.
- Llama (3-8B-like): RMSNorm, rotary position embeddings (half-split rotation), grouped-query
  attention (KV heads repeated to the query heads, as ``repeat_kv``), SwiGLU MLP, untied head.
- BERT base: token, position and token-type embeddings with LayerNorm, post-norm layers, a
  padding mask turned into an additive bias ((1 - mask) * dtype minimum), erf-GELU, MLM head.

``attention`` picks how each model computes attention: "einsum" (written out, as the reference
implementations do), or "cudnn" / "xla" (``jax.nn.dot_product_attention`` with that
implementation; the cuDNN-substituted model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("einsum", "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model's sizes. ``kv_heads`` < ``heads`` is grouped-query attention (Llama only)."""

    family: str  # "gpt2" | "llama" | "bert"
    layers: int
    embed: int
    heads: int
    mlp: int
    vocab: int
    seq: int
    batch: int
    kv_heads: int = 0  # 0: as many as ``heads``
    max_positions: int = 0  # learned position table size (0: ``seq``)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        if self.embed % self.heads or self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"embed {self.embed} must split into {self.heads} heads, and those into "
                             f"{self.kv_heads} KV groups")

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    def label(self) -> str:
        gqa = f" KV{self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else ""
        return (f"L{self.layers} E{self.embed} H{self.heads}{gqa} MLP{self.mlp} V{self.vocab} "
                f"B{self.batch} S{self.seq}")


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, causal: bool,
            attention: str, dtype: Any) -> jax.Array:
    """Attention over [B, S, H, D] operands (K, V already repeated to H heads): written out as the
    reference implementations do, or through jax.nn.dot_product_attention. ``bias``: [B, 1, 1, S]."""
    if attention != "einsum":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, implementation=attention)
    d = q.shape[-1]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, S, D]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.asarray(d ** 0.5, dtype)
    if causal:
        s = q.shape[2]
        keep = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


# --- GPT-2 ---------------------------------------------------------------------------------------

class GPT2Block(nn.Module):
    cfg: ModelConfig
    dtype: Any
    attention: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        b, s, e = x.shape
        h = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln_1")(x)
        qkv = nn.Dense(3 * e, dtype=dt, param_dtype=dt, name="c_attn")(h)
        q, k, v = (t.reshape(b, s, cfg.heads, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        a = _attend(q, k, v, None, True, self.attention, dt).reshape(b, s, e)
        x = x + nn.Dense(e, dtype=dt, param_dtype=dt, name="c_proj")(a)
        h = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln_2")(x)
        h = nn.gelu(nn.Dense(cfg.mlp, dtype=dt, param_dtype=dt, name="c_fc")(h), approximate=True)
        return x + nn.Dense(e, dtype=dt, param_dtype=dt, name="mlp_c_proj")(h)


class GPT2(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        wte = nn.Embed(cfg.vocab, cfg.embed, dtype=dt, param_dtype=dt, name="wte")
        wpe = nn.Embed(cfg.max_positions or cfg.seq, cfg.embed, dtype=dt, param_dtype=dt, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[1]))[None]
        for i in range(cfg.layers):
            x = GPT2Block(cfg, dt, self.attention, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln_f")(x)
        return wte.attend(x)  # tied head


# --- Llama ---------------------------------------------------------------------------------------

def rotary(x: jax.Array, theta: float = 500_000.0) -> jax.Array:
    """Rotary embedding of [B, S, H, D] by position, Llama's half-split form (``rotate_half``)."""
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(s, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LlamaBlock(nn.Module):
    cfg: ModelConfig
    dtype: Any
    attention: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        b, s, e = x.shape
        kv, d = cfg.kv_heads or cfg.heads, cfg.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        h = nn.RMSNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="input_layernorm")(x)
        q = rotary(dense(cfg.heads * d, "q_proj")(h).reshape(b, s, cfg.heads, d))
        k = rotary(dense(kv * d, "k_proj")(h).reshape(b, s, kv, d))
        v = dense(kv * d, "v_proj")(h).reshape(b, s, kv, d)
        groups = cfg.heads // kv  # repeat_kv: [B, S, KV, D] -> [B, S, KV * groups, D]
        k, v = (jnp.broadcast_to(t[:, :, :, None], (b, s, kv, groups, d)).reshape(b, s, cfg.heads, d) for t in (k, v))
        a = _attend(q, k, v, None, True, self.attention, dt).reshape(b, s, e)
        x = x + dense(e, "o_proj")(a)
        h = nn.RMSNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="post_attention_layernorm")(x)
        h = nn.silu(dense(cfg.mlp, "gate_proj")(h)) * dense(cfg.mlp, "up_proj")(h)
        return x + dense(e, "down_proj")(h)


class Llama(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        x = nn.Embed(cfg.vocab, cfg.embed, dtype=dt, param_dtype=dt, name="embed_tokens")(tokens)
        for i in range(cfg.layers):
            x = LlamaBlock(cfg, dt, self.attention, name=f"layers_{i}")(x)
        x = nn.RMSNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="norm")(x)
        return nn.Dense(cfg.vocab, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x)


# --- BERT ----------------------------------------------------------------------------------------

class BertLayer(nn.Module):
    cfg: ModelConfig
    dtype: Any
    attention: str

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        b, s, e = x.shape
        split = lambda t: t.reshape(b, s, cfg.heads, cfg.head_dim)  # noqa: E731
        q, k, v = (split(nn.Dense(e, dtype=dt, param_dtype=dt, name=n)(x)) for n in ("query", "key", "value"))
        a = _attend(q, k, v, bias, False, self.attention, dt).reshape(b, s, e)
        a = nn.Dense(e, dtype=dt, param_dtype=dt, name="attention_output")(a)
        x = nn.LayerNorm(epsilon=1e-12, dtype=dt, param_dtype=dt, name="attention_layernorm")(x + a)
        h = nn.gelu(nn.Dense(cfg.mlp, dtype=dt, param_dtype=dt, name="intermediate")(x), approximate=False)
        h = nn.Dense(e, dtype=dt, param_dtype=dt, name="output")(h)
        return nn.LayerNorm(epsilon=1e-12, dtype=dt, param_dtype=dt, name="output_layernorm")(x + h)


class Bert(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        word = nn.Embed(cfg.vocab, cfg.embed, dtype=dt, param_dtype=dt, name="word_embeddings")
        positions = jnp.arange(tokens.shape[1])[None]
        x = (word(tokens) + nn.Embed(cfg.max_positions or cfg.seq, cfg.embed, dtype=dt, param_dtype=dt,
                                     name="position_embeddings")(positions)
             + nn.Embed(2, cfg.embed, dtype=dt, param_dtype=dt, name="token_type_embeddings")(jnp.zeros_like(tokens)))
        x = nn.LayerNorm(epsilon=1e-12, dtype=dt, param_dtype=dt, name="embeddings_layernorm")(x)
        # [B, S] of 1 (attend) / 0 (padding) -> additive [B, 1, 1, S] bias, as get_extended_attention_mask
        bias = ((1.0 - attention_mask[:, None, None, :].astype(dt)) * jnp.finfo(dt).min).astype(dt)
        for i in range(cfg.layers):
            x = BertLayer(cfg, dt, self.attention, name=f"layer_{i}")(x, bias)
        h = nn.gelu(nn.Dense(cfg.embed, dtype=dt, param_dtype=dt, name="mlm_transform")(x), approximate=False)
        h = nn.LayerNorm(epsilon=1e-12, dtype=dt, param_dtype=dt, name="mlm_layernorm")(h)
        return word.attend(h)  # MLM logits through the tied word embeddings


FAMILIES: dict[str, type[nn.Module]] = {"gpt2": GPT2, "llama": Llama, "bert": Bert}

#: the real sizes (GPT-2 small; Llama 3 8B; BERT base, uncased)
REAL: dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", layers=12, embed=768, heads=12, mlp=3072, vocab=50257, seq=128, batch=8,
                        max_positions=1024),
    "llama": ModelConfig("llama", layers=32, embed=4096, heads=32, kv_heads=8, mlp=14336, vocab=128256,
                         seq=2048, batch=1),
    "bert": ModelConfig("bert", layers=12, embed=768, heads=12, mlp=3072, vocab=30522, seq=128, batch=8,
                        max_positions=512),
}

#: tiny sizes for --cpu-smoke (the same architectures)
SMOKE: dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", layers=2, embed=32, heads=4, mlp=128, vocab=97, seq=16, batch=2, max_positions=32),
    "llama": ModelConfig("llama", layers=2, embed=32, heads=4, kv_heads=2, mlp=96, vocab=97, seq=16, batch=2),
    "bert": ModelConfig("bert", layers=2, embed=32, heads=4, mlp=128, vocab=97, seq=16, batch=2, max_positions=32),
}


@dataclasses.dataclass(frozen=True)
class Built:
    """A model's forward ``apply(params, *inputs)``, its parameters and inputs (concrete arrays,
    or jax.ShapeDtypeStruct when built abstract) and the training targets."""

    cfg: ModelConfig
    apply: Callable[..., jax.Array]
    params: Any
    inputs: tuple[Any, ...]
    labels: Any
    dtype: Any = jnp.float32


def build(cfg: ModelConfig, dtype: Any = jnp.float32, attention: str = "einsum", abstract: bool = False,
          seed: int = 0) -> Built:
    """The model with random weights (``abstract``: parameters and inputs as ShapeDtypeStructs,
    nothing allocated: for tracing and compiling at sizes that do not fit in memory)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    module = FAMILIES[cfg.family](cfg, dtype, attention)
    k_tokens, k_init, k_mask = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (cfg.batch, cfg.seq)
    if abstract:
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
        mask = (jax.ShapeDtypeStruct(shape, jnp.int32),) if cfg.family == "bert" else ()
        inputs: tuple[Any, ...] = (tokens, *mask)
        params = jax.eval_shape(lambda *xs: module.init(k_init, *xs), *inputs)
        labels = jax.ShapeDtypeStruct(shape, jnp.int32)
    else:
        tokens = jax.random.randint(k_tokens, shape, 0, cfg.vocab, dtype=jnp.int32)
        if cfg.family == "bert":  # each row keeps a random-length prefix (>= 1 token), the rest padding
            lengths = jax.random.randint(k_mask, (cfg.batch, 1), 1, cfg.seq + 1)
            inputs = (tokens, (jnp.arange(cfg.seq)[None] < lengths).astype(jnp.int32))
        else:
            inputs = (tokens,)
        params = module.init(k_init, *inputs)
        labels = jnp.roll(tokens, -1, axis=1) if cfg.family != "bert" else tokens
    return Built(cfg, module.apply, params, inputs, labels, dtype)


def with_attention(built: Built, attention: str) -> Built:
    """``built`` (same weights and inputs) with its attention computed by ``attention``."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    module = FAMILIES[built.cfg.family](built.cfg, built.dtype, attention)
    return dataclasses.replace(built, apply=module.apply)
