"""Fixtures of the orchestration tests: a tiny generated warehouse and migrated Airflow metadata DBs."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from orch_support import AIRFLOW, END, airflow_env, copy_home, sqlite_metadata_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def tiny_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MTREC_HOME with 8 generated days (200 users, 100 items) ending at END; copy it before writing."""
    from mtrec.config import load_config
    from mtrec.data.generate import generate_into_warehouse

    home = tmp_path_factory.mktemp("tiny") / "home"
    cfg = load_config(environ={}, overrides={"home": str(home)})
    generate_into_warehouse(cfg, users=200, items=100, days=8, end_date=END, seed=11, progress=False)
    return home


@pytest.fixture
def mtrec_home(tiny_warehouse: Path, tmp_path: Path) -> Path:
    return copy_home(tiny_warehouse, tmp_path / "home")


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow metadata DB (SQLite) migrated once per session."""
    home = tmp_path_factory.mktemp("airflow-template")
    _migrate(home)
    return home / "airflow.db"


def _migrate(home: Path, db_url: str | None = None) -> None:
    env = airflow_env(home, home / "unused", db_url)
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@contextmanager
def _pg_database(base: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database on the test PostgreSQL server (a copy of `template` when given), dropped on exit: its name."""
    import sqlalchemy as sa

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield name
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _pg_database_url(base: str, name: str) -> str:
    import sqlalchemy as sa

    url = sa.engine.make_url(base.replace("postgresql://", "postgresql+psycopg://", 1))
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def airflow_pg_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """Name of an Airflow metadata database on the test PostgreSQL server, migrated once per session and
    copied per test; None outside CI when no server is configured (the tests then use SQLite)."""
    base = os.environ.get("MTREC_TEST_POSTGRES_URL")
    if not base:
        if IN_CI:
            pytest.fail("MTREC_TEST_POSTGRES_URL is not set: CI runs Airflow's services on PostgreSQL")
        yield None
        return
    with _pg_database(base, "mtrec_airflow_tmpl") as name:
        _migrate(tmp_path_factory.mktemp("airflow-pg-template"), _pg_database_url(base, name))
        yield name


@pytest.fixture
def airflow_metadata_url(airflow_pg_template: str | None, airflow_home: Path) -> Iterator[str]:
    """The metadata DB for Airflow's scheduler, api-server and dag-processor running together: a fresh
    PostgreSQL database (a copy of the migrated template), as deployed; SQLite under the home otherwise.
    On SQLite these processes contend for one file lock, and Airflow's own retries do not cover every
    statement (a scheduler once died on a dag_run update that matched no row)."""
    if airflow_pg_template is None:
        yield sqlite_metadata_url(airflow_home)
        return
    base = os.environ["MTREC_TEST_POSTGRES_URL"]
    with _pg_database(base, "mtrec_airflow", template=airflow_pg_template) as name:
        yield _pg_database_url(base, name)


@pytest.fixture
def airflow_home(airflow_db_template: Path, tmp_path: Path) -> Path:
    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(airflow_db_template, home / "airflow.db")
    return home
