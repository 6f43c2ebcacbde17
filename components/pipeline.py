"""The mtrec Kubeflow pipeline (DESIGN.md section 6), compiled to components/mtrec_pipeline.yaml.

    validate -> features -> train (GPU) -> evaluate -> dsl.If(blessed): promote
                                                    -> list_scenarios -> dsl.ParallelFor(scenario): score -> publish

- `ds` is a pipeline parameter (YYYY-MM-DD, UTC), passed to every task, so no cached result of another day
  can stand in for it; caching is off anyway because every stage writes to the warehouse.
- `run_id` is the KFP run name (`{{$.pipeline_job_name}}`): the stages of a run share state under it.
- The loop iterates over a list of dicts (scenario, ds, run_id) produced upstream, and its body reads only
  its item: with the local runner, an upstream task output passed into a ParallelFor body is replaced by
  the loop item (kfp bug), so nothing else enters the loop.
- Platform settings for Kubernetes (what `kfp-kubernetes` would write, kept here as plain dicts so the only
  dependency is kfp): MTREC_HOME on a PersistentVolumeClaim, the mtrec.yaml ConfigMap mounted at
  /etc/mtrec, the warehouse URL from a Secret, an emptyDir for /tmp (the image's root filesystem is
  read-only), and for training a GPU node selector and toleration. The local runner ignores them.

Compile: `python components/pipeline.py` (add `--image REF` to build for another image tag).
Run locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call `mtrec_daily(ds=...)`.
"""

import argparse
import copy
import os
import sys
from pathlib import Path

from kfp import compiler, dsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mtrec_components as C  # noqa: E402

PIPELINE_NAME = "mtrec-daily"
COMPILED = Path(__file__).resolve().parent / "mtrec_pipeline.yaml"

HOME_PVC, HOME_MOUNT = "mtrec-home", "/var/lib/mtrec"
CONFIG_MAP, CONFIG_MOUNT = "mtrec-config", "/etc/mtrec"
WAREHOUSE_SECRET, WAREHOUSE_SECRET_KEY = "mtrec-warehouse", "url"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "1800s"}

# (cpu request, cpu limit, memory request, memory limit) per component
RESOURCES = {
    "validate": ("1", "2", "4G", "8G"),
    "features": ("2", "4", "8G", "16G"),
    "train": ("4", "8", "16G", "32G"),
    "evaluate": ("2", "4", "8G", "16G"),
    "promote": ("250m", "1", "1G", "2G"),
    "list-scenarios": ("250m", "1", "1G", "2G"),
    "score": ("2", "4", "8G", "16G"),
    "publish": ("1", "2", "4G", "8G"),
}


def _const(value: str) -> dict:
    return {"runtimeValue": {"constant": value}}


def kubernetes_config(gpu: bool = False) -> dict:
    """The `platforms.kubernetes` executor config of a task (same schema as kfp-kubernetes produces)."""
    cfg = {
        "pvcMount": [{"constant": HOME_PVC, "pvcNameParameter": _const(HOME_PVC), "mountPath": HOME_MOUNT}],
        "configMapAsVolume": [{"configMapName": CONFIG_MAP, "configMapNameParameter": _const(CONFIG_MAP),
                               "mountPath": CONFIG_MOUNT, "optional": False}],
        "secretAsEnv": [{"secretName": WAREHOUSE_SECRET, "secretNameParameter": _const(WAREHOUSE_SECRET),
                         "keyToEnv": [{"secretKey": WAREHOUSE_SECRET_KEY, "envVar": "MTREC_WAREHOUSE_URL"}],
                         "optional": False}],
        "emptyDirMounts": [{"volumeName": "tmp", "mountPath": "/tmp"}],
        "imagePullPolicy": "IfNotPresent",
        "podMetadata": {"labels": {"app.kubernetes.io/name": "mtrec", "app.kubernetes.io/part-of": "mtrec"}},
    }
    if gpu:
        cfg["nodeSelector"] = {"labels": dict(GPU_NODE_SELECTOR)}
        cfg["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return cfg


def _configure(task: dsl.PipelineTask, name: str, *, gpu: bool = False, retries: bool = True) -> dsl.PipelineTask:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[name]
    task.set_display_name(name)
    task.set_caching_options(False)  # every stage writes to the warehouse: never skip one
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    if retries:
        task.set_retry(**RETRIES)
    task.platform_config["kubernetes"] = copy.deepcopy(kubernetes_config(gpu=gpu))
    return task


@dsl.pipeline(name=PIPELINE_NAME,
              description="mtrec daily batch: validate, features, train, evaluate/gate, score per scenario, publish")
def mtrec_daily(ds: str, retrain: str = "auto", scenarios: list[str] = []) -> None:  # noqa: B006 - KFP default
    """ds: logical date YYYY-MM-DD (UTC). retrain: auto | always | never. scenarios: only these (empty: all)."""
    run_id = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    validated = _configure(C.validate(ds=ds, run_id=run_id), "validate")
    feats = _configure(C.features(ds=ds, run_id=run_id), "features").after(validated)
    trained = _configure(C.train(ds=ds, run_id=run_id, retrain=retrain, feature_set=feats.outputs["feature_set"]),
                         "train", gpu=True)
    gate = _configure(C.evaluate(ds=ds, run_id=run_id, model=trained.outputs["model"]), "evaluate")
    with dsl.If(gate.outputs["decision"] == "blessed", name="blessed"):
        _configure(C.promote(ds=ds, run_id=run_id, candidate=gate.outputs["candidate"],
                             model=trained.outputs["model"]), "promote")
    # Scoring runs whichever way the gate went (always with the champion).
    todo = _configure(C.list_scenarios(ds=ds, run_id=run_id, scenarios=scenarios), "list-scenarios").after(gate)
    with dsl.ParallelFor(items=todo.output, parallelism=4, name="per-scenario") as item:
        scored = _configure(C.score(ds=item.ds, run_id=item.run_id, scenario=item.scenario), "score")
    _configure(C.publish(ds=ds, run_id=run_id, items=todo.output), "publish").after(scored)


def compile_pipeline(path: str | os.PathLike = COMPILED) -> Path:
    compiler.Compiler().compile(pipeline_func=mtrec_daily, package_path=str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compile the mtrec Kubeflow pipeline to YAML.")
    ap.add_argument("--output", default=str(COMPILED), help=f"where to write it (default {COMPILED})")
    ap.add_argument("--image", help=f"component image (default {C.DEFAULT_IMAGE}; or set MTREC_IMAGE)")
    args = ap.parse_args(argv)
    if args.image and args.image != C.IMAGE:  # the image is read when components are defined: recompile in a child
        import subprocess

        env = {**os.environ, "MTREC_IMAGE": args.image}
        raise SystemExit(subprocess.call([sys.executable, __file__, "--output", args.output], env=env))
    print(compile_pipeline(args.output))


if __name__ == "__main__":
    main()
