"""bench/browser_check.py: the explorer's pictures render in headless Chromium (skipped without it)."""

from __future__ import annotations

import pytest

from bench_scripts import load_bench

browser_check = load_bench("browser_check", "eqsat_attn_bench_browser_check")
CHROMIUM = browser_check.find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")


def test_explorer_pictures_render(tmp_path):
    artefacts = browser_check.write_artefacts("attention", "roofline-h100", tmp_path, "builtin", 2000)
    assert browser_check.check(tmp_path, artefacts, CHROMIUM, 2000) == []
    png = browser_check.read_png(tmp_path / "page.png")
    assert png[0] == 2040 and png[1] > 500


def test_broken_blank_and_wide_pictures_fail(tmp_path):
    (tmp_path / "broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50"><text>')
    (tmp_path / "blank.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200">'
                                        '<rect width="300" height="200" fill="white"/></svg>')
    (tmp_path / "wide.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="2600" height="80">'
                                       '<text x="10" y="40" font-size="30">wide</text></svg>')
    artefacts = [browser_check.Artefact(n, "svg") for n in ("broken.svg", "blank.svg", "wide.svg")]
    problems = "\n".join(browser_check.check(tmp_path, artefacts, CHROMIUM, 2000))
    assert "broken.svg: not well-formed XML" in problems
    assert "broken.svg (img 1): the browser could not load or parse it" in problems
    assert "blank.svg: no text in the picture" in problems
    assert "blank.svg: blank in the screenshot" in problems
    assert "wide.svg: 2600 px wide > 2000" in problems
    assert "wide.svg (img 1): rendered 2600 px wide" in problems
