"""The Airflow DAGs parse cleanly and have the promised structure, in local and kubernetes mode (no cluster)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from orch_support import DAGS, END, REPO, check_container_policy, clean_env, mtrec_env

pytest.importorskip("airflow")

STAGE_CHAIN = ["plan", "validate", "features", "train", "evaluate", "gate"]


@pytest.fixture
def airflow_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k in [k for k in __import__("os").environ if k.startswith("MTREC_AIRFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return tmp_path


def _dagbag(monkeypatch: pytest.MonkeyPatch, **env: str):
    from airflow.dag_processing.dagbag import DagBag

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture
def local_bag(airflow_config, monkeypatch):
    return _dagbag(monkeypatch, MTREC_AIRFLOW_MODE="local")


@pytest.fixture
def k8s_bag(airflow_config, monkeypatch, tmp_path):
    # An offline kubeconfig: building pod specs needs a client object, never a connection.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: offline\n  cluster: {server: 'https://127.0.0.1:1'}\n"
        "contexts:\n- name: offline\n  context: {cluster: offline, user: offline}\ncurrent-context: offline\n"
        "users:\n- name: offline\n  user: {}\n")
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": {
        "in_cluster": False, "kube_config_path": str(kubeconfig),
        "xcom_sidecar_container_image": "alpine:3.20.3",
        "xcom_sidecar_container_resources": json.dumps(
            {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "50m", "memory": "32Mi"}})}}))
    return _dagbag(monkeypatch, MTREC_AIRFLOW_MODE="kubernetes", MTREC_AIRFLOW_IMAGE="ghcr.io/mtrec/mtrec:0.1.0")


def _upstream(dag, task_id: str) -> set[str]:
    return set(dag.get_task(task_id).upstream_task_ids)


@pytest.mark.parametrize("bag_fixture", ["local_bag", "k8s_bag"])
def test_dagbag_imports_without_errors_and_has_both_dags(request, bag_fixture):
    bag = request.getfixturevalue(bag_fixture)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"mtrec_daily", "mtrec_retrain"}
    mode = "local" if bag_fixture == "local_bag" else "kubernetes"
    for dag in bag.dags.values():
        assert {"mtrec", f"mode:{mode}"} <= set(dag.tags)
        assert dag.max_active_runs == 1
        assert dag.doc_md and "backfill create" in dag.doc_md and "retrain" in dag.doc_md
        assert set(dag.params.keys()) == {"retrain", "scenarios", "ds"}
        for t in dag.tasks:  # every stage retries; the pure-Python bookkeeping tasks need not
            if t.task_id not in ("plan", "gate"):
                assert t.retries >= 1, t.task_id
                assert t.retry_delay > dt.timedelta(0)


def test_daily_dag_structure(local_bag):
    from airflow.sdk import CronDataIntervalTimetable

    dag = local_bag.dags["mtrec_daily"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 0 * * *"  # @daily
    assert str(dag.timetable.timezone) in ("UTC", "Timezone('UTC')")
    assert dag.catchup is False
    assert dag.params["retrain"] == "auto" and dag.params["scenarios"] == []
    assert local_bag.dags["mtrec_retrain"].params["retrain"] == "always"
    assert local_bag.dags["mtrec_retrain"].timetable.__class__.__name__ == "NullTimetable"
    ids = {t.task_id for t in dag.tasks}
    assert ids == {"plan", "validate", "features", "train", "evaluate", "gate", "promote", "keep_champion",
                   "scenarios", "score", "publish"}
    for prev, nxt in zip(STAGE_CHAIN, STAGE_CHAIN[1:], strict=False):
        assert prev in _upstream(dag, nxt), (prev, nxt)
    assert dag.get_task("gate").__class__.__name__.startswith("_BranchPython")
    assert "gate" in _upstream(dag, "promote") and "gate" in _upstream(dag, "keep_champion")
    # scoring runs whichever branch the gate took
    scen = dag.get_task("scenarios")
    assert {"promote", "keep_champion"} <= _upstream(dag, "scenarios")
    assert scen.trigger_rule == "none_failed_min_one_success"
    score = dag.get_task("score")
    assert score.__class__.__name__ == "DecoratedMappedOperator"
    assert "scenarios" in _upstream(dag, "score")
    assert score.partial_kwargs.get("max_active_tis_per_dagrun") == 1  # DuckDB: one writer at a time
    assert "score" in _upstream(dag, "publish")


def test_serialization_round_trip(local_bag, k8s_bag):
    from airflow.serialization.serialized_objects import DagSerialization

    for bag in (local_bag, k8s_bag):
        for dag in bag.dags.values():
            data = DagSerialization.to_dict(dag)
            DagSerialization.validate_schema(data)
            back = DagSerialization.from_dict(data)
            assert {t.task_id for t in back.tasks} == {t.task_id for t in dag.tasks}


def test_dag_file_imports_nothing_heavy():
    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "heavy = [m for m in ('mtrec', 'pandas', 'torch', 'feast', 'great_expectations', 'kubernetes', 'duckdb')"
            " if m in sys.modules]; print('HEAVY=' + ','.join(heavy))")
    env = clean_env(MTREC_AIRFLOW_MODE="local", AIRFLOW__CORE__LOAD_EXAMPLES="False")
    out = subprocess.run([sys.executable, "-c", code, str(DAGS / "mtrec_daily.py")], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert heavy == ["HEAVY="], out.stdout[-2000:]


def test_bad_mode_is_an_import_error(airflow_config, monkeypatch):
    bag = _dagbag(monkeypatch, MTREC_AIRFLOW_MODE="docker")
    assert len(bag.import_errors) == 1
    assert "MTREC_AIRFLOW_MODE must be local or kubernetes" in next(iter(bag.import_errors.values()))


def test_resolve_ds_prefers_param_then_logical_date():
    sys.path.insert(0, str(DAGS))
    try:
        import mtrec_daily as m
    finally:
        sys.path.remove(str(DAGS))
    start = dt.datetime(2024, 5, 9, tzinfo=dt.UTC)
    logical = dt.datetime(2024, 5, 10, 0, 0, tzinfo=dt.UTC)
    assert m.resolve_ds({"ds": "2024-05-01"}, logical, start) == "2024-05-01"
    assert m.resolve_ds({"ds": None}, logical, start) == "2024-05-10"
    assert m.resolve_ds({}, None, start) == "2024-05-09"
    with pytest.raises(ValueError, match="ds param"):
        m.resolve_ds({}, None, None)
    with pytest.raises(ValueError):
        m.resolve_ds({"ds": "10/05/2024"}, logical)


# -- kubernetes mode -----------------------------------------------------------------------------------------

class _TI:
    """Stands in for the task instance when rendering the KPO templates (XCom values of a real run)."""

    def __init__(self, xcoms: dict[str, object]) -> None:
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str, **_: object) -> object:
        return self.xcoms[task_ids]


def _render(op, xcoms: dict[str, object]):
    ctx = {"ti": _TI(xcoms), "params": {}}
    return op.render_template(op.arguments, ctx, jinja_env=op.get_template_env())


def test_kubernetes_tasks_are_pods_of_the_mtrec_image(k8s_bag):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dag = k8s_bag.dags["mtrec_daily"]
    for tid in ("validate", "features", "train", "evaluate", "promote", "scenarios", "publish"):
        op = dag.get_task(tid)
        assert isinstance(op, KubernetesPodOperator), tid
        assert op.image == "ghcr.io/mtrec/mtrec:0.1.0" and op.cmds == ["python"]
        assert op.arguments[2] == tid and op.do_xcom_push
    score = dag.get_task("score")
    assert score.operator_class is KubernetesPodOperator or score.operator_class.__name__ == "KubernetesPodOperator"
    assert {t.task_id for t in dag.tasks} == {t.task_id for t in k8s_bag.dags["mtrec_retrain"].tasks}
    for prev, nxt in zip(STAGE_CHAIN, STAGE_CHAIN[1:], strict=False):
        assert prev in _upstream(dag, nxt), (prev, nxt)
    assert dag.get_task("scenarios").trigger_rule == "none_failed_min_one_success"


def test_kubernetes_templates_render_to_stage_arguments(k8s_bag):
    dag = k8s_bag.dags["mtrec_daily"]
    plan = {"ds": "2024-05-10", "run_id": "scheduled__2024-05-11T00:00:00+00:00", "retrain": "never",
            "scenarios": ["home"]}
    xcoms = {"plan": plan, "evaluate": {"decision": "blessed", "candidate": "v0003-20240510"},
             "scenarios": [{"scenario": "home", "ds": "2024-05-10", "run_id": plan["run_id"]}]}
    args = _render(dag.get_task("train"), xcoms)
    assert args[2:5] == ["train", "2024-05-10", plan["run_id"]] and json.loads(args[5]) == {"retrain": "never"}
    args = _render(dag.get_task("promote"), xcoms)
    assert json.loads(args[5]) == {"version": "v0003-20240510"}
    args = _render(dag.get_task("scenarios"), xcoms)
    assert json.loads(args[5]) == {"scenarios": ["home"]}
    args = _render(dag.get_task("publish"), xcoms)
    assert json.loads(args[5]) == {"scenarios": ["home"]}


def test_kubernetes_pod_specs_validate_and_follow_policy(k8s_bag):
    import kubernetes_validate
    from kubernetes.client import ApiClient

    dag = k8s_bag.dags["mtrec_daily"]
    client = ApiClient()
    for tid in ("validate", "features", "train", "evaluate", "promote", "scenarios", "publish"):
        pod = client.sanitize_for_serialization(dag.get_task(tid).build_pod_request_obj())
        kubernetes_validate.validate(pod, "1.32", strict=True)
        spec = pod["spec"]
        assert spec["serviceAccountName"] == "mtrec-pipeline"
        assert spec["securityContext"]["runAsNonRoot"] is True
        base = next(c for c in spec["containers"] if c["name"] == "base")
        check_container_policy(base, f"{tid}/base", pod_security=spec["securityContext"])
        env = {e["name"]: e for e in base["env"]}
        assert env["MTREC_WAREHOUSE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mtrec-warehouse", "key": "url"}
        assert "value" not in env["MTREC_WAREHOUSE_URL"]
        sidecar = next(c for c in spec["containers"] if c["name"] != "base")
        assert sidecar["resources"]["limits"] and ":" in sidecar["image"] and not sidecar["image"].endswith(":latest")
        if tid == "train":
            assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        else:
            assert "nvidia.com/gpu" not in base["resources"]["limits"]


def test_pod_program_runs_a_stage_and_writes_the_xcom(mtrec_home, tmp_path):
    """What a kubernetes-mode pod executes, run here with the venv's python on the tiny warehouse."""
    sys.path.insert(0, str(DAGS))
    try:
        import mtrec_daily as m
    finally:
        sys.path.remove(str(DAGS))
    xcom = tmp_path / "xcom" / "return.json"
    xcom.parent.mkdir()
    args = m.pod_arguments("scenarios", END.isoformat(), "k8s-run-1", {"scenarios": []})
    out = subprocess.run([sys.executable, *args], env=mtrec_env(mtrec_home, MTREC_XCOM_PATH=str(xcom)),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    items = json.loads(xcom.read_text())
    assert [i["scenario"] for i in items] == sorted(i["scenario"] for i in items) and len(items) >= 2
    assert all(i["ds"] == END.isoformat() and i["run_id"] == "k8s-run-1" for i in items)
    # a bad config exits 2 with one line, like the CLI
    bad = subprocess.run([sys.executable, *args], env=mtrec_env(mtrec_home, MTREC_TRAINING__BATCH_SIZE="lots"),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: config key training.batch_size")
