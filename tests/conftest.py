"""Shared fixtures: config in a temp MTREC_HOME, warehouses on DuckDB and (when configured) PostgreSQL/Redis."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtrec.config import MtrecConfig, load_config

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _service_url(var: str) -> str:
    """URL of a test service, or skip (outside CI) / fail (in CI) when it is not configured."""
    url = os.environ.get(var)
    if not url:
        if IN_CI:
            pytest.fail(f"{var} is not set: CI must point the service tests at a real server")
        pytest.skip(f"{var} not set: export it to run tests against a real server")
    return url


@pytest.fixture
def cfg(tmp_path: Path) -> MtrecConfig:
    """Default config with its home in a fresh temp directory and a small, fast training setup."""
    return load_config(environ={}, overrides={
        "home": str(tmp_path / "home"),
        "training": {"epochs": 2, "train_days": 7, "batch_size": 512},
    })


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    base = _service_url("MTREC_TEST_POSTGRES_URL")
    import sqlalchemy as sa

    schema = f"t_{secrets.token_hex(6)}"
    try:
        engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001
        if IN_CI:
            pytest.fail(f"PostgreSQL at {base} unreachable in CI: {e}")
        pytest.skip(f"PostgreSQL at {base} unreachable: {e}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}schema={schema}"
    with engine.begin() as c:
        c.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def redis_url() -> str:
    url = _service_url("MTREC_TEST_REDIS_URL")
    import redis

    try:
        redis.Redis.from_url(url).ping()
    except Exception as e:  # noqa: BLE001
        if IN_CI:
            pytest.fail(f"Redis at {url} unreachable in CI: {e}")
        pytest.skip(f"Redis at {url} unreachable: {e}")
    return url


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrises a test over both backends (PostgreSQL only when MTREC_TEST_POSTGRES_URL is set)."""
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'wh.duckdb'}"
    return request.getfixturevalue("postgres_url")


# DuckDB's Python bindings (nanobind) print pages of "leaked instance" noise when the interpreter tears down
# after connections were used from many threads. The results are already reported by then: leave quietly.
_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT["status"] = int(exitstatus)


def pytest_unconfigure(config) -> None:
    if "status" in _EXIT and os.environ.get("MTREC_TEST_QUIET_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
