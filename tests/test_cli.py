"""The eqsat-attn command line: rules, explore, bench (CPU smoke paths)."""

from __future__ import annotations

import json

import pytest

from eqsat_attn.cli import UsageError, import_target, main, parse_shapes


def test_rules(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "transpose" in out and "attention_raise" in out


def test_parse_shapes():
    assert parse_shapes("2x8x64,64x64") == [(2, 8, 64), (64, 64)]
    assert parse_shapes("scalar") == [()]
    with pytest.raises(UsageError, match="bad shape '2xq'"):
        parse_shapes("2xq")
    with pytest.raises(UsageError, match="cannot be negative"):
        parse_shapes("2x-3")


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


def one_error_line(capsys) -> str:
    """The only stderr line of a usage mistake (nothing on stdout, no traceback)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqsat-attn: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["explore", "eqsat_attn.examples:transformer_block"], "needs --shapes"),
        (["explore", "nope"], "unknown example 'nope'; built-in: block"),
        (["explore", "no_such_module_xyz:f", "--shapes", "2"], "cannot import module 'no_such_module_xyz'"),
        (["explore", "eqsat_attn.examples:no_such_fn", "--shapes", "2"], "has no 'no_such_fn'"),
        (["explore", "eqsat_attn.examples:EXAMPLES", "--shapes", "2"], "is a dict, not a function"),
        (["explore", "block", "--shapes", "2xq"], "bad shape '2xq' in --shapes"),
        (["explore", "block", "--shapes", "2x16"], "--shapes for block is BxSxE"),
        (["explore", "attention", "--shapes", "2x16"], "--shapes for attention is BxHxSxD"),
        (["explore", "block", "--dtype", "f7"], "unknown --dtype 'f7'; use one of f32"),
        (["explore", "block", "--cost-model", "roofline-a100"], "--cost-model: unknown cost model 'roofline-a100'"),
        (["explore", "block", "--compare", "bytes,nope"], "--compare: unknown cost model 'nope'"),
        (["explore", "block", "--rules", "canonical,nope"], "--rules: unknown rule set 'nope'"),
        (["explore", "block", "--rules", "missing_rules.py"], "--rules: rule file"),
        (["explore", "block", "--iterations", "0"], "--iterations must be at least 1, got 0"),
        (["explore", "block", "--iterations", "-2"], "--iterations must be at least 1, got -2"),
        (["explore", "block", "--iterations", "two"], "invalid int value: 'two'"),
        (["explore", "block", "--seconds", "0"], "--seconds must be positive"),
        (["explore", "block", "--shapes", "1x8x16", "--heads", "3"], "--heads 3 must divide the embedding size E=16"),
        (["explore", "block", "--heads", "0"], "--heads must be at least 1"),
        (["explore", "block", "--svg", "no_such_folder/g.svg"], "its folder does not exist"),
        (["explore"], "required: target"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_mistakes_print_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths above are in an empty folder
    assert main(argv) == 2
    assert says in one_error_line(capsys)


def test_module_that_fails_to_import_or_to_trace_is_a_usage_mistake(capsys, tmp_path, monkeypatch):
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('half-written model')\n")
    (tmp_path / "matmul_mod.py").write_text("def f(x, w):\n    return x @ w\n")
    monkeypatch.chdir(tmp_path)
    assert main(["explore", "raising_mod:f", "--shapes", "2"]) == 2
    assert "RuntimeError: half-written model" in one_error_line(capsys)
    assert main(["explore", "matmul_mod:f", "--shapes", "2x3"]) == 2
    assert "does not take 1 arguments" in one_error_line(capsys)
    assert main(["explore", "matmul_mod:f", "--shapes", "2x3,4x5"]) == 2
    assert "tracing matmul_mod:f" in one_error_line(capsys)


def test_files_in_the_working_directory_do_not_shadow_installed_modules(tmp_path, monkeypatch):
    import colorsys
    import os
    import sys

    (tmp_path / "colorsys.py").write_text("raise RuntimeError('shadowed the standard library')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "colorsys")
    monkeypatch.setattr(sys, "path", list(sys.path))
    fn = import_target("colorsys:rgb_to_hsv")
    assert fn.__module__ == "colorsys" and not fn.__code__.co_filename.startswith(str(tmp_path))
    assert sys.path[0] != os.getcwd() and sys.path[-1] == os.getcwd()


def test_no_traceback_from_the_installed_command(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "eqsat_attn.cli", "explore", "block", "--cost-model", "nope"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "unknown cost model 'nope'" in done.stderr


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
