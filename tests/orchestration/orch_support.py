"""Helpers shared by the orchestration tests (Airflow, KFP, image, Kubernetes manifests)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AIRFLOW = str(VENV_BIN / "airflow")
DAGS = REPO / "dags"

END = dt.date(2024, 5, 10)  # last generated day
# Small but real: every stage runs; training is short.
SMALL_CONFIG = {
    "MTREC_TRAINING__EPOCHS": "1",
    "MTREC_TRAINING__TRAIN_DAYS": "5",
    "MTREC_SCORING__TOP_K": "5",
}


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any MTREC_* / AIRFLOW* settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MTREC_") or k.startswith("AIRFLOW") or k == "KUBECONFIG")}
    env.update(extra)
    return env


def mtrec_env(home: Path, **extra: str) -> dict[str, str]:
    return clean_env(MTREC_HOME=str(home), **SMALL_CONFIG, **extra)


def sqlite_metadata_url(airflow_home: Path) -> str:
    return f"sqlite:///{airflow_home / 'airflow.db'}"


def airflow_env(airflow_home: Path, mtrec_home: Path, db_url: str | None = None, **extra: str) -> dict[str, str]:
    """Airflow pointed at a private home and metadata DB (SQLite under the home unless `db_url` names another,
    e.g. a PostgreSQL database through psycopg), the repo's dags/, local mode without retries."""
    db_url = db_url or sqlite_metadata_url(airflow_home)
    if db_url.startswith("postgresql+psycopg://"):  # Airflow's async engine needs its own driver name
        extra.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC",
                         db_url.replace("postgresql+psycopg://", "postgresql+psycopg_async://", 1))
    return mtrec_env(
        mtrec_home,
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=db_url,
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        MTREC_AIRFLOW_MODE="local",
        MTREC_AIRFLOW_RETRIES="0",
        **extra,
    )


def copy_home(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_rows(db_url: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
    """Rows of a query on the Airflow metadata DB (SQLite or PostgreSQL), on a connection of its own."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url, connect_args={"timeout": 30} if db_url.startswith("sqlite") else {})
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql), params or {})]
    finally:
        engine.dispose()


def task_states(db_url: str, dag_id: str) -> dict[str, dict[tuple[str, int], str]]:
    """{run_id: {(task_id, map_index): state}} from the Airflow metadata DB."""
    rows = airflow_rows(db_url, "SELECT run_id, task_id, map_index, state FROM task_instance WHERE dag_id = :d",
                        {"d": dag_id})
    out: dict[str, dict[tuple[str, int], str]] = {}
    for run_id, task_id, map_index, state in rows:
        out.setdefault(run_id, {})[(task_id, map_index)] = state
    return out


def query(home: Path, sql: str, params: dict[str, Any] | None = None):
    """Read the test warehouse (DuckDB under home) with mtrec's own warehouse layer."""
    from mtrec.config import load_config
    from mtrec.warehouse import open_warehouse

    cfg = load_config(environ={"MTREC_HOME": str(home)})
    wh = open_warehouse(cfg)
    try:
        return wh.query_df(sql, params or {})
    finally:
        wh.close()


class Services:
    """Airflow scheduler, api-server and dag-processor started by a test, each in its own process group,
    and stopped by that test only (SIGTERM to the groups it created, SIGKILL after a grace period)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, *names: str) -> None:
        for name in names:
            log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self.procs[name] = subprocess.Popen([AIRFLOW, name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            tails = {n: (self.log_dir / f"{n}.log").read_text(errors="replace")[-3000:] for n in dead}
            raise AssertionError(f"airflow services exited early: {dead}\n{tails}")

    def stop(self, grace: float = 30.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            try:  # the group may still hold task processes of the executor
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition", on_poll=None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_poll is not None:
            on_poll()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- Kubernetes policy ------------------------------------------------------------------------------------------

SECRET_NAMES = ("PASSWORD", "SECRET", "TOKEN", "API_KEY", "ACCESS_KEY", "PRIVATE_KEY", "CREDENTIALS")


def image_is_pinned(image: str) -> bool:
    """A tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def looks_like_secret_value(name: str, value: str) -> bool:
    import re

    upper = name.upper()
    if any(s in upper for s in SECRET_NAMES) and value:
        return True
    return bool(re.search(r"://[^/\s:@]+:[^/\s@]+@", value or ""))  # credentials inside a URL


def check_container_policy(c: dict, where: str, pod_security: dict | None = None) -> None:
    """Resources with limits, non-root, read-only root filesystem, no added capabilities, no privilege,
    a pinned image and no literal secret values."""
    pod_security = pod_security or {}
    res = c.get("resources") or {}
    assert res.get("requests") and res.get("limits"), f"{where}: requests and limits are required"
    assert {"cpu", "memory"} <= set(res["limits"]), f"{where}: cpu and memory limits are required"
    sc = c.get("securityContext") or {}
    non_root = sc.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    user = sc.get("runAsUser", pod_security.get("runAsUser"))
    assert non_root is True, f"{where}: runAsNonRoot must be true"
    assert user is None or user != 0, f"{where}: runs as uid 0"
    assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    assert not sc.get("privileged"), f"{where}: privileged"
    caps = sc.get("capabilities") or {}
    assert not caps.get("add"), f"{where}: adds capabilities {caps.get('add')}"
    assert "ALL" in (caps.get("drop") or []), f"{where}: must drop ALL capabilities"
    assert image_is_pinned(c["image"]), f"{where}: image {c['image']} is not pinned"
    for e in c.get("env") or []:
        assert not looks_like_secret_value(e["name"], str(e.get("value") or "")), \
            f"{where}: env {e['name']} holds a literal secret; use secretKeyRef"
