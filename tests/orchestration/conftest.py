"""Fixtures of the orchestration tests: a tiny generated warehouse and a migrated Airflow metadata DB."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from orch_support import AIRFLOW, END, airflow_env, copy_home


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
    env = airflow_env(home, home / "unused")
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home / "airflow.db"


@pytest.fixture
def airflow_home(airflow_db_template: Path, tmp_path: Path) -> Path:
    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(airflow_db_template, home / "airflow.db")
    return home
