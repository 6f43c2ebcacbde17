"""Data-quality reports: the per-day HTML and JSON, the 90-day index, and the `mtrec dq` queries."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.reports import html as H
from mtrec.validation.results import CRITICAL, WARNING, CheckResult
from mtrec.warehouse import Warehouse, q

PASSED, WARNED, FAILED = "passed", "warning", "failed"
SHOW_COLUMNS = ["table", "expectation", "column", "severity", "success", "observed_value", "threshold"]


def dq_dir(cfg: MtrecConfig) -> Path:
    return cfg.reports_dir / "dq"


def report_path(cfg: MtrecConfig, ds: dt.date) -> Path:
    return dq_dir(cfg) / f"{ds.isoformat()}.html"


def json_path(cfg: MtrecConfig, ds: dt.date) -> Path:
    return dq_dir(cfg) / f"{ds.isoformat()}.json"


def data_docs_dir(cfg: MtrecConfig, ds: dt.date) -> Path:
    return dq_dir(cfg) / "data_docs" / ds.isoformat()


def status_of(critical: int, warnings: int) -> str:
    return FAILED if critical else WARNED if warnings else PASSED


def _status_badge(status: str) -> str:
    return H.badge(status, {PASSED: "passed", WARNED: "warning", FAILED: "failed"}.get(status, "info"))


# -- queries ------------------------------------------------------------------------------------------

def list_days(cfg: MtrecConfig, wh: Warehouse, limit: int = 90) -> pd.DataFrame:
    """The last `limit` validated days, newest first: ds, status, critical, warnings, report_path.

    Bounded: only the rows of the last `limit` calendar days are aggregated, however long the history.
    """
    cols = ["ds", "status", "critical", "warnings", "report_path"]
    if not wh.table_exists(S.DATA_QUALITY_RESULTS):
        return pd.DataFrame(columns=cols)
    latest = wh.scalar(f"SELECT max(ds) FROM {q(S.DATA_QUALITY_RESULTS)}")
    if latest is None:
        return pd.DataFrame(columns=cols)
    latest = pd.Timestamp(latest).date()
    since = latest - dt.timedelta(days=max(limit, 1) - 1)
    df = wh.query_df(
        f"SELECT ds, sum(CASE WHEN NOT success AND severity = 'critical' THEN 1 ELSE 0 END) AS critical, "
        f"sum(CASE WHEN NOT success AND severity = 'warning' THEN 1 ELSE 0 END) AS warnings, count(*) AS checks "
        f"FROM {q(S.DATA_QUALITY_RESULTS)} WHERE ds >= :since GROUP BY ds ORDER BY ds DESC LIMIT :n",
        {"since": since, "n": int(limit)})
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["ds"] = pd.to_datetime(df["ds"]).dt.date
    df["critical"] = pd.to_numeric(df["critical"]).fillna(0).astype(int)
    df["warnings"] = pd.to_numeric(df["warnings"]).fillna(0).astype(int)
    df["status"] = [status_of(c, w) for c, w in zip(df["critical"], df["warnings"], strict=True)]
    df["report_path"] = [str(report_path(cfg, d)) for d in df["ds"]]
    return df[cols].reset_index(drop=True)


def show_day(cfg: MtrecConfig, wh: Warehouse, ds: dt.date) -> pd.DataFrame:
    """Every expectation recorded for ds, failures first (critical, then warning), with observed values."""
    if not wh.table_exists(S.DATA_QUALITY_RESULTS):
        return pd.DataFrame(columns=SHOW_COLUMNS)
    df = wh.query_df(
        f"SELECT table_name AS {q('table')}, expectation, column_name AS {q('column')}, severity, success, "
        f"observed_value, threshold FROM {q(S.DATA_QUALITY_RESULTS)} WHERE ds = :ds", {"ds": ds})
    if df.empty:
        return pd.DataFrame(columns=SHOW_COLUMNS)
    df["success"] = df["success"].astype(bool)
    rank = df["severity"].map({CRITICAL: 0, WARNING: 1}).fillna(2)
    df = df.assign(_f=df["success"].astype(int), _r=rank).sort_values(
        ["_f", "_r", "table", "expectation", "column"], kind="stable")
    return df.drop(columns=["_f", "_r"])[SHOW_COLUMNS].reset_index(drop=True)


# -- files --------------------------------------------------------------------------------------------

def write_json(cfg: MtrecConfig, ds: dt.date, payload: dict[str, Any]) -> Path:
    path = json_path(cfg, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def _row_class(rec: dict[str, Any]) -> str:
    if rec.get("success") in (False, "no"):
        return "fail-critical" if rec.get("severity") == CRITICAL else "fail-warning"
    return ""


def _results_table(results: list[CheckResult], empty: str) -> str:
    rows = [{"table": r.table, "expectation": r.expectation, "column": r.column,
             "severity": H.badge(r.severity, None if not r.success else "info"), "success": r.success,
             "result": H.badge("passed" if r.success else "failed"), "observed value": r.observed,
             "threshold": r.threshold, "_sev": r.severity} for r in results]
    return H.table(rows, ["table", "expectation", "column", "severity", "result", "observed value", "threshold"],
                   html_columns=["severity", "result"],
                   row_class=lambda rec: _row_class({"success": rec["success"], "severity": rec["_sev"]}),
                   empty=empty)


def render_day(cfg: MtrecConfig, ds: dt.date, run_id: str, results: list[CheckResult], trends: Any,
               data_docs_index: Path | None = None) -> str:
    """The day's report: failures first, then trends of row counts and label rates per scenario."""
    critical = [r for r in results if r.failed_critical]
    warnings = [r for r in results if not r.success and r.severity == WARNING]
    status = status_of(len(critical), len(warnings))
    daily = trends.daily_rows
    today_rows = int(daily.loc[daily["ds"] == ds, "rows"].sum()) if len(daily) else 0
    head = H.cards({"status": status, "critical failures": len(critical), "warnings": len(warnings),
                    "checks": len(results), f"events on {ds}": today_rows})
    links = [H.link("index.html", "all days")]
    links.append(H.link(f"{ds.isoformat()}.json", "JSON result"))
    if data_docs_index is not None and data_docs_index.exists():
        links.append(H.link(os.path.relpath(data_docs_index, dq_dir(cfg)), "Great Expectations Data Docs"))
    body = [f"<p>{_status_badge(status)} &nbsp; " + " · ".join(links) + "</p>", head]
    body.append(H.section("Failures", _results_table(critical + warnings, "no failed expectation"),
                          anchor="failures"))
    start = ds - dt.timedelta(days=cfg.validation.report_trend_days - 1)
    d = daily[(daily["ds"] >= start) & (daily["ds"] <= ds)] if len(daily) else daily
    charts = [H.line_chart({"events": list(zip(d["ds"], d["rows"], strict=True))},
                           title=f"events per day (last {cfg.validation.report_trend_days} days)",
                           y_label="rows", highlight_x=ds)]
    lc = trends.label_counts
    if len(lc) and trends.tasks:
        lc = lc[(lc["ds"] >= start) & (lc["ds"] <= ds)]
        for task in trends.tasks:
            series = {}
            for scen, g in lc.groupby("scenario"):
                series[str(scen)] = [(day, (pos / n) if n else None)
                                     for day, pos, n in zip(g["ds"], g[task], g["impressions"], strict=True)]
            charts.append(H.line_chart(series, title=f"{task} rate per scenario", y_label=f"{task} rate",
                                       y_format=".3f", highlight_x=ds))
    body.append(H.section("Trends", '<div class="charts">' + "".join(charts) + "</div>", anchor="trends"))
    passed = [r for r in results if r.success]
    body.append(H.section(f"Passed expectations ({len(passed)})", _results_table(passed, "none"), anchor="passed"))
    return H.page(f"Data quality {ds.isoformat()}", "".join(body), subtitle=f"run {run_id} · status {status}")


def write_day_report(cfg: MtrecConfig, ds: dt.date, run_id: str, results: list[CheckResult], trends: Any
                     ) -> Path:
    content = render_day(cfg, ds, run_id, results, trends, data_docs_dir(cfg, ds) / "index.html")
    return H.write_page(report_path(cfg, ds), content)


def render_index(cfg: MtrecConfig, days: pd.DataFrame) -> str:
    rows = []
    for rec in days.to_dict("records"):
        name = Path(rec["report_path"]).name
        rows.append({"ds": H.link(name, rec["ds"].isoformat()), "status": _status_badge(rec["status"]),
                     "critical": rec["critical"], "warnings": rec["warnings"],
                     "_status": rec["status"]})
    counts = days["status"].value_counts().to_dict() if len(days) else {}
    head = H.cards({"days": len(days), "failed": counts.get(FAILED, 0), "warning": counts.get(WARNED, 0),
                    "passed": counts.get(PASSED, 0)})
    tab = H.table(rows, ["ds", "status", "critical", "warnings"], html_columns=["ds", "status"],
                  row_class=lambda r: {FAILED: "fail-critical", WARNED: "fail-warning"}.get(r["_status"], ""),
                  empty="no validated day yet")
    return H.page("Data quality: validated days", head + H.section(
        f"Last {cfg.validation.report_index_days} days", tab), subtitle=str(dq_dir(cfg).resolve()))


def write_index(cfg: MtrecConfig, wh: Warehouse) -> Path:
    """Rebuild index.html from the table (bounded window: cost does not grow with history)."""
    days = list_days(cfg, wh, limit=cfg.validation.report_index_days)
    return H.write_page(dq_dir(cfg) / "index.html", render_index(cfg, days))
