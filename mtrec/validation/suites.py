"""Row-level expectation suites as code for events (the ds partition), users and items (rows of ds)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.validation.engine import Suite
from mtrec.validation.results import CRITICAL, WARNING, CheckResult
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

# pandas/GX type names accepted for each logical type (GX reports the element type for object columns).
TYPE_NAMES = {
    S.TEXT: ["str", "object", "string", "StringDtype"],
    S.TIMESTAMP: ["Timestamp", "datetime64", "datetime64[ns]", "datetime64[us]", "datetime64[ns, UTC]",
                  "datetime64[us, UTC]", "DatetimeTZDtype"],
    S.BIGINT: ["int64", "int32", "int16", "int8", "uint8", "Int64", "Int32", "Int16", "Int8", "int"],
    S.DOUBLE: ["float64", "float32", "Float64", "float"],
}
ENTITY_SAMPLE_ROWS = 10_000
TS_SUFFIX = "__utc"  # derived column: the timestamp parsed to UTC, so range checks never crash on strings


def _gxe():
    from mtrec.validation.engine import _quiet_gx
    _quiet_gx()
    import great_expectations.expectations as gxe
    return gxe


def is_timestamp_type(sql_type: str | None) -> bool:
    return bool(sql_type) and "timestamp" in sql_type.lower()


def is_numeric_type(sql_type: str | None) -> bool:
    t = (sql_type or "").lower()
    return any(k in t for k in ("int", "double", "float", "numeric", "real", "decimal"))


def is_date_type(sql_type: str | None) -> bool:
    return (sql_type or "").lower() == "date"


def _meta(check: str, table: str, column: str = "", threshold: str = "", **extra: Any) -> dict[str, Any]:
    return {"check": check, "table": table, "column": column, "threshold": threshold, **extra}


def missing_table(table: str) -> CheckResult:
    return CheckResult(table, "table_exists", "", CRITICAL, False, "missing", "table exists",
                       {"gx_expectation": None})


def read_partition(wh: Warehouse, table: str, columns: list[str], where: str,
                   params: dict[str, Any], limit: str = "") -> pd.DataFrame:
    cols = ", ".join(q(c) for c in columns) or "1 AS _none"
    frame = wh.query_df(f"SELECT {cols} FROM {q(table)} WHERE {where}{limit}", params)
    for c in frame.columns:
        # GX cannot match a tz-aware dtype by name: hand it naive UTC (strings stay strings and fail the check).
        if isinstance(frame[c].dtype, pd.DatetimeTZDtype):
            frame[c] = frame[c].dt.tz_convert("UTC").dt.tz_localize(None)
    return frame


def _with_utc(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    s = frame[column]
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        parsed = s.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_any_dtype(s.dtype):
        parsed = s.dt.tz_localize("UTC")
    else:
        parsed = pd.to_datetime(s, utc=True, errors="coerce", format="mixed")
    return frame.assign(**{column + TS_SUFFIX: parsed})


def _schema_expectations(table: str, required: dict[str, str], present: set[str]) -> list[Any]:
    gxe = _gxe()
    exps: list[Any] = []
    for col, typ in required.items():
        exps.append(gxe.ExpectColumnToExist(column=col, severity=CRITICAL,
                                            meta=_meta("column_exists", table, col, "column exists")))
        if col in present and typ in TYPE_NAMES:
            exps.append(gxe.ExpectColumnValuesToBeInTypeList(
                column=col, type_list=TYPE_NAMES[typ], severity=CRITICAL,
                meta=_meta("column_type", table, col, f"type {typ}")))
    return exps


def _not_null(table: str, cols: list[str], present: set[str]) -> list[Any]:
    gxe = _gxe()
    return [gxe.ExpectColumnValuesToNotBeNull(column=c, severity=CRITICAL, meta=_meta("not_null", table, c, "no nulls"))
            for c in cols if c in present]


def events_suite(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, wh_types: dict[str, str],
                 known_scenarios: list[str] | None) -> tuple[Suite, pd.DataFrame]:
    """The events suite on the ds partition; returns the suite and the partition frame it reads."""
    from mtrec.data.raw import end_of_day, start_of_day

    gxe = _gxe()
    table = S.EVENTS
    required = S.required_columns(table, cfg)
    present = [c for c in required if c in wh_types]
    ds_cond = "ds = :ds" if is_date_type(wh_types.get("ds")) else "CAST(ds AS DATE) = :ds"
    frame = read_partition(wh, table, present, ds_cond, {"ds": ds})
    present_set = set(present)
    exps = _schema_expectations(table, required, present_set)
    exps.append(gxe.ExpectTableRowCountToBeBetween(
        min_value=cfg.validation.min_rows, severity=CRITICAL,
        meta=_meta("row_count_min", table, "", f">= {cfg.validation.min_rows} rows")))
    exps += _not_null(table, [c for c in required if c != "event_timestamp"] + ["event_timestamp"], present_set)
    if "event_id" in present_set:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="event_id", severity=CRITICAL,
                                                     meta=_meta("unique", table, "event_id", "unique")))
    for task in cfg.task_names:
        if task in present_set:
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=task, value_set=[0, 1], severity=CRITICAL,
                                                        meta=_meta("label_values", table, task, "in {0, 1}")))
    for spec in cfg.tasks:
        if spec.depends_on and {spec.name, spec.depends_on} <= present_set:
            # child <= parent row by row: a child label of 1 needs its parent at 1 (like => click)
            exps.append(gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=spec.depends_on, column_B=spec.name, or_equal=True, severity=CRITICAL,
                meta=_meta(f"implies_{spec.depends_on}", table, spec.name,
                           f"{spec.name} = 1 only where {spec.depends_on} = 1")))
    if "event_timestamp" in present_set:
        frame = _with_utc(frame, "event_timestamp")
        start, end = pd.Timestamp(start_of_day(ds)), pd.Timestamp(end_of_day(ds))
        ts_col = "event_timestamp" + TS_SUFFIX
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=ts_col, min_value=start, max_value=end, strict_max=True, severity=CRITICAL,
            meta=_meta("timestamp_in_partition", table, "event_timestamp",
                       f"[{start.isoformat()}, {end.isoformat()})")))
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=ts_col, max_value=end, strict_max=True, severity=CRITICAL,
            meta=_meta("timestamp_not_in_future", table, "event_timestamp", f"< {end.isoformat()}")))
    if "scenario" in present_set and known_scenarios:
        exps.append(gxe.ExpectColumnValuesToBeInSet(
            column="scenario", value_set=list(known_scenarios), severity=WARNING,
            meta=_meta("scenario_known", table, "scenario", "in {" + ", ".join(known_scenarios) + "}")))
    return Suite(name=table, frame=frame, expectations=exps), frame


def entity_suite(cfg: MtrecConfig, wh: Warehouse, table: str, ds: dt.date, wh_types: dict[str, str]) -> Suite:
    """users / items: schema, non-null keys and unique (id, updated_at) on the rows updated during ds."""
    from mtrec.data.raw import end_of_day, start_of_day

    gxe = _gxe()
    required = S.required_columns(table, cfg)
    present = [c for c in required if c in wh_types]
    present_set = set(present)
    if is_timestamp_type(wh_types.get("updated_at")):
        where, params = "updated_at >= :a AND updated_at < :b", {"a": start_of_day(ds), "b": end_of_day(ds)}
    else:
        # Without a usable updated_at there is no "rows of ds": check the whole table (it fails its type check).
        where, params = "TRUE", {}
    frame = read_partition(wh, table, present, where, params)
    if frame.empty and where != "TRUE":
        # No row changed on ds: check types (and keys) on a bounded sample of the rows valid at ds instead.
        frame = read_partition(wh, table, present, "updated_at < :b", {"b": end_of_day(ds)},
                               f" ORDER BY updated_at DESC LIMIT {int(ENTITY_SAMPLE_ROWS)}")
    exps = _schema_expectations(table, required, present_set)
    key = S.ID_COLUMN[table]
    exps += _not_null(table, [key, "updated_at"], present_set)
    if {key, "updated_at"} <= present_set:
        exps.append(gxe.ExpectCompoundColumnsToBeUnique(
            column_list=[key, "updated_at"], severity=CRITICAL,
            meta=_meta("unique", table, f"{key},updated_at", "unique (id, updated_at)")))
    return Suite(name=table, frame=frame, expectations=exps)
