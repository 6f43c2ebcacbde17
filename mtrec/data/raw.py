"""Raw tables: contract checks, idempotent loads, and partition reads."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig, check_identifier
from mtrec.errors import DataContractError
from mtrec.warehouse import Warehouse, q
from mtrec.warehouse.base import logical_type_of, normalize_frame

log = logging.getLogger(__name__)


def _first_bad_row(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0]) + 1


def conform(table: str, df: pd.DataFrame, cfg: MtrecConfig, source: str) -> pd.DataFrame:
    """Check a raw frame against the data contract and return it with contract types.

    Raises DataContractError naming the source, column and (1-based data) row at fault.
    """
    required = S.required_columns(table, cfg)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"missing required column {missing[0]} in {source}", table=table, column=missing[0])
    for col in df.columns:
        try:
            check_identifier(str(col), "column")
        except ValueError:
            raise DataContractError(f"column name {col!r} in {source} is not a valid identifier",
                                    table=table, column=str(col)) from None
    out = df.copy()
    for col, typ in required.items():
        s = out[col]
        if typ == S.TEXT:
            bad = s.isna()
            if col in S.KEYS.get(table, ()) or col.endswith("_id") or col == "scenario":
                if bad.any():
                    raise DataContractError(f"null value at row {_first_bad_row(bad)} of {source}",
                                            table=table, column=col)
            out[col] = s.astype(object).where(s.notna(), None).map(lambda v: v if v is None else str(v))
        elif typ == S.TIMESTAMP:
            parsed = pd.to_datetime(s, utc=True, errors="coerce", format="mixed") if s.dtype == object else \
                pd.to_datetime(s, utc=True, errors="coerce")
            bad = parsed.isna()
            if bad.any():
                raise DataContractError(f"unparsable timestamp {s[bad].iloc[0]!r} at row {_first_bad_row(bad)} of {source}",
                                        table=table, column=col)
            out[col] = parsed
        elif typ == S.BIGINT:
            num = pd.to_numeric(s, errors="coerce")
            bad = num.isna() | (num != num.round())
            if bad.any():
                raise DataContractError(f"non-integer value {s[bad].iloc[0]!r} at row {_first_bad_row(bad)} of {source}",
                                        table=table, column=col)
            out[col] = num.astype("int64")
    for col, typ in S.EVENTS_OPTIONAL.items() if table == S.EVENTS else ():
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64" if typ == S.DOUBLE else "Int64")
    if table == S.EVENTS:
        out["ds"] = out["event_timestamp"].dt.tz_convert("UTC").dt.date
    return out


def table_types(table: str, df: pd.DataFrame, cfg: MtrecConfig) -> dict[str, str]:
    types = {c: logical_type_of(df[c]) for c in df.columns}
    types.update(S.required_columns(table, cfg))
    if table == S.EVENTS:
        types.update({k: v for k, v in S.EVENTS_OPTIONAL.items() if k in df.columns})
        types["ds"] = S.DATE
    return types


def ensure_raw_table(wh: Warehouse, table: str, types: Mapping[str, str]) -> dict[str, str]:
    """Create the raw table if needed, add new columns; return the table's full logical column map."""
    if not wh.table_exists(table):
        wh.create_table(S.TableSpec(table, dict(types)))
        return dict(types)
    existing = wh.columns(table)
    new = {c: t for c, t in types.items() if c not in existing}
    if new:
        log.info("table %s: adding columns %s", table, sorted(new))
        wh.add_columns(table, new)
    return {**{c: types.get(c, S.TEXT) for c in existing}, **new}


def load_frames(wh: Warehouse, cfg: MtrecConfig, frames: Mapping[str, pd.DataFrame],
                sources: Mapping[str, str] | None = None) -> dict[str, int]:
    """Check every frame first, then load all of them in one transaction (all or nothing).

    Loads are idempotent: events replace rows with the same event_id, users and items rows with the
    same (id, updated_at).
    """
    sources = sources or {}
    conformed = {t: conform(t, df, cfg, sources.get(t, f"{t} frame")) for t, df in frames.items() if df is not None}
    counts: dict[str, int] = {}
    with wh.transaction():
        for table, df in conformed.items():
            cols = ensure_raw_table(wh, table, table_types(table, df, cfg))
            frame = normalize_frame(df, {c: t for c, t in cols.items() if c in df.columns})
            counts[table] = wh.replace_where_in(table, frame, S.KEYS[table])
    return counts


def read_file(path: str) -> pd.DataFrame:
    if path.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if path.endswith((".csv", ".csv.gz", ".tsv")):
        return pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype=str, keep_default_na=True)
    raise DataContractError(f"unsupported file type {path} (expected .csv, .tsv or .parquet)")


def load_files(wh: Warehouse, cfg: MtrecConfig, paths: Mapping[str, str | None]) -> dict[str, int]:
    frames, sources = {}, {}
    for table, path in paths.items():
        if path:
            try:
                frames[table] = read_file(path)
            except (OSError, ValueError) as e:
                raise DataContractError(f"cannot read {path}: {str(e).splitlines()[0]}", table=table) from None
            sources[table] = path
    return load_frames(wh, cfg, frames, sources)


# -- reads --------------------------------------------------------------------------------------------

def read_events(wh: Warehouse, start: dt.date, end: dt.date | None = None,
                columns: list[str] | None = None) -> pd.DataFrame:
    """Events with start <= ds <= end (end defaults to start)."""
    cols = ", ".join(q(c) for c in columns) if columns else "*"
    return wh.query_df(f"SELECT {cols} FROM {q(S.EVENTS)} WHERE ds BETWEEN :a AND :b ORDER BY event_timestamp, event_id",
                       {"a": start, "b": end or start})


def latest_rows(wh: Warehouse, table: str, as_of: dt.datetime | None = None) -> pd.DataFrame:
    """The latest version of each user/item (by updated_at), optionally as of a UTC instant."""
    key = S.ID_COLUMN[table]
    cond = "WHERE updated_at < :t" if as_of is not None else ""
    return wh.query_df(
        f"SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY {q(key)} ORDER BY updated_at DESC) AS _rn "
        f"FROM {q(table)} {cond}) s WHERE _rn = 1 ORDER BY {q(key)}",
        {"t": as_of} if as_of is not None else None).drop(columns="_rn")


def known_scenarios(wh: Warehouse, cfg: MtrecConfig, through: dt.date) -> list[str]:
    if cfg.scenarios:
        return list(cfg.scenarios)
    df = wh.query_df(f"SELECT DISTINCT scenario FROM {q(S.EVENTS)} WHERE ds <= :d ORDER BY scenario", {"d": through})
    return [s for s in df["scenario"].tolist() if s is not None]


def end_of_day(ds: dt.date) -> dt.datetime:
    """The serving cut-off of ds: 00:00 UTC of ds + 1."""
    return dt.datetime.combine(ds + dt.timedelta(days=1), dt.time(0), tzinfo=dt.UTC)


def start_of_day(ds: dt.date) -> dt.datetime:
    return dt.datetime.combine(ds, dt.time(0), tzinfo=dt.UTC)
