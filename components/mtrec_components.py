"""Kubeflow Pipelines components of mtrec: thin lightweight Python components that call mtrec.steps.

Every component runs in the mtrec image (`base_image`, with kfp already installed: `install_kfp_package=False`).
Bodies are self-contained (KFP ships each function's source): they load the config from MTREC_CONFIG /
MTREC_HOME / MTREC_WAREHOUSE_URL / MTREC_* (set by the image and the platform config of pipeline.py), call
`mtrec.steps.<verb>.run`, and describe what the stage produced as typed artifacts (Dataset, Model, Metrics, HTML).
The warehouse and MTREC_HOME stay the source of truth: stages of one run find each other's state through the
`run_id` (the KFP run name) exactly as under Airflow or `mtrec run`.
"""

import functools
import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/mtrec/mtrec:0.1.0"
# The image every component runs in; `python components/pipeline.py --image REF` compiles for another one.
IMAGE = os.environ.get("MTREC_IMAGE") or DEFAULT_IMAGE

component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def validate(ds: str, run_id: str, dq_report: Output[HTML], dq_metrics: Output[Metrics]) -> str:
    """Data-quality suites on the ds partition; a critical failure fails the task (nothing downstream runs)."""
    import datetime as dt
    import logging
    import shutil

    from mtrec.config import load_config
    from mtrec.steps import validate as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id)
    shutil.copyfile(res.report_path, dq_report.path)
    dq_report.metadata.update({"ds": ds, "report": res.report_path, "status": res.details.get("status", "")})
    dq_metrics.log_metric("checks", float(res.details.get("checks", 0)))
    dq_metrics.log_metric("warnings", float(res.details.get("warnings", 0)))
    dq_metrics.log_metric("drift_detected", float(bool(res.drift_detected)))
    return res.status


@component
def features(ds: str, run_id: str, feature_set: Output[Dataset]) -> str:
    """Feature tables as of the end of ds, title embeddings, feast apply + materialize."""
    import datetime as dt
    import json
    import logging

    from mtrec.config import load_config
    from mtrec.steps import features as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id)
    summary = {"ds": ds, "run_id": run_id, "message": res.message, "details": res.to_json()["details"],
               "artifacts": res.artifacts}
    with open(feature_set.path, "w") as f:
        json.dump(summary, f, indent=2)
    feature_set.metadata.update({"ds": ds, "days_computed": len(res.days_computed),
                                 "items_embedded": res.items_embedded, **res.artifacts})
    return res.status


@component
def train(ds: str, run_id: str, retrain: str, feature_set: Input[Dataset],
          model: Output[Model]) -> NamedTuple("TrainOutputs", [("version", str), ("status", str)]):
    """Train a candidate when the retrain policy asks for one; the Model artifact is a copy of the registered
    version (safetensors + JSON metadata), empty when training was skipped."""
    import datetime as dt
    import logging
    import os
    import shutil
    from collections import namedtuple

    from mtrec.config import load_config
    from mtrec.steps import train as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id, retrain=retrain)
    version = res.version or ""
    uri = res.artifacts.get("model", "")
    if version and uri and os.path.isdir(uri.removeprefix("file://")):
        shutil.copytree(uri.removeprefix("file://"), model.path, dirs_exist_ok=True)
    else:
        os.makedirs(model.path, exist_ok=True)
    model.metadata.update({"version": version, "mode": res.mode, "status": res.status, "registry_uri": uri,
                           "framework": "pytorch", "trained_through": ds})
    return namedtuple("TrainOutputs", ["version", "status"])(version, res.status)


@component
def evaluate(ds: str, run_id: str, model: Input[Model], metrics: Output[Metrics],
             report: Output[HTML]) -> NamedTuple("EvaluateOutputs", [("decision", str), ("candidate", str)]):
    """Gate the candidate against the champion (or popularity on a first run) on the holdout.
    decision: blessed | rejected | skipped (nothing trained through ds)."""
    import datetime as dt
    import json
    import logging
    import math
    import shutil
    from collections import namedtuple

    from mtrec.config import load_config
    from mtrec.steps import evaluate as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id)
    if res.report_path:
        shutil.copyfile(res.report_path, report.path)
    else:
        with open(report.path, "w") as f:
            f.write(f"<!doctype html><title>evaluation {ds}</title><p>{res.message}</p>")
    if res.evaluation_path:
        with open(res.evaluation_path) as f:
            evaluation = json.load(f)
        named = {"candidate": evaluation["metrics"].get("candidate", {}),
                 "champion": evaluation["metrics"].get("champion", {}),
                 **{f"baseline_{k}": v for k, v in evaluation["metrics"].get("baselines", {}).items()}}
        for who, tree in named.items():
            for scenario, tasks in (tree or {}).items():
                for task, cell in (tasks or {}).items():
                    for name in ("auc", "logloss", "gauc"):
                        value = (cell or {}).get(name)
                        if isinstance(value, int | float) and math.isfinite(value):
                            metrics.log_metric(f"{who}.{scenario}.{task}.{name}", float(value))
    metrics.log_metric("blessed", 1.0 if res.decision == "blessed" else 0.0)
    report.metadata.update({"decision": res.decision, "reasons": list(res.reasons)[:20]})
    return namedtuple("EvaluateOutputs", ["decision", "candidate"])(res.decision, res.candidate or "")


@component
def promote(ds: str, run_id: str, candidate: str, model: Input[Model], champion: Output[Model]) -> str:
    """Runs only when the gate blessed the candidate: make sure it is the champion (idempotent: evaluate
    promoted it with its decision) and export it as the champion Model artifact."""
    import datetime as dt
    import logging
    import os
    import shutil

    from mtrec.config import load_config
    from mtrec.registry import ModelRegistry
    from mtrec.warehouse import ensure_contract_tables, open_warehouse

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config()
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        mv = ModelRegistry(cfg, wh).promote(candidate, actor=f"kfp:{run_id}", reason="blessed by the gate",
                                            ds=dt.date.fromisoformat(ds))
    finally:
        wh.close()
    if os.path.isdir(model.path):
        shutil.copytree(model.path, champion.path, dirs_exist_ok=True)
    champion.metadata.update({"version": mv.version, "sha256": mv.sha256, "registry_uri": mv.artifact_uri,
                              "status": "champion"})
    return mv.version


@component
def list_scenarios(ds: str, run_id: str, scenarios: list[str]) -> list[dict]:
    """The scenarios to score, as a list of dicts carrying ds and run_id (the loop body reads everything it
    needs from its item: see the note on ParallelFor in pipeline.py)."""
    import datetime as dt

    from mtrec.config import load_config
    from mtrec.data.raw import known_scenarios
    from mtrec.warehouse import open_warehouse

    names = [s for s in scenarios if s]
    if not names:
        cfg = load_config()
        wh = open_warehouse(cfg)
        try:
            names = known_scenarios(wh, cfg, dt.date.fromisoformat(ds))
        finally:
            wh.close()
    return [{"scenario": s, "ds": ds, "run_id": run_id} for s in names]


@component
def score(ds: str, run_id: str, scenario: str, scores: Output[Dataset]) -> int:
    """Score every active user of one scenario with the champion; stage the top-K for publish."""
    import datetime as dt
    import json
    import logging

    from mtrec.config import load_config
    from mtrec.steps import score as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id, scenarios=[scenario], model="champion")
    rows = int(sum((res.rows or {}).values()))
    with open(scores.path, "w") as f:
        json.dump({"ds": ds, "run_id": run_id, "scenario": scenario, "rows": res.rows,
                   "model_version": res.model_version, "artifacts": res.artifacts}, f, indent=2)
    scores.metadata.update({"ds": ds, "scenario": scenario, "rows": rows, "model_version": res.model_version or ""})
    return rows


@component
def publish(ds: str, run_id: str, items: list[dict], recommendations: Output[Dataset]) -> int:
    """Atomically replace the (ds, scenario) partitions of daily_recommendations with the staged scores."""
    import datetime as dt
    import json
    import logging

    from mtrec.config import load_config
    from mtrec.steps import publish as step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scenarios = [i["scenario"] for i in items]
    res = step.run(load_config(), dt.date.fromisoformat(ds), run_id=run_id, scenarios=scenarios)
    rows = {k: int(v) for k, v in (res.rows or {}).items()}
    with open(recommendations.path, "w") as f:
        json.dump({"table": "daily_recommendations", "ds": ds, "run_id": run_id, "rows": rows}, f, indent=2)
    recommendations.metadata.update({"table": "daily_recommendations", "ds": ds, "rows": sum(rows.values()),
                                     **{f"rows.{k}": v for k, v in rows.items()}})
    return sum(rows.values())
