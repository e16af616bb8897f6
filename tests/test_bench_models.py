"""bench/models.py (issue 22): the real-model benchmark runs at tiny shapes on CPU and writes
its page; its models are the architectures they claim to be."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bench_scripts import load_bench

models = load_bench("models", "bench_models")
zoo = models.model_zoo


def test_cpu_smoke_writes_the_page_with_checked_values(tmp_path) -> None:
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit):
            models.main(["--models", "gpt2", "--layers", "1", "--out", str(tmp_path / "x.md")])
    out = tmp_path / "smoke.md"
    code = models.main(["--cpu-smoke", "--models", "llama", "--layers", "1", "--reps", "2", "--rounds", "1",
                        "--probe-repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert code == 0 and "- device:" in text and "- date:" in text and "--cpu-smoke" in text
    assert "## Optimize time vs XLA compile time" in text and "| llama | L1 E32 H4 KV2" in text
    section = text.split("A second process with the disk cache")[1].split("\n\n")[1]  # its table
    cached = [line for line in section.splitlines() if line.startswith("| llama |")]
    assert len(cached) == 1 and cached[0].endswith("| yes |")  # the embedding's gather did not keep it off the disk
    rows = [line for line in text.splitlines() if line.startswith("| llama | forward") or
            line.startswith("| llama | train step")]
    assert len(rows) == 7 and all("| ok |" in row for row in rows)  # 3 forward, 4 train-step rows
    assert "FAIL" not in text


def test_llama_attention_is_grouped_and_rotary_keeps_norms() -> None:
    """GQA: 4 query heads read 2 KV heads (K/V projections half as wide); rotary embedding is a
    rotation (norms kept) that depends on position."""
    built = zoo.build(zoo.SMOKE["llama"])
    layer = built.params["params"]["layers_0"]
    assert layer["q_proj"]["kernel"].shape == (32, 32) and layer["k_proj"]["kernel"].shape == (32, 16)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 8))
    x = x.at[0, 0, 0, 0].set(3e38).at[0, 1, 0, 1].set(-0.0)  # near-overflow and a signed zero
    y = zoo.rotary(x)
    np.testing.assert_allclose(jnp.linalg.norm(y[0, 2:], axis=-1), jnp.linalg.norm(x[0, 2:], axis=-1), rtol=1e-5)
    same = jnp.broadcast_to(x[:, :1], x.shape)  # one vector at every position: rotated differently
    assert not np.allclose(zoo.rotary(same)[0, 1], zoo.rotary(same)[0, 2])


def test_bert_padding_is_ignored_and_gpt2_is_causal() -> None:
    """BERT: tokens behind the padding mask do not change the unpadded positions' outputs;
    GPT-2: a later token does not change earlier positions' logits."""
    cfg = dataclasses.replace(zoo.SMOKE["bert"], layers=1)
    bert = zoo.build(cfg)
    tokens, mask = bert.inputs
    mask = mask.at[0].set(jnp.arange(cfg.seq) < 5)
    changed = tokens.at[0, 5:].set((tokens[0, 5:] + 1) % cfg.vocab)
    a, b = bert.apply(bert.params, tokens, mask), bert.apply(bert.params, changed, mask)
    np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, 5:], b[0, 5:])
    gpt = zoo.build(dataclasses.replace(zoo.SMOKE["gpt2"], layers=1))
    (tokens,) = gpt.inputs
    later = tokens.at[:, -1].set((tokens[:, -1] + 1) % gpt.cfg.vocab)
    a, b = gpt.apply(gpt.params, tokens), gpt.apply(gpt.params, later)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, -1], b[:, -1])


def test_relative_error_sees_nan_and_inf_mismatches() -> None:
    want = {"a": jnp.array([1.0, -0.0, jnp.inf]), "b": jnp.array([2.0, jnp.nan])}
    assert models.relative_error(want, want) == 0.0
    assert models.relative_error({"a": want["a"], "b": jnp.array([2.0, 1.0])}, want) == float("inf")
    assert models.relative_error({"a": jnp.array([1.0, 0.0, jnp.inf]), "b": want["b"]}, want) == 0.0
    assert models.relative_error({"a": jnp.array([1.5, 0.0, jnp.inf]), "b": want["b"]}, want) == pytest.approx(0.25)
    assert models.relative_error({"a": jnp.array([1.0, 0.0, -jnp.inf]), "b": want["b"]}, want) == float("inf")
    assert models.relative_error({"a": jnp.array([1.0, 1e-40, jnp.inf]), "b": want["b"]}, want) < 1e-30
