"""Render the explorer's pictures in a real browser (headless Chromium) and check them.

    python bench/browser_check.py [--target block] [--cost-model roofline-h100] [--out DIR]
                                  [--max-width 2000] [--engine auto|builtin|dot] [--chromium PATH]

Saturates a built-in example (`eqsat_attn.examples`; ``block`` by default), writes the
explorer's pictures — the focused attention view (folded), the whole e-graph (or its summary),
the `why` bar chart — and its notebook HTML (explorer, extraction, comparison, why) to ``--out``,
puts them on one page and opens it in Chromium twice: once to read the DOM after layout
(``--dump-dom``: each picture loaded, its rendered size, its text), once to take a screenshot
(``page.png``). It fails (exit status 1) when a picture does not load or parse, is empty (no
text, or a blank region of the screenshot) or is wider than ``--max-width`` CSS pixels. Look at
``page.png`` too: the check proves that the pictures render, not that they read well.
"""

from __future__ import annotations

import argparse
import html
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_RESULT = re.compile(r'<pre id="result">(.*?)</pre>', re.S)


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium (or Chrome) executable: ``explicit``, else the first on PATH."""
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@dataclass(frozen=True)
class Artefact:
    name: str  # file name under the output folder
    kind: str  # "svg" (loaded as an image) or "html" (inlined in the page)


def write_artefacts(target: str, cost_model: str, out: pathlib.Path, engine: str, max_width: int) -> list[Artefact]:
    """Saturate a built-in example and write the explorer's pictures and HTML to ``out``."""
    import eqsat_attn as ea
    from eqsat_attn import examples

    fn, args = examples.EXAMPLES[target]()
    ex = ea.explore(fn, *args)
    ex.run(limits=ea.Limits(iterations=30))
    best = ex.extract(cost_model)
    why = ex.why("attention", cost_model)
    ex.svg(out / "focus_attention.svg", focus="attention", fold=True, engine=engine, max_width=max_width)
    ex.svg(out / "whole.svg", engine=engine, max_width=max_width)
    why.svg(out / "why.svg")
    compare = ex.compare(["roofline-h100", "roofline-cpu", "bytes"])
    parts = [ex._repr_html_(), best._repr_html_(), compare._repr_html_(), why._repr_html_()]
    (out / "notebook.html").write_text("\n<hr>\n".join(parts))
    return [Artefact("focus_attention.svg", "svg"), Artefact("whole.svg", "svg"), Artefact("why.svg", "svg"),
            Artefact("notebook.html", "html")]


def static_problems(path: pathlib.Path, max_width: int) -> list[str]:
    """Problems visible without a browser: an SVG that does not parse, has no text or is too wide."""
    from eqsat_attn.explore_draw import svg_width_px

    text = path.read_text()
    svgs = [text] if path.suffix == ".svg" else re.findall(r"<svg\b.*?</svg>", text, re.S)
    problems = []
    for i, svg in enumerate(svgs):
        where = path.name if path.suffix == ".svg" else f"{path.name} (svg {i + 1})"
        try:
            root = ET.fromstring(svg)
        except ET.ParseError as exc:
            problems.append(f"{where}: not well-formed XML: {exc}")
            continue
        if not any(el.tag.endswith("text") and "".join(el.itertext()).strip() for el in root.iter()):
            problems.append(f"{where}: no text in the picture")
        try:
            width = svg_width_px(svg)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if width > max_width:
            problems.append(f"{where}: {width:.0f} px wide > {max_width}")
    return problems


def page(artefacts: Sequence[Artefact], out: pathlib.Path) -> str:
    """One page holding every artefact, and a script that reports how each one rendered."""
    sections = []
    for i, a in enumerate(artefacts):
        body = ((out / a.name).read_text() if a.kind == "html"
                else f'<img src="{html.escape(a.name)}" alt="{html.escape(a.name)}">')
        sections.append(f'<section class="art" id="a{i}" data-name="{html.escape(a.name)}" data-kind="{a.kind}">'
                        f"<h3>{html.escape(a.name)}</h3><div class='body'>{body}</div></section>")
    script = """
<pre id="result">pending</pre>
<script>
function report() {
  const out = [];
  for (const s of document.querySelectorAll('section.art')) {
    const r = s.querySelector('.body').getBoundingClientRect();
    const item = {name: s.dataset.name, kind: s.dataset.kind, x: r.left + scrollX, y: r.top + scrollY,
                  width: r.width, height: r.height, pictures: []};
    for (const img of s.querySelectorAll('img')) {
      const b = img.getBoundingClientRect();
      item.pictures.push({kind: 'img', loaded: img.complete && img.naturalWidth > 0,
                          width: b.width, height: b.height, natural: img.naturalWidth});
    }
    for (const svg of s.querySelectorAll('svg')) {
      const b = svg.getBoundingClientRect();
      let texts = 0, inked = 0;
      for (const t of svg.querySelectorAll('text')) { texts++; if (t.getBBox().width > 0) inked++; }
      item.pictures.push({kind: 'svg', loaded: true, width: b.width, height: b.height, texts: texts, inked: inked});
    }
    out.push(item);
  }
  document.getElementById('result').textContent = JSON.stringify(
    {sections: out, height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth});
}
window.addEventListener('load', report);
</script>"""
    return ("<!doctype html><html><head><meta charset='utf-8'><style>body{margin:8px;font-family:sans-serif}"
            "img{max-width:none}section{margin-bottom:24px}</style></head><body>"
            + "".join(sections) + script + "</body></html>")


def run_chromium(chromium: str, url: str, width: int, height: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--allow-file-access-from-files", f"--window-size={width},{height}", "--virtual-time-budget=10000",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def read_png(path: pathlib.Path) -> tuple[int, int, Any]:
    """(width, height, changes) of an 8-bit, non-interlaced RGB or RGBA PNG: ``changes[y, x]`` is
    True where the pixel differs from its neighbours, read from the PNG's filter residuals (which
    are zero across a uniform region, whatever its colour), so no full decode is needed."""
    import numpy as np

    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, width, height, bpp = 8, [], 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            if depth != 8 or color not in (2, 6) or interlace:
                raise ValueError(f"{path}: PNG depth {depth}, colour type {color}, interlace {interlace} not read here")
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, width * bpp + 1)
    filters, pixels = rows[:, 0], rows[:, 1:].reshape(height, width, bpp)[..., :3]
    changes = (pixels != 0).any(axis=2)  # filtered rows: a residual is a change
    raw = filters == 0  # unfiltered rows: compare each pixel with the one to its left
    changes[raw, 1:] = (pixels[raw, 1:] != pixels[raw, :-1]).any(axis=2)
    changes[raw, 0] = False
    changes[:, 0] = False  # a row's first pixel carries its left-edge value, not a change
    return width, height, changes


def inked_fraction(png: tuple[int, int, Any], x: float, y: float, w: float, h: float) -> float:
    """Fraction of the pixels of a region that differ from their neighbours (0 for a blank one)."""
    width, height, changes = png
    x0, y0 = max(0, int(x)), max(0, int(y))
    x1, y1 = min(width, int(x + w)), min(height, int(y + h))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(changes[y0:y1, x0:x1].mean())


def check(out: pathlib.Path, artefacts: Sequence[Artefact], chromium: str, max_width: int) -> list[str]:
    """Every problem found (empty when the pictures render), with ``out/page.png`` written."""
    problems = [p for a in artefacts for p in static_problems(out / a.name, max_width)]
    page_path = out / "page.html"
    page_path.write_text(page(artefacts, out))
    url = page_path.resolve().as_uri()
    window_w = max_width + 40
    dom = run_chromium(chromium, url, window_w, 1200, "--dump-dom")
    found = _RESULT.search(dom.stdout)
    if dom.returncode != 0 or found is None or found.group(1).strip() == "pending":
        return problems + [f"chromium did not render the page (exit {dom.returncode}): {dom.stderr.strip()[-500:]}"]
    result = json.loads(html.unescape(found.group(1)))
    for s in result["sections"]:
        if not s["pictures"]:
            problems.append(f"{s['name']}: no picture on the page")
        for i, p in enumerate(s["pictures"]):
            where = f"{s['name']} ({p['kind']} {i + 1})"
            if not p["loaded"]:
                problems.append(f"{where}: the browser could not load or parse it")
            elif p["width"] <= 1 or p["height"] <= 1:
                problems.append(f"{where}: rendered empty ({p['width']:.0f}x{p['height']:.0f})")
            elif p["width"] > max_width + 0.5:
                problems.append(f"{where}: rendered {p['width']:.0f} px wide > {max_width}")
            if p["kind"] == "svg" and p.get("inked", 1) == 0:
                problems.append(f"{where}: none of its {p.get('texts', 0)} text elements rendered")
    height = min(int(result["height"]) + 20, 16000)
    shot = out / "page.png"
    run = run_chromium(chromium, url, window_w, height, f"--screenshot={shot}")
    if run.returncode != 0 or not shot.is_file():
        return problems + [f"chromium took no screenshot (exit {run.returncode}): {run.stderr.strip()[-500:]}"]
    png = read_png(shot)
    for s in result["sections"]:
        ink = inked_fraction(png, s["x"], s["y"], min(s["width"], max_width), min(s["height"], 3000))
        if ink < 0.002:
            problems.append(f"{s['name']}: blank in the screenshot ({ink:.2%} of its pixels drawn)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="block", help="built-in example (block, attention, attention_vt)")
    parser.add_argument("--cost-model", default="roofline-h100")
    parser.add_argument("--out", default=str(pathlib.Path(tempfile.gettempdir()) / "eqsat_attn_browser_check"),
                        help="folder for the pictures and page.png (default: in the temporary folder)")
    parser.add_argument("--max-width", type=int, default=2000, help="widest picture allowed, CSS pixels")
    parser.add_argument("--engine", default="auto", choices=("auto", "builtin", "dot"))
    parser.add_argument("--chromium", help="Chromium executable (default: the first of chromium, chrome on PATH)")
    ns = parser.parse_args(argv)
    chromium = find_chromium(ns.chromium)
    if chromium is None:
        print("browser_check: no Chromium found (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    out = pathlib.Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    artefacts = write_artefacts(ns.target, ns.cost_model, out, ns.engine, ns.max_width)
    problems = check(out, artefacts, chromium, ns.max_width)
    for a in artefacts:
        print(f"wrote {out / a.name}")
    print(f"screenshot: {out / 'page.png'}")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"ok: {len(artefacts)} artefacts render in {chromium}, none wider than {ns.max_width} px, none blank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
