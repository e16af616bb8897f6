"""ea.explore: stepping rule sets, extraction, cost-model comparison, why, drawing (CPU, small)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import jax
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn import examples
from eqsat_attn.explore import Comparison, Explanation, Step, cost_model_from_name, program_summary
from eqsat_attn.lower import lower


@pytest.fixture(scope="module")
def saturated():
    """Hand-written einsum attention, saturated with the default rule sets."""
    fn, args = examples.attention_example(batch=1, heads=2, seq=8, head_dim=4)
    ex = ea.explore(fn, *args)
    ex.run(limits=ea.Limits(iterations=30))
    return fn, args, ex


def test_run_step_by_step_records_size_and_rules():
    fn, args = examples.attention_example(batch=1, heads=2, seq=8, head_dim=4)
    ex = ea.explore(fn, *args)
    assert isinstance(ex, ea.Exploration)
    start = ex.size
    first = ex.run("attention_raise")
    assert isinstance(first, Step)
    assert first.iterations == 1 and first.rulesets == ("attention_raise",)
    assert first.nodes_before == start and first.nodes_after != start
    assert any(k.startswith("attention_raise.") for k in first.rules_fired)
    second = ex.run("canonical", "transpose", iterations=2)
    assert second.index == 2 and second.nodes_before == first.nodes_after
    assert [s.index for s in ex.history] == [1, 2]
    assert sum(ex.rules_fired.values()) == sum(first.rules_fired.values()) + sum(second.rules_fired.values())
    assert "step 2" in str(ex) and "<pre>" in ex._repr_html_()


def test_extract_keeps_values(saturated):
    fn, args, ex = saturated
    best = ex.extract("roofline-h100")
    assert best.attention, f"no attention raised:\n{best.program}"
    assert best.cost <= best.original_cost
    flat = ex.captured.flat_args(*args)
    got = lower(best.program, attention_kernel="reference")(*flat)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(fn(*args)), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(0)
    other = [rng.standard_normal(a.shape).astype(np.float32) for a in args]
    np.testing.assert_allclose(np.asarray(lower(best.program, attention_kernel="reference")(*other)[0]),
                               np.asarray(fn(*other)), rtol=1e-5, atol=1e-5)
    assert "cost model roofline-h100" in str(best)


def test_compare_one_row_per_model(saturated):
    _, _, ex = saturated
    models = {"bytes": "bytes", "h100": "roofline-h100", "cpu": cost_model_from_name("roofline-cpu")}
    cmp = ex.compare(models)
    assert isinstance(cmp, Comparison)
    assert [r["model"] for r in cmp.rows] == list(models)
    for row in cmp.rows:
        assert set(row["costs"]) == set(models)
        assert row["attention"] >= 1
        assert row["costs"][row["model"]] <= cmp.original["costs"][row["model"]]
    text = str(cmp)
    assert "cost under h100" in text and "(original)" in text
    assert "<table" in cmp._repr_html_() and "★" in cmp._repr_html_()
    from rich.table import Table

    assert isinstance(cmp.table(), Table) and cmp.table().row_count == len(models) + 1


def test_why_prices_alternatives_of_attention(saturated):
    _, _, ex = saturated
    why = ex.why("attention", "roofline-h100")
    assert isinstance(why, Explanation)
    assert why.classes, str(why)
    cls = why.classes[0]
    assert len(cls.alternatives) >= 2
    layouts = {a.layouts.get("v") for a in cls.alternatives if a.layouts}
    assert {"BHSD", "BHDS"} <= layouts  # the standard and the transposed-V form are both there
    assert all(np.isfinite(a.total) for a in cls.alternatives if a.layouts)
    best = cls.best
    assert best.total == min(a.total for a in cls.alternatives)
    assert "attention" in str(why) and "->" in why.format(limit=2)


def test_why_prices_packed_attention_members():
    """An e-class of attention also holds packed attention (over one packed projection) and the
    unfused matmuls: every member is priced, none breaks the explanation."""
    fn, args = examples.attention_vt_example()
    ex = ea.explore(fn, *args)
    ex.saturate()
    why = ex.why("attention", "roofline-h100")
    described = [a.description for c in why.classes for a in c.alternatives]
    assert any(d.startswith("packed_attention") for d in described), described
    assert all(np.isfinite(a.total) for c in why.classes for a in c.alternatives)
    best = ex.extract("roofline-h100")
    assert best.program.count("packed_attention") == 1 and "1 attention" in str(best)


def test_why_without_attention_says_so():
    fn, args = examples.attention_example(batch=1, heads=2, seq=8, head_dim=4)
    ex = ea.explore(fn, *args)
    assert ex.why("attention").classes == []
    assert "no e-class" in str(ex.why("attention"))


def test_svg_written(saturated, tmp_path):
    _, _, ex = saturated
    path = tmp_path / "egraph.svg"
    svg = ex.svg(path)
    assert path.stat().st_size > 0 and svg == path.read_text()
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "attention" in svg
    small = ex.svg(tmp_path / "summary.svg", max_nodes=5)  # too large to draw at this limit: a summary
    assert "too large to draw" in small
    assert "digraph" in ex.dot()
    assert "<svg" in ex._repr_html_()


def test_summary_of_programs():
    fn, args = examples.block_example(examples.BlockShape(batch=1, seq=8, embed=16, heads=2))
    ex = ea.explore(fn, *args)
    s = program_summary(ex.program)
    assert s["attention"] == 0 and s["nodes"] > 50 and s["transposes"] >= 4
    assert ex.summary()["e-nodes"] > 0


def test_unknown_cost_model():
    with pytest.raises(ValueError, match="unknown cost model"):
        cost_model_from_name("nope")


def test_jax_arrays_are_accepted():
    fn, args = examples.attention_example(batch=1, heads=1, seq=4, head_dim=2)
    ex = ea.explore(jax.jit(fn), *args)
    assert len(ex.program.inputs) == 3
