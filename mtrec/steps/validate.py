"""validate: run the data-quality suites on the ds partition, record and report them, stop on critical failures."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import DataValidationError
from mtrec.steps.base import FAILED, SUCCESS, StageResult, new_run_id, stage_warehouse, tracked
from mtrec.validation.drift import DRIFT_CHECK
from mtrec.validation.plan import validate_partition
from mtrec.validation.results import CheckResult, to_frame
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)


@dataclass
class ValidateResult(StageResult):
    critical_failures: list[str] = field(default_factory=list)
    drift_detected: bool = False
    report_path: str = ""
    json_path: str = ""


def _drift(results: list[CheckResult]) -> bool:
    return any(r.expectation == f"{DRIFT_CHECK}[critical]" and not r.success for r in results)


def failure_message(critical: list[CheckResult], report: str) -> tuple[str, CheckResult]:
    first = critical[0]
    more = f"; {len(critical) - 1} more" if len(critical) > 1 else ""
    thr = f" (expected {first.threshold})" if first.threshold else ""
    return (f"critical expectation {first.expectation} failed: observed {first.observed}{thr}{more}; "
            f"report: {report}"), first


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse) -> ValidateResult:
    from mtrec.reports import dq

    started = time.perf_counter()
    outcome = validate_partition(cfg, wh, ds, dq.data_docs_dir(cfg, ds))
    results = outcome.results
    critical, warnings = outcome.critical, outcome.warnings
    drift = _drift(results)
    now = dt.datetime.now(dt.UTC)  # bookkeeping only: which data is checked is decided by ds
    # Everything is recorded before deciding: a failed day still has its rows, JSON and report.
    wh.write_normalized(S.DATA_QUALITY_SPEC, to_frame(results, ds, run_id, now), {"ds": ds})
    status = dq.status_of(len(critical), len(warnings))
    report = dq.report_path(cfg, ds)
    payload = {
        "ds": ds.isoformat(), "run_id": run_id, "status": status, "drift_detected": drift,
        "critical_failures": len(critical), "warnings": len(warnings), "checks": len(results),
        "report": str(report), "data_docs": str(dq.data_docs_dir(cfg, ds) / "index.html"),
        "timings_seconds": {k: round(v, 3) for k, v in outcome.timings.items()},
        "results": [{"table": r.table, "expectation": r.expectation, "column": r.column, "severity": r.severity,
                     "success": r.success, "observed_value": r.observed, "threshold": r.threshold,
                     "details": r.details} for r in results],
    }
    jpath = dq.write_json(cfg, ds, payload)
    dq.write_day_report(cfg, ds, run_id, results, outcome.trends)
    dq.write_index(cfg, wh)
    log.info("validated %s: %s (%d critical, %d warnings, %d checks) in %.1fs; report %s", ds, status,
             len(critical), len(warnings), len(results), time.perf_counter() - started, report)
    if critical:
        message, first = failure_message(critical, str(report))
        raise DataValidationError(message, table=first.table, column=first.column or None, ds=ds)
    return ValidateResult(
        stage="validate", ds=ds, run_id=run_id, status=SUCCESS if not critical else FAILED,
        message=f"{status}: {len(results)} checks, {len(warnings)} warnings; report {report}",
        details={"status": status, "checks": len(results), "warnings": len(warnings), "drift_detected": drift,
                 "timings_seconds": payload["timings_seconds"]},
        artifacts={"dq_report": str(report), "dq_json": str(jpath),
                   "data_docs": str(dq.data_docs_dir(cfg, ds) / "index.html")},
        warnings=[r.summary() for r in warnings],
        critical_failures=[], drift_detected=drift, report_path=str(report), json_path=str(jpath))


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str | None = None, wh: Warehouse | None = None) -> ValidateResult:
    """Validate the raw tables for ds. Raises DataValidationError (after writing every report) on a critical failure."""
    run_id = run_id or new_run_id(ds)
    with stage_warehouse(cfg, wh) as w:
        return tracked("validate", cfg, ds, run_id, w, _body, cfg, ds, run_id, w)


def drift_flag(cfg: MtrecConfig, wh: Warehouse, ds: dt.date) -> bool:
    """True when the DQ drift check for ds flagged a shift (what the `auto` retrain policy consults)."""
    if not cfg.validation.drift_triggers_retrain or not wh.table_exists(S.DATA_QUALITY_RESULTS):
        return False
    n = wh.scalar(f"SELECT count(*) FROM {q(S.DATA_QUALITY_RESULTS)} WHERE ds = :ds AND expectation = :e "
                  "AND NOT success", {"ds": ds, "e": f"{DRIFT_CHECK}[critical]"})
    return bool(n)
