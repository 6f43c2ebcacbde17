"""Self-contained HTML building blocks: page template with inline CSS, tables, and inline-SVG line/bar charts.

Nothing here references an external URL: a page opens offline, from a file or an artifact store, and
leaks no request. Every function returns an HTML string; callers compose them and write with `write_page`.

    body = section("Row counts", line_chart({"events": [(d, n) for d, n in rows]}, y_label="rows"))
    write_page(path, page("DQ 2024-05-10", body, subtitle="run manual__..."))
"""

from __future__ import annotations

import datetime as dt
import html as _html
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#ffffff; --panel:#f6f7f9;
        --bad:#b3261e; --bad-bg:#fde8e7; --warn:#8a5a00; --warn-bg:#fff4d6; --ok:#1e6b34; --ok-bg:#e3f4e8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { padding: 18px 28px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 0 0 4px; font-size: 20px; }
header .sub { color: var(--muted); }
main { padding: 8px 28px 40px; max-width: 1200px; }
section { margin-top: 22px; }
h2 { font-size: 16px; margin: 0 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--panel); font-weight: 600; position: sticky; top: 0; }
tr.fail-critical td { background: var(--bad-bg); }
tr.fail-warning td { background: var(--warn-bg); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.failed, .badge.critical { color: var(--bad); background: var(--bad-bg); }
.badge.warning { color: var(--warn); background: var(--warn-bg); }
.badge.passed, .badge.ok, .badge.success { color: var(--ok); background: var(--ok-bg); }
.badge.info, .badge.skipped { color: var(--muted); background: var(--panel); }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; min-width: 140px; background: var(--bg); }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
.muted { color: var(--muted); }
code { background: var(--panel); padding: 0 3px; border-radius: 3px; }
"""


def escape(value: Any) -> str:
    """HTML-escape any value (None -> empty string)."""
    return "" if value is None else _html.escape(str(value), quote=True)


def page(title: str, body: str, *, subtitle: str = "", extra_css: str = "") -> str:
    """A complete HTML document with the shared inline stylesheet. `body` is trusted HTML."""
    sub = f'<div class="sub">{escape(subtitle)}</div>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # A CSP forbids any fetch from the page: whatever a value contains, nothing leaves the machine.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{escape(title)}</title><style>{CSS}{extra_css}</style></head>"
            f"<body><header><h1>{escape(title)}</h1>{sub}</header><main>{body}</main></body></html>\n")


def section(title: str, body: str, *, anchor: str | None = None) -> str:
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{escape(title)}</h2>{body}</section>"


def badge(text: str, kind: str | None = None) -> str:
    """A coloured label; kind is one of failed|critical|warning|passed|ok|success|info|skipped (default: text)."""
    return f'<span class="badge {escape(kind or text)}">{escape(text)}</span>'


def cards(items: Mapping[str, Any]) -> str:
    """Big-number summary cards: {label: value}."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        for k, v in items.items()) + "</div>"


def link(href: str, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def _cell(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            return "", True
        return (f"{value:.6g}" if isinstance(value, float) else str(value)), True
    return escape(value), False


def table(rows: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
          headers: Mapping[str, str] | None = None, row_class: Callable[[Mapping[str, Any]], str] | None = None,
          html_columns: Iterable[str] = (), empty: str = "nothing to show") -> str:
    """An HTML table. Values are escaped except in `html_columns` (for badges or links built by the caller)."""
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(r) for r in rows]
    if columns is None:
        columns = list(rows.columns) if isinstance(rows, pd.DataFrame) else (list(records[0]) if records else [])
    if not records:
        return f'<p class="muted">{escape(empty)}</p>'
    raw = set(html_columns)
    heads = "".join(f"<th>{escape((headers or {}).get(c, c))}</th>" for c in columns)
    body = []
    for rec in records:
        cls = row_class(rec) if row_class else ""
        cells = []
        for c in columns:
            if c in raw:
                cells.append(f"<td>{rec.get(c, '')}</td>")
            else:
                text, numeric = _cell(rec.get(c))
                cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append(f'<tr class="{escape(cls)}">' + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _x_value(x: Any) -> float:
    if isinstance(x, dt.datetime):
        return x.timestamp() / 86400.0
    if isinstance(x, dt.date):
        return float(x.toordinal())
    return float(x)


def _x_label(x: Any) -> str:
    if isinstance(x, dt.date):
        return x.strftime("%m-%d")
    return f"{x:g}" if isinstance(x, float) else str(x)


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt_tick(v: float, fmt: str | None) -> str:
    if fmt:
        return format(v, fmt)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def line_chart(series: Mapping[str, Sequence[tuple[Any, float | None]]], *, title: str = "", y_label: str = "",
               width: int = 520, height: int = 220, y_format: str | None = None, y_min: float | None = 0.0,
               highlight_x: Any = None) -> str:
    """Inline-SVG line chart: {series name: [(x, y), ...]}; x may be dates, datetimes or numbers.

    `highlight_x` draws a vertical marker (e.g. the validated day). None y values break the line.
    """
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and not _isnan(y)]
    if not pts:
        return f'<figure><p class="muted">{escape(title)}: no data</p></figure>'
    left, right, top, bottom = 56, 24, 22, 28 + 16 * math.ceil(len(series) / 4)
    xs = [_x_value(x) for x, _ in pts]
    ys = [float(y) for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0 = min(ys) if y_min is None else min(y_min, min(ys))
    y1 = max(ys)
    if y1 <= y0:
        y1 = y0 + (abs(y0) or 1.0)
    ticks = _nice_ticks(y0, y1)
    y1 = max(y1, ticks[-1])
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (pw * (x - x0) / (x1 - x0) if x1 > x0 else pw / 2)

    def sy(y: float) -> float:
        return top + ph - ph * (y - y0) / (y1 - y0)

    out = [f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">']
    if title:
        out.append(f'<text x="{left}" y="14" style="font-weight:600;fill:#1d2330">{escape(title)}</text>')
    for t in ticks:
        if y0 <= t <= y1:
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e6e8ee"/>')
            out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{escape(_fmt_tick(t, y_format))}</text>')
    all_x = sorted({x for s in series.values() for x, _ in s}, key=_x_value)
    step = max(1, len(all_x) // 6)
    for x in all_x[::step]:
        out.append(f'<text x="{sx(_x_value(x)):.1f}" y="{top + ph + 14}" text-anchor="middle">{escape(_x_label(x))}</text>')
    if highlight_x is not None:
        hx = sx(_x_value(highlight_x))
        out.append(f'<line x1="{hx:.1f}" x2="{hx:.1f}" y1="{top}" y2="{top + ph}" stroke="#b3261e" '
                   'stroke-dasharray="3,3"/>')
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2:.1f}" transform="rotate(-90 12 {top + ph / 2:.1f})" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        segs: list[list[str]] = [[]]
        for x, y in sorted(s, key=lambda p: _x_value(p[0])):
            if y is None or _isnan(y):
                segs.append([])
                continue
            segs[-1].append(f"{sx(_x_value(x)):.1f},{sy(float(y)):.1f}")
        for seg in segs:
            if len(seg) > 1:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{" ".join(seg)}"/>')
            for p in seg:
                cx, cy = p.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.2" fill="{color}"/>')
        lx = left + (i % 4) * (pw / 4)
        ly = top + ph + 30 + 16 * (i // 4)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14:.1f}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return f"<figure>{''.join(out)}</figure>"


def bar_chart(values: Mapping[str, float], *, title: str = "", width: int = 520, bar_height: int = 18,
              value_format: str | None = None, colors: Mapping[str, str] | None = None) -> str:
    """Inline-SVG horizontal bar chart: {label: value} (values >= 0 drawn from zero; negatives to the left)."""
    if not values:
        return f'<figure><p class="muted">{escape(title)}: no data</p></figure>'
    label_w, top = 150, 22 if title else 6
    height = top + bar_height * len(values) + 8
    lo = min(0.0, *values.values())
    hi = max(0.0, *values.values())
    span = (hi - lo) or 1.0
    pw = width - label_w - 70

    def sx(v: float) -> float:
        return label_w + pw * (v - lo) / span

    out = [f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">']
    if title:
        out.append(f'<text x="0" y="14" style="font-weight:600;fill:#1d2330">{escape(title)}</text>')
    for i, (label, v) in enumerate(values.items()):
        y = top + i * bar_height
        color = (colors or {}).get(label, PALETTE[0])
        a, b = sorted((sx(0.0), sx(float(v))))
        out.append(f'<text x="{label_w - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{a:.1f}" y="{y + 2}" width="{max(b - a, 1):.1f}" height="{bar_height - 5}" fill="{color}"/>')
        out.append(f'<text x="{b + 4:.1f}" y="{y + bar_height * 0.7:.1f}">{escape(_fmt_tick(float(v), value_format))}</text>')
    out.append("</svg>")
    return f"<figure>{''.join(out)}</figure>"


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def write_page(path: Path, content: str) -> Path:
    """Write atomically (readers never see a half-written report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return path
