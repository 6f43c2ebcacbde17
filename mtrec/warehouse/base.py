"""The Warehouse protocol: the only place SQL meets the storage engine."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from mtrec.config import check_identifier
from mtrec.schema import BIGINT, BOOLEAN, DATE, DOUBLE, TEXT, TIMESTAMP, TableSpec


def as_utc(values: pd.Series) -> pd.Series:
    """Timestamps as UTC. `pd.to_datetime(utc=True)` on a column that already has a time zone boxes its first
    10,000 values into Python objects (to decide on caching) before converting: a conversion (or, naive, a
    localization) is all it needs."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(values.dtype):  # naive: taken as UTC
        return values.dt.tz_localize("UTC")
    return pd.to_datetime(values, utc=True)


def q(name: str) -> str:
    """Quote an identifier after checking it: nothing from data reaches SQL unchecked."""
    return '"' + check_identifier(name, "identifier") + '"'


def logical_type_of(series: pd.Series) -> str:
    """Map a pandas dtype to the contract's logical type."""
    dt = series.dtype
    if pd.api.types.is_bool_dtype(dt):
        return BOOLEAN
    if pd.api.types.is_integer_dtype(dt):
        return BIGINT
    if pd.api.types.is_float_dtype(dt):
        return DOUBLE
    if isinstance(dt, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(dt):
        return TIMESTAMP
    if len(series) and all(hasattr(v, "isoformat") and not hasattr(v, "hour") for v in series.dropna().head(5)):
        return DATE
    return TEXT


def where_clause(where: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`col = :w_col AND ...` with named parameters; values never spliced into SQL."""
    parts, params = [], {}
    for i, (col, val) in enumerate(where.items()):
        key = f"w{i}"
        parts.append(f"{q(col)} = :{key}")
        params[key] = val
    return (" AND ".join(parts) or "TRUE"), params


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


def named_to(style: str, sql: str) -> str:
    """Rewrite `:name` parameters to a driver style (`$name` for DuckDB, `%(name)s` for psycopg)."""
    if style == "dollar":
        return _NAMED.sub(r"$\1", sql)
    if style == "pyformat":
        return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))
    return sql


@runtime_checkable
class Warehouse(Protocol):
    """What every backend offers. SQL passed in uses `:name` parameters and the common SQL subset."""

    url: str
    dialect: str

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...
    def query_df(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame: ...
    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any: ...
    def transaction(self) -> AbstractContextManager[Warehouse]: ...
    def table_exists(self, name: str) -> bool: ...
    def columns(self, name: str) -> dict[str, str]: ...
    def create_table(self, spec: TableSpec) -> None: ...
    def add_columns(self, table: str, columns: Mapping[str, str]) -> None: ...
    def insert_df(self, table: str, df: pd.DataFrame) -> int: ...
    def replace_partition(self, table: str, df: pd.DataFrame, where: Mapping[str, Any]) -> int: ...
    def replace_where_in(self, table: str, df: pd.DataFrame, key_columns: Sequence[str]) -> int: ...
    def iter_query(self, sql: str, params: Mapping[str, Any] | None = None, chunk_rows: int = 500_000) -> Iterator[pd.DataFrame]: ...
    def close(self) -> None: ...


SQL_TYPES = {
    "duckdb": {TEXT: "VARCHAR", DATE: "DATE", TIMESTAMP: "TIMESTAMPTZ", DOUBLE: "DOUBLE", BIGINT: "BIGINT",
               BOOLEAN: "BOOLEAN"},
    "postgresql": {TEXT: "TEXT", DATE: "DATE", TIMESTAMP: "TIMESTAMPTZ", DOUBLE: "DOUBLE PRECISION",
                   BIGINT: "BIGINT", BOOLEAN: "BOOLEAN"},
}


def create_table_sql(spec: TableSpec, dialect: str) -> list[str]:
    types = SQL_TYPES[dialect]
    cols = [f"{q(c)} {types[t]}" for c, t in spec.columns.items()]
    if spec.primary_key:
        cols.append("PRIMARY KEY (" + ", ".join(q(c) for c in spec.primary_key) + ")")
    stmts = [f"CREATE TABLE IF NOT EXISTS {q(spec.name)} (" + ", ".join(cols) + ")"]
    for idx in spec.indexes:
        name = f"ix_{spec.name}_{'_'.join(idx)}"[:63]
        stmts.append(f"CREATE INDEX IF NOT EXISTS {q(name)} ON {q(spec.name)} (" + ", ".join(q(c) for c in idx) + ")")
    return stmts


def normalize_frame(df: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Reorder to the table's columns (missing ones as NULL) and coerce types the drivers get wrong."""
    out = pd.DataFrame(index=df.index)
    for col, typ in columns.items():
        s = df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)
        if typ == TIMESTAMP:
            s = as_utc(s)
        elif typ == DATE:
            s = pd.to_datetime(s).dt.date.astype(object).where(s.notna(), None)
        elif typ == DOUBLE:
            s = pd.to_numeric(s, errors="coerce").astype("float64")
        elif typ == BIGINT:
            s = pd.to_numeric(s, errors="coerce").astype("Int64")
        elif typ == BOOLEAN:
            s = s.astype("boolean")
        elif typ == TEXT:
            s = s.astype(object).where(s.notna(), None)
        out[col] = s
    return out
