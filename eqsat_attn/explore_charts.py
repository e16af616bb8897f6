"""Charts of the explorer's answers: `why` as ranked bar charts (SVG), `compare` as an HTML table.

Hand-written SVG and HTML (no plotting library): each e-class's alternatives are bars of
their total cost, split into the e-node's own cost and its cheapest operands, cheapest on top;
the comparison marks, per cost model, the cheapest program under it (the winner).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

_OWN, _OPERANDS, _BEST_FILL = "#4c72b0", "#a6bddb", "#ffe9a8"
_CHAR_W, _ROW_H, _BAR_W = 6.2, 18, 260


def why_svg(sections: Sequence[tuple[str, Sequence[Any]]], fmt: Callable[[float], str], heading: str,
            limit: int | None = 10, max_width: int = 2000) -> str:
    """Ranked bars for each (title, alternatives) section; an alternative has ``own_cost``,
    ``operands_cost``, ``total``, ``operand_transposes`` and ``description``."""
    rows: list[tuple[str, Any]] = [("heading", heading)]
    for title, alternatives in sections:
        ranked = sorted(alternatives, key=lambda a: a.total)
        rows.append(("section", f"{title}: {len(ranked)} alternatives"))
        rows += [("bar", (i, a)) for i, a in enumerate(ranked[:limit])]
        if limit is not None and len(ranked) > limit:
            rows.append(("more", f"… {len(ranked) - limit} dearer alternatives (Exploration.why lists all)"))
    finite = [a.total for kind, v in rows if kind == "bar" for a in [v[1]] if a.total < 1e29]
    top = max(finite, default=1.0) or 1.0
    text_x = 40 + _BAR_W + 10
    width = min(max_width, text_x + 150 * _CHAR_W + 10)
    most = int((width - text_x - 10) / _CHAR_W)
    out, y = [], 8
    for kind, value in rows:
        y += _ROW_H
        if kind == "heading":
            out.append(f'<text x="10" y="{y}" font-weight="bold" font-size="12">{html.escape(value)}</text>')
        elif kind == "section":
            y += 6
            out.append(f'<text x="10" y="{y}" font-weight="bold">{html.escape(value)}</text>')
        elif kind == "more":
            out.append(f'<text x="40" y="{y}" fill="#777" font-style="italic">{html.escape(value)}</text>')
        else:
            rank, alt = value
            if rank == 0:
                out.append(f'<rect x="4" y="{y - 13}" width="{width - 8:.0f}" height="{_ROW_H}" fill="{_BEST_FILL}"/>')
            weight = ' font-weight="bold"' if rank == 0 else ""
            mark = "→" if rank == 0 else f"{rank + 1}."
            out.append(f'<text x="10" y="{y}"{weight}>{mark}</text>')
            if alt.total < 1e29:
                own_w = _BAR_W * min(alt.own_cost, top) / top
                ops_w = _BAR_W * min(alt.operands_cost, top) / top
                out.append(f'<rect x="40" y="{y - 11}" width="{own_w:.1f}" height="12" fill="{_OWN}">'
                           f"<title>own {html.escape(fmt(alt.own_cost))}</title></rect>")
                out.append(f'<rect x="{40 + own_w:.1f}" y="{y - 11}" width="{ops_w:.1f}" height="12"'
                           f' fill="{_OPERANDS}">'
                           f"<title>operands {html.escape(fmt(alt.operands_cost))}</title></rect>")
            text = (f"{fmt(alt.total):>9} (own {fmt(alt.own_cost)} + operands {fmt(alt.operands_cost)},"
                    f" {alt.operand_transposes} transposes)  {alt.description}")
            text = text if len(text) <= most else text[:most - 1] + "…"
            out.append(f'<text x="{text_x}" y="{y}"{weight}><title>{html.escape(alt.description)}</title>'
                       f"{html.escape(text)}</text>")
    y += _ROW_H
    legend_x = 10
    for color, name in ((_OWN, "own cost of the e-node"), (_OPERANDS, "its cheapest operands")):
        out.append(f'<rect x="{legend_x}" y="{y - 10}" width="12" height="10" fill="{color}"/>'
                   f'<text x="{legend_x + 16}" y="{y}">{name}</text>')
        legend_x += 16 + len(name) * _CHAR_W + 20
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
            f'viewBox="0 0 {width:.0f} {height}" font-family="monospace" font-size="11">'
            f'<rect width="{width:.0f}" height="{height}" fill="white"/>' + "".join(out) + "</svg>")


def comparison_html(headers: Sequence[str], rows: Sequence[Sequence[str]], costs: Sequence[Sequence[float]],
                    first_cost_column: int) -> str:
    """An HTML table; in each cost column the cheapest program (the winner under that model) is
    marked with ★ and shaded. ``costs[r][j]`` is the number behind cell ``first_cost_column + j`` of row r."""
    winners = set()
    for j in range(len(costs[0]) if costs else 0):
        column = [row[j] for row in costs]
        best = min(column)
        winners |= {(r, first_cost_column + j) for r, v in enumerate(column) if v == best}
    th = "".join(f"<th style='padding:2px 8px;border-bottom:1px solid #888'>{html.escape(h)}</th>" for h in headers)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            align = "left" if j in (0, 3) else "right"
            if (r, j) in winners:
                cells.append(f"<td style='padding:2px 8px;text-align:{align};background:{_BEST_FILL};"
                             f"font-weight:bold' title='cheapest under this model'>★ {html.escape(cell)}</td>")
            else:
                cells.append(f"<td style='padding:2px 8px;text-align:{align}'>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ("<table style='border-collapse:collapse;font-family:monospace;font-size:12px'>"
            "<caption style='text-align:left'>extraction under each cost model: ★ = cheapest program under the"
            " column's model (the winner), * = the model's own choice</caption>"
            f"<tr>{th}</tr>{''.join(body)}</table>")
