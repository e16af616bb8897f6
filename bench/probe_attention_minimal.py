"""Minimal reproductions of the gaps bench/probe_attention_spellings.py found (issue 19).

    python bench/probe_attention_minimal.py [--only SUBSTR ...]

Each program is the smallest one that shows its gap; printed the same way as the probe script.
A few are controls, near spellings that *are* raised, which narrow a gap down:
``min_bias_plus_bool_mask_grad``, ``min_bias_plus_causal_grad``, ``min_bf16_scores_cast_f32_grad``
and ``min_scores_sum_of_two_dots``. Findings: bench/results/attention-probe-2026-12-07.md.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from probe_attention_spellings import BF16, BHSD, BSHD, D, F32, H, PROBES, S, B, Probe, tensors, main  # noqa: E402
from attention_corpus import _normal  # noqa: E402  (tests/ is on the path now)

PROBES.clear()


def probe(name, make_args, grad_argnums=(0, 1, 2)):
    def register(fn):
        PROBES.append(Probe(name, "minimal", fn, make_args, grad_argnums))
        return fn

    return register


def tri():
    return jnp.tril(jnp.ones((S, S), bool))


@probe("min_bias_plus_bool_mask_grad", tensors(BHSD, BHSD, BHSD, (B, 1, S, S),
                                                  extra=(lambda rng: jnp.arange(S) < jnp.array([[11], [S]]),)))
def bias_bool(q, k, v, bias, keep):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias
    s = jnp.where(keep[:, None, None, :], s, -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_bias_plus_causal_grad", tensors(BHSD, BHSD, BHSD, (1, H, S, S)))
def bias_causal(q, k, v, bias):
    s = jnp.where(tri(), jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_bf16_pet_f32_grad", tensors(BHSD, BHSD, BHSD, dtype=BF16))
def bf16_pet(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(BF16), v)


@probe("min_bf16_scores_cast_f32_grad", tensors(BHSD, BHSD, BHSD, dtype=BF16))
def bf16_cast(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(F32)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(BF16), v)


@probe("min_scan_attention_grad", tensors((2, B, H, S, D)), grad_argnums=(0,))
def scan_attn(xs):
    def body(h, x):
        s = jnp.einsum("bhqd,bhkd->bhqk", h, x)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), x), None

    return jax.lax.scan(body, xs[0], xs)[0]


@probe("min_gqa_scores_reshaped_5d_to_4d", tensors((B, S, H, D), (B, S, 2, D), (B, S, 2, D)))
def gqa_reshape(q, k, v):
    s = jnp.einsum("btkgd,bskd->btkgs", q.reshape(B, S, 2, 2, D), k).reshape(B, S, H, S)
    p = jax.nn.softmax(s, axis=-1).reshape(B, S, 2, 2, S)
    return jnp.einsum("btkgs,bskd->btkgd", p, v)


@probe("min_mha_scores_reshape_roundtrip", tensors(BHSD, BHSD, BHSD))
def reshape_roundtrip(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).reshape(B * H, S, S)
    p = jax.nn.softmax(s, axis=-1).reshape(B, H, S, S)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@probe("min_query_without_seq_axis", tensors((B, H, D), BHSD, BHSD))
def q_no_seq(q, k, v):
    return jnp.einsum("bhk,bhkd->bhd", jax.nn.softmax(jnp.einsum("bhd,bhkd->bhk", q, k), -1), v)


@probe("min_query_without_batch_axis", tensors((4, D), (B, S, D), (B, S, D)))
def q_no_batch(q, k, v):
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.einsum("qd,bkd->bqk", q, k), -1), v)


@probe("min_divide_by_traced_scalar", tensors(BHSD, BHSD, BHSD, extra=(lambda rng: jnp.float32(0.7),)))
def div_traced(q, k, v, tau):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / tau, -1), v)


@probe("min_per_head_scale", tensors(BHSD, BHSD, BHSD, (H, 1, 1)))
def per_head(q, k, v, scale):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale, -1), v)


@probe("min_softmax_where_window", tensors(BHSD, BHSD, BHSD))
def where_window(q, k, v):
    i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1, where=(j <= i) & (i - j < 4)), v)


@probe("min_softmax_over_axis_minus2_grad", tensors(BHSD, BHSD, BHSD))
def axis_m2(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bhkd,bhqd->bhkq", k, q), axis=-2)
    return jnp.einsum("bhkq,bhkd->bhqd", p, v)


@probe("min_hand_softmax_max_not_stopped_grad", tensors(BHSD, BHSD, BHSD))
def hand_max(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("bhqk,bhkd->bhqd", e / e.sum(-1, keepdims=True), v)


@probe("min_scores_sum_of_two_dots", tensors(BHSD, BHSD, BHSD, BHSD, BHSD))
def two_dots(q1, q2, k1, k2, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q1, k1) + jnp.einsum("bhqd,bhkd->bhqk", q2, k2)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_softcap_grad", tensors(BHSD, BHSD, BHSD))
def softcap(q, k, v):
    s = 50.0 * jnp.tanh(jnp.einsum("bhqd,bhkd->bhqk", q, k) / 50.0)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_scores_mul_sum", tensors(BHSD, BHSD, BHSD))
def mul_sum(q, k, v):
    s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_grad_crash_second_score_dot_kv_shared", tensors(BHSD, BHSD, BHSD, (B, S, D), BHSD))
def crash(q1, q2, k1, k2, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q1, k1) + jnp.einsum("bhqd,bkd->bhqk", q2, k2)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_jax_dpa_batch_bias_causal_grad_lowering", tensors(BSHD, BSHD, BSHD, (B, 1, S, S)))
def dpa_bias_causal(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation="xla")


@probe("min_scale_after_bias", tensors(BHSD, BHSD, BHSD, (B, H, S, S)))
def scale_after_bias(q, k, v, bias):
    s = (jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias) * 0.3
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


@probe("min_grad_wrt_v_only", tensors(BHSD, BHSD, BHSD), grad_argnums=(2,))
def grad_v_only(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), -1), v)


def _f16_overflowing(rng):
    q, k, v = (_normal(rng, BHSD, jnp.float16) for _ in range(3))
    return q.at[0, 0, 3].set(300.0), k.at[0, 0, 2].set(300.0), v  # score 8·300² > 65504


@probe("min_f16_score_overflow_values_change", _f16_overflowing)
def f16_overflow(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), -1), v)


def _f16_padded(rng):
    q, k, v = (_normal(rng, BHSD, jnp.float16) * 4 for _ in range(3))
    return q, k, v, jnp.array([[True] * S, [False] * S])  # batch 1 fully padded


@probe("min_f16_finfo_min_bias_values_change", _f16_padded)
def f16_bias(q, k, v, keep):
    bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float16).min).astype(jnp.float16)[:, None, None, :]
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, -1), v)


if __name__ == "__main__":
    main()
