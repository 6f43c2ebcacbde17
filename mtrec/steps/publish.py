"""Publish stage: replace each (ds, scenario) partition of daily_recommendations with a run's staged scores.

Input (written by the score stage): `run_dir/scores/<scenario>.parquet`, one file per scenario with exactly
the columns of `schema.recommendations_spec(cfg)`, and `run_dir/scores/_SUCCESS.json` =
`{"scenarios": {name: rows}, "model_version": ..., "ds": ...}` written after all of them.

Every staged file is validated before anything is written (columns and types, ds and scenario of the partition,
no duplicate (user_id, rank), no nulls, finite scores, probabilities in [0, 1], row count as announced). Then
each partition is replaced in one transaction that also checks the row count before it commits, so readers see
the old or the new partition, never a mix, and a writer killed in the middle leaves the old one:

- PostgreSQL: advisory lock on the partition (serialises concurrent publishers), DELETE, then one COPY fed
  in slices of CSV rendered by Arrow (streamed: one slice in memory at a time).
- DuckDB: the staged Arrow table is scanned in place; rows whose key is already there are UPDATEd, keys
  that are gone are DELETEd and new keys INSERTed. Same end state as delete + insert, but DuckDB's primary-key
  index makes deleting and re-inserting the same keys in one transaction ~7x slower at commit.
- Other SQLAlchemy dialects: DELETE + the backend's insert_df.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import DataContractError, MtrecError, StageError, WarehouseError
from mtrec.steps.base import SUCCESS, StageResult, run_dir, stage_warehouse, tracked
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

TABLE = S.DAILY_RECOMMENDATIONS
SCORES_DIR = "scores"
SUCCESS_FILE = "_SUCCESS.json"
KEY = ("user_id", "rank")
COPY_SLICE_ROWS = 50_000  # rows rendered to CSV at a time for PostgreSQL COPY
KEEP_ROWS = 2_000_000  # validated rows kept in memory between the validation and the write pass

_view_ids = itertools.count()


@dataclass
class PublishResult(StageResult):
    rows: dict[str, int] = field(default_factory=dict)  # scenario -> rows published
    model_version: str | None = None


def scores_dir(cfg: MtrecConfig, ds: dt.date, run_id: str) -> Path:
    """Where the score stage stages its per-scenario parquet files for a run."""
    return run_dir(cfg, ds, run_id) / SCORES_DIR


def scores_path(cfg: MtrecConfig, ds: dt.date, run_id: str, scenario: str) -> Path:
    return scores_dir(cfg, ds, run_id) / f"{scenario}.parquet"


# -- staged input -------------------------------------------------------------------------------------------
def read_success(cfg: MtrecConfig, ds: dt.date, run_id: str) -> dict[str, Any]:
    """The score stage's completion marker; StageError when the run has no (complete) staged scores."""
    path = scores_dir(cfg, ds, run_id) / SUCCESS_FILE
    if not path.is_file():
        raise StageError(f"no staged scores for run {run_id} at {path}: run `mtrec score` first", table=TABLE, ds=ds)
    try:
        marker = json.loads(path.read_text())
        counts = marker["scenarios"]
        if not isinstance(counts, dict) or not all(isinstance(n, int) and n >= 0 for n in counts.values()):
            raise ValueError("'scenarios' must map scenario names to row counts")
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"unreadable staged-scores marker {path} ({e}): rerun `mtrec score`",
                         table=TABLE, ds=ds) from None
    staged_ds = marker.get("ds")
    if staged_ds is not None and str(staged_ds)[:10] != ds.isoformat():
        raise DataContractError(f"staged scores of run {run_id} are for ds {staged_ds}, not {ds} ({path})",
                                table=TABLE, column="ds", ds=ds)
    return marker


def _fail(msg: str, column: str | None, ds: dt.date) -> DataContractError:
    return DataContractError(msg, table=TABLE, column=column, ds=ds)


def _as_type(col: pa.ChunkedArray, name: str, logical: str, ds: dt.date, where: str) -> pa.ChunkedArray:
    """Coerce one staged column to the Arrow type the contract's logical type maps to."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    try:
        if logical == S.TEXT and (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            return col.cast(pa.string())
        if logical == S.BIGINT and (pa.types.is_integer(t) or pa.types.is_null(t)):
            return col.cast(pa.int64())
        if logical == S.DOUBLE and (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
            return col.cast(pa.float64())
        if logical == S.DATE and (pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_null(t)):
            return col.cast(pa.date32())  # a timestamp with a time of day fails: not a date
        if logical == S.TIMESTAMP and (pa.types.is_timestamp(t) or pa.types.is_null(t)):
            if pa.types.is_timestamp(t) and t.tz is None:  # naive means UTC in this project
                col = pc.assume_timezone(col, "UTC")
            return col.cast(pa.timestamp("us", tz="UTC"), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise _fail(f"{where}: cannot read as {logical} ({str(e).splitlines()[0]})", name, ds) from None
    raise _fail(f"{where}: type {t} where the contract has {logical}", name, ds)


def validate_staged(cfg: MtrecConfig, ds: dt.date, scenario: str, table: pa.Table, where: str,
                    expected_rows: int | None = None) -> tuple[pa.Table, list[str]]:
    """Check a staged frame against the contract; return it in the table's column order and types (+ warnings).

    Raises DataContractError naming the table, the column and ds for the first violation found."""
    spec = S.recommendations_spec(cfg)
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        raise _fail(f"{where}: missing column(s) {', '.join(missing)}", missing[0], ds)
    extra = [c for c in table.column_names if c not in spec.columns]
    if extra:
        raise _fail(f"{where}: unexpected column(s) {', '.join(extra)} (not in the contract for tasks "
                    f"{', '.join(cfg.task_names)})", extra[0], ds)
    if expected_rows is not None and table.num_rows != expected_rows:
        raise _fail(f"{where}: {table.num_rows} rows but {SUCCESS_FILE} announces {expected_rows} "
                    "(stale or truncated staging: rerun `mtrec score`)", None, ds)
    cols = {c: _as_type(table[c], c, typ, ds, where) for c, typ in spec.columns.items()}
    out = pa.table(cols)
    for c in spec.columns:
        nulls = out[c].null_count
        if nulls:
            raise _fail(f"{where}: {nulls} null value(s)", c, ds)
    if out.num_rows == 0:
        return out, [f"scenario {scenario}: no staged rows, the partition is emptied"]

    def _only(c: str, value: Any) -> None:
        bad = pc.invert(pc.equal(out[c], pa.scalar(value, out[c].type)))
        n = pc.sum(bad.cast(pa.int64())).as_py() or 0
        if n:
            first = out[c].filter(bad)[0].as_py()
            raise _fail(f"{where}: {n} row(s) with {c} = {first}, expected {value}", c, ds)

    _only("ds", ds)
    _only("scenario", scenario)
    lowest = pc.min(out["rank"]).as_py()
    if lowest < 1:
        raise _fail(f"{where}: rank {lowest} (ranks start at 1)", "rank", ds)
    for c in ["score", *(S.prob_column(t) for t in cfg.task_names)]:
        vals = out[c]
        finite = pc.is_finite(vals)
        if not pc.all(finite).as_py():
            raise _fail(f"{where}: non-finite value(s) (NaN or infinity)", c, ds)
        if c != "score":
            lo, hi = pc.min(vals).as_py(), pc.max(vals).as_py()
            if lo < 0 or hi > 1:
                raise _fail(f"{where}: probability outside [0, 1] (min {lo}, max {hi})", c, ds)
    dup = _first_duplicate(out, KEY)
    if dup is not None:
        raise _fail(f"{where}: duplicate (user_id, rank) = ({dup[0]}, {dup[1]})", "rank", ds)
    warnings = []
    dup_item = _first_duplicate(out, ("user_id", "item_id"))
    if dup_item is not None:
        warnings.append(f"scenario {scenario}: item {dup_item[1]} recommended twice to user {dup_item[0]}")
    return out, warnings


def _first_duplicate(table: pa.Table, key: tuple[str, ...]) -> tuple | None:
    counts = table.select(list(key)).group_by(list(key), use_threads=True).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts["count_all"], 1))
    if dup.num_rows == 0:
        return None
    return tuple(dup[c][0].as_py() for c in key)


def load_staged(cfg: MtrecConfig, ds: dt.date, run_id: str, scenario: str,
                expected_rows: int | None) -> tuple[pa.Table, list[str]]:
    path = scores_path(cfg, ds, run_id, scenario)
    if not path.is_file():
        raise StageError(f"no staged scores for scenario {scenario} of run {run_id} at {path}: "
                         "run `mtrec score` first", table=TABLE, ds=ds)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise _fail(f"unreadable staged scores {path}: {str(e).splitlines()[0]}", None, ds) from None
    return validate_staged(cfg, ds, scenario, table, f"staged scores {path}", expected_rows)


# -- writers ------------------------------------------------------------------------------------------------
def _count(wh: Warehouse, ds: dt.date, scenario: str) -> int:
    return int(wh.scalar(f"SELECT count(*) FROM {q(TABLE)} WHERE {q('ds')} = :ds AND {q('scenario')} = :s",
                         {"ds": ds, "s": scenario}))


def _check_count(wh: Warehouse, ds: dt.date, scenario: str, expected: int) -> int:
    """Inside the transaction, before the commit: a mismatch rolls the partition back to its old rows."""
    found = _count(wh, ds, scenario)
    if found != expected:
        raise WarehouseError(f"scenario {scenario}: {found} rows in the partition after the write, "
                             f"{expected} staged; rolled back", table=TABLE, ds=ds)
    return found


def _csv_slices(table: pa.Table, rows: int) -> Any:
    """CSV (no header) of successive row slices; Arrow quotes every string, so "" stays "" and NULL is empty."""
    import pyarrow.csv as pacsv

    opts = pacsv.WriteOptions(include_header=False)
    for start in range(0, table.num_rows, rows):
        buf = io.BytesIO()
        pacsv.write_csv(table.slice(start, rows), buf, opts)
        yield buf.getbuffer()


def _write_postgres(wh: Any, table: pa.Table, ds: dt.date, scenario: str) -> int:
    cols = ", ".join(q(c) for c in table.column_names)
    copy_sql = f"COPY {q(TABLE)} ({cols}) FROM STDIN WITH (FORMAT csv)"
    with wh.transaction():
        # A second publisher of the same partition waits here instead of failing on the primary key.
        wh.execute("SELECT pg_advisory_xact_lock(hashtext(:t), hashtext(:k))",
                   {"t": TABLE, "k": f"{ds.isoformat()}/{scenario}"})
        wh.execute(f"DELETE FROM {q(TABLE)} WHERE {q('ds')} = :ds AND {q('scenario')} = :s", {"ds": ds, "s": scenario})
        if table.num_rows:
            with wh._connection() as conn:  # the transaction's connection: COPY joins the same transaction
                from psycopg.copy import QueuedLibpqWriter

                cur = conn.connection.driver_connection.cursor()
                try:
                    # A writer thread sends while Arrow (GIL released) renders the next slice.
                    with cur.copy(copy_sql, writer=QueuedLibpqWriter(cur)) as copy:
                        for chunk in _csv_slices(table, COPY_SLICE_ROWS):
                            copy.write(chunk)
                except Exception as e:  # noqa: BLE001 - any driver error: the transaction rolls back
                    raise WarehouseError(f"COPY of scenario {scenario} failed: {str(e).splitlines()[0]}",
                                         table=TABLE, ds=ds) from e
        return _check_count(wh, ds, scenario, table.num_rows)


def _write_duckdb(wh: Any, table: pa.Table, ds: dt.date, scenario: str) -> int:
    t, v = q(TABLE), f"__mtrec_publish_{next(_view_ids)}"
    staged = table.column_names
    # Columns the config no longer has (e.g. p_<task> of a removed task) become NULL, as after delete + insert.
    others = [c for c in wh.columns(TABLE) if c not in staged]
    sets = [f"{q(c)} = {v}.{q(c)}" for c in staged if c not in ("ds", "scenario", *KEY)]
    sets += [f"{q(c)} = NULL" for c in others]
    part = {"ds": ds, "s": scenario}
    in_part = f"{t}.{q('ds')} = :ds AND {t}.{q('scenario')} = :s"
    same_key = " AND ".join(f"{t}.{q(k)} = {v}.{q(k)}" for k in KEY)
    with wh.transaction():
        wh.con.register(v, table)
        try:
            wh.execute(f"UPDATE {t} SET {', '.join(sets)} FROM {v} WHERE {in_part} AND {same_key}", part)
            wh.execute(f"DELETE FROM {t} WHERE {in_part} AND NOT EXISTS (SELECT 1 FROM {v} WHERE {same_key})", part)
            wh.execute(f"INSERT INTO {t} ({', '.join(q(c) for c in staged)}) SELECT {', '.join(q(c) for c in staged)} "
                       f"FROM {v} WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {in_part} AND {same_key})", part)
            return _check_count(wh, ds, scenario, table.num_rows)
        finally:
            try:
                wh.con.unregister(v)
            except Exception:  # noqa: BLE001 - an aborted transaction refuses even this; ROLLBACK cleans up
                pass


def _write_generic(wh: Warehouse, table: pa.Table, ds: dt.date, scenario: str) -> int:
    with wh.transaction():
        wh.execute(f"DELETE FROM {q(TABLE)} WHERE {q('ds')} = :ds AND {q('scenario')} = :s", {"ds": ds, "s": scenario})
        for batch in table.to_batches(COPY_SLICE_ROWS):
            wh.insert_df(TABLE, batch.to_pandas())
        return _check_count(wh, ds, scenario, table.num_rows)


def write_partition(wh: Warehouse, table: pa.Table, ds: dt.date, scenario: str) -> int:
    """Replace the (ds, scenario) partition with a validated table in one transaction; return the row count."""
    try:
        if wh.dialect == "postgresql" and hasattr(wh, "_connection"):
            return _write_postgres(wh, table, ds, scenario)
        if wh.dialect == "duckdb" and hasattr(wh, "con"):
            return _write_duckdb(wh, table, ds, scenario)
        return _write_generic(wh, table, ds, scenario)
    except MtrecError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a failed commit: name the partition, one line
        raise WarehouseError(f"publishing scenario {scenario} failed: {str(e).splitlines()[0]}",
                             table=TABLE, ds=ds) from e


# -- the stage ----------------------------------------------------------------------------------------------
def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, scenarios: list[str] | None) -> PublishResult:
    marker = read_success(cfg, ds, run_id)
    staged: dict[str, int] = marker["scenarios"]
    names = list(staged) if scenarios is None else list(dict.fromkeys(scenarios))
    unknown = [s for s in names if s not in staged]
    if unknown:
        raise StageError(f"scenario(s) {', '.join(unknown)} not staged by run {run_id} "
                         f"(staged: {', '.join(staged) or 'none'}): run `mtrec score` for them first",
                         table=TABLE, ds=ds)
    # Validate every scenario before writing any, so that bad input publishes nothing. Validated tables are
    # kept for the write pass up to KEEP_ROWS in all; the others are read (and checked) again when written.
    warnings: list[str] = []
    kept: dict[str, pa.Table] = {}
    kept_rows = 0
    for s in names:
        table, warn = load_staged(cfg, ds, run_id, s, staged[s])
        warnings += warn
        if kept_rows + table.num_rows <= KEEP_ROWS:
            kept[s], kept_rows = table, kept_rows + table.num_rows
        del table
    rows: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for s in names:
        t0 = time.perf_counter()
        table = kept.pop(s) if s in kept else load_staged(cfg, ds, run_id, s, staged[s])[0]
        rows[s] = write_partition(wh, table, ds, s)
        del table
        seconds[s] = round(time.perf_counter() - t0, 3)
        log.info("publish %s/%s: %d rows in %.2fs", ds, s, rows[s], seconds[s])
    total = sum(rows.values())
    model_version = marker.get("model_version")
    per = ", ".join(f"{s} {n}" for s, n in rows.items())
    return PublishResult(
        stage="publish", ds=ds, run_id=run_id, status=SUCCESS, rows=rows, model_version=model_version,
        message=f"published {total} rows to {TABLE} for {ds} ({per or 'no scenarios'})",
        warnings=warnings,
        details={"table": TABLE, "rows": rows, "total_rows": total, "model_version": model_version,
                 "seconds": seconds, "verified": True, "staged": str(scores_dir(cfg, ds, run_id))})


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str, wh: Warehouse | None = None,
        scenarios: list[str] | None = None) -> PublishResult:
    """Publish the staged scores of `run_id` into daily_recommendations, one atomic (ds, scenario) at a time.

    scenarios=None publishes every scenario listed in the run's _SUCCESS.json."""
    with stage_warehouse(cfg, wh) as w:
        return tracked("publish", cfg, ds, run_id, w, _body, cfg, ds, run_id, w, scenarios)
