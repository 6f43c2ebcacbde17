"""Validate one ds partition: gather the suites, run them, and return every result with the trends."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.validation import aggregates, drift, suites
from mtrec.validation.engine import Suite, run_suites
from mtrec.validation.results import WARNING, CheckResult, sort_results
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    results: list[CheckResult]
    trends: aggregates.Trends
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def critical(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed_critical]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success and r.severity == WARNING]


def scenarios_before(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, ev_types: dict[str, str]) -> list[str] | None:
    """The known scenario set: the configured one, else the scenarios seen before ds (None: no history yet)."""
    if cfg.scenarios:
        return list(cfg.scenarios)
    if "scenario" not in ev_types or "ds" not in ev_types:
        return None
    df = wh.query_df(f"SELECT DISTINCT scenario FROM {q(S.EVENTS)} WHERE {aggregates.ds_condition(ev_types, '< :d')} "
                     "AND scenario IS NOT NULL ORDER BY scenario", {"d": ds})
    return [str(s) for s in df["scenario"]] or None


def validate_partition(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, data_docs_dir: Path | None = None) -> Outcome:
    """Run every check for ds. Never raises for bad data: a broken table becomes failed results."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    types = {t: wh.columns(t) for t in S.RAW_TABLES if wh.table_exists(t)}
    pre: list[CheckResult] = [suites.missing_table(t) for t in S.RAW_TABLES if t not in types]
    ev = types.get(S.EVENTS, {})
    gx_suites: list[Suite] = []
    if ev and "ds" not in ev:
        pre.append(CheckResult(S.EVENTS, "column_exists", "ds", "critical", False, "missing", "column exists",
                               {"why": "the partition column ds is added at load; without it no day can be read"}))
    elif ev:
        known = scenarios_before(cfg, wh, ds, ev)
        if known is None and "scenario" in ev:
            pre.append(CheckResult(S.EVENTS, "scenario_known", "scenario", WARNING, True,
                                   "skipped: no scenarios configured and none seen before this day", "", {}))
        suite, _ = suites.events_suite(cfg, wh, ds, ev, known)
        gx_suites.append(suite)
    for table in (S.USERS, S.ITEMS):
        if table in types:
            gx_suites.append(suites.entity_suite(cfg, wh, table, ds, types[table]))
    timings["read_rows"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    tr = aggregates.trends(cfg, wh, ds, ev) if ev else aggregates.Trends(
        pd.DataFrame(columns=["ds", "rows"]), pd.DataFrame(columns=["ds", "scenario"]), [])
    metrics: list[aggregates.Metric] = []
    if ev and "ds" in ev:
        for fn in (lambda: aggregates.row_count_metrics(cfg, ds, tr),
                   lambda: aggregates.label_rate_metrics(cfg, ds, tr),
                   lambda: aggregates.unknown_ref_metrics(cfg, wh, ds, types),
                   lambda: drift.drift_metrics(cfg, wh, ds, types)):
            got, notes = fn()
            metrics += got
            pre += notes
    if metrics:
        gx_suites.append(aggregates.metrics_suite(metrics))
    timings["aggregates"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    results = pre + run_suites(gx_suites, data_docs_dir)
    timings["great_expectations"] = time.perf_counter() - t2
    return Outcome(sort_results(results), tr, timings)
