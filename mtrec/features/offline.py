"""Feast's DuckDB offline store, reading only the daily snapshot files a retrieval can match.

The features stage exports one Parquet file per day and table (`<table>/ds=YYYY-MM-DD.parquet`, values stamped
within that day or at its end). Feast's DuckDB store reads a file source's whole glob on every retrieval, then
keeps the rows within each feature view's TTL of the entity timestamps: its cost grows with the days of history
(a year of snapshots: every scoring retrieval reads 365 files to use one). This store is Feast's own, with two
changes, neither of which changes a result (tests compare both with Feast's own DuckDB store):

- for a file source whose files are all `ds=` partitions, a historical retrieval reads only the days that can hold
  a row within [earliest entity timestamp - TTL, latest entity timestamp];
- when every entity row has the same timestamp (batch scoring: everyone as of the end of ds) and the views read
  local Parquet files, the point-in-time join keys on the join keys alone, written as one DuckDB query
  (`instant_sql`) run on the store's own connection. Feast's general join builds a text id of every entity row
  (its timestamp and keys, cast and concatenated) and ranks and joins back on it, through an ibis expression
  compiled per retrieval (about 0.2 CPU-s of Python, holding the GIL, per retrieval here): at one instant, the
  latest row of each key is the same thing, cheaper (a retrieval of 100k users, to a DataFrame: 0.31-0.38 vs
  0.78-0.84 CPU-s here, with `SLOWER_REWRITES` off).

Everything else (materialization, pulls, writes) is the DuckDB store's.

Selected in the store's config as `offline_store: {type: mtrec.features.offline.SnapshotDuckDBOfflineStore}`
(Feast's custom offline store convention: the config class is the store's name + `Config`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import pandas as pd
import pyarrow as pa
from feast.data_format import ParquetFormat
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _read_data_source,
    _validate_lance_feature_views,
    _write_data_source,
)
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    IbisRetrievalJob,
    _get_entity_df_event_timestamp_range,
    _to_utc,
    get_historical_features_ibis,
)
from feast.infra.offline_stores.offline_store import RetrievalMetadata
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.on_demand_feature_view import OnDemandFeatureView

from mtrec.features.store import SNAPSHOT_STORE
from mtrec.warehouse import as_utc

PARTITION = re.compile(r"^ds=(\d{4}-\d{2}-\d{2})\.parquet$")
DAY = dt.timedelta(days=1)


class SnapshotDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["mtrec.features.offline.SnapshotDuckDBOfflineStore"] = SNAPSHOT_STORE  # type: ignore[assignment]


def snapshot_files(pattern: str, lo: dt.datetime | None, hi: dt.datetime) -> list[str] | None:
    """The files of a local glob that may hold a row stamped within [lo, hi] (lo None: no lower bound), or None
    when they are not all `ds=YYYY-MM-DD.parquet` partitions (or none is left: the caller reads the glob).
    Partition d holds values stamped within [d 00:00, d + 1 00:00] UTC."""
    if "://" in pattern:
        return None
    files = sorted(glob.glob(pattern))
    days = [PARTITION.match(Path(f).name) for f in files]
    if not files or not all(days):
        return None
    keep = []
    for f, m in zip(files, days, strict=True):
        start = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
        if start <= hi and (lo is None or start + DAY >= lo):
            keep.append(f)
    return keep or None


def _entity_window(entity_df) -> tuple[dt.datetime, dt.datetime] | None:
    """(earliest, latest) entity timestamp in UTC of a DataFrame entity table; None for a SQL one or no rows."""
    if not isinstance(entity_df, pd.DataFrame) or entity_df.empty:
        return None
    column = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes, strict=True)))
    ts = as_utc(entity_df[column])  # (naive = UTC, as Feast)
    if ts.isna().any():
        return None
    return ts.min(), ts.max()


def _longest_ttls(feature_views) -> dict[str, dt.timedelta | None]:
    """Per batch source: the longest TTL of the views reading it (None: a view without one, no lower bound)."""
    out: dict[str, dt.timedelta | None] = {}
    for fv in feature_views:
        if fv.batch_source is None:
            continue
        name, ttl = fv.batch_source.name, fv.ttl or None  # (a zero TTL is Feast's "none")
        if name not in out:
            out[name] = ttl
        elif out[name] is not None:
            out[name] = None if ttl is None else max(out[name], ttl)
    return out


class SnapshotDuckDBOfflineStore(DuckDBOfflineStore):
    @staticmethod
    def get_historical_features(config, feature_views, feature_refs, entity_df, registry, project,
                                full_feature_names: bool = False, filter_by_created_timestamp: bool = False):
        _validate_lance_feature_views(feature_views)
        window = _entity_window(entity_df)
        ttls = _longest_ttls(feature_views)

        def reader(source, repo_path: str):
            if window is not None and isinstance(source, FileSource) and source.path.endswith("*.parquet"):
                ttl = ttls.get(source.name)
                files = snapshot_files(source.path, window[0] - ttl if ttl else None, window[1])
                if files is not None:
                    import ibis

                    return ibis.read_parquet(files)
            return _read_data_source(source, repo_path)

        if window is not None and window[0] == window[1]:
            job = _one_instant(config, feature_views, feature_refs, entity_df, window[0], registry, project,
                               full_feature_names, filter_by_created_timestamp)
            if job is not None:
                return job
        return get_historical_features_ibis(
            config=config, feature_views=feature_views, feature_refs=feature_refs, entity_df=entity_df,
            registry=registry, project=project, full_feature_names=full_feature_names, data_source_reader=reader,
            data_source_writer=_write_data_source, staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            filter_by_created_timestamp=filter_by_created_timestamp)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class _View:
    """What the one-instant join reads of a feature view: its files, timestamp fields, join keys (the source's
    column -> the entity's), feature columns (the source's -> the result's) and the earliest timestamp its TTL
    keeps (None: no bound)."""

    files: list[str]
    ts: str
    created: str | None
    key_map: dict[str, str]
    columns: dict[str, str]
    earliest: dt.datetime | None


def instant_sql(entity: str, entity_columns: list[str], views: list[_View], instant: dt.datetime,
                filter_by_created_timestamp: bool = False) -> tuple[str, dict]:
    """Feast's point-in-time join for entity rows (the relation `entity`) that all have the timestamp `instant`:
    per feature view, its rows stamped at or before the instant (and within its TTL) whose keys an entity row
    has, the latest per key (then the latest created), left-joined on the keys. (DuckDB SQL, its parameters.)"""
    ctes, selects, joins = [], [f"e.{_q(c)}" for c in entity_columns], []
    params = {"instant": instant}
    for n, v in enumerate(views):
        ts = f"CAST(t.{_q(v.ts)} AS TIMESTAMPTZ)"
        keep = [f"{ts} <= $instant"]
        if v.earliest is not None:
            keep.append(f"{ts} >= $earliest_{n}")
            params[f"earliest_{n}"] = v.earliest
        if filter_by_created_timestamp and v.created:
            keep.append(f"CAST(t.{_q(v.created)} AS TIMESTAMPTZ) <= $instant")
        order = f"{ts} DESC" + (f", CAST(t.{_q(v.created)} AS TIMESTAMPTZ) DESC" if v.created else "")
        keys = ", ".join(f"{_q(e)} AS k{j}" for j, e in enumerate(v.key_map.values()))
        on = " AND ".join(f"t.{_q(s)} = k.k{j}" for j, s in enumerate(v.key_map))
        files = ", ".join(_sql_text(f) for f in v.files)
        ctes.append(
            f"f{n} AS (SELECT {', '.join(f't.{_q(s)} AS k{j}' for j, s in enumerate(v.key_map))}, "
            f"{', '.join(f't.{_q(s)} AS {_q(r)}' for s, r in v.columns.items())} "
            f"FROM read_parquet([{files}]) t JOIN (SELECT DISTINCT {keys} FROM {_q(entity)}) k ON {on} "
            f"WHERE {' AND '.join(keep)} "
            f"QUALIFY row_number() OVER (PARTITION BY {', '.join(f't.{_q(s)}' for s in v.key_map)} "
            f"ORDER BY {order}) = 1)")
        selects += [f"f{n}.{_q(r)}" for r in v.columns.values()]
        joins.append(f"LEFT JOIN f{n} ON " + " AND ".join(
            f"e.{_q(e)} = f{n}.k{j}" for j, e in enumerate(v.key_map.values())))
    sql = f"SELECT {', '.join(selects)} FROM {_q(entity)} e {' '.join(joins)}"
    return (f"WITH {', '.join(ctes)} {sql}" if ctes else sql), params


class InstantRetrievalJob(IbisRetrievalJob):
    """A one-instant retrieval run as SQL on the DuckDB connection Feast's store uses (ibis's default backend),
    with the entity rows registered on it as `name` for the query's duration; `table` (the ibis expression
    persisting and remote export write) is the result, made when first asked for."""

    def __init__(self, sql: str, params: dict, entity: pd.DataFrame, name: str, **kwargs) -> None:
        super().__init__(None, **kwargs)
        self._sql, self._params, self._entity, self._name = sql, params, entity, name

    @property
    def table(self):
        if self._table is None:
            import ibis

            self._table = ibis.memtable(self._to_arrow_internal())
        return self._table

    @table.setter
    def table(self, value) -> None:
        self._table = value

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        import ibis

        entity = pa.Table.from_pandas(self._entity, preserve_index=False)
        for n, f in enumerate(entity.schema):  # timestamps in microseconds, as ibis hands them to DuckDB
            if pa.types.is_timestamp(f.type) and f.type.unit == "ns":
                entity = entity.set_column(n, f.name, entity[n].cast(pa.timestamp("us", f.type.tz), safe=False))
        # a connection of its own to the database (a DuckDB connection runs one query at a time and is not to be
        # shared between threads): retrievals made in several threads run side by side, each with its own
        # registered entity rows; the session settings ibis gives its connection are set on this one too
        # (timestamps out in UTC, no Python variables read as tables)
        parent = ibis.get_backend().con
        con = parent.cursor()
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET python_enable_replacements = false")
            con.register(self._name, entity)
            with _optimizers_off(con, SLOWER_REWRITES, database=id(parent)):
                return con.sql(self._sql, params=self._params).to_arrow_table()
        finally:
            con.close()


# DuckDB optimizer rules `instant_sql` runs without: DuckDB rewrites each view's latest-row-per-key window
# (`QUALIFY row_number() ... = 1`) as a hash aggregate of arg_max over a struct of every feature column, which
# takes about 1.7x the CPU of the window it replaces here (148k users, 15 feature columns, one thread: 0.46-0.49
# vs 0.28-0.29 s, EXPLAIN ANALYZE). Same rows either way: optimizer rules change the plan, not the result.
SLOWER_REWRITES = ("top_n_window_elimination",)


_OPTIMIZERS_LOCK = threading.Lock()
# per database (its first connection's id): retrievals running with SLOWER_REWRITES off, and the setting before
_optimizers_held: dict[int, dict] = {}


@contextlib.contextmanager
def _optimizers_off(con, names: tuple[str, ...], database: int = 0):
    """The database's `disabled_optimizers` setting extended by `names` while any retrieval runs on it, then
    restored (a DuckDB that does not know a name, or the setting, runs the query with its own plan). The setting
    is global to the database, shared by its connections: the first of the retrievals running at once sets it,
    the last restores it. `database`: what identifies the database `con` is a connection to."""
    with _OPTIMIZERS_LOCK:
        held = _optimizers_held.setdefault(database, {"queries": 0, "before": None})
        if not held["queries"]:
            try:
                before = str(con.execute("SELECT current_setting('disabled_optimizers')").fetchall()[0][0] or "")
                off = [n.strip() for n in before.split(",") if n.strip()]
                con.execute("SET disabled_optimizers = $1", [",".join(off + [n for n in names if n not in off])])
            except duckdb.Error:
                before = None
            held["before"] = before
        held["queries"] += 1
    try:
        yield
    finally:
        with _OPTIMIZERS_LOCK:
            held["queries"] -= 1
            if not held["queries"]:
                before = _optimizers_held.pop(database)["before"]
                if before:
                    con.execute("SET disabled_optimizers = $1", [before])
                elif before is not None:
                    con.execute("RESET disabled_optimizers")


def _local_parquet(source) -> bool:
    return (isinstance(source, FileSource) and "://" not in source.path and not source.field_mapping
            and (isinstance(source.file_format, ParquetFormat)
                 or (source.file_format is None and source.path.endswith(".parquet"))))


def _one_instant(config, feature_views, feature_refs, entity_df: pd.DataFrame, instant: dt.datetime, registry,
                 project, full_feature_names: bool, filter_by_created_timestamp: bool):
    """The retrieval job of entity rows that all have the timestamp `instant` (UTC) from local Parquet sources:
    `instant_sql` over the files each view can match (the same rows, renames and on-demand views as Feast's
    join); None when a view reads another kind of source or an on-demand view is a substrait one (Feast's join
    then)."""
    odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
    if any(odfv.mode == "substrait" for odfv in odfvs) or \
            not all(fv.batch_source is not None and _local_parquet(fv.batch_source) for fv in feature_views):
        return None
    ts_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes, strict=True)))
    span = _get_entity_df_event_timestamp_range(entity_df, ts_col)
    entity_df = _to_utc(entity_df, ts_col)
    instant = pd.Timestamp(instant).to_pydatetime()
    views = []
    for fv in feature_views:
        source = fv.batch_source
        earliest = None
        if fv.ttl:
            with contextlib.suppress(OverflowError):
                earliest = instant - fv.ttl
        files = snapshot_files(source.path, earliest, instant) or [source.path]
        prefix = fv.projection.name_to_use()
        refs = [r.split(":")[1] for r in feature_refs if r.startswith(f"{prefix}:")]
        base = fv.projection.name_alias or fv.name
        key_map = fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
        if not refs:
            continue
        views.append(_View(files, source.timestamp_field, source.created_timestamp_column or None, key_map,
                           {f: f"{base}__{f}" if full_feature_names else f for f in refs}, earliest))
    name = f"mtrec_entity_{uuid.uuid4().hex}"
    sql, params = instant_sql(name, list(entity_df.columns), views, instant, filter_by_created_timestamp)
    return InstantRetrievalJob(
        sql, params, entity_df, name, on_demand_feature_views=odfvs, full_feature_names=full_feature_names,
        metadata=RetrievalMetadata(features=feature_refs, keys=list(set(entity_df.columns) - {ts_col}),
                                   min_event_timestamp=span[0], max_event_timestamp=span[1]),
        data_source_writer=_write_data_source, staging_location=config.offline_store.staging_location,
        staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        repo_path=str(config.repo_path))
