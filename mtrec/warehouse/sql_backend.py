"""SQLAlchemy warehouse (PostgreSQL through psycopg 3, with COPY for bulk writes)."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pandas as pd
import sqlalchemy as sa

from mtrec.errors import WarehouseError
from mtrec.schema import TableSpec
from mtrec.warehouse.base import SQL_TYPES, create_table_sql, normalize_frame, q, where_clause

COPY_CHUNK_ROWS = 200_000


def _split_schema(url: str) -> tuple[str, str | None]:
    """Accept `postgresql://.../db?schema=name`; SQLAlchemy needs the psycopg driver spelled out."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", None)
    scheme = parts.scheme
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment)), schema


class SQLWarehouse:
    def __init__(self, url: str) -> None:
        self.url = url
        sa_url, self.schema = _split_schema(url)
        connect_args: dict[str, Any] = {}
        self.dialect = "postgresql" if sa_url.startswith("postgresql") else sa.engine.make_url(sa_url).get_backend_name()
        if self.dialect == "postgresql":
            opts = "-c timezone=UTC"
            if self.schema:
                q(self.schema)
                opts += f" -c search_path={self.schema}"
            connect_args["options"] = opts
        try:
            self.engine = sa.create_engine(sa_url, connect_args=connect_args, pool_pre_ping=True)
            with self.engine.connect() as c:
                if self.schema:
                    if self.dialect == "postgresql":  # concurrent first opens race on pg_namespace
                        c.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": f"schema {self.schema}"})
                    c.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {q(self.schema)}"))
                    c.commit()
        except Exception as e:  # noqa: BLE001 - any driver error means the warehouse is unreachable
            host = urlsplit(url).hostname
            raise WarehouseError(f"cannot connect to warehouse at {host}: {str(e).splitlines()[0]}") from None
        # the connection of the transaction open in each thread: a transaction belongs to the thread that opened
        # it (the score stage queries from several threads; the others take their own pooled connections)
        self._local = threading.local()

    # -- connections ----------------------------------------------------------------------------------
    @property
    def _conn(self) -> sa.Connection | None:
        return getattr(self._local, "conn", None)

    @_conn.setter
    def _conn(self, conn: sa.Connection | None) -> None:
        self._local.conn = conn

    @contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        if self._conn is not None:
            yield self._conn
            return
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[SQLWarehouse]:
        if self._conn is not None:
            yield self
            return
        with self.engine.begin() as conn:
            self._conn = conn
            try:
                yield self
            finally:
                self._conn = None

    def _run(self, conn: sa.Connection, sql: str, params: Mapping[str, Any] | None) -> sa.CursorResult:
        try:
            return conn.execute(sa.text(sql), dict(params or {}))
        except sa.exc.DBAPIError as e:
            raise WarehouseError(f"{self.dialect}: {str(e.orig).splitlines()[0]}") from e

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        with self._connection() as conn:
            self._run(conn, sql, params)

    def query_df(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        with self._connection() as conn:
            res = self._run(conn, sql, params)
            return pd.DataFrame(res.fetchall(), columns=list(res.keys()))

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        with self._connection() as conn:
            return self._run(conn, sql, params).scalar()

    def iter_query(self, sql: str, params: Mapping[str, Any] | None = None,
                   chunk_rows: int = 500_000) -> Iterator[pd.DataFrame]:
        with self.engine.connect().execution_options(stream_results=True) as conn:
            res = self._run(conn, sql, params)
            cols = list(res.keys())
            while rows := res.fetchmany(chunk_rows):
                yield pd.DataFrame(rows, columns=cols)

    # -- schema ---------------------------------------------------------------------------------------
    def table_exists(self, name: str) -> bool:
        return bool(self.scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = :t AND table_schema = current_schema()",
            {"t": name}))

    def columns(self, name: str) -> dict[str, str]:
        df = self.query_df(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = :t AND table_schema = current_schema() ORDER BY ordinal_position", {"t": name})
        return dict(zip(df["column_name"], df["data_type"], strict=True))

    def create_table(self, spec: TableSpec) -> None:
        with self.transaction():
            # Serialise concurrent first runs: CREATE IF NOT EXISTS races on the pg_type catalogue.
            if self.dialect == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(hashtext(:n))", {"n": spec.name})
            for stmt in create_table_sql(spec, "postgresql" if self.dialect == "postgresql" else "duckdb"):
                self.execute(stmt)

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        for col, typ in columns.items():
            self.execute(f"ALTER TABLE {q(table)} ADD COLUMN IF NOT EXISTS {q(col)} {SQL_TYPES['postgresql'][typ]}")

    # -- bulk writes ----------------------------------------------------------------------------------
    def insert_df(self, table: str, df: pd.DataFrame) -> int:
        if df.empty:
            return 0
        cols = [q(c) for c in df.columns]
        if self.dialect != "postgresql":
            stmt = f"INSERT INTO {q(table)} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in df.columns)})"
            records = df.astype(object).where(df.notna(), None).to_dict("records")
            with self._connection() as conn:
                conn.execute(sa.text(stmt), records)
            return len(df)
        copy_sql = f"COPY {q(table)} ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')"
        with self._connection() as conn:
            cur = conn.connection.driver_connection.cursor()
            try:
                with cur.copy(copy_sql) as copy:
                    for start in range(0, len(df), COPY_CHUNK_ROWS):
                        buf = io.StringIO()
                        # \\N marks NULL so that an empty string stays an empty string.
                        df.iloc[start:start + COPY_CHUNK_ROWS].to_csv(
                            buf, header=False, index=False, quoting=csv.QUOTE_MINIMAL, na_rep="\\N")
                        copy.write(buf.getvalue())
            except Exception as e:  # noqa: BLE001
                raise WarehouseError(f"COPY into {table} failed: {str(e).splitlines()[0]}") from e
        return len(df)

    def replace_partition(self, table: str, df: pd.DataFrame, where: Mapping[str, Any]) -> int:
        clause, params = where_clause(where)
        with self.transaction():
            self.execute(f"DELETE FROM {q(table)} WHERE {clause}", params)
            return self.insert_df(table, df)

    def replace_where_in(self, table: str, df: pd.DataFrame, key_columns: Sequence[str]) -> int:
        if df.empty:
            return 0
        keys = df[list(key_columns)].drop_duplicates()
        tmp = "mtrec_tmp_keys"
        cond = " AND ".join(f"t.{q(k)} = k.{q(k)}" for k in key_columns)
        with self.transaction():
            self.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp} AS SELECT {', '.join(q(k) for k in key_columns)} "
                         f"FROM {q(table)} WHERE FALSE")
            self.execute(f"TRUNCATE {tmp}")
            self.insert_df(tmp, keys)
            self.execute(f"DELETE FROM {q(table)} t USING {tmp} k WHERE {cond}")
            self.execute(f"DROP TABLE {tmp}")
            return self.insert_df(table, df)

    def write_normalized(self, spec: TableSpec, df: pd.DataFrame, where: Mapping[str, Any]) -> int:
        return self.replace_partition(spec.name, normalize_frame(df, spec.columns), where)

    def close(self) -> None:
        self.engine.dispose()

