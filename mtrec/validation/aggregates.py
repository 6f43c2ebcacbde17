"""Aggregate checks computed in the warehouse (row counts, label rates, unknown references) and their trends."""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import WarehouseError
from mtrec.validation.results import CRITICAL, WARNING, CheckResult
from mtrec.validation.suites import is_date_type, is_numeric_type, is_timestamp_type
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)


@dataclass
class Metric:
    """One aggregate value checked against a band by a GX expectation on a one-row frame."""

    table: str
    check: str
    column: str
    value: float
    min_value: float | None
    max_value: float | None
    severity: str
    observed: str
    threshold: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trends:
    """What the report charts: rows per day and positives per (day, scenario) over the trailing window."""

    daily_rows: pd.DataFrame  # ds, rows
    label_counts: pd.DataFrame  # ds, scenario, impressions, <task>... (positives)
    tasks: list[str]


def ds_condition(wh_types: dict[str, str], op: str = "=", alias: str = "") -> str:
    col = f"{alias}ds" if alias else "ds"
    expr = col if is_date_type(wh_types.get("ds")) else f"CAST({col} AS DATE)"
    return f"{expr} {op}"


def _num(x: object) -> float:
    """SUM over no rows is NULL (None or NaN depending on the driver)."""
    return 0.0 if x is None or pd.isna(x) else float(x)


def trends(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, wh_types: dict[str, str]) -> Trends:
    """Per-day rows and positives per scenario over max(report window, check windows): one bounded scan."""
    v = cfg.validation
    days = max(v.report_trend_days, v.row_count_window_days + 1, v.label_rate_window_days + 1)
    start = ds - dt.timedelta(days=days - 1)
    tasks = [t for t in cfg.task_names if is_numeric_type(wh_types.get(t))]
    if "ds" not in wh_types:
        return Trends(pd.DataFrame(columns=["ds", "rows"]), pd.DataFrame(columns=["ds", "scenario", "impressions"]),
                      tasks)
    dsx = ds_condition(wh_types, "BETWEEN :a AND :b")
    day = "ds" if is_date_type(wh_types.get("ds")) else "CAST(ds AS DATE)"
    if "scenario" in wh_types:
        sums = "".join(f", sum(CASE WHEN {q(t)} = 1 THEN 1 ELSE 0 END) AS {q(t)}" for t in tasks)
        counts = wh.query_df(f"SELECT {day} AS ds, scenario, count(*) AS impressions{sums} FROM {q(S.EVENTS)} "
                             f"WHERE {dsx} GROUP BY 1, 2 ORDER BY 1, 2", {"a": start, "b": ds})
    else:
        counts = wh.query_df(f"SELECT {day} AS ds, '?' AS scenario, count(*) AS impressions FROM {q(S.EVENTS)} "
                             f"WHERE {dsx} GROUP BY 1 ORDER BY 1", {"a": start, "b": ds})
        tasks = []
    counts["ds"] = pd.to_datetime(counts["ds"]).dt.date
    for c in ["impressions", *tasks]:
        counts[c] = pd.to_numeric(counts[c]).fillna(0).astype("int64")
    daily = counts.groupby("ds", as_index=False)["impressions"].sum().rename(columns={"impressions": "rows"})
    return Trends(daily, counts, tasks)


def row_count_metrics(cfg: MtrecConfig, ds: dt.date, tr: Trends) -> tuple[list[Metric], list[CheckResult]]:
    v = cfg.validation
    lo_day = ds - dt.timedelta(days=v.row_count_window_days)
    by_day = dict(zip(tr.daily_rows["ds"], tr.daily_rows["rows"], strict=True))
    trailing = [n for d, n in by_day.items() if lo_day <= d < ds]
    today = int(by_day.get(ds, 0))
    if not trailing:
        return [], [CheckResult(S.EVENTS, f"row_count_vs_trailing_median[{sev}]", "", sev, True,
                                f"{today} rows; skipped: no trailing history", "", {})
                    for sev in (WARNING, CRITICAL)]
    med = float(pd.Series(trailing).median())
    out = []
    for sev, ratio in ((WARNING, v.row_count_warning_ratio), (CRITICAL, v.row_count_critical_ratio)):
        lo, hi = med / ratio, med * ratio
        out.append(Metric(S.EVENTS, f"row_count_vs_trailing_median[{sev}]", "", float(today), lo, hi, sev,
                          f"{today} rows = {today / med:.3g}x the trailing {len(trailing)}-day median {med:g}",
                          f"[{lo:.6g}, {hi:.6g}] rows (median / {ratio:g} .. median x {ratio:g})",
                          {"median": med, "days": len(trailing)}))
    return out, []


def label_rate_metrics(cfg: MtrecConfig, ds: dt.date, tr: Trends) -> tuple[list[Metric], list[CheckResult]]:
    """Today's label rate per scenario x task against the trailing window, in a band widened for noise."""
    v = cfg.validation
    lc = tr.label_counts
    if lc.empty or not tr.tasks:
        return [], []
    lo_day = ds - dt.timedelta(days=v.label_rate_window_days)
    today = lc[lc["ds"] == ds].set_index("scenario")
    ref = lc[(lc["ds"] >= lo_day) & (lc["ds"] < ds)].groupby("scenario")[["impressions", *tr.tasks]].sum()
    metrics: list[Metric] = []
    skipped: list[CheckResult] = []
    for scen in sorted(today.index):
        n = int(today.at[scen, "impressions"])
        ref_n = int(ref.at[scen, "impressions"]) if scen in ref.index else 0
        for task in tr.tasks:
            col = f"{task}@{scen}"
            rate = float(today.at[scen, task]) / n if n else 0.0
            if n < v.label_rate_min_impressions or ref_n < v.label_rate_min_impressions:
                skipped += [CheckResult(S.EVENTS, f"label_rate_vs_trailing[{sev}]", col, sev, True,
                                        f"rate {rate:.4g} over {n} impressions; skipped: fewer than "
                                        f"{v.label_rate_min_impressions} impressions today or in the trailing window",
                                        "", {}) for sev in (WARNING, CRITICAL)]
                continue
            base = float(ref.at[scen, task]) / ref_n
            se = math.sqrt(max(base * (1 - base), 1e-12) / n)
            for sev, ratio in ((WARNING, v.label_rate_warning_ratio), (CRITICAL, v.label_rate_critical_ratio)):
                lo = max(0.0, min(base / ratio, base - v.label_rate_z * se))
                hi = min(1.0, max(base * ratio, base + v.label_rate_z * se))
                metrics.append(Metric(
                    S.EVENTS, f"label_rate_vs_trailing[{sev}]", col, rate, lo, hi, sev,
                    f"rate {rate:.4g} over {n} impressions vs trailing {base:.4g} "
                    f"({rate / base if base else float('inf'):.3g}x)",
                    f"[{lo:.4g}, {hi:.4g}] (trailing / {ratio:g} .. x {ratio:g}, widened to {v.label_rate_z:g} s.e.)",
                    {"trailing_rate": base, "trailing_impressions": ref_n, "impressions": n}))
    return metrics, skipped


def unknown_ref_metrics(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, types: dict[str, dict[str, str]]
                        ) -> tuple[list[Metric], list[CheckResult]]:
    """Share of the day's events whose user or item is not in users / items (as of the end of ds)."""
    from mtrec.data.raw import end_of_day

    v = cfg.validation
    ev = types.get(S.EVENTS, {})
    metrics: list[Metric] = []
    failed: list[CheckResult] = []
    for table in (S.USERS, S.ITEMS):
        key = S.ID_COLUMN[table]
        check = f"unknown_{table}_ratio"
        bands = ((WARNING, v.unknown_ref_warning), (CRITICAL, v.unknown_ref_critical))
        if table == S.USERS:
            bands = ((WARNING, v.unknown_user_warning if v.unknown_user_warning is not None else v.unknown_ref_warning),
                     (CRITICAL, v.unknown_user_critical if v.unknown_user_critical is not None
                      else v.unknown_ref_critical))
        ref_types = types.get(table)
        if key not in ev or "ds" not in ev or not ref_types or key not in ref_types:
            failed += [CheckResult(S.EVENTS, f"{check}[{sev}]", key, sev, False,
                                   f"could not evaluate: {table}.{key} or events.{key} is missing", f"<= {thr:g}", {})
                       for sev, thr in bands]
            continue
        as_of = "WHERE updated_at < :end" if is_timestamp_type(ref_types.get("updated_at")) else ""
        sql = (f"SELECT count(*) AS n, sum(CASE WHEN r.{q(key)} IS NULL THEN 1 ELSE 0 END) AS unknown "
               f"FROM {q(S.EVENTS)} e LEFT JOIN (SELECT DISTINCT {q(key)} FROM {q(table)} {as_of}) r "
               f"ON r.{q(key)} = e.{q(key)} WHERE {ds_condition(ev, '= :ds', 'e.')} AND e.{q(key)} IS NOT NULL")
        try:
            row = wh.query_df(sql, {"ds": ds, "end": end_of_day(ds)}).iloc[0]
        except WarehouseError as e:
            failed += [CheckResult(S.EVENTS, f"{check}[{sev}]", key, sev, False, f"could not evaluate: {e}",
                                   f"<= {thr:g}", {}) for sev, thr in bands]
            continue
        n, unknown = int(_num(row["n"])), int(_num(row["unknown"]))
        ratio = unknown / n if n else 0.0
        for sev, thr in bands:
            metrics.append(Metric(S.EVENTS, f"{check}[{sev}]", key, ratio, None, thr, sev,
                                  f"{ratio:.4g} ({unknown} of {n} events name an unknown {key})",
                                  f"<= {thr:g}", {"unknown": unknown, "events": n}))
    return metrics, failed


def metrics_suite(metrics: list[Metric]):
    """One GX suite over a one-row frame: each metric is a column checked against its band."""
    from mtrec.validation.engine import Suite, _quiet_gx

    _quiet_gx()
    import great_expectations.expectations as gxe

    frame = pd.DataFrame({f"m{i:03d}_{m.check.split('[')[0]}": [m.value] for i, m in enumerate(metrics)})
    exps = []
    for col, m in zip(frame.columns, metrics, strict=True):
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=m.min_value, max_value=m.max_value, severity=m.severity,
            meta={"check": m.check, "table": m.table, "column": m.column, "threshold": m.threshold,
                  "observed": m.observed, **{k: v for k, v in m.extra.items() if isinstance(v, int | float | str)}}))
    return Suite(name="aggregates", frame=frame, expectations=exps)
