"""Explorer pictures: focused e-graph views, the chosen program marked, costs in labels, width
caps, folding, the why bar chart, the comparison table and the CLI flags (CPU, no Graphviz needed)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

import eqsat_attn as ea
from eqsat_attn import cli, examples, explore_draw
from eqsat_attn.choices import cost_model_from_name
from eqsat_attn.explore import _fmt_cost
from eqsat_attn.explore_draw import svg_width_px
from eqsat_attn.explore_graph import ATTENTION_CTORS, price

MODEL = "roofline-h100"


@pytest.fixture(scope="module")
def block():
    """The built-in transformer block (small shapes: the e-graph's size does not depend on them), saturated."""
    fn, args = examples.block_example(examples.BlockShape(batch=1, seq=8, embed=16, heads=2))
    ex = ea.explore(fn, *args)
    ex.run(limits=ea.Limits(iterations=30))
    best = ex.extract(MODEL)
    return ex, best


def _drawn_nodes(svg: str) -> list[str]:
    """The e-node lines of a built-in drawing (each an <g> with a <title>)."""
    root = ET.fromstring(svg)
    return [g.find("{http://www.w3.org/2000/svg}title").text for g in root.iter("{http://www.w3.org/2000/svg}g")
            if g.find("{http://www.w3.org/2000/svg}title") is not None]


def _drawn_classes(svg: str) -> set[str]:
    return set(re.findall(r">(c\d+|l\d+)[ <]", svg))


def _plain_neighbourhood(view, focus: set[str], depth: int) -> set[str]:
    """Every e-class within ``depth`` hops along any e-node (an upper bound of what is drawn)."""
    seen, frontier = set(focus), set(focus)
    for _ in range(depth):
        nxt = set()
        for c in frontier:
            nxt |= {ch for k in view.classes[c] for ch in view.nodes[k].children}
            nxt |= {n.eclass for n in view.nodes.values() if c in n.children}
        frontier = nxt - seen
        seen |= nxt
    return seen


def test_focus_limits_the_drawing_to_the_neighbourhood(block):
    ex, _ = block
    view = ex.view()
    attention = view.resolve_focus("attention")
    assert attention == {n.eclass for n in view.nodes.values() if n.ctor in ATTENTION_CTORS} and attention
    whole = ex.picture()
    assert whole.node_count == len(view.nodes)
    for depth in (0, 1, 2):
        svg = ex.svg(focus="attention", depth=depth, engine="builtin")
        nodes, classes = _drawn_nodes(svg), _drawn_classes(svg)
        picture = ex.picture("attention", depth=depth)
        assert len(nodes) == picture.node_count < len(view.nodes) // 4
        assert {view.short_id(c) for c in attention} <= classes
        assert classes == {view.short_id(c) for c in picture.classes}
        assert set(picture.classes) <= _plain_neighbourhood(view, attention, depth)
        assert all(len(pc.nodes) <= 4 for pc in picture.classes.values())  # the cheapest alternatives
        if depth == 0:
            assert set(picture.classes) == attention
    assert len(ex.picture("attention", depth=1).classes) < len(ex.picture("attention", depth=2).classes)
    # an e-class id, an op name and a program node focus too
    some = next(iter(attention))
    assert set(ex.picture(view.short_id(some), depth=0).classes) == {some}
    assert set(ex.picture("softmax", depth=0).classes) == {n.eclass for n in view.nodes.values() if n.ctor == "softmax"}
    named = next(c for c, n in view.names.items() if n.startswith("%"))
    assert set(ex.picture(view.names[named].split(",")[0], depth=0).classes) == {named}


def test_chosen_program_is_marked(block):
    ex, best = block
    model = best.model
    pricing = ex.pricing()
    assert pricing.model is model  # pictures price under the last extraction's model
    # the marked e-nodes are the extracted program: same cost as egglog's extractor reported
    assert math.isclose(sum(pricing.own[k] for k in pricing.chosen), best.extracted_cost, rel_tol=1e-9)
    assert math.isclose(sum(pricing.own[k] for k in pricing.chosen), best.cost, rel_tol=1e-6)
    (info,) = best.attention
    picture = ex.picture("attention")
    chosen_attention = [n for pc in picture.classes.values() for n in pc.nodes
                        if n.chosen and n.text.startswith("attention")]
    assert len(chosen_attention) == 1
    text = chosen_attention[0].text
    assert f"q={info.q_layout} k={info.k_layout} v={info.v_storage} o={info.o_layout}" in text
    assert ("causal" in text) == info.causal
    assert text in picture.title[2]  # "chosen attention: ..."
    svg = ex.svg(focus="attention", engine="builtin")
    bold = re.findall(r'<text [^>]*font-weight="bold">([^<]*)</text>', svg)
    assert any(t.startswith(text) for t in bold)
    marked = sum(1 for pc in picture.classes.values() for n in pc.nodes if n.chosen)
    assert svg.count(f'fill="{explore_draw._CHOSEN_FILL}"') == marked > 1
    chosen_edges = [e for e in picture.edges if e[2]]
    assert chosen_edges and all(e[0] in pricing.chosen for e in chosen_edges)
    assert svg.count(f'stroke="{explore_draw._CHOSEN}" stroke-width="2.4"') == len(chosen_edges)
    dot = ex.dot(focus="attention")
    assert dot.startswith("digraph") and dot.count("penwidth=2.5") == len(chosen_edges)


def test_costs_appear_in_labels(block):
    ex, best = block
    pricing = ex.pricing()
    view = ex.view()
    fmt = lambda v: _fmt_cost(v, best.model)  # noqa: E731
    picture = ex.picture("attention", depth=1)
    for c, pc in picture.classes.items():
        assert f"cheapest {fmt(pricing.class_cost[c])}" in pc.title
        totals = [pricing.total[n.key] for n in pc.nodes]
        assert min(totals) == pytest.approx(pricing.class_cost[c], rel=1e-9)
        for n in pc.nodes:
            assert n.costs == f"own {fmt(pricing.own[n.key])} · total {fmt(pricing.total[n.key])}"
            assert pricing.total[n.key] >= pricing.own[n.key]
    svg = ex.svg(focus="attention", depth=1, engine="builtin")
    assert all(" · total " in line for line in _drawn_nodes(svg))
    # the same pricing as why: an attention e-class's cheapest total matches why's cheapest alternative
    why = ex.why("attention", best.model, max_alternatives=200)
    focus_costs = {pricing.class_cost[c] for c in view.resolve_focus("attention")}
    for cls in why.classes:
        assert any(cls.best.total == pytest.approx(v, rel=1e-6) for v in focus_costs)
    # a different model prices differently, and its own pricing is used when asked for
    cpu = ex.pricing("roofline-cpu")
    assert cpu.model.name == "roofline-cpu" and cpu.class_cost != pricing.class_cost


@pytest.mark.parametrize("engine", ["builtin", "dot"])
def test_width_within_the_limit_for_the_saturated_block(block, engine):
    if engine == "dot" and not explore_draw.shutil.which("dot"):
        pytest.skip("Graphviz dot not installed")
    ex, _ = block
    for kwargs in ({"focus": "attention"}, {"focus": "attention", "fold": True}, {"focus": "attention", "depth": 3},
                   {"focus": "dot_general", "depth": 1}, {}):
        svg = ex.svg(engine=engine, **kwargs)
        ET.fromstring(svg)
        assert 100 < svg_width_px(svg) <= 2000, kwargs
    narrow = ex.svg(focus="attention", engine=engine, max_width=900)
    assert svg_width_px(narrow) <= 900


def test_builtin_layout_is_used_without_graphviz(block, monkeypatch):
    ex, _ = block
    monkeypatch.setattr(explore_draw.shutil, "which", lambda name: None)
    svg = ex.svg(focus="attention")
    assert "<g><title>" in svg and svg_width_px(svg) <= 2000
    with pytest.raises(ValueError, match="needs Graphviz"):
        ex.svg(focus="attention", engine="dot")


def test_fold_hides_identity_transposes(block):
    ex, _ = block
    view = ex.view()
    identity = [k for k, n in view.nodes.items()
                if n.ctor == "transpose" and tuple(n.statics[0]) == tuple(range(len(n.statics[0])))]
    assert identity  # saturation leaves identity transposes in e-classes
    assert all(view.is_structural(k) for k in identity)
    unfolded = ex.picture(max_alternatives=None)
    folded = ex.picture(fold=True)
    drawn = lambda p: {n.key for pc in p.classes.values() for n in pc.nodes}  # noqa: E731
    assert set(identity) <= drawn(unfolded)
    assert not set(identity) & drawn(folded)
    assert all(not view.is_structural(k) or len(view.classes[view.nodes[k].eclass]) == 1 for k in drawn(folded))
    assert sum(pc.folded for pc in folded.classes.values()) >= len(identity)
    svg = ex.svg(focus="attention", fold=True, engine="builtin")
    perms = re.findall(r"transpose \(([\d,]+)\)", svg)
    assert all(tuple(map(int, p.split(","))) != tuple(range(p.count(",") + 1)) for p in perms)
    assert "structural folded" in svg


def test_bad_focus_and_options_say_what_to_do(block):
    ex, _ = block
    with pytest.raises(ValueError, match="names nothing.*'attention'"):
        ex.svg(focus="no_such_op")
    with pytest.raises(ValueError, match="depth"):
        ex.svg(focus="attention", depth=-1)
    with pytest.raises(ValueError, match="engine"):
        ex.svg(focus="attention", engine="neato")
    small = ex.svg(max_nodes=5)  # too large to draw whole: a summary saying how to focus
    assert "too large" in small and "focus" in small


def test_why_as_a_ranked_bar_chart(block):
    ex, best = block
    why = ex.why("attention", best.model)
    svg = why.svg(limit=5)
    root = ET.fromstring(svg)
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") == "#4c72b0"
            and r.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == sum(min(5, len(c.alternatives)) for c in why.classes)
    for cls in why.classes:
        ranked = sorted(cls.alternatives, key=lambda a: a.total)[:5]
        texts = [_fmt_cost(a.total, best.model) for a in ranked]
        position = -1  # cheapest first: each bar's text after the one before (equal texts may repeat)
        for t, a in zip(texts, ranked):
            position = svg.find(f">{t.rjust(9)} (own {_fmt_cost(a.own_cost, best.model)}", position + 1)
            assert position >= 0, f"{t} (own {a.own_cost}) not drawn after the cheaper bars"
    assert svg_width_px(svg) <= 2000
    assert "<svg" in why._repr_html_() and "<pre>" in why._repr_html_()


def test_compare_table_marks_each_models_winner(block):
    ex, best = block
    comparison = ex.compare(["roofline-h100", "roofline-cpu", "bytes"])
    assert ex.pricing().model is best.model  # comparing does not change the pictures' model
    page = comparison._repr_html_()
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in rows]
    everyone = comparison.rows + [comparison.original]
    for j, name in enumerate(comparison.models):
        column = [row["costs"][name] for row in everyone]
        for r, row_cells in enumerate(cells):
            marked = row_cells[len(row_cells) - len(comparison.models) + j].startswith("★")
            assert marked == (column[r] == min(column))
    assert "winner" in page


def test_cli_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(explore_draw.shutil, "which", lambda name: None)  # as on CI: the built-in layout
    svg, why_svg = tmp_path / "focus.svg", tmp_path / "why.svg"
    argv = ["explore", "attention_vt", "--shapes", "1x2x8x4", "--cost-model", MODEL, "--no-show-before",
            "--svg", str(svg), "--focus", "attention", "--depth", "1", "--fold", "--why-svg", str(why_svg)]
    assert cli.main(argv) == 0
    drawing = svg.read_text()
    ET.fromstring(drawing)
    assert "e-graph around attention (depth 1)" in drawing and "structural e-nodes folded" in drawing
    assert svg_width_px(drawing) <= 2000
    assert "why: alternatives" in why_svg.read_text()
    assert "(around attention)" in capsys.readouterr().out
    for bad, message in ((["--focus", "attention"], "give --svg FILE too"),
                         (["--fold"], "give --svg FILE too"),
                         (["--svg", str(svg), "--depth", "-1"], "--depth must be at least 0"),
                         (["--svg", str(svg), "--focus", "no_such_op"], "names nothing"),
                         (["--why-svg", str(tmp_path / "missing" / "w.svg")], "its folder does not exist")):
        assert cli.main(["explore", "attention", "--shapes", "1x2x8x4", "--no-show-before", *bad]) == 2
        assert message in capsys.readouterr().err


def test_pricing_matches_extraction_under_every_model():
    fn, args = examples.attention_vt_example(batch=1, heads=2, seq=8, head_dim=4)
    ex = ea.explore(fn, *args)
    ex.run(limits=ea.Limits(iterations=30))
    for name in ("bytes", "roofline-h100", "roofline-cpu"):
        model = cost_model_from_name(name)
        best = ex.extract(model)
        greedy = price(ex.view(), model)  # this module's own greedy-DAG run, ties broken its own way
        marked = ex.pricing()
        assert math.isclose(sum(greedy.own[k] for k in greedy.chosen), best.extracted_cost, rel_tol=1e-9)
        assert math.isclose(sum(marked.own[k] for k in marked.chosen), best.extracted_cost, rel_tol=1e-9)
