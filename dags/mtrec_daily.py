"""Airflow DAGs for mtrec: `mtrec_daily` (scheduled) and `mtrec_retrain` (on demand).

Both run the stages of DESIGN.md section 6 as one task each: validate -> features -> train -> evaluate ->
gate (branch: promote | keep_champion) -> scenarios -> score (mapped, one task per scenario) -> publish.
Scoring always runs with the champion, whichever way the gate went.

Execution mode, chosen by configuration (environment of the scheduler, dag-processor and workers):

- ``MTREC_AIRFLOW_MODE=local`` (default): each task calls ``mtrec.steps.<verb>.run`` in the worker. mtrec
  itself reads ``MTREC_CONFIG`` / ``MTREC_HOME`` / ``MTREC_WAREHOUSE_URL`` / ``MTREC_*`` as everywhere else.
- ``MTREC_AIRFLOW_MODE=kubernetes``: each stage is a ``KubernetesPodOperator`` running the mtrec image; the
  pod executes the same ``run_stage`` function below and hands its summary back through XCom.

This file imports nothing heavy at the top (no mtrec, pandas, torch, kubernetes): the dag-processor parses it
often. Everything else is read from ``MTREC_AIRFLOW_*`` variables, see ``Settings``.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule, get_current_context, task

STAGES = ("validate", "features", "train", "evaluate", "score", "publish")
TAGS = ["mtrec", "ml", "recommender"]


def run_stage(verb: str, ds: str, run_id: str, options: dict | None = None) -> Any:
    """Run one mtrec stage for the logical date `ds` and return a small JSON-able summary.

    The same function runs in the Airflow worker (local mode) and, as the source of a `python -c` program, in
    a pod of the mtrec image (kubernetes mode): keep it self-contained (imports inside, no globals).
    Besides the six verbs it knows two helpers: `scenarios` (the list to fan scoring out over, as a list of
    dicts so that each mapped task gets ds and run_id with its scenario) and `promote` (make sure the blessed
    candidate is the champion; the evaluate stage already promoted it in the transaction of its decision).
    """
    import datetime as dt
    import importlib
    import json

    from mtrec.config import load_config

    cfg = load_config()
    day = dt.date.fromisoformat(ds)
    options = dict(options or {})
    if verb == "scenarios":
        wanted = [s for s in (options.get("scenarios") or []) if s]
        if not wanted:
            from mtrec.data.raw import known_scenarios
            from mtrec.warehouse import open_warehouse

            wh = open_warehouse(cfg)
            try:
                wanted = known_scenarios(wh, cfg, day)
            finally:
                wh.close()
        return [{"scenario": s, "ds": ds, "run_id": run_id} for s in wanted]
    if verb == "promote":
        from mtrec.registry import ModelRegistry
        from mtrec.warehouse import ensure_contract_tables, open_warehouse

        wh = open_warehouse(cfg)
        try:
            ensure_contract_tables(wh, cfg)
            reg = ModelRegistry(cfg, wh)
            mv = reg.promote(options["version"], actor=f"airflow:{run_id}", reason="blessed by the gate", ds=day)
        finally:
            wh.close()
        return {"stage": "promote", "ds": ds, "run_id": run_id, "status": "success", "champion": mv.version,
                "message": f"{mv.version} is champion"}
    step = importlib.import_module(f"mtrec.steps.{verb}")
    result = step.run(cfg, day, run_id=run_id, **options)
    out = {"stage": verb, "ds": ds, "run_id": run_id, "status": result.status, "message": result.message,
           "artifacts": dict(result.artifacts)}
    for key in ("version", "mode", "decision", "reasons", "candidate", "champion", "rows", "model_version",
                "evaluation_path", "report_path", "drift_detected"):
        if hasattr(result, key):
            out[key] = getattr(result, key)
    return json.loads(json.dumps(out, default=str))


# What a kubernetes-mode pod runs: `python -c POD_PROGRAM <verb> <ds> <run_id> <options-json>`. It writes the
# summary to /airflow/xcom/return.json (KubernetesPodOperator's XCom sidecar reads it) and exits like the CLI:
# 0 ok, 1 stage failure (a critical data-quality failure included), 2 config error; one line on stderr.
POD_PROGRAM = "from __future__ import annotations\n" + inspect.getsource(run_stage) + '''
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from mtrec.errors import MtrecError
try:
    out = run_stage(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
except MtrecError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(e.exit_code)
path = os.environ.get("MTREC_XCOM_PATH", "/airflow/xcom/return.json")
if os.path.isdir(os.path.dirname(path)):
    with open(path, "w") as f:
        json.dump(out, f)
print(json.dumps(out), flush=True)
sys.stdout.flush()
os._exit(0)
'''


def _env_json(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be JSON: {e}") from None


@dataclass(frozen=True)
class Settings:
    """Deployment settings, from MTREC_AIRFLOW_* environment variables (defaults match k8s/base)."""

    mode: str = "local"
    retries: int = 2
    retry_delay_minutes: float = 5.0
    score_parallelism: int = 1
    pool: str | None = None
    image: str = "ghcr.io/mtrec/mtrec:0.1.0"
    namespace: str = "mtrec"
    service_account: str = "mtrec-pipeline"
    config_map: str = "mtrec-config"
    warehouse_secret: str = "mtrec-warehouse"
    home_pvc: str = "mtrec-home"
    kubernetes_conn_id: str = "kubernetes_default"
    start_date: dt.date = dt.date(2024, 1, 1)
    end_date: dt.date | None = None
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        mode = env.get("MTREC_AIRFLOW_MODE", "local").strip().lower() or "local"
        if mode not in ("local", "kubernetes"):
            raise ValueError(f"MTREC_AIRFLOW_MODE must be local or kubernetes (got {mode!r})")
        d = cls()
        return cls(
            mode=mode,
            retries=int(env.get("MTREC_AIRFLOW_RETRIES", d.retries)),
            retry_delay_minutes=float(env.get("MTREC_AIRFLOW_RETRY_DELAY_MINUTES", d.retry_delay_minutes)),
            # DuckDB allows one writing process: local mode scores one scenario at a time unless told otherwise.
            score_parallelism=int(env.get("MTREC_AIRFLOW_SCORE_PARALLELISM", 1 if mode == "local" else 4)),
            pool=env.get("MTREC_AIRFLOW_POOL") or None,
            image=env.get("MTREC_AIRFLOW_IMAGE", d.image),
            namespace=env.get("MTREC_AIRFLOW_NAMESPACE", d.namespace),
            service_account=env.get("MTREC_AIRFLOW_SERVICE_ACCOUNT", d.service_account),
            config_map=env.get("MTREC_AIRFLOW_CONFIG_MAP", d.config_map),
            warehouse_secret=env.get("MTREC_AIRFLOW_WAREHOUSE_SECRET", d.warehouse_secret),
            home_pvc=env.get("MTREC_AIRFLOW_HOME_PVC", d.home_pvc),
            kubernetes_conn_id=env.get("MTREC_AIRFLOW_KUBERNETES_CONN_ID", d.kubernetes_conn_id),
            start_date=dt.date.fromisoformat(env.get("MTREC_AIRFLOW_START_DATE") or d.start_date.isoformat()),
            end_date=dt.date.fromisoformat(env["MTREC_AIRFLOW_END_DATE"]) if env.get("MTREC_AIRFLOW_END_DATE") else None,
            gpu_node_selector=_env_json("MTREC_AIRFLOW_GPU_NODE_SELECTOR", d.gpu_node_selector),
        )


SETTINGS = Settings.from_env()

DOC_MD = """
### mtrec daily pipeline

One task per stage of the mtrec daily batch (see `docs/orchestration.md` in the repository):
`validate` -> `features` -> `train` -> `evaluate` -> `gate` (branch: `promote` when the candidate is
blessed, `keep_champion` otherwise) -> `scenarios` -> `score` (one mapped task per scenario, always with
the champion) -> `publish` (atomic overwrite of `daily_recommendations` partitions `(ds, scenario)`).

**Logical date.** A run processes `ds` = its logical date (UTC), which for scheduled and backfill runs is
the start of its data interval: the run for `ds` starts after 00:00 UTC of `ds + 1`, reads data up to the
end of `ds`, and its recommendations are served on `ds + 1`. The `ds` param overrides it (manual runs:
pass the day to process, since a manual trigger's logical date defaults to the trigger time).

**Params.** `retrain`: `auto` (retrain when there is no champion, it is older than `retrain.every_days`
or the drift check flagged a shift; otherwise an incremental update) | `always` | `never`;
`scenarios`: only these scenarios (empty: every scenario in the data); `ds`: override the logical date.

**Retrain on demand:** trigger `mtrec_retrain` with `{"ds": "YYYY-MM-DD"}` (retrain=always), or this DAG
with `{"retrain": "always"}`.
**Backfill:** `airflow backfill create --dag-id mtrec_daily --from-date D1 --to-date D2
--dag-run-conf '{"retrain": "never"}'` (scheduler, api-server and dag-processor must run; the DAG must be
unpaused). A rerun of a day replaces its partition: never duplicates.

**Mode:** `MTREC_AIRFLOW_MODE` = `local` (tasks call the library in the worker) or `kubernetes`
(each task runs the mtrec image with `KubernetesPodOperator`).
"""


def _params(retrain_default: str) -> dict[str, Param]:
    return {
        "retrain": Param(retrain_default, enum=["auto", "always", "never"],
                         description="Retrain policy for this run: auto | always | never."),
        "scenarios": Param([], type="array", items={"type": "string"},
                           description="Only these scenarios; empty = every scenario in the data."),
        "ds": Param(None, type=["null", "string"], format="date",
                    description="Day to process, YYYY-MM-DD (UTC); empty = the run's logical date."),
    }


def resolve_ds(params: dict[str, Any], logical_date: Any, data_interval_start: Any = None) -> str:
    """The mtrec ds of a run: the ds param, else the logical date (UTC; for scheduled and backfill runs it is
    the start of the data interval), else the data interval start."""
    if params.get("ds"):
        return dt.date.fromisoformat(str(params["ds"])).isoformat()
    moment = logical_date or data_interval_start
    if moment is None:
        raise ValueError("this run has no logical date: trigger it with the ds param, e.g. {\"ds\": \"2024-05-10\"}")
    return moment.astimezone(dt.UTC).date().isoformat()


def _default_args(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "owner": "mtrec",
        "retries": settings.retries,
        "retry_delay": dt.timedelta(minutes=settings.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(hours=1),
        "execution_timeout": dt.timedelta(hours=3),
    }
    if settings.pool:
        args["pool"] = settings.pool
    return args


# -- local mode: TaskFlow tasks calling the library ----------------------------------------------------------

def _local(verb: str, ds: str, run_id: str, options: dict | None = None) -> Any:
    """run_stage in the worker; a critical data-quality failure fails the task without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from mtrec.errors import ConfigError, DataValidationError

    try:
        return run_stage(verb, ds, run_id, options)
    except (DataValidationError, ConfigError) as e:  # retrying cannot fix bad data or a bad config
        raise AirflowFailException(str(e)) from e


def _local_stages(settings: Settings, plan: Any) -> dict[str, Any]:
    @task(task_id="validate")
    def validate(p: dict) -> dict:
        return _local("validate", p["ds"], p["run_id"])

    @task(task_id="features")
    def features(p: dict) -> dict:
        return _local("features", p["ds"], p["run_id"])

    @task(task_id="train", execution_timeout=dt.timedelta(hours=8))
    def train(p: dict) -> dict:
        return _local("train", p["ds"], p["run_id"], {"retrain": p["retrain"]})

    @task(task_id="evaluate")
    def evaluate(p: dict) -> dict:
        return _local("evaluate", p["ds"], p["run_id"])

    @task(task_id="promote")
    def promote(p: dict, evaluated: dict) -> dict:
        return _local("promote", p["ds"], p["run_id"], {"version": evaluated["candidate"]})

    @task(task_id="scenarios", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def scenarios(p: dict) -> list[dict]:
        return _local("scenarios", p["ds"], p["run_id"], {"scenarios": p["scenarios"]})

    @task(task_id="score", max_active_tis_per_dagrun=settings.score_parallelism,
          map_index_template="{{ scenario }}")
    def score(item: dict) -> dict:
        get_current_context()["scenario"] = item["scenario"]  # type: ignore[typeddict-unknown-key]
        return _local("score", item["ds"], item["run_id"], {"scenarios": [item["scenario"]], "model": "champion"})

    @task(task_id="publish")
    def publish(p: dict, items: list[dict]) -> dict:
        return _local("publish", p["ds"], p["run_id"], {"scenarios": [i["scenario"] for i in items]})

    v = validate(plan)
    f = features(plan)
    t = train(plan)
    e = evaluate(plan)
    v >> f >> t >> e
    pr = promote(plan, e)
    sc = scenarios(plan)
    scored = score.expand(item=sc)
    pub = publish(plan, sc)
    scored >> pub
    return {"validate": v, "features": f, "train": t, "evaluate": e, "promote": pr, "scenarios": sc,
            "score": scored, "publish": pub}


# -- kubernetes mode: the same stages as pods of the mtrec image --------------------------------------------

HOME_MOUNT = "/var/lib/mtrec"
CONFIG_MOUNT = "/etc/mtrec"

RESOURCES = {
    "default": ({"cpu": "1", "memory": "4Gi"}, {"cpu": "2", "memory": "8Gi"}),
    "features": ({"cpu": "2", "memory": "8Gi"}, {"cpu": "4", "memory": "16Gi"}),
    "train": ({"cpu": "4", "memory": "16Gi"}, {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}),
    "score": ({"cpu": "2", "memory": "8Gi"}, {"cpu": "4", "memory": "16Gi"}),
}
RESOURCES["scenarios"] = RESOURCES["promote"] = ({"cpu": "250m", "memory": "1Gi"}, {"cpu": "1", "memory": "2Gi"})


def pod_arguments(verb: str, ds: str, run_id: str, options: dict | None = None) -> list[str]:
    """Arguments of the `python` command of a stage pod."""
    return ["-c", POD_PROGRAM, verb, ds, run_id, json.dumps(options or {})]


def _score_arguments(item: dict) -> list[str]:
    return pod_arguments("score", item["ds"], item["run_id"], {"scenarios": [item["scenario"]], "model": "champion"})


def _pod_kwargs(settings: Settings, verb: str) -> dict[str, Any]:
    from kubernetes.client import models as k8s

    requests, limits = RESOURCES.get(verb, RESOURCES["default"])
    kwargs: dict[str, Any] = dict(
        namespace=settings.namespace,
        image=settings.image,
        image_pull_policy="IfNotPresent",
        cmds=["python"],
        name=f"mtrec-{verb}",
        labels={"app.kubernetes.io/name": "mtrec", "app.kubernetes.io/component": verb,
                "app.kubernetes.io/part-of": "mtrec"},
        service_account_name=settings.service_account,
        kubernetes_conn_id=settings.kubernetes_conn_id,
        env_vars=[
            k8s.V1EnvVar(name="MTREC_HOME", value=HOME_MOUNT),
            k8s.V1EnvVar(name="MTREC_CONFIG", value=f"{CONFIG_MOUNT}/mtrec.yaml"),
            k8s.V1EnvVar(name="HOME", value="/tmp"),
            k8s.V1EnvVar(name="TMPDIR", value="/tmp"),
            k8s.V1EnvVar(name="MTREC_WAREHOUSE_URL", value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=settings.warehouse_secret, key="url"))),
        ],
        volumes=[
            k8s.V1Volume(name="home", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=settings.home_pvc)),
            k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=settings.config_map)),
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="8Gi")),
        ],
        volume_mounts=[
            k8s.V1VolumeMount(name="home", mount_path=HOME_MOUNT),
            k8s.V1VolumeMount(name="config", mount_path=CONFIG_MOUNT, read_only=True),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(
            run_as_non_root=True, read_only_root_filesystem=True, allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"])),
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=600,
    )
    if verb == "train":
        kwargs["node_selector"] = dict(settings.gpu_node_selector)
        kwargs["tolerations"] = [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
        kwargs["execution_timeout"] = dt.timedelta(hours=8)
    return kwargs


def _kubernetes_stages(settings: Settings, plan: Any) -> dict[str, Any]:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    def xp(key: str) -> str:
        return "{{ ti.xcom_pull(task_ids='plan')['" + key + "'] }}"

    def pod(verb: str, options: str = "{}", task_id: str | None = None, **extra: Any) -> Any:
        kwargs = _pod_kwargs(settings, verb)
        kwargs.update(extra)
        return KubernetesPodOperator(task_id=task_id or verb, arguments=["-c", POD_PROGRAM, verb, xp("ds"),
                                                                          xp("run_id"), options], **kwargs)

    v = pod("validate")
    f = pod("features")
    t = pod("train", '{"retrain": "' + xp("retrain") + '"}')
    e = pod("evaluate")
    pr = pod("promote", '{"version": "{{ ti.xcom_pull(task_ids=\'evaluate\')[\'candidate\'] }}"}')
    sc = pod("scenarios", "{{ {'scenarios': ti.xcom_pull(task_ids='plan')['scenarios']} | tojson }}",
             trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    score_kwargs = _pod_kwargs(settings, "score")
    score_kwargs.pop("name")
    scored = KubernetesPodOperator.partial(
        task_id="score", name="mtrec-score", max_active_tis_per_dagrun=settings.score_parallelism,
        **score_kwargs).expand(arguments=sc.output.map(_score_arguments))
    pub = KubernetesPodOperator(
        task_id="publish",
        arguments=["-c", POD_PROGRAM, "publish", xp("ds"), xp("run_id"),
                   "{{ {'scenarios': ti.xcom_pull(task_ids='scenarios') | map(attribute='scenario') | list}"
                   " | tojson }}"],
        **_pod_kwargs(settings, "publish"))
    plan >> v >> f >> t >> e
    e >> pr
    sc >> scored >> pub
    return {"validate": v, "features": f, "train": t, "evaluate": e, "promote": pr, "scenarios": sc,
            "score": scored, "publish": pub}


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC)


# -- the DAGs -------------------------------------------------------------------------------------------------

def build_dag(dag_id: str, *, schedule: Any, retrain_default: str, description: str,
              settings: Settings = SETTINGS) -> DAG:
    """One DAG of the mtrec stages; `mtrec_daily` and `mtrec_retrain` differ in schedule and retrain default."""
    from airflow.providers.standard.operators.empty import EmptyOperator

    with DAG(
        dag_id=dag_id,
        description=description,
        schedule=schedule,
        start_date=_midnight(settings.start_date),
        end_date=_midnight(settings.end_date) if settings.end_date else None,
        catchup=False,
        max_active_runs=1,
        max_active_tasks=8,
        default_args=_default_args(settings),
        params=_params(retrain_default),
        tags=[*TAGS, f"mode:{settings.mode}"],
        doc_md=DOC_MD,
        dagrun_timeout=dt.timedelta(hours=20),
        is_paused_upon_creation=True,
    ) as dag:

        @task(task_id="plan", retries=0)
        def plan() -> dict:
            """Resolve the run's ds, run_id, retrain policy and scenarios once for every stage."""
            ctx = get_current_context()
            params = ctx["params"]
            return {"ds": resolve_ds(params, ctx.get("logical_date"), ctx.get("data_interval_start")),
                    "run_id": ctx["run_id"], "retrain": params.get("retrain") or "auto",
                    "scenarios": list(params.get("scenarios") or [])}

        @task.branch(task_id="gate", retries=0)
        def gate(evaluated: dict) -> str:
            """Promote only when the gate blessed the candidate; otherwise the champion stays."""
            return "promote" if (evaluated or {}).get("decision") == "blessed" else "keep_champion"

        p = plan()
        stages = (_local_stages if settings.mode == "local" else _kubernetes_stages)(settings, p)
        g = gate(stages["evaluate"].output if settings.mode == "kubernetes" else stages["evaluate"])
        keep = EmptyOperator(task_id="keep_champion")
        g >> [stages["promote"], keep]
        [stages["promote"], keep] >> stages["scenarios"]
    return dag


mtrec_daily = build_dag(
    "mtrec_daily",
    # Data-interval semantics: the run for ds covers [ds 00:00, ds+1 00:00) UTC and starts after it ends.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    retrain_default="auto",
    description="mtrec daily batch: validate, features, train, evaluate/gate, score, publish",
)

mtrec_retrain = build_dag(
    "mtrec_retrain",
    schedule=None,
    retrain_default="always",
    description="mtrec on-demand retraining: the daily stages with retrain=always for the ds param",
)
