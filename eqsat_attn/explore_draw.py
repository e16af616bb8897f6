"""Pictures of an e-graph: a `Picture` (what to draw) and two renderers (Graphviz DOT, built-in SVG).

`build_picture` chooses the e-classes (all of them, or a focus's neighbourhood), folds away
structural e-nodes on request, keeps the cheapest alternatives of each e-class and labels
everything with its cost under the model: each e-class with its cheapest total, each e-node
with its own cost and its total with the cheapest operands. E-nodes and edges of the cheapest
program are marked. `render_svg` draws it with Graphviz's ``dot`` when installed (scaled to fit
``max_width``) and with a built-in layered layout otherwise (rows wrapped at ``max_width``).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .explore_graph import ATTENTION_CTORS, EGraphView, Pricing, label, shown_nodes, type_text

#: the widest drawing, in CSS pixels, unless asked otherwise
MAX_WIDTH = 2000
ENGINES = ("auto", "dot", "builtin")
_CHOSEN = "#c0392b"
_CHOSEN_FILL = "#ffe9a8"
_FOCUS = "#e67e22"


@dataclass(frozen=True)
class PicNode:
    key: str
    text: str  # label
    costs: str  # "own 3 us · total 19.2 us"
    chosen: bool  # in the cheapest program
    best: bool  # its e-class's cheapest e-node


@dataclass(frozen=True)
class PicClass:
    key: str
    title: str  # "c91 %70 f32[2,2,16,16] · cheapest 19.2 us"
    nodes: tuple[PicNode, ...]
    more: int  # alternatives not drawn
    folded: int  # structural e-nodes hidden
    focus: bool
    chosen: bool


@dataclass(frozen=True)
class Picture:
    title: tuple[str, ...]
    classes: dict[str, PicClass]
    edges: tuple[tuple[str, str, bool], ...]  # (e-node, operand e-class, on the chosen program)
    levels: dict[str, int] | None = None  # e-class -> row (higher above); None: layered by operands

    @property
    def node_count(self) -> int:
        return sum(len(c.nodes) for c in self.classes.values())


def build_picture(
    view: EGraphView,
    pricing: Pricing,
    fmt: Callable[[float], str],
    *,
    classes: Iterable[str] | None = None,
    focus: Iterable[str] = (),
    fold: bool = False,
    max_alternatives: int | None = None,
    heading: str = "e-graph",
    levels: dict[str, int] | None = None,
) -> Picture:
    """What to draw: the given e-classes (default all), their e-nodes ranked by total cost."""
    focus = set(focus)
    drawn = list(view.classes) if classes is None else [c for c in classes if c in view.classes]
    out: dict[str, PicClass] = {}
    for c in drawn:
        members = view.classes[c]
        folded = sum(1 for k in members if view.is_structural(k)) if fold else 0
        folded = min(folded, len(members) - 1)
        shown = shown_nodes(view, pricing, c, fold, max_alternatives)
        nodes = tuple(
            PicNode(k, label(view, view.nodes[k]), _costs(pricing, k, fmt), k in pricing.chosen,
                    pricing.best.get(c) == k)
            for k in shown
        )
        cheapest = pricing.class_cost.get(c)
        title = " ".join(x for x in (view.short_id(c), view.names.get(c, ""), type_text(view.types.get(c))) if x)
        title += f" · cheapest {fmt(cheapest)}" if cheapest is not None else " · unpriced"
        out[c] = PicClass(c, title, nodes, len(members) - folded - len(nodes), folded, c in focus,
                          any(n.chosen for n in nodes))
    edges = []
    for pc in out.values():
        for n in pc.nodes:
            for child in dict.fromkeys(view.nodes[n.key].children):
                if child in out and child != pc.key:
                    edges.append((n.key, child, n.chosen))
    chosen_attention = sorted({label(view, view.nodes[k]) for k in pricing.chosen
                               if view.nodes[k].ctor in ATTENTION_CTORS})
    total_nodes = sum(len(v) for v in view.classes.values())
    title = [
        f"{heading}: {len(out)} of {len(view.classes)} e-classes, {sum(len(p.nodes) for p in out.values())} of "
        f"{total_nodes} e-nodes drawn" + (" (structural e-nodes folded)" if fold else ""),
        f"costs under {getattr(pricing.model, 'name', pricing.model)}; chosen program (red, bold) costs "
        f"{fmt(sum(pricing.own[k] for k in pricing.chosen))}",
        "chosen attention: " + ("; ".join(chosen_attention) if chosen_attention else "none"),
        "e-class: cheapest total · e-node: own cost · total with its cheapest operands",
    ]
    return Picture(tuple(title), out, tuple(edges), levels)


def render_svg(picture: Picture, engine: str = "auto", max_width: int = MAX_WIDTH) -> str:
    """SVG of a picture, at most ``max_width`` CSS pixels wide."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "dot" and not shutil.which("dot"):
        raise ValueError("engine='dot' needs Graphviz's dot on PATH (apt-get install graphviz); "
                         "or use engine='builtin'")
    if engine != "builtin" and shutil.which("dot"):
        return subprocess.run(["dot", "-Tsvg"], input=to_dot(picture, max_width), capture_output=True,
                              text=True, check=True).stdout
    return layered_svg(picture, max_width)


def svg_width_px(svg: str) -> float:
    """The width an SVG's root element declares, in CSS pixels (pt converted)."""
    m = re.search(r"<svg\b[^>]*?\swidth=\"([0-9.]+)(pt|px)?\"", svg)
    if m is None:
        raise ValueError("SVG without a width attribute")
    return float(m.group(1)) * (4 / 3 if m.group(2) == "pt" else 1)


# ----------------------------------------------------------------------------------- Graphviz
def to_dot(picture: Picture, max_width: int = MAX_WIDTH) -> str:
    """DOT text: one node per e-class (a table, one row per e-node), the chosen program in bold red.

    Users sit above their operands (left of them when that is narrower); ``size`` caps the width.
    """
    levels = _levels(picture)
    widths = {c: _box_width(pc) for c, pc in picture.classes.items()}
    per_level: dict[int, list[str]] = {}
    for c, lv in levels.items():
        per_level.setdefault(lv, []).append(c)
    across = max((sum(widths[c] for c in cs) for cs in per_level.values()), default=0)
    along = sum(max(widths[c] for c in cs) for cs in per_level.values())
    rankdir = "TB" if across <= max_width or across <= along else "LR"
    inches = max_width * 0.75 / 72  # CSS px -> pt -> in
    title = "".join(f'<tr><td align="left">{"<b>" if i == 0 else ""}{html.escape(t)}{"</b>" if i == 0 else ""}'
                    "</td></tr>" for i, t in enumerate(picture.title))
    lines = [
        "digraph egraph {",
        f'  graph [rankdir={rankdir}, size="{inches:.2f},1000", nodesep=0.25, ranksep=0.5, fontname="monospace",'
        f' labelloc=t, labeljust=l, label=<<table border="0" cellpadding="0" cellspacing="0">{title}</table>>];',
        '  node [shape=plain, fontname="monospace", fontsize=10];',
        '  edge [color="#9999bb", arrowsize=0.5, penwidth=0.7];',
    ]
    ids = {c: f"c{i}" for i, c in enumerate(picture.classes)}
    ports = {}
    for c, pc in picture.classes.items():
        color = _FOCUS if pc.focus else ("#555555" if pc.chosen else "#aaaaaa")
        rows = [f'<tr><td align="left"><font color="#444444">{"<b>" if pc.focus else ""}{html.escape(pc.title)}'
                f'{"</b>" if pc.focus else ""}</font></td></tr>']
        for i, n in enumerate(pc.nodes):
            ports[n.key] = f"{ids[c]}:p{i}"
            text = html.escape(f"{n.text}  {n.costs}")
            if n.chosen:
                rows.append(f'<tr><td port="p{i}" align="left" bgcolor="{_CHOSEN_FILL}"><b>{text}</b></td></tr>')
            else:
                rows.append(f'<tr><td port="p{i}" align="left">{text}</td></tr>')
        if pc.more or pc.folded:
            more = html.escape(_more_text(pc))
            rows.append(f'<tr><td align="left"><font color="#777777"><i>{more}</i></font></td></tr>')
        lines.append(f'  {ids[c]} [label=<<table border="{2 if pc.focus else 1}" cellborder="0" cellspacing="0"'
                     f' cellpadding="2" color="{color}" bgcolor="#f8f8ff" style="rounded">{"".join(rows)}</table>>];')
    if picture.levels is not None:
        for lv, cs in sorted(per_level.items()):
            lines.append("  { rank=same; " + " ".join(ids[c] for c in cs) + " }")
    for key, child, chosen in picture.edges:
        style = f' [color="{_CHOSEN}", penwidth=2.5]' if chosen else ""
        lines.append(f"  {ports[key]} -> {ids[child]}{style};")
    lines.append("}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- built-in layout
_CHAR_W, _LINE_H, _PAD, _GAP_X, _GAP_Y = 6.2, 15, 6, 22, 48


def layered_svg(picture: Picture, max_width: int = MAX_WIDTH) -> str:
    """A dependency-free drawing: e-classes as boxes in layers (operands below their users), rows
    wrapped at ``max_width``, one line per e-node; the chosen program in bold red."""
    levels = _levels(picture)
    rows: dict[int, list[str]] = {}
    for c, lv in levels.items():
        rows.setdefault(lv, []).append(c)
    users: dict[str, list[str]] = {}
    for key, child, _ in picture.edges:
        users.setdefault(child, []).append(key)
    box: dict[str, tuple[float, float, float, float]] = {}
    node_at: dict[str, tuple[float, float, float]] = {}  # e-node -> (x, baseline y, line width)
    y = 14.0 + _LINE_H * len(picture.title) + 8
    width = 0.0
    for lv in sorted(rows, reverse=True):  # users on top, operands below
        order = sorted(rows[lv], key=lambda c: _barycentre(c, users, node_at))
        x, row_h = 10.0, 0.0
        for c in order:
            pc = picture.classes[c]
            w = min(_box_width(pc), max_width - 20)
            h = (len(pc.nodes) + 1 + bool(pc.more or pc.folded)) * _LINE_H + 2 * _PAD
            if x > 10 and x + w > max_width - 10:  # wrap the row
                x, y, row_h = 10.0, y + row_h + _GAP_Y / 2, 0.0
            box[c] = (x, y, w, h)
            for i, n in enumerate(pc.nodes):
                node_at[n.key] = (x + _PAD, y + _PAD + (i + 2) * _LINE_H - 4, w - 2 * _PAD)
            x += w + _GAP_X
            row_h = max(row_h, h)
            width = max(width, x)
        y += row_h + _GAP_Y
    width = max(width, max(len(t) for t in picture.title) * _CHAR_W * 1.1 + 20)
    width = min(width, max_width)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{y:.0f}" '
           f'viewBox="0 0 {width:.0f} {y:.0f}" font-family="monospace" font-size="10">',
           f'<rect width="{width:.0f}" height="{y:.0f}" fill="white"/>']
    for i, t in enumerate(picture.title):
        weight = ' font-weight="bold"' if i == 0 else ""
        out.append(f'<text x="10" y="{16 + i * _LINE_H}" font-size="11"{weight}>{html.escape(t)}</text>')
    for chosen_pass in (False, True):  # chosen edges on top
        for key, child, chosen in picture.edges:
            if chosen != chosen_pass:
                continue
            nx, ny, nw = node_at[key]
            bx, by, bw, bh = box[child]
            x1, y1 = nx + min(nw, 120) / 2, ny + 4
            x2, y2 = bx + bw / 2, (by if by > y1 else by + bh)
            mid = (y1 + y2) / 2
            stroke = f'stroke="{_CHOSEN}" stroke-width="2.4"' if chosen else 'stroke="#9999bb" stroke-width="0.7"'
            out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}" '
                       f'fill="none" {stroke}/>')
    for c, (x0, y0, w, h) in box.items():
        pc = picture.classes[c]
        border = (f'stroke="{_FOCUS}" stroke-width="2.2"' if pc.focus
                  else 'stroke="#555" stroke-width="1"' if pc.chosen else 'stroke="#999" stroke-dasharray="4 2"')
        out.append(f'<rect x="{x0:.0f}" y="{y0:.0f}" width="{w:.0f}" height="{h:.0f}" rx="4" fill="#f8f8ff" {border}/>')
        weight = ' font-weight="bold"' if pc.focus else ""
        out.append(f'<text x="{x0 + _PAD:.0f}" y="{y0 + _PAD + _LINE_H - 4:.0f}" fill="#444"{weight}>'
                   f"{html.escape(_fit(pc.title, w))}</text>")
        for n in pc.nodes:
            nx, ny, nw = node_at[n.key]
            text = _fit(f"{n.text}  {n.costs}", nw + 2 * _PAD)
            out.append(f"<g><title>{html.escape(n.text + '  ' + n.costs)}</title>")
            if n.chosen:
                out.append(f'<rect x="{nx - 3:.0f}" y="{ny - 11:.0f}" width="{nw + 6:.0f}" height="{_LINE_H:.0f}" '
                           f'fill="{_CHOSEN_FILL}" stroke="{_CHOSEN}" stroke-width="1.5" rx="2"/>')
            weight = ' font-weight="bold"' if n.chosen else ""
            out.append(f'<text x="{nx:.0f}" y="{ny:.0f}"{weight}>{html.escape(text)}</text></g>')
        if pc.more or pc.folded:
            out.append(f'<text x="{x0 + _PAD:.0f}" y="{y0 + h - _PAD - 3:.0f}" fill="#777" font-style="italic">'
                       f"{html.escape(_fit(_more_text(pc), w))}</text>")
    out.append("</svg>")
    return "\n".join(out)


def summary_svg(lines: list[str], width: int = 640) -> str:
    """A picture of text lines (the e-graph's counts when it is too large to draw)."""
    h = 16 * len(lines) + 20
    texts = "".join(f'<text x="10" y="{20 + 16 * i}">{html.escape(t)}</text>' for i, t in enumerate(lines))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="monospace" '
            f'font-size="12"><rect width="{width}" height="{h}" fill="white"/>{texts}</svg>')


# ----------------------------------------------------------------------------------- helpers
def _costs(pricing: Pricing, key: str, fmt: Callable[[float], str]) -> str:
    own = pricing.own.get(key, 0.0)
    total = pricing.total.get(key)
    return f"own {fmt(own)} · total {fmt(total) if total is not None else 'unpriced'}"


def _more_text(pc: PicClass) -> str:
    parts = []
    if pc.more:
        parts.append(f"… {pc.more} more alternative{'s' if pc.more > 1 else ''} (dearer)")
    if pc.folded:
        parts.append(f"{pc.folded} structural folded")
    return "; ".join(parts)


def _box_width(pc: PicClass) -> float:
    chars = max([len(pc.title), len(_more_text(pc))] + [len(n.text) + 2 + len(n.costs) for n in pc.nodes])
    return chars * _CHAR_W + 2 * _PAD


def _fit(text: str, width: float) -> str:
    most = max(4, int((width - 2 * _PAD) / _CHAR_W))
    return text if len(text) <= most else text[:most - 1] + "…"


def _levels(picture: Picture) -> dict[str, int]:
    """The picture's levels, else the longest path from the leaves over drawn edges (cycles capped)."""
    if picture.levels is not None:
        return {c: picture.levels[c] for c in picture.classes}
    below: dict[str, set[str]] = {c: set() for c in picture.classes}
    owner = {n.key: c for c, pc in picture.classes.items() for n in pc.nodes}
    for key, child, _ in picture.edges:
        below[owner[key]].add(child)
    level: dict[str, int] = {}
    cap = len(picture.classes)
    for _ in range(cap + 1):
        changed = False
        for c in picture.classes:
            lv = min(cap, 1 + max((level.get(ch, 0) for ch in below[c]), default=-1))
            if level.get(c) != lv:
                level[c], changed = lv, True
        if not changed:
            break
    return level


def _barycentre(c: str, users: dict[str, list[str]], node_at: dict[str, tuple[float, float, float]]) -> float:
    xs = [node_at[u][0] for u in users.get(c, ()) if u in node_at]
    return sum(xs) / len(xs) if xs else float("inf")
