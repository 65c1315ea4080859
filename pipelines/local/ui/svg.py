"""Inline SVG: the pipeline DAG, line/scatter plots, the confusion-matrix heatmap, grouped bars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.local.ui.html import STATUS_CLASSES, Markup, e

#: Line colours of plots (colour-blind friendly).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 210, 52, 30, 46, 16


@dataclass
class Node:
    """One step in the DAG: its name, type, display status, a link, and its incoming edges (name, label)."""

    name: str
    step_type: str
    status: str
    href: str
    subtitle: str = ""
    selected: bool = False
    edges: list[tuple[str, str]] = field(default_factory=list)


def _layers(nodes: Mapping[str, Node]) -> list[list[str]]:
    """Longest-path layering (a node sits one row below its deepest parent), input order kept within a row."""
    depth: dict[str, int] = {}

    def of(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name not in depth:
            parents = [p for p, _ in nodes[name].edges if p in nodes and p not in seen]
            depth[name] = 1 + max((of(p, seen | {name}) for p in parents), default=-1)
        return depth[name]

    rows: list[list[str]] = []
    for name in nodes:
        level = of(name)
        while len(rows) <= level:
            rows.append([])
        rows[level].append(name)
    return rows


def reduce_edges(nodes: Mapping[str, Node]) -> None:
    """Drop the edges implied by longer paths (a step reading outputs of its grandparent too, a branch step after
    another one of its branch): the graph stays readable and says the same about order."""
    ancestors: dict[str, set[str]] = {}

    def above(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if name not in ancestors:
            found: set[str] = set()
            for parent, _ in nodes[name].edges:
                if parent in nodes and parent not in seen:
                    found |= {parent} | above(parent, seen | {name})
            ancestors[name] = found
        return ancestors[name]

    for node in nodes.values():
        parents = {p for p, _ in node.edges if p in nodes}
        implied = {p for p in parents for q in parents if q != p and p in above(q)}
        node.edges = [(p, label) for p, label in node.edges if p not in implied]


def dag(nodes: Mapping[str, Node]) -> Markup:
    """Top-down DAG: rows by dependency depth, boxes coloured by status, edge labels (condition branches)."""
    reduce_edges(nodes)
    rows = _layers(nodes)
    width = max((len(r) for r in rows), default=1) * (NODE_W + GAP_X) - GAP_X + 2 * PAD
    height = len(rows) * (NODE_H + GAP_Y) - GAP_Y + 2 * PAD
    pos: dict[str, tuple[float, float]] = {}
    for level, row in enumerate(rows):
        row_w = len(row) * (NODE_W + GAP_X) - GAP_X
        for i, name in enumerate(row):
            pos[name] = ((width - row_w) / 2 + i * (NODE_W + GAP_X), PAD + level * (NODE_H + GAP_Y))
    parts = [f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="pipeline graph">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#888"/></marker></defs>']
    for name, node in nodes.items():
        for parent, label in node.edges:
            if parent in pos:
                parts.append(_edge(pos[parent], pos[name], label, node.status == "NotTaken"))
    for name, node in nodes.items():
        parts.append(_node(node, *pos[name]))
    parts.append("</svg>")
    return Markup("".join(parts))


def _edge(start: tuple[float, float], end: tuple[float, float], label: str, off: bool) -> str:
    x1, y1 = start[0] + NODE_W / 2, start[1] + NODE_H
    x2, y2 = end[0] + NODE_W / 2, end[1]
    mid = (y1 + y2) / 2
    dash = ' stroke-dasharray="5 4"' if off else ""
    text = (f'<text class="edge-label" x="{(x1 + x2) / 2 + 4:.1f}" y="{mid + 4:.1f}">{e(label)}</text>'
            if label else "")
    return (f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2 - 2:.1f}" '
            f'fill="none" stroke="#888" stroke-width="1.4"{dash} marker-end="url(#arrow)"/>{text}')


def _node(node: Node, x: float, y: float) -> str:
    css = STATUS_CLASSES.get(node.status, "idle")
    title = node.name if len(node.name) <= 26 else node.name[:25] + "…"
    selected = " selected" if node.selected else ""
    return (f'<a href="{e(node.href)}" class="node {css}{selected}" data-step="{e(node.name)}" '
            f'data-status="{e(node.status)}"><title>{e(node.name)} ({e(node.step_type)}): {e(node.status)}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
            f'<text class="name" x="{x + 10:.1f}" y="{y + 21:.1f}">{e(title)}</text>'
            f'<text class="sub" x="{x + 10:.1f}" y="{y + 40:.1f}">{e(node.step_type)} · {e(node.status)}'
            f'{(" · " + e(node.subtitle)) if node.subtitle else ""}</text></a>')


# --------------------------------------------------------------------------------------------------- plots


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for mult in (1, 2, 5, 10):
        if (high - low) / (step * mult) <= count:
            step *= mult
            break
    step = max(1.0, round(step)) if integer else step
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 and abs(value) >= 1 else f"{value:.3g}"


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, title: str, x_label: str,
               y_label: str, marks: Sequence[tuple[float, float, str]] = (), width: int = 560, height: int = 300,
               points: Sequence[str] = (), integer_x: bool = False) -> Markup:
    """Lines of ``(label, [(x, y), ...])`` (only points for the labels in ``points``); ``marks`` are highlighted
    points ``(x, y, label)``; ``integer_x``: x ticks on whole numbers (trials, epochs)."""
    values = [p for _, pts in series for p in pts] + [(x, y) for x, y, _ in marks]
    values = [(x, y) for x, y in values if _finite(x) and _finite(y)]
    if not values:
        return Markup(f'<figure class="plot"><figcaption>{e(title)}</figcaption><p class="note">no data yet</p>'
                      "</figure>")
    left, right, top, bottom = 52, 14, 26, 40
    x_lo, x_hi = min(x for x, _ in values), max(x for x, _ in values)
    y_lo, y_hi = min(y for _, y in values), max(y for _, y in values)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 0.1
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
             f'<text class="title" x="{left}" y="16">{e(title)}</text>']
    parts += _axes(sx, sy, (x_lo, x_hi), (y_lo, y_hi), width, height, left, bottom, x_label, y_label, integer_x)
    for index, (label, pts) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        pts = [(x, y) for x, y in pts if _finite(x) and _finite(y)]
        if len(pts) > 1 and label not in points:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"><title>{e(label)}: '
                  f'{_fmt(x)}, {y:.4f}</title></circle>' for x, y in pts]
    for x, y, label in marks:
        parts.append(f'<circle class="mark" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="8" fill="none" stroke="#d55e00" '
                     f'stroke-width="2.5"/><text class="mark-label" x="{sx(x) + 10:.1f}" y="{sy(y) - 8:.1f}">'
                     f"{e(label)}</text>")
    parts.append("</svg>")
    parts.append(_legend(series))
    parts.append("</figure>")
    return Markup("".join(parts))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _axes(sx: Any, sy: Any, xs: tuple[float, float], ys: tuple[float, float], width: int, height: int,
          left: int, bottom: int, x_label: str, y_label: str, integer_x: bool = False) -> list[str]:
    out = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#999"/>',
           f'<line x1="{left}" y1="20" x2="{left}" y2="{height - bottom}" stroke="#999"/>']
    for tick in _ticks(*ys):
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#eee"/>'
                   f'<text class="tick" x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    for tick in _ticks(*xs, integer=integer_x):
        out.append(f'<text class="tick" x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                   f"{_fmt(tick)}</text>")
    out.append(f'<text class="axis" x="{(left + width) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
               f"{e(x_label)}</text>")
    out.append(f'<text class="axis" transform="translate(12,{(height - bottom) / 2 + 10:.0f}) rotate(-90)" '
               f'text-anchor="middle">{e(y_label)}</text>')
    return out


def _legend(series: Sequence[tuple[str, Any]]) -> str:
    if len(series) < 2:
        return ""
    items = "".join(f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{e(label)}</span>'
                    for i, (label, _) in enumerate(series))
    return f'<figcaption class="legend">{items}</figcaption>'


def heatmap(matrix: Mapping[str, Mapping[str, Any]], *, title: str = "Confusion matrix") -> Markup:
    """``{actual: {predicted: n}}`` as a grid of cells, darker for more, the diagonal outlined."""
    names = list(matrix)
    cell = max(18, min(56, 520 // max(1, len(names))))
    label_w = min(200, 8 * max((len(n) for n in names), default=4) + 16)
    size = label_w + cell * len(names) + 10
    peak = max((int(v or 0) for row in matrix.values() for v in row.values()), default=0) or 1
    parts = [f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{size}" '
             f'height="{size + 20}" viewBox="0 0 {size} {size + 20}" role="img" aria-label="{e(title)}">']
    for i, actual in enumerate(names):
        y = label_w + i * cell
        parts.append(f'<text class="tick" x="{label_w - 6}" y="{y + cell / 2 + 4:.0f}" text-anchor="end">'
                     f"{e(actual[:24])}</text>")
        for j, predicted in enumerate(names):
            x = label_w + j * cell
            count = int((matrix.get(actual) or {}).get(predicted) or 0)
            shade = count / peak
            fill = f"rgb({int(255 - 200 * shade)},{int(255 - 140 * shade)},{int(255 - 60 * shade)})"
            stroke = ' stroke="#333" stroke-width="1.5"' if i == j else ' stroke="#fff"'
            tone = "light" if shade > 0.55 else "dark"
            parts.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}"{stroke}>'
                         f"<title>actual {e(actual)}, predicted {e(predicted)}: {count}</title></rect>"
                         f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="middle" '
                         f'class="count {tone}">{count}</text>')
    for j, predicted in enumerate(names):
        x = label_w + j * cell + cell / 2
        parts.append(f'<text class="tick" transform="translate({x + 4:.0f},{label_w - 6}) rotate(-60)">'
                     f"{e(predicted[:24])}</text>")
    parts.append(f'<text class="axis" x="{label_w}" y="{size + 14}">rows: actual · columns: predicted</text>')
    parts.append(f"</svg><figcaption>{e(title)}</figcaption></figure>")
    return Markup("".join(parts))


def bars(groups: Sequence[tuple[str, Sequence[float | None]]], series: Sequence[str], *, title: str,
         width: int = 560, height: int = 260) -> Markup:
    """Grouped bars in [0, 1]: one group per label, one bar per series (e.g. precision and recall per class)."""
    left, bottom, top = 40, 56, 24
    span = (width - left - 10) / max(1, len(groups))
    bar = min(28.0, span * 0.8 / max(1, len(series)))
    parts = [f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
             f'<text class="title" x="{left}" y="16">{e(title)}</text>']
    plot_h = height - top - bottom
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = height - bottom - tick * plot_h
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for g, (label, values) in enumerate(groups):
        x0 = left + g * span + (span - bar * len(series)) / 2
        for s, value in enumerate(values):
            if value is None:
                continue
            h = max(0.0, min(1.0, float(value))) * plot_h
            parts.append(f'<rect x="{x0 + s * bar:.1f}" y="{height - bottom - h:.1f}" width="{bar - 2:.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[s % len(PALETTE)]}"><title>{e(label)} {e(series[s])}: '
                         f"{float(value):.3f}</title></rect>")
        parts.append(f'<text class="tick" transform="translate({left + g * span + span / 2:.0f},'
                     f'{height - bottom + 12}) rotate(30)">{e(label[:18])}</text>')
    parts.append("</svg>")
    parts.append(_legend([(name, None) for name in series]))
    parts.append("</figure>")
    return Markup("".join(parts))
