"""One expectation outcome per table and column: the row shape of `data_quality_results`."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

CRITICAL, WARNING, INFO = "critical", "warning", "info"
SEVERITY_ORDER = {CRITICAL: 0, WARNING: 1, INFO: 2}


@dataclass
class CheckResult:
    """The outcome of one expectation. `expectation` is our stable check name (the GX type is in details)."""

    table: str
    expectation: str
    column: str
    severity: str
    success: bool
    observed: str
    threshold: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_critical(self) -> bool:
        return not self.success and self.severity == CRITICAL

    def summary(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        thr = f" (expected {self.threshold})" if self.threshold else ""
        return f"{where}: {self.expectation} observed {self.observed}{thr}"


def sort_results(results: list[CheckResult]) -> list[CheckResult]:
    """Failures first (critical, then warning), then passes; stable within a group."""
    return sorted(results, key=lambda r: (r.success, SEVERITY_ORDER.get(r.severity, 9), r.table))


def to_frame(results: list[CheckResult], ds: dt.date, run_id: str, created_at: dt.datetime) -> pd.DataFrame:
    """Rows for `data_quality_results` (one per table x expectation x column)."""
    rows = [{
        "ds": ds, "table_name": r.table, "expectation": r.expectation, "column_name": r.column,
        "severity": r.severity, "success": bool(r.success), "observed_value": r.observed[:2000],
        "threshold": r.threshold[:2000], "details": json.dumps(r.details, default=str)[:20_000],
        "run_id": run_id, "created_at": created_at,
    } for r in results]
    df = pd.DataFrame(rows, columns=["ds", "table_name", "expectation", "column_name", "severity", "success",
                                     "observed_value", "threshold", "details", "run_id", "created_at"])
    # The primary key must hold even if a suite produced the same check twice: keep the worst outcome.
    df = df.sort_values(["success"], kind="stable").drop_duplicates(["table_name", "expectation", "column_name"])
    return df.reset_index(drop=True)
