"""Attention as the libraries' own modules write it (issue 19): tiny random-initialised HF Flax
models (one layer, padding mask) and the MultiHeadAttention modules of Haiku, Flax linen and nnx
and Equinox, optimized forward or under ``jax.grad`` (of the parameters); prints, per module, the
attention ops found, the softmaxes left with the report's reason, the largest relative value
error and the CPU seconds of the first optimization.

    python bench/probe_library_modules.py [--grad] [NAME ...]

``transformers`` (4.x, the last with Flax models) and ``dm-haiku`` are not project
dependencies: a module whose library is missing is reported as skipped. Findings:
bench/results/library-modules-probe-2026-12-08-session18.md.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import eqsat_attn as ea
from eqsat_attn.cost import for_device

B, S, E, H = 2, 16, 64, 4
Module = tuple[Callable, object, tuple]  # fn(params, *inputs), params, inputs

_HF_COMMON = dict(hidden_size=E, num_attention_heads=H, intermediate_size=2 * E, num_hidden_layers=1,
                  vocab_size=128, max_position_embeddings=64)
_SEQ2SEQ = dict(d_model=E, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=2 * E, decoder_ffn_dim=2 * E,
                encoder_attention_heads=H, decoder_attention_heads=H)
#: HF Flax model name -> (config class, model class, config overrides), by attribute of `transformers`
HF_MODELS = {
    "bert": ("BertConfig", "FlaxBertModel", {}),
    "roberta": ("RobertaConfig", "FlaxRobertaModel", {}),
    "electra": ("ElectraConfig", "FlaxElectraModel", dict(embedding_size=E)),
    "albert": ("AlbertConfig", "FlaxAlbertModel", dict(embedding_size=E)),
    "distilbert": ("DistilBertConfig", "FlaxDistilBertModel", dict(dim=E, n_heads=H, n_layers=1, hidden_dim=2 * E)),
    "roformer": ("RoFormerConfig", "FlaxRoFormerModel", dict(embedding_size=E)),
    "gpt2": ("GPT2Config", "FlaxGPT2Model", dict(n_embd=E, n_head=H, n_layer=1, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "FlaxGPTNeoModel", dict(attention_types=[[["local"], 1]], num_layers=1, window_size=8)),
    "gptj": ("GPTJConfig", "FlaxGPTJModel", dict(n_embd=E, n_head=H, n_layer=1, n_positions=64, rotary_dim=8)),
    "opt": ("OPTConfig", "FlaxOPTModel", dict(ffn_dim=2 * E, word_embed_proj_dim=E)),
    "xglm": ("XGLMConfig", "FlaxXGLMModel", dict(d_model=E, ffn_dim=2 * E, num_layers=1)),
    "bloom": ("BloomConfig", "FlaxBloomModel", dict(n_head=H, n_layer=1)),
    "llama": ("LlamaConfig", "FlaxLlamaModel", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "FlaxMistralModel", dict(num_key_value_heads=2, sliding_window=8)),
    "gemma": ("GemmaConfig", "FlaxGemmaModel", dict(num_key_value_heads=1, head_dim=16)),
    "bart": ("BartConfig", "FlaxBartModel", _SEQ2SEQ),
    "mbart": ("MBartConfig", "FlaxMBartModel", _SEQ2SEQ),
    "bigbird_full": ("BigBirdConfig", "FlaxBigBirdModel", dict(attention_type="original_full")),
}


def hf_module(name: str) -> Module:
    import transformers

    config_name, model_name, overrides = HF_MODELS[name]
    config = getattr(transformers, config_name)(**{**_HF_COMMON, **overrides})
    model = getattr(transformers, model_name)(config, seed=0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 100, (B, S)), jnp.int32)
    mask = jnp.asarray(np.arange(S)[None, :] < np.array([S, S - 5])[:, None], jnp.int32)
    extra = {"decoder_input_ids": ids[:, : S // 2]} if name in ("bart", "mbart") else {}

    def fn(params, ids, mask):
        return model(ids, attention_mask=mask, params=params, **extra)[0]

    return fn, model.params, (ids, mask)


def _x() -> jax.Array:
    return jnp.asarray(np.random.default_rng(1).standard_normal((B, S, E)), jnp.float32)


def _keep() -> jax.Array:
    return jnp.asarray(np.arange(S)[None, :] < np.array([S, S - 5])[:, None])


def haiku_mha(mask_kind: str) -> Module:
    import haiku as hk

    mask = _keep()[:, None, None, :] if mask_kind == "padding" else jnp.tril(jnp.ones((S, S), bool))[None, None]

    def forward(x):
        return hk.MultiHeadAttention(num_heads=H, key_size=E // H, w_init=hk.initializers.VarianceScaling(1.0))(
            x, x, x, mask=mask)

    transformed = hk.without_apply_rng(hk.transform(forward))
    x = _x()
    return transformed.apply, transformed.init(jax.random.PRNGKey(0), x), (x,)


def linen_mha(mask_kind: str) -> Module:
    import flax.linen as nn

    module = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, deterministic=True,
                                             normalize_qk=mask_kind == "normalize_qk")
    x = _x()
    mask = {"causal": nn.make_causal_mask(jnp.ones((B, S))), "padding": nn.make_attention_mask(_keep(), _keep()),
            "normalize_qk": None}[mask_kind]
    return (lambda params, x: module.apply(params, x, x, mask=mask)), module.init(jax.random.PRNGKey(0), x, x), (x,)


def nnx_mha() -> Module:
    from flax import nnx

    module = nnx.MultiHeadAttention(num_heads=H, in_features=E, qkv_features=E, decode=False, rngs=nnx.Rngs(0),
                                    deterministic=True)
    graph, state = nnx.split(module)

    def fn(state, x):
        return nnx.merge(graph, state)(x, mask=nnx.make_causal_mask(jnp.ones((B, S))))

    return fn, state, (_x(),)


def equinox_mha() -> Module:
    import equinox as eqx

    module = eqx.nn.MultiheadAttention(num_heads=H, query_size=E, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(module, eqx.is_array)
    causal = jnp.tril(jnp.ones((S, S), bool))

    def fn(params, x):
        attention = eqx.combine(params, static)
        return jax.vmap(lambda row: attention(row, row, row, mask=causal))(x)

    return fn, params, (_x(),)


MODULES: dict[str, Callable[[], Module]] = {
    **{f"hf_{name}": (lambda name=name: hf_module(name)) for name in HF_MODELS},
    "haiku_mha_padding": lambda: haiku_mha("padding"),
    "haiku_mha_causal": lambda: haiku_mha("causal"),
    "linen_mha_causal": lambda: linen_mha("causal"),
    "linen_mha_padding": lambda: linen_mha("padding"),
    "linen_mha_normalize_qk": lambda: linen_mha("normalize_qk"),
    "nnx_mha_causal": nnx_mha,
    "equinox_mha_causal": equinox_mha,
}


def gradient_of(fn: Callable, params, inputs) -> Callable:
    """``jax.grad`` of ``sum(fn(params, *inputs) * cotangent)`` with respect to the parameters."""
    out = jax.eval_shape(fn, params, *inputs)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape), jnp.float32)
    return lambda params, *inputs: jax.grad(lambda p: jnp.sum(fn(p, *inputs) * cotangent))(params)


def probe(name: str, grad: bool) -> str:
    try:
        fn, params, inputs = MODULES[name]()
    except ImportError as error:
        return f"{name:26s} skipped ({error.name} is not installed)"
    except Exception as error:  # noqa: BLE001 - a library's own failure (an API the installed jax removed)
        return f"{name:26s} the module itself fails: {type(error).__name__}: {str(error)[:200]}"
    fn = gradient_of(fn, params, inputs) if grad else fn
    optimized = ea.optimize(fn, cost_model=for_device("h100"))
    start = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = optimized.explain(params, *inputs)
        got = optimized(params, *inputs)
    seconds = time.process_time() - start
    want = fn(params, *inputs)
    error = max(float(jnp.max(jnp.abs(g - w) / (1 + jnp.abs(w)))) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    fallbacks = [str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)]
    lines = [f"{name:26s} attention={len(report.attention)} left={len(report.not_attention)} "
             f"max rel error={error:.1e} cpu={seconds:.1f}s" + (f" FALLBACK {fallbacks}" if fallbacks else "")]
    lines += [f"    {a}" for a in report.attention if not str(a).startswith(("dq", "dk", "dv"))]
    lines += [f"    left: {reason}" for reason in report.not_attention]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grad", action="store_true", help="jax.grad of the parameters instead of the forward")
    parser.add_argument("names", nargs="*", help=f"modules to probe (default: all): {', '.join(MODULES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - MODULES.keys())
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    for name in args.names or MODULES:
        print(probe(name, args.grad), flush=True)


if __name__ == "__main__":
    main()
