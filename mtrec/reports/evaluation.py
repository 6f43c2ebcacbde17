"""Self-contained HTML evaluation report rendered from evaluation.json alone (no external URLs)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

PALETTE = {"candidate": "#1f77b4", "champion": "#d62728"}
OTHER_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
ALL = "__all__"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.banner{padding:14px 18px;border-radius:6px;margin:12px 0;font-size:15px}
.blessed{background:#e6f4ea;border:1px solid #34a853} .rejected{background:#fce8e6;border:1px solid #d93025}
.banner strong{font-size:18px;text-transform:uppercase;letter-spacing:.04em}
.banner ul{margin:8px 0 0 18px;padding:0}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left}
.fail{color:#b3261e;font-weight:600} .pass{color:#188038} .nj{color:#777}
.ci{color:#666;font-size:11px} .charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{border:1px solid #eee;padding:6px} .meta td{text-align:left}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else _e(x)


def _colors(models: list[str]) -> dict[str, str]:
    out, extra = {}, iter(OTHER_COLORS * 4)
    for m in models:
        out[m] = PALETTE.get(m) or next(extra)
    return out


def _svg_lines(series: dict[str, list[list[float]]], colors: dict[str, str], *, title: str, xlabel: str,
               ylabel: str, diagonal: bool = True, x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None, width: int = 340, height: int = 260) -> str:
    """A line chart as inline SVG; series: name -> [[x, y], ...]."""
    pad_l, pad_r, pad_t, pad_b = 54, 14, 24, 36
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f'<div class="chart"><em>{_e(title)}: no data</em></div>'
    x0, x1 = x_range or (min(p[0] for p in pts), max(p[0] for p in pts))
    y0, y1 = y_range or (min(p[1] for p in pts), max(p[1] for p in pts))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return pad_t + h - (y - y0) / (y1 - y0) * h

    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>']
    for frac in (0, 0.5, 1):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        parts.append(f'<text x="{sx(xv):.1f}" y="{pad_t + h + 14}" text-anchor="middle" font-size="10">'
                     f'{xv:.3g}</text>')
        parts.append(f'<text x="{pad_l - 4}" y="{sy(yv) + 3:.1f}" text-anchor="end" font-size="10">{yv:.3g}</text>')
    parts.append(f'<text x="{pad_l + w / 2}" y="{height - 4}" text-anchor="middle" font-size="11">{_e(xlabel)}</text>')
    parts.append(f'<text x="11" y="{pad_t + h / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 11 {pad_t + h / 2})">{_e(ylabel)}</text>')
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        parts.append(f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
                     f'stroke="#aaa" stroke-dasharray="4 3"/>')
    for name, s in series.items():
        if not s:
            continue
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, *_ in s)
        parts.append(f'<polyline fill="none" stroke="{colors.get(name, "#333")}" stroke-width="1.8" points="{d}">'
                     f'<title>{_e(name)}</title></polyline>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def _legend(colors: dict[str, str]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><svg width="14" height="10"><rect width="14" height="10" fill="{c}"/></svg> {_e(m)}</span>'
        for m, c in colors.items()) + "</div>"


def _models(ev: dict[str, Any]) -> dict[str, dict]:
    """Display name -> metrics tree, candidate first, champion, then baselines."""
    m = ev.get("metrics", {})
    out = {"candidate": m.get("candidate", {})}
    if m.get("champion"):
        out["champion"] = m["champion"]
    for name, tree in (m.get("baselines") or {}).items():
        out[name] = tree
    return out


def _cell(metric: dict | None, key: str) -> str:
    if not metric or metric.get(key) is None:
        return "<td>–</td>"
    ci = metric.get(f"{key}_ci")
    ci_s = f'<br><span class="ci">[{_num(ci[0], 3)}, {_num(ci[1], 3)}]</span>' if ci and None not in ci else ""
    return f"<td>{_num(metric[key])}{ci_s}</td>"


def _metrics_table(ev: dict[str, Any]) -> str:
    models = _models(ev)
    ref = ev.get("reference", "champion")
    diffs = (ev.get("differences") or {}).get(ref, {})
    keys = ["auc", "logloss", "gauc"]
    extra = sorted({k for tree in models.values() for tasks in tree.values() for cell in tasks.values()
                    for k in cell if isinstance(cell.get(k), int | float) and not k.endswith("_ci")
                    and k not in keys and k not in ("n", "positives")})
    head = ('<tr><th class="l">scenario</th><th class="l">task</th><th>rows</th><th>positives</th>'
            '<th class="l">model</th>' + "".join(f"<th>{_e(k)}</th>" for k in keys + extra)
            + f"<th>Δ AUC vs {_e(ref)}<br><span class='ci'>{_e(ev.get('gate_config', {}).get('confidence', 0.95))}"
            " CI</span></th></tr>")
    rows = []
    scenarios = sorted({s for tree in models.values() for s in tree}, key=lambda s: (s != ALL, s))
    tasks = ev.get("tasks") or sorted({t for tree in models.values() for s in tree.values() for t in s})
    for s in scenarios:
        for t in tasks:
            base = models["candidate"].get(s, {}).get(t, {})
            d = (diffs.get(s) or {}).get(t, {}).get("auc") if diffs else None
            d_s = (f"{d['point']:+.4f}<br><span class='ci'>[{_num(d['lo'], 3)}, {_num(d['hi'], 3)}]</span>"
                   if d and d.get("point") is not None and d.get("lo") is not None else "–")
            for i, (name, tree) in enumerate(models.items()):
                cell = tree.get(s, {}).get(t)
                lead = (f'<td class="l" rowspan="{len(models)}">{_e("all scenarios" if s == ALL else s)}</td>'
                        f'<td class="l" rowspan="{len(models)}">{_e(t)}</td>'
                        f'<td rowspan="{len(models)}">{_e(base.get("n", "–"))}</td>'
                        f'<td rowspan="{len(models)}">{_e(base.get("positives", "–"))}</td>') if i == 0 else ""
                tail = f'<td rowspan="{len(models)}">{d_s}</td>' if i == 0 else ""
                rows.append(f'<tr>{lead}<td class="l">{_e(name)}</td>'
                            + "".join(_cell(cell, k) for k in keys + extra) + tail + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _rules_table(ev: dict[str, Any]) -> str:
    cls = {"fail": "fail", "pass": "pass", "not judged": "nj"}
    rows = "".join(f'<tr><td class="l">{_e(r["rule"])}</td><td class="l {cls.get(r["outcome"], "")}">'
                   f'{_e(r["outcome"])}</td><td class="l">{_e(r["text"])}</td></tr>' for r in ev.get("rules", []))
    return '<table><tr><th class="l">rule</th><th class="l">outcome</th><th class="l">detail</th></tr>' + rows + "</table>"


def _training_curves(ev: dict[str, Any]) -> str:
    history = (ev.get("training") or {}).get("history") or []
    if not history:
        return "<p><em>no training history recorded for this candidate</em></p>"
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, int | float) and k != "epoch"})
    charts = []
    for k in keys:
        pts = [[float(h.get("epoch", i + 1)), float(h[k])] for i, h in enumerate(history)
               if isinstance(h.get(k), int | float)]
        charts.append(_svg_lines({k: pts}, {k: "#1f77b4"}, title=k, xlabel="epoch", ylabel=k, diagonal=False))
    return '<div class="charts">' + "".join(charts) + "</div>"


def render(ev: dict[str, Any]) -> str:
    decision = ev.get("decision", "unknown")
    cand = ev.get("candidate") or {}
    champ = ev.get("champion")
    hold, train = ev.get("holdout") or {}, ev.get("train_window") or {}
    title = f"mtrec evaluation {ev.get('ds', '')}: {cand.get('version', '?')} {decision}"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in ev.get("reasons", []))
    warnings = "".join(f"<li>{_e(w)}</li>" for w in ev.get("warnings", []))
    against = (f"champion {champ['version']}" if champ else f"{ev.get('reference', 'popularity')} baseline "
               f"(first run: no champion)")
    banner = (f'<div class="banner {_e(decision)}" id="decision"><strong>{_e(decision)}</strong> '
              f'candidate {_e(cand.get("version", "?"))} against {_e(against)}'
              + (" (forced)" if ev.get("forced") else "") + f"<ul id='reasons'>{reasons}</ul></div>")
    meta_rows = [
        ("logical date (ds)", ev.get("ds")), ("run", ev.get("run_id")),
        ("holdout", f"{hold.get('first_day')} .. {hold.get('last_day')} ({hold.get('rows')} impressions, "
                    f"{hold.get('users')} users, scenarios {', '.join(hold.get('scenarios', []))})"),
        ("training window", f"{train.get('first_day')} .. {train.get('last_day')}"
                            + (f" ({train.get('rows')} impressions)" if train.get("rows") is not None else "")),
        ("candidate", f"{cand.get('version')} · {cand.get('model_name')} · trained through "
                      f"{cand.get('trained_through')} · sha256 {str(cand.get('sha256', ''))[:12]}"),
        ("champion", f"{champ['version']} · {champ.get('model_name')} · trained through {champ.get('trained_through')}"
         if champ else "none (first run)"),
    ]
    meta = '<table class="meta">' + "".join(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>"
                                            for k, v in meta_rows) + "</table>"
    curve_blocks = []
    for task, by_model in (ev.get("curves") or {}).items():
        colors = _colors(list(by_model))
        roc = _svg_lines({m: c.get("roc", []) for m, c in by_model.items()}, colors, title=f"ROC · {task}",
                         xlabel="false positive rate", ylabel="true positive rate", x_range=(0, 1), y_range=(0, 1))
        cal_series = {m: c.get("calibration", []) for m, c in by_model.items()}
        top = max([max(p[0], p[1]) for s in cal_series.values() for p in s] or [1.0])
        cal = _svg_lines(cal_series, colors, title=f"calibration · {task}", xlabel="mean predicted",
                         ylabel="observed rate", x_range=(0, top), y_range=(0, top))
        curve_blocks.append(_legend(colors) + f'<div class="charts">{roc}{cal}</div>')
    body = [
        f"<h1>{_e(title)}</h1>", banner,
        f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "",
        "<h2>Data window</h2>", meta,
        "<h2>Metrics per scenario × task</h2>",
        "<p>Point estimates on the holdout with bootstrap intervals (users resampled; differences paired).</p>",
        _metrics_table(ev),
        "<h2>Gate rules</h2>", _rules_table(ev),
        "<h2>ROC and calibration</h2>", "".join(curve_blocks) or "<p><em>no curves</em></p>",
        "<h2>Training curves</h2>", _training_curves(ev),
        "<h2>Gate configuration</h2>", f"<pre>{_e(json.dumps(ev.get('gate_config', {}), indent=2))}</pre>",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>")


def write_report(evaluation: dict[str, Any], path: str | Path) -> Path:
    """Render evaluation.json's content to a self-contained HTML file (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(render(evaluation), encoding="utf-8")
    tmp.replace(path)
    return path
