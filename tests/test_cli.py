"""The eqsat-attn command line: rules, explore, bench (CPU smoke paths)."""

from __future__ import annotations

import json

import pytest

from eqsat_attn.cli import main, parse_shapes


def test_rules(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "transpose" in out and "attention_raise" in out


def test_parse_shapes():
    assert parse_shapes("2x8x64,64x64") == [(2, 8, 64), (64, 64)]
    assert parse_shapes("scalar") == [()]
    with pytest.raises(SystemExit):
        parse_shapes("2xq")


def test_explore_block_tiny(capsys, tmp_path):
    svg = tmp_path / "g.svg"
    assert main(["explore", "block", "--shapes", "1x8x16", "--heads", "2", "--cost-model", "roofline-h100",
                 "--svg", str(svg), "--no-show-before"]) == 0
    out = capsys.readouterr().out
    assert "rule-set steps" in out and "predicted cost under roofline-h100" in out
    assert "attention q=" in out  # chosen attention variant
    assert "alternatives" in out  # why
    assert svg.stat().st_size > 0


def test_explore_module_function(capsys, tmp_path, monkeypatch):
    (tmp_path / "userfns.py").write_text(
        "import jax.numpy as jnp\n"
        "def f(x, w):\n"
        "    return jnp.transpose(jnp.tanh(jnp.transpose(x, (0, 2, 1))), (0, 2, 1)) @ w\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["explore", "userfns:f", "--shapes", "2x4x8,8x8", "--rules", "canonical,transpose",
                 "--cost-model", "bytes", "--compare", "bytes,roofline-cpu"]) == 0
    out = capsys.readouterr().out
    assert "no attention op" in out and "cost under bytes" in out


def test_explore_needs_shapes_for_module_function():
    with pytest.raises(SystemExit, match="needs --shapes"):
        main(["explore", "eqsat_attn.examples:transformer_block"])
    with pytest.raises(SystemExit, match="unknown example"):
        main(["explore", "nope"])


@pytest.mark.parametrize("name", ["end-to-end", "cost-model"])
def test_gpu_benches_refuse_on_cpu(name, capsys):
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as info:
        main(["bench", name])
    assert info.value.code == 2
    assert "no GPU found" in capsys.readouterr().err


def test_bench_cost_model_cpu_smoke(tmp_path):
    cal = tmp_path / "cpu.json"
    out = tmp_path / "cm.md"
    assert main(["bench", "cost-model", "--cpu-smoke", "--variants", "3", "--reps", "2", "--calibrate",
                 "--calibration-out", str(cal), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Spearman rank correlation" in text and "Worst mispredictions" in text
    data = json.loads(cal.read_text())
    assert "fitted" in data and "source" in data
    from eqsat_attn.cost import CPU, DeviceSpec

    DeviceSpec.from_json(cal, base=CPU)  # the cost model can read what calibration writes


def test_bench_end_to_end_cpu_smoke(tmp_path):
    out = tmp_path / "e2e.md"
    assert main(["bench", "end-to-end", "--cpu-smoke", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "jax.jit(ea.optimize)" in text and "flax" in text and "dot_product_attention" in text


def test_bench_rule_ablation_runs_on_cpu(tmp_path):
    """The ablation runs where it is asked (CPU here), checks every variant's values and puts
    the cost model's prediction beside each measurement."""
    out = tmp_path / "ablation.md"
    assert main(["bench", "rule-ablation", "--reps", "2", "--drop", "canonical", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["as written", "all rule sets", "without canonical"]
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows)  # max err against the original
    with pytest.raises(SystemExit, match="unknown rule sets"):
        main(["bench", "rule-ablation", "--drop", "no_such_rules"])


def test_bench_scaling_cpu_smoke(tmp_path):
    out = tmp_path / "scaling.md"
    assert main(["bench", "scaling", "--layers", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Where the time goes" in text and "XLA compile" in text
