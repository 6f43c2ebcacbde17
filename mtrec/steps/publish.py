"""Publish stage: replace each (ds, scenario) partition of daily_recommendations with a run's staged scores.

Input (written by the score stage): `run_dir/scores/<scenario>.parquet`, one file per scenario with exactly
the columns of `schema.recommendations_spec(cfg)`, and `run_dir/scores/_SUCCESS.json` =
`{"scenarios": {name: rows}, "model_version": ..., "ds": ...}` written after all of them.

Every staged file is validated before anything is written (columns and types, ds and scenario of the
partition, no duplicate (user_id, rank), no nulls, finite scores, probabilities in [0, 1], row count as announced)
and sorted by (user_id, rank). Each write checks the partition's row count before its commit, so readers see the
old or the new partition, never a mix, and a writer killed in the middle leaves the old one:

- PostgreSQL: all the scenarios of the run in one transaction, scenario i+1 read and validated while i is
  written. daily_recommendations is partitioned by ds, then scenario (one table per partition; a plain table of
  an earlier version is converted once). Each scenario is COPYed (binary, built column-wise) into a new table
  with the partition's bounds and its primary key built once over the sorted rows; then the old partition's
  table is dropped and the new one attached. Advisory locks serialise publishers of the same partition.
- DuckDB: one transaction per partition; the staged Arrow table is scanned in place; rows whose key is already
  there are UPDATEd, keys that are gone are DELETEd and new keys INSERTed. Same end state as delete + insert, but
  DuckDB's primary-key index makes deleting and re-inserting the same keys in one transaction ~7x slower at commit.
  (One transaction for all scenarios, validated in a thread meanwhile, measured slower: bigger commit.)
- Other SQLAlchemy dialects: as DuckDB, with DELETE + the backend's insert_df.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec import schema as S
from mtrec.config import MtrecConfig, check_identifier
from mtrec.errors import DataContractError, MtrecError, StageError, WarehouseError
from mtrec.steps.base import SUCCESS, StageResult, run_dir, stage_warehouse, tracked
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

TABLE = S.DAILY_RECOMMENDATIONS
SCORES_DIR = "scores"
SUCCESS_FILE = "_SUCCESS.json"
KEY = ("user_id", "rank")
PK = ("ds", "scenario", *KEY)  # the primary key of daily_recommendations
COPY_SLICE_ROWS = 50_000  # rows encoded at a time for PostgreSQL COPY
SWAP_LOCK_TRY_MS = 200  # one attempt at the day's exclusive lock (PostgreSQL); readers behind it wait this long
SWAP_LOCK_PATIENCE_S = 600  # attempts go on this long, then the publish fails and rolls back
KEEP_ROWS = 2_000_000  # DuckDB and others: validated rows kept in memory between validation and writes

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
    # Rows in key order: duplicates are neighbours, and PostgreSQL builds the primary key over presorted rows.
    # A column with one value (ds, scenario, often model_version...) is already in any order.
    order = pc.sort_indices(out, [(k, "ascending") for k in KEY])
    out = pa.table({c: out[c] if _single_value(out[c]) is not None else out[c].take(order) for c in out.column_names})
    dup = _first_adjacent_duplicate(out, KEY)
    if dup is not None:
        raise _fail(f"{where}: duplicate (user_id, rank) = ({dup[0]}, {dup[1]})", "rank", ds)
    warnings = []
    dup_item = _first_repeated_item(out)
    if dup_item is not None:
        warnings.append(f"scenario {scenario}: item {dup_item[1]} recommended twice to user {dup_item[0]}")
    return out, warnings


def _first_adjacent_duplicate(table: pa.Table, key: tuple[str, ...]) -> tuple | None:
    """The first key equal to the one of the row before (the table is sorted by key)."""
    if table.num_rows < 2:
        return None
    same = None
    for c in key:
        col = table[c]
        eq = pc.equal(col.slice(1), col.slice(0, table.num_rows - 1))
        same = eq if same is None else pc.and_(same, eq)
    hits = pc.indices_nonzero(same)
    if not len(hits):
        return None
    i = hits[0].as_py() + 1
    return tuple(table[c][i].as_py() for c in key)


def _first_repeated_item(table: pa.Table) -> tuple[str, str] | None:
    """A (user_id, item_id) that occurs twice, if any, in a table sorted by user_id: on integer keys
    (user run number, item dictionary index), cheaper than grouping by two strings."""
    n = table.num_rows
    if n < 2:
        return None
    users = table["user_id"]
    new_user = pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    user_no = np.concatenate([[0], np.cumsum(new_user, dtype=np.int64)])
    items = pc.dictionary_encode(table["item_id"]).combine_chunks().indices.to_numpy().astype(np.int64)
    key = (user_no << 32) | items
    ordered = np.sort(key)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not same.size:
        return None
    i = int(np.flatnonzero(key == ordered[same[0]])[0])
    return table["user_id"][i].as_py(), table["item_id"][i].as_py()


def _single_value(col: pa.ChunkedArray) -> Any:
    """The value of a column whose rows all hold the same non-null value, else None."""
    if not len(col) or col.null_count:
        return None
    lo_hi = pc.min_max(col)
    lo, hi = lo_hi["min"], lo_hi["max"]
    return lo.as_py() if lo.is_valid and lo == hi else None


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


# -- PostgreSQL: one table per (ds, scenario), loaded aside and swapped in --------------------------------------
# daily_recommendations is PARTITION BY LIST (ds); each day, daily_recommendations_YYYYMMDD, is PARTITION BY LIST
# (scenario) with one leaf per scenario. Both levels have a DEFAULT partition that holds the rows other writers
# (insert_df, write_normalized) put where no leaf exists yet; a publish replaces those of its partition too.
# The load (COPY, primary key) touches only the new table; readers of the day wait for the swap alone.
PG_EPOCH_DAYS = 10_957  # 2000-01-01 - 1970-01-01, in days
PG_EPOCH_US = PG_EPOCH_DAYS * 86_400_000_000
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _pg_type(t: pa.DataType) -> str | None:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_date32(t):
        return "date"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_timestamp(t) and t.tz is not None:
        return "timestamp with time zone"
    return None


def _binary_rows(table: pa.Table) -> pa.Buffer:
    """COPY BINARY tuples (no header/trailer) of a validated, null-free table, built column-wise.

    Runs of fixed-width fields (and the length words of strings) are filled into one numpy record per row,
    then Arrow joins records and string bytes row by row: no Python per row."""
    n = table.num_rows
    parts: list[pa.Array] = []
    fields: list[tuple[str, Any]] = [(">i2", table.num_columns)]

    def flush() -> None:
        rec = np.empty(n, dtype=np.dtype([(f"f{i}", d) for i, (d, _) in enumerate(fields)]))
        for i, (_, v) in enumerate(fields):
            rec[f"f{i}"] = v
        arr = pa.Array.from_buffers(pa.binary(rec.dtype.itemsize), n, [None, pa.py_buffer(rec.view(np.uint8))])
        parts.append(arr.cast(pa.binary()))
        fields.clear()

    for col in table.columns:
        col = col.combine_chunks()
        kind = _pg_type(col.type)
        if col.null_count:
            raise ValueError("binary COPY of a column with nulls")
        if kind == "text":
            b = col.cast(pa.binary())
            fields.append((">i4", pc.binary_length(b).to_numpy(zero_copy_only=False)))
            flush()
            parts.append(b)
        elif kind == "date":
            fields += [(">i4", 4), (">i4", col.cast(pa.int32()).to_numpy() - PG_EPOCH_DAYS)]
        elif kind == "bigint":
            fields += [(">i4", 8), (">i8", col.cast(pa.int64()).to_numpy())]
        elif kind == "double precision":
            fields += [(">i4", 8), (">f8", col.cast(pa.float64()).to_numpy())]
        elif kind == "timestamp with time zone":
            us = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            fields += [(">i4", 8), (">i8", us.to_numpy() - PG_EPOCH_US)]
        else:
            raise TypeError(f"no binary COPY encoding for {col.type}")
    if fields:
        flush()
    rows = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
    end = np.frombuffer(rows.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * rows.offset)[-1]
    return rows.buffers()[2].slice(0, int(end))


def _binary_slices(table: pa.Table, rows: int) -> Any:
    yield _COPY_HEADER
    for start in range(0, table.num_rows, rows):
        yield _binary_rows(table.slice(start, rows))
    yield _COPY_TRAILER


def _csv_slices(table: pa.Table, rows: int) -> Any:
    """CSV (no header) of successive row slices; Arrow quotes every string, so "" stays "" and NULL is empty."""
    import pyarrow.csv as pacsv

    opts = pacsv.WriteOptions(include_header=False)
    for start in range(0, table.num_rows, rows):
        buf = io.BytesIO()
        pacsv.write_csv(table.slice(start, rows), buf, opts)
        yield buf.getbuffer()


def _binary_ok(pg: _PG, schema: pa.Schema) -> bool:
    """Binary COPY needs each column's table type to be the one its values encode (an older table may differ:
    then CSV, which the server converts)."""
    have = pg.columns(TABLE)
    return all(_pg_type(f.type) is not None and have.get(f.name) == _pg_type(f.type) for f in schema)


def _constant_columns(table: pa.Table) -> dict[str, Any]:
    """Non-key, non-float columns holding a single value (floats: no literal round trip to worry about)."""
    out = {}
    for f in table.schema:
        if f.name in KEY or pa.types.is_floating(f.type) or _pg_type(f.type) is None:
            continue
        value = _single_value(table[f.name])
        if value is not None:
            out[f.name] = value
    return out


def _pg_names(ds: dt.date, scenario: str | None = None) -> str:
    """The day table, or the leaf of a scenario: any scenario name gives a valid, distinct identifier."""
    day = f"{TABLE}_{ds:%Y%m%d}"
    if scenario is None:
        return day
    slug = re.sub(r"[^a-z0-9]+", "_", scenario.lower()).strip("_")[:12]
    return f"{day}_{slug}_{hashlib.sha1(scenario.encode()).hexdigest()[:8]}"


class _PG:
    """Raw psycopg access inside the warehouse's current transaction (DDL needs literals, COPY needs a cursor)."""

    def __init__(self, wh: Any) -> None:
        self.wh = wh

    def _raw(self) -> Any:
        return self.wh._conn.connection.driver_connection

    def run(self, stmt: str, *args: Any) -> list[tuple]:
        from psycopg import sql

        raw = self._raw()
        text = sql.SQL(stmt).format(*(a if isinstance(a, sql.Composable) else sql.Literal(a) for a in args))
        cur = raw.execute(text)
        return cur.fetchall() if cur.description else []

    def relkind(self, name: str) -> str | None:
        got = self.run("SELECT c.relkind FROM pg_class c WHERE c.relname = {} "
                       "AND c.relnamespace = current_schema()::regnamespace", name)
        return got[0][0] if got else None

    def parent(self, name: str) -> str | None:
        got = self.run("SELECT p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                       "JOIN pg_class p ON p.oid = i.inhparent WHERE c.relname = {} "
                       "AND c.relnamespace = current_schema()::regnamespace", name)
        return got[0][0] if got else None

    def columns(self, name: str) -> dict[str, str]:
        return dict(self.run("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = {} "
                             "AND table_schema = current_schema() ORDER BY ordinal_position", name))

    def lock(self, key: str) -> None:
        self.run("SELECT pg_advisory_xact_lock(hashtext({}), hashtext({}))", TABLE, key)


def _id(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(check_identifier(name, "table"))


_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}


def _pg_ensure_partitioned(wh: Any) -> bool:
    """Turn a plain daily_recommendations (created by ensure_contract_tables or an earlier mtrec) into the
    partitioned layout, moving its rows and grants; idempotent and serialised between processes.

    False (the table stays plain) when views or foreign keys depend on it: they would have to be recreated."""
    from psycopg import sql

    with wh.transaction():
        pg = _PG(wh)
        if pg.relkind(TABLE) == "p":
            return True
        pg.lock("layout")
        if pg.relkind(TABLE) != "r":
            return pg.relkind(TABLE) == "p"
        dependents = [r[0] for r in pg.run(
            "SELECT v.oid::regclass::text FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid "
            "JOIN pg_class v ON v.oid = w.ev_class WHERE d.classid = 'pg_rewrite'::regclass "
            "AND d.refobjid = {}::regclass AND v.oid <> d.refobjid "
            "UNION SELECT conname::text FROM pg_constraint WHERE confrelid = {}::regclass", TABLE, TABLE)]
        if dependents:
            log.warning("%s stays one plain table (written by DELETE + COPY, slower): %s depend(s) on it",
                        TABLE, ", ".join(sorted(set(dependents))))
            return False
        old = f"{TABLE}_unpartitioned"
        col_list = sql.SQL(", ").join(_id(c) for c in pg.columns(TABLE))
        pg.run("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", _id(TABLE))
        grants = pg.run("SELECT a.privilege_type, a.is_grantable, coalesce(r.rolname, 'PUBLIC') "
                        "FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee "
                        "WHERE c.oid = {}::regclass AND a.grantee <> c.relowner", TABLE)
        pg.run("ALTER TABLE {} RENAME TO {}", _id(TABLE), _id(old))
        for (con,) in pg.run("SELECT conname FROM pg_constraint WHERE conrelid = {}::regclass AND contype = 'p'", old):
            pg.run("ALTER TABLE {} RENAME CONSTRAINT {} TO {}", _id(old), sql.Identifier(con), _id(f"{old}_pkey"))
        pg.run("CREATE TABLE {} (LIKE {}) PARTITION BY LIST (ds)", _id(TABLE), _id(old))
        pg.run("ALTER TABLE {} ADD PRIMARY KEY ({})", _id(TABLE), sql.SQL(", ").join(_id(c) for c in PK))
        pg.run("CREATE TABLE {} PARTITION OF {} DEFAULT", _id(f"{TABLE}_default"), _id(TABLE))
        for priv, grantable, role in grants:
            if priv in _PRIVILEGES:
                pg.run(f"GRANT {priv} ON {{}} TO {{}}{' WITH GRANT OPTION' if grantable else ''}", _id(TABLE),
                       sql.SQL("PUBLIC") if role == "PUBLIC" else sql.Identifier(role))
        for (day,) in pg.run("SELECT DISTINCT ds FROM {} WHERE ds IS NOT NULL", _id(old)):
            _pg_ensure_day(pg, day)
        pg.run("INSERT INTO {} ({}) SELECT {} FROM {}", _id(TABLE), col_list, col_list, _id(old))
        pg.run("DROP TABLE {}", _id(old))
        log.info("%s: converted to one partition per (ds, scenario)", TABLE)
        return True


def _pg_ensure_day(pg: _PG, ds: dt.date) -> str:
    """The day's sub-partitioned table, attached (rows of that day in the DEFAULT partition move into it)."""
    from psycopg import sql

    day = _pg_names(ds)
    if pg.relkind(day) == "p" and pg.parent(day) == TABLE:
        return day
    cols = sql.SQL(", ").join(_id(c) for c in pg.columns(TABLE))
    pg.run("CREATE TABLE {} (LIKE {}) PARTITION BY LIST (scenario)", _id(day), _id(TABLE))
    pg.run("CREATE TABLE {} PARTITION OF {} DEFAULT", _id(f"{day}_default"), _id(day))
    default = f"{TABLE}_default"
    if pg.relkind(default) and pg.parent(default) == TABLE:
        pg.run("WITH moved AS (DELETE FROM {} WHERE ds = {} RETURNING {}) INSERT INTO {} ({}) SELECT * FROM moved",
               _id(default), ds, cols, _id(day), cols)
    # SHARE UPDATE EXCLUSIVE on the parent: readers of other days go on.
    pg.run("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})", _id(TABLE), _id(day), ds)
    return day


def _pg_lock_day(pg: _PG, ds: dt.date) -> None:
    """ACCESS EXCLUSIVE on the day and all its partitions (or, for a new day, on the DEFAULT partition it is
    carved from), asked for in short attempts: a long reader of the day delays the publisher, while the readers
    arriving after it wait at most one attempt instead of queueing behind the publisher's request."""
    import psycopg

    target, what = _pg_names(ds), "{}"
    if pg.relkind(target) != "p":
        target, what = f"{TABLE}_default", "ONLY {}"
        if not pg.relkind(target):
            return
    prev = pg.run("SELECT current_setting('lock_timeout')")[0][0]
    deadline, pause = time.monotonic() + SWAP_LOCK_PATIENCE_S, 0.05
    while True:
        pg.run("SAVEPOINT mtrec_swap_lock")
        try:
            pg.run("SELECT set_config('lock_timeout', {}, true)", f"{SWAP_LOCK_TRY_MS}ms")
            pg.run(f"LOCK TABLE {what} IN ACCESS EXCLUSIVE MODE", _id(target))
        except psycopg.errors.LockNotAvailable:
            pg.run("ROLLBACK TO SAVEPOINT mtrec_swap_lock")
            if time.monotonic() > deadline:
                raise WarehouseError(f"{target} stayed in use by other sessions for {SWAP_LOCK_PATIENCE_S} s: "
                                     "nothing published", table=TABLE, ds=ds) from None
            time.sleep(pause)
            pause = min(2 * pause, 1.0)
            continue
        pg.run("RELEASE SAVEPOINT mtrec_swap_lock")
        pg.run("SELECT set_config('lock_timeout', {}, true)", prev)
        return


def _pg_copy(pg: _PG, target: str, table: pa.Table, ds: dt.date, scenario: str, binary: bool,
             freeze: bool = False) -> None:
    from psycopg import sql
    from psycopg.copy import QueuedLibpqWriter

    cols = sql.SQL(", ").join(_id(c) for c in table.column_names)
    opts = sql.SQL("FORMAT binary" if binary else "FORMAT csv") + sql.SQL(", FREEZE" if freeze else "")
    stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH ({})").format(_id(target), cols, opts)
    cur = pg._raw().cursor()
    try:
        # A writer thread sends while numpy/Arrow (GIL released) encode the next slice.
        with cur.copy(stmt, writer=QueuedLibpqWriter(cur)) as copy:
            for chunk in (_binary_slices if binary else _csv_slices)(table, COPY_SLICE_ROWS):
                copy.write(chunk)
    except Exception as e:  # noqa: BLE001 - any driver error: the transaction rolls back
        raise WarehouseError(f"COPY of scenario {scenario} failed: {str(e).splitlines()[0]}",
                             table=TABLE, ds=ds) from e


def _pg_load(pg: _PG, table: pa.Table, ds: dt.date, scenario: str, binary: bool) -> str:
    """COPY a validated scenario into a new table shaped like the leaf (bounds checked, primary key built)."""
    from psycopg import sql

    fresh = f"{_pg_names(ds, scenario)}_n"
    pg.run("CREATE TABLE {} (LIKE {}, CONSTRAINT partition_bounds CHECK (ds = {} AND scenario = {}))",
           _id(fresh), _id(TABLE), ds, scenario)
    if table.num_rows:
        # Columns with one value in the whole partition (ds, scenario, and usually model_version, run_id,
        # created_at) are not sent: the server fills them in from a default set for the load only.
        same = _constant_columns(table)
        if same:
            pg.run("ALTER TABLE {} " + ", ".join(["ALTER COLUMN {} SET DEFAULT {}"] * len(same)), _id(fresh),
                   *itertools.chain.from_iterable((_id(c), v) for c, v in same.items()))
        # FREEZE: the table is new in this transaction, so its rows need no later visibility work.
        _pg_copy(pg, fresh, table.drop_columns(list(same)), ds, scenario, binary, freeze=True)
        if same:
            pg.run("ALTER TABLE {} " + ", ".join(["ALTER COLUMN {} DROP DEFAULT"] * len(same)), _id(fresh),
                   *(_id(c) for c in same))
    # Built once over rows COPYed in key order: a near-linear pass, not one index insert per row.
    pg.run("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})", _id(fresh), _id(f"{fresh}_pkey"),
           sql.SQL(", ").join(_id(c) for c in PK))
    return fresh


def _pg_replace_plain(wh: Any, pg: _PG, table: pa.Table, ds: dt.date, scenario: str, binary: bool) -> None:
    """A plain (unconvertible) table: DELETE + COPY, in the caller's transaction."""
    wh.execute(f"DELETE FROM {q(TABLE)} WHERE {q('ds')} = :ds AND {q('scenario')} = :s", {"ds": ds, "s": scenario})
    if table.num_rows:
        _pg_copy(pg, TABLE, table, ds, scenario, binary)


def _pg_swap(pg: _PG, fresh: str, ds: dt.date, scenario: str) -> None:
    """Replace the scenario's leaf by the loaded table (the caller holds the day's lock; commit follows)."""
    day = _pg_ensure_day(pg, ds)
    leaf = _pg_names(ds, scenario)
    # Rows of this scenario written to the day's DEFAULT partition by another writer are replaced too.
    pg.run("DELETE FROM {} WHERE scenario = {}", _id(f"{day}_default"), scenario)
    if pg.relkind(leaf):
        if pg.parent(leaf) != day:
            raise WarehouseError(f"scenario {scenario}: table {leaf} exists but is not the partition of {day}",
                                 table=TABLE, ds=ds)
        pg.run("DROP TABLE {}", _id(leaf))  # ACCESS EXCLUSIVE on the day until the commit
    pg.run("ALTER TABLE {} RENAME TO {}", _id(fresh), _id(leaf))
    pg.run("ALTER TABLE {} RENAME CONSTRAINT {} TO {}", _id(leaf), _id(f"{fresh}_pkey"), _id(f"{leaf}_pkey"))
    # partition_bounds implies the partition constraint: ATTACH scans nothing.
    pg.run("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})", _id(day), _id(leaf), scenario)


def _write_postgres(wh: Any, table: pa.Table, ds: dt.date, scenario: str) -> int:
    partitioned = _pg_ensure_partitioned(wh)
    with wh.transaction():
        pg = _PG(wh)
        pg.lock(f"{ds.isoformat()}/{scenario}")
        if not partitioned:
            _pg_replace_plain(wh, pg, table, ds, scenario, _binary_ok(pg, table.schema))
            return _check_count(wh, ds, scenario, table.num_rows)
        fresh = _pg_load(pg, table, ds, scenario, _binary_ok(pg, table.schema))
        pg.lock(ds.isoformat())
        _pg_lock_day(pg, ds)
        _pg_swap(pg, fresh, ds, scenario)
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
def _prefetched(cfg: MtrecConfig, ds: dt.date, run_id: str, names: list[str], staged: dict[str, int],
                warnings: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """(scenario, validated table) in order, the next scenario read and validated in a thread meanwhile
    (Arrow releases the GIL): at most two tables in memory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load_staged, cfg, ds, run_id, names[0], staged[names[0]])
        for i, s in enumerate(names):
            table, warn = pending.result()
            warnings += warn
            if i + 1 < len(names):
                pending = pool.submit(load_staged, cfg, ds, run_id, names[i + 1], staged[names[i + 1]])
            yield s, table
            del table


def _publish_postgres(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Any, names: list[str],
                      staged: dict[str, int], warnings: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """All scenarios of the run in one transaction: each is read, validated and loaded into a table of its own
    (the next one is read and validated meanwhile), then all are swapped in and counted, then one commit.
    Nothing is visible before the commit, so a bad scenario or a killed writer leaves every partition as it was."""
    partitioned = _pg_ensure_partitioned(wh)
    rows: dict[str, int] = {}
    seconds: dict[str, float] = {}
    fresh: dict[str, str] = {}
    with wh.transaction():
        pg = _PG(wh)
        for s in sorted(names):  # one order for every publisher: no deadlock between overlapping runs
            # A second publisher of the same partition waits here (the key earlier versions used too).
            pg.lock(f"{ds.isoformat()}/{s}")
        binary = None
        t0 = time.perf_counter()
        for s, table in _prefetched(cfg, ds, run_id, names, staged, warnings):
            if binary is None:
                binary = _binary_ok(pg, table.schema)
            if partitioned:
                fresh[s] = _pg_load(pg, table, ds, s, binary)
            else:
                _pg_replace_plain(wh, pg, table, ds, s, binary)
            rows[s] = table.num_rows
            del table
            seconds[s], t0 = time.perf_counter() - t0, time.perf_counter()
        if partitioned:
            pg.lock(ds.isoformat())  # days are created and swapped one publisher at a time
            _pg_lock_day(pg, ds)
            for s in names:
                _pg_swap(pg, fresh[s], ds, s)
        for s in names:
            rows[s] = _check_count(wh, ds, s, rows[s])
        swap = time.perf_counter() - t0
    for s in names:
        seconds[s] = round(seconds[s] + swap / len(names), 3)
        log.info("publish %s/%s: %d rows in %.2fs", ds, s, rows[s], seconds[s])
    return rows, seconds


def _publish_each(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, names: list[str],
                  staged: dict[str, int], warnings: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """DuckDB and other dialects: one transaction per scenario, after all are validated (bad input publishes nothing). Validated tables
    are kept for the write pass up to KEEP_ROWS in all; the others are read (and checked) again when written."""
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
    return rows, seconds


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, scenarios: list[str] | None) -> PublishResult:
    marker = read_success(cfg, ds, run_id)
    staged: dict[str, int] = marker["scenarios"]
    names = list(staged) if scenarios is None else list(dict.fromkeys(scenarios))
    unknown = [s for s in names if s not in staged]
    if unknown:
        raise StageError(f"scenario(s) {', '.join(unknown)} not staged by run {run_id} "
                         f"(staged: {', '.join(staged) or 'none'}): run `mtrec score` for them first",
                         table=TABLE, ds=ds)
    warnings: list[str] = []
    if wh.dialect == "postgresql" and hasattr(wh, "_connection") and names:
        try:
            rows, seconds = _publish_postgres(cfg, ds, run_id, wh, names, staged, warnings)
        except MtrecError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a failed commit: name the table and date, one line
            raise WarehouseError(f"publishing scenario(s) {', '.join(names)} failed: {str(e).splitlines()[0]}",
                                 table=TABLE, ds=ds) from e
    else:
        rows, seconds = _publish_each(cfg, ds, run_id, wh, names, staged, warnings)
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
