"""bench/probe_library_modules.py: a library's own attention module is probed (raised, values
checked), and a module whose library is not installed is reported as skipped, not an error."""

from __future__ import annotations

import sys

from bench_scripts import load_bench

probe_script = load_bench("probe_library_modules", "probe_library_modules")


def test_equinox_attention_is_raised_with_its_values():
    line = probe_script.probe("equinox_mha_causal", grad=False)
    assert "attention=1 left=0" in line and "FALLBACK" not in line, line
    assert "causal" in line, line
    assert float(line.split("max rel error=")[1].split()[0]) < 1e-5, line


def test_a_missing_library_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert "skipped (transformers is not installed)" in probe_script.probe("hf_bert", grad=False)
