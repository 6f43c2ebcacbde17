"""mtrec_daily really runs under Airflow: `airflow dags test` of one day, and a 3-day `airflow backfill create`
executed by a real scheduler, api-server and dag-processor (LocalExecutor) on loopback."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from orch_support import (
    AIRFLOW,
    END,
    Services,
    airflow_env,
    airflow_rows,
    free_port,
    group_alive,
    mtrec_env,
    query,
    sqlite_metadata_url,
    task_states,
    wait_for,
)

pytest.importorskip("airflow")

STAGES = ["validate", "features", "train", "evaluate", "score", "publish"]


def _scenarios(home: Path) -> list[str]:
    return sorted(query(home, "SELECT DISTINCT scenario FROM events")["scenario"])


def _published(home: Path, ds: dt.date):
    return query(home, "SELECT scenario, user_id, rank, run_id FROM daily_recommendations WHERE ds = :d", {"d": ds})


@pytest.mark.slow
def test_airflow_dags_test_runs_the_whole_pipeline(mtrec_home: Path, airflow_home: Path):
    env = airflow_env(airflow_home, mtrec_home)
    proc = subprocess.run([AIRFLOW, "dags", "test", "mtrec_daily", END.isoformat()], env=env, capture_output=True,
                          text=True, timeout=900, cwd=airflow_home)
    log = proc.stdout + proc.stderr
    (airflow_home / "dags-test.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]

    runs = task_states(sqlite_metadata_url(airflow_home), "mtrec_daily")
    assert len(runs) == 1
    run_id, states = next(iter(runs.items()))
    scenarios = _scenarios(mtrec_home)
    for tid in ["plan", "validate", "features", "train", "evaluate", "gate", "scenarios", "publish"]:
        assert states[(tid, -1)] == "success", (tid, states)
    assert sorted(i for (t, i), s in states.items() if t == "score" and s == "success") == \
        list(range(len(scenarios)))
    # the gate's branch agrees with the decision the evaluate stage recorded
    decision = query(mtrec_home, "SELECT details FROM pipeline_runs WHERE run_id = :r AND stage = 'evaluate'",
                     {"r": run_id})["details"].iloc[0]
    blessed = json.loads(decision).get("decision") == "blessed"
    assert states[("promote", -1)] == ("success" if blessed else "skipped")
    assert states[("keep_champion", -1)] == ("skipped" if blessed else "success")

    # every stage is recorded under the Airflow run id, and the partition is published for each scenario
    recorded = set(query(mtrec_home, "SELECT stage FROM pipeline_runs WHERE run_id = :r", {"r": run_id})["stage"])
    assert set(STAGES) <= recorded
    pub = _published(mtrec_home, END)
    assert sorted(pub["scenario"].unique()) == scenarios
    assert set(pub["run_id"]) == {run_id}
    assert pub.groupby(["scenario", "user_id"])["rank"].max().eq(5).all()
    safe = re.sub(r"[^A-Za-z0-9\-_.+]", "_", run_id)
    manifest = json.loads((mtrec_home / "runs" / END.isoformat() / safe / "manifest.json").read_text())
    assert set(STAGES) <= set(manifest["stages"])


def _make_champion(home: Path, ds: dt.date) -> str:
    """The state a backfill with retrain=never starts from: a champion trained through ds."""
    from mtrec.config import load_config
    from mtrec.registry import ModelRegistry
    from mtrec.steps import evaluate, features, train, validate
    from mtrec.warehouse import open_warehouse

    cfg = load_config(environ=mtrec_env(home))
    validate.run(cfg, ds, run_id="setup")
    features.run(cfg, ds, run_id="setup")
    trained = train.run(cfg, ds, run_id="setup", retrain="always")
    evaluate.run(cfg, ds, run_id="setup", force=True, reason="test setup: a champion to backfill with")
    wh = open_warehouse(cfg)
    try:
        champion = ModelRegistry(cfg, wh).champion()
    finally:
        wh.close()
    assert champion is not None and champion.version == trained.version
    return champion.version


@pytest.mark.slow
def test_airflow_backfill_create_publishes_past_days(mtrec_home: Path, airflow_home: Path,
                                                    airflow_metadata_url: str, tmp_path: Path):
    days = [END - dt.timedelta(days=2), END - dt.timedelta(days=1), END]
    champion = _make_champion(mtrec_home, days[0] - dt.timedelta(days=1))
    scenario = _scenarios(mtrec_home)[0]  # one scenario keeps the test short and exercises the param

    port = free_port()
    env = airflow_env(
        airflow_home, mtrec_home, airflow_metadata_url,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET="orchestration-test-only-" + tmp_path.name,
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="0.5",
        # No scheduled run for "yesterday" on this synthetic data: the schedule ends with the data.
        MTREC_AIRFLOW_END_DATE=END.isoformat(),
    )

    def cli(*args: str, timeout: float = 120) -> str:
        for _ in range(3):  # a SQLite metadata DB is shared with the running scheduler: a write may hit its lock
            p = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout,
                               cwd=airflow_home)
            if p.returncode == 0 or "database is locked" not in p.stdout + p.stderr:
                break
            time.sleep(2)
        errors = [line[:300] for line in (p.stdout + p.stderr).splitlines() if "Error" in line]
        assert p.returncode == 0, (args, errors[-5:], p.stdout[-3000:], p.stderr[-3000:])
        return p.stdout

    services = Services(env, tmp_path)
    try:
        services.start("api-server", "scheduler", "dag-processor")

        def parsed() -> bool:
            return bool(airflow_rows(airflow_metadata_url, "SELECT 1 FROM dag WHERE dag_id = 'mtrec_daily'"))

        wait_for(parsed, timeout=120, what="the dag-processor to parse mtrec_daily", on_poll=services.check_alive)
        cli("dags", "unpause", "mtrec_daily")
        cli("backfill", "create", "--dag-id", "mtrec_daily", "--from-date", days[0].isoformat(),
            "--to-date", days[-1].isoformat(), "--max-active-runs", "1",
            "--dag-run-conf", json.dumps({"retrain": "never", "scenarios": [scenario]}))

        def finished():
            rows = airflow_rows(airflow_metadata_url, "SELECT run_id, state FROM dag_run WHERE dag_id = 'mtrec_daily'")
            if len(rows) == len(days) and all(s in ("success", "failed") for _, s in rows):
                return dict(rows)
            return None

        runs = wait_for(finished, timeout=900, interval=3, what=f"{len(days)} backfill runs to finish",
                        on_poll=services.check_alive)
    finally:
        services.stop()
    assert all(not group_alive(p.pid) for p in services.procs.values())

    assert set(runs.values()) == {"success"}, (runs, task_states(airflow_metadata_url, "mtrec_daily"))
    kinds = {r for (r,) in airflow_rows(airflow_metadata_url,
                                        "SELECT DISTINCT run_type FROM dag_run WHERE dag_id = 'mtrec_daily'")}
    # conf is JSON text on SQLite and JSONB (a dict already) on PostgreSQL
    conf = [json.loads(r) if isinstance(r, str) else r
            for (r,) in airflow_rows(airflow_metadata_url, "SELECT conf FROM dag_run WHERE dag_id = 'mtrec_daily'")]
    assert kinds == {"backfill"}
    assert all(c.get("retrain") == "never" for c in conf)
    for d in days:
        pub = _published(mtrec_home, d)
        assert sorted(pub["scenario"].unique()) == [scenario], d
        assert pub["run_id"].nunique() == 1 and pub["run_id"].iloc[0].startswith("backfill__")
        assert not pub.duplicated(["scenario", "user_id", "rank"]).any()
    # retrain=never: no new model, every day scored with the champion
    versions = query(mtrec_home, "SELECT version FROM model_registry")["version"].tolist()
    assert versions == [champion]
    trained = query(mtrec_home, "SELECT ds, status FROM pipeline_runs WHERE stage = 'train' AND run_id <> 'setup'")
    assert len(trained) == len(days) and set(trained["status"]) == {"skipped"}
