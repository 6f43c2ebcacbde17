"""Embedded DuckDB warehouse: a single file under MTREC_HOME."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from mtrec.errors import WarehouseError
from mtrec.schema import TableSpec
from mtrec.warehouse.base import create_table_sql, named_to, normalize_frame, q, where_clause

_counter = itertools.count()


def _unregister(con: duckdb.DuckDBPyConnection, view: str) -> None:
    # After a failed statement the transaction is aborted and even unregister raises; ROLLBACK cleans up.
    try:
        con.unregister(view)
    except duckdb.Error:
        pass


def duckdb_path(url: str) -> str:
    """`duckdb:///relative.db` -> relative.db, `duckdb:////abs/wh.duckdb` -> /abs/wh.duckdb (SQLAlchemy style)."""
    path = url.removeprefix("duckdb://")
    path = path[1:] if path.startswith("/") and not path.startswith("//") and path != "/:memory:" else path
    path = path.removeprefix("/") if path.startswith("//") else path
    return ":memory:" if path in ("", ":memory:", "/:memory:") else path


def set_duckdb_threads(con: duckdb.DuckDBPyConnection, n: int) -> int:
    """Set the worker threads of a connection's database; returns the previous setting."""
    previous = int(con.execute("SELECT current_setting('threads')").fetchall()[0][0])
    con.execute(f"SET threads = {max(1, int(n))}").fetchall()
    return previous


class DuckDBWarehouse:
    dialect = "duckdb"

    def __init__(self, url: str, read_only: bool = False) -> None:
        self.url = url
        self.path = duckdb_path(url)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.Error as e:
            raise WarehouseError(f"cannot open DuckDB warehouse {self.path}: {str(e).splitlines()[0]}") from None
        self._attach(con)

    def _attach(self, con: duckdb.DuckDBPyConnection) -> None:
        """Take `con` as this warehouse's connection (session in UTC; statements one at a time under a lock)."""
        self.con = con
        self.con.execute("SET TimeZone = 'UTC'")
        self._depth = 0
        self._lock = threading.RLock()

    # -- statements -----------------------------------------------------------------------------------
    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self.con.execute(named_to("dollar", sql), dict(params) if params else None)
        except duckdb.Error as e:
            raise WarehouseError(f"DuckDB: {str(e).splitlines()[0]}") from e

    # every result is read to its end before the lock is released: a result left open (a DML count, a fetchone)
    # makes DuckDB refuse the next register() on the connection, from whichever thread it comes
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._run(sql, params).fetchall()

    def query_df(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        with self._lock:
            return self._run(sql, params).df()

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        with self._lock:
            rows = self._run(sql, params).fetchall()
        return rows[0][0] if rows else None

    def iter_query(self, sql: str, params: Mapping[str, Any] | None = None,
                   chunk_rows: int = 500_000) -> Iterator[pd.DataFrame]:
        with self._lock:
            reader = self._run(sql, params).fetch_record_batch(chunk_rows)
            for batch in reader:
                yield batch.to_pandas()

    @contextmanager
    def transaction(self) -> Iterator[DuckDBWarehouse]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self.con.execute("BEGIN TRANSACTION").fetchall()
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                self.con.execute("ROLLBACK").fetchall()
                raise
            self._depth = 0
            try:
                self.con.execute("COMMIT").fetchall()
            except duckdb.Error as e:
                raise WarehouseError(f"DuckDB commit failed: {str(e).splitlines()[0]}") from e

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
        for stmt in create_table_sql(spec, self.dialect):
            self.execute(stmt)

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        from mtrec.warehouse.base import SQL_TYPES
        for col, typ in columns.items():
            self.execute(f"ALTER TABLE {q(table)} ADD COLUMN IF NOT EXISTS {q(col)} {SQL_TYPES[self.dialect][typ]}")

    # -- bulk writes ----------------------------------------------------------------------------------
    def insert_df(self, table: str, df: pd.DataFrame) -> int:
        if df.empty:
            return 0
        for c in df.columns:
            q(c)
        view = f"__mtrec_df_{next(_counter)}"
        with self._lock:
            self.con.register(view, df)
            try:
                self.execute(f"INSERT INTO {q(table)} BY NAME SELECT * FROM {view}")
            finally:
                _unregister(self.con, view)
        return len(df)

    def replace_partition(self, table: str, df: pd.DataFrame, where: Mapping[str, Any]) -> int:
        """Delete the partition and insert the new rows in one transaction (readers see old or new)."""
        clause, params = where_clause(where)
        with self.transaction():
            self.execute(f"DELETE FROM {q(table)} WHERE {clause}", params)
            return self.insert_df(table, df)

    def replace_where_in(self, table: str, df: pd.DataFrame, key_columns: Sequence[str]) -> int:
        """Upsert by key: delete rows whose key appears in df, then insert df, in one transaction."""
        if df.empty:
            return 0
        view = f"__mtrec_keys_{next(_counter)}"
        keys = df[list(key_columns)].drop_duplicates()
        cond = " AND ".join(f"t.{q(k)} = k.{q(k)}" for k in key_columns)
        with self.transaction(), self._lock:
            self.con.register(view, keys)
            try:
                self.execute(f"DELETE FROM {q(table)} t WHERE EXISTS (SELECT 1 FROM {view} k WHERE {cond})")
            finally:
                _unregister(self.con, view)
            return self.insert_df(table, df)

    def write_normalized(self, spec: TableSpec, df: pd.DataFrame, where: Mapping[str, Any]) -> int:
        return self.replace_partition(spec.name, normalize_frame(df, spec.columns), where)

    def set_threads(self, n: int) -> int:
        """Set DuckDB's worker threads for this database (a query also runs on its caller's thread); returns the
        previous setting, to restore."""
        with self._lock:
            return set_duckdb_threads(self.con, n)

    def reader(self) -> DuckDBWarehouse:
        """Another connection to the same database, for reads from another thread: its queries run beside this
        connection's instead of waiting for its lock (it sees what is committed). Close it when done."""
        out = DuckDBWarehouse.__new__(DuckDBWarehouse)
        out.url, out.path = self.url, self.path
        with self._lock:
            con = self.con.cursor()
        out._attach(con)
        return out

    def close(self) -> None:
        try:
            self.con.close()
        except duckdb.Error:
            pass
