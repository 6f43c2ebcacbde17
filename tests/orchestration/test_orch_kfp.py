"""The Kubeflow pipeline: the committed YAML is what pipeline.py compiles, its structure is the one DESIGN.md
section 6 promises, and the full pipeline runs locally with kfp.local.SubprocessRunner(use_venv=False)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from orch_support import END, REPO, SMALL_CONFIG, clean_env, query

pytest.importorskip("kfp")

COMPONENTS = REPO / "components"
COMPILED = COMPONENTS / "mtrec_pipeline.yaml"
VERBS = ["validate", "features", "train", "evaluate", "score", "publish"]


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPILED.read_text().split("\n---\n")[0])


@pytest.fixture(scope="module")
def platform() -> dict:
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    assert len(docs) == 2, "pipeline spec + platform spec"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture
def pipeline_module(monkeypatch):
    monkeypatch.delenv("MTREC_IMAGE", raising=False)
    monkeypatch.syspath_prepend(str(COMPONENTS))
    for name in ("pipeline", "mtrec_components"):
        sys.modules.pop(name, None)
    import pipeline

    yield pipeline
    for name in ("pipeline", "mtrec_components"):
        sys.modules.pop(name, None)


def test_committed_yaml_is_what_pipeline_py_compiles(tmp_path):
    out = tmp_path / "compiled.yaml"
    proc = subprocess.run([sys.executable, str(COMPONENTS / "pipeline.py"), "--output", str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == COMPILED.read_text(), (
        "components/mtrec_pipeline.yaml is stale: run `.venv/bin/python components/pipeline.py` and commit it")


def test_image_override_recompiles_every_component(tmp_path):
    out = tmp_path / "other.yaml"
    proc = subprocess.run([sys.executable, str(COMPONENTS / "pipeline.py"), "--output", str(out),
                           "--image", "registry.example.com/mtrec:9.9.9"], env=clean_env(), capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = {e["container"]["image"] for e in yaml.safe_load(out.read_text().split("\n---\n")[0])
              ["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/mtrec:9.9.9"}


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, flattened over sub-DAGs (conditions, loops)."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update((comp.get("dag") or {}).get("tasks") or {})
    return out


def test_components_run_the_mtrec_image_without_installing_kfp(spec):
    executors = spec["deploymentSpec"]["executors"]
    assert {k.removeprefix("exec-") for k in executors} == {*VERBS, "promote", "list-scenarios"}
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == "ghcr.io/mtrec/mtrec:0.1.0", name
        script = "\n".join(c["command"] + c.get("args", []))
        assert "pip install" not in script and "kfp==" not in script, name
        verb = name.removeprefix("exec-")
        if verb in VERBS:
            assert f"from mtrec.steps import {verb} as step" in script, name
        assert c["resources"]["cpuLimit"] and c["resources"]["memoryLimit"], name


def test_ds_is_a_pipeline_parameter_fed_to_every_stage(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["ds"]["parameterType"] == "STRING" and "defaultValue" not in params["ds"]
    assert params["retrain"]["defaultValue"] == "auto"
    tasks = _tasks(spec)
    for name, task in tasks.items():
        if name.startswith("for-loop") or name.startswith("condition"):
            continue
        inputs = task["inputs"]["parameters"]
        assert "ds" in inputs, name
        run_id = inputs["run_id"]
        if name != "score":  # inside the loop ds and run_id come from the loop item
            assert inputs["ds"]["componentInputParameter"] in ("ds", "pipelinechannel--ds"), name
            assert run_id["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}", name
        assert task["cachingOptions"] == {} or task["cachingOptions"].get("enableCache") is False, name
        assert task["retryPolicy"]["maxRetryCount"] == 2, name


def test_gate_is_a_condition_on_the_evaluate_decision(spec):
    root = spec["root"]["dag"]["tasks"]
    cond = root["condition-1"]
    assert cond["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--evaluate-decision'] == 'blessed'"
    assert "evaluate" in cond["dependentTasks"]
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"promote"}
    # scoring does not wait on the condition: it runs whatever the decision
    assert "condition-1" not in root["list-scenarios"].get("dependentTasks", [])
    assert "evaluate" in root["list-scenarios"]["dependentTasks"]


def test_scoring_fans_out_over_a_list_of_dicts(spec):
    root = spec["root"]["dag"]["tasks"]
    loop = next(t for n, t in root.items() if n.startswith("for-loop"))
    it = loop["parameterIterator"]
    assert it["items"]["inputParameter"].endswith("list-scenarios-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["score"]["inputs"]["parameters"]
    for key in ("scenario", "ds", "run_id"):
        assert body[key]["parameterExpressionSelector"] == f'parseJson(string_value)["{key}"]', key
    assert spec["components"]["comp-list-scenarios"]["outputDefinitions"]["parameters"]["Output"][
        "parameterType"] == "LIST"
    assert "for-loop-2" in root["publish"]["dependentTasks"]


def test_training_asks_for_a_gpu_and_more_memory(spec, platform):
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["accelerator"]["resourceCount"] == "1"
    score = spec["deploymentSpec"]["executors"]["exec-score"]["container"]["resources"]
    assert float(train["resourceMemoryLimit"].rstrip("G")) > float(score["resourceMemoryLimit"].rstrip("G"))
    assert platform["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert platform["exec-train"]["nodeSelector"]["labels"]
    assert "tolerations" not in platform["exec-score"]


def test_typed_artifacts(spec):
    def outputs(comp: str) -> dict[str, str]:
        arts = spec["components"][f"comp-{comp}"]["outputDefinitions"].get("artifacts", {})
        return {k: v["artifactType"]["schemaTitle"] for k, v in arts.items()}

    assert outputs("validate") == {"dq_report": "system.HTML", "dq_metrics": "system.Metrics"}
    assert outputs("features") == {"feature_set": "system.Dataset"}
    assert outputs("train") == {"model": "system.Model"}
    assert outputs("evaluate") == {"metrics": "system.Metrics", "report": "system.HTML"}
    assert outputs("promote") == {"champion": "system.Model"}
    assert outputs("score") == {"scores": "system.Dataset"}
    assert outputs("publish") == {"recommendations": "system.Dataset"}
    inputs = spec["components"]["comp-evaluate"]["inputDefinitions"]["artifacts"]
    assert inputs["model"]["artifactType"]["schemaTitle"] == "system.Model"


def test_platform_config_mounts_home_config_and_secret_for_every_executor(spec, platform):
    assert set(platform) == set(spec["deploymentSpec"]["executors"])
    for name, cfg in platform.items():
        assert cfg["pvcMount"][0]["mountPath"] == "/var/lib/mtrec", name
        assert cfg["configMapAsVolume"][0]["mountPath"] == "/etc/mtrec", name
        env = cfg["secretAsEnv"][0]
        assert env["secretName"] == "mtrec-warehouse" and env["keyToEnv"][0]["envVar"] == "MTREC_WAREHOUSE_URL"
        assert cfg["emptyDirMounts"][0]["mountPath"] == "/tmp"
    text = COMPILED.read_text()
    assert "postgresql://" not in text and "password" not in text.lower()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no effect in the current local runner:UserWarning")
def test_full_pipeline_runs_locally_and_publishes(mtrec_home, tmp_path, monkeypatch, pipeline_module):
    from kfp import local

    for k, v in {"MTREC_HOME": str(mtrec_home), "TMPDIR": str(tmp_path / "tmp"), **SMALL_CONFIG}.items():
        monkeypatch.setenv(k, v)
    for k in ("MTREC_CONFIG", "MTREC_WAREHOUSE_URL"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

    task = pipeline_module.mtrec_daily(ds=END.isoformat())
    assert task is not None

    runs = query(mtrec_home, "SELECT run_id, stage, status FROM pipeline_runs")
    run_ids = set(runs["run_id"])
    assert len(run_ids) == 1
    run_id = run_ids.pop()
    assert run_id.startswith("mtrec-daily-")
    assert set(VERBS) <= set(runs["stage"])
    scenarios = sorted(query(mtrec_home, "SELECT DISTINCT scenario FROM events")["scenario"])
    pub = query(mtrec_home, "SELECT scenario, user_id, rank, run_id FROM daily_recommendations WHERE ds = :d",
                {"d": END})
    assert sorted(pub["scenario"].unique()) == scenarios and set(pub["run_id"]) == {run_id}
    assert not pub.duplicated(["scenario", "user_id", "rank"]).any()
    # the typed artifacts landed under the pipeline root
    run_root = next(root.iterdir())
    files = {p.relative_to(run_root).parts[0]: p for p in run_root.rglob("*") if p.is_file()}
    assert {"validate", "features", "train", "evaluate", "list-scenarios", "publish"} <= set(files)
    report = next((run_root / "validate").rglob("dq_report"))
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    published = json.loads(next((run_root / "publish").rglob("recommendations")).read_text())
    assert published["ds"] == END.isoformat() and sum(published["rows"].values()) == len(pub)
