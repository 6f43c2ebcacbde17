"""k8s/: both overlays render with `kubectl kustomize`, every object validates against the Kubernetes 1.32 API
schemas offline, and policy holds (limits, non-root, read-only root, no added capabilities, pinned images,
no secret values); names agree with the pipeline, the DAG and the image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from orch_support import REPO, check_container_policy, image_is_pinned, looks_like_secret_value

K8S = REPO / "k8s"
OVERLAYS = {"base": "mtrec", "dev": "mtrec-dev", "prod": "mtrec"}  # base: what overlays build on
KUBE_VERSION = "1.32"
KUBECTL = shutil.which("kubectl")
IN_CI = __import__("os").environ.get("CI", "").lower() in ("1", "true", "yes")


def _render(path: Path) -> list[dict]:
    if KUBECTL is None:
        if IN_CI:
            pytest.fail("kubectl is required in CI to render k8s/ with kustomize")
        pytest.skip("kubectl not installed: cannot render kustomize overlays")
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request) -> tuple[str, list[dict]]:
    path = K8S / "base" if request.param == "base" else K8S / "overlays" / request.param
    return request.param, _render(path)


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objs:
        kind, name = o["kind"], o["metadata"]["name"]
        spec = o.get("spec") or {}
        if kind == "Pod":
            out.append((f"Pod/{name}", spec))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((f"{kind}/{name}", spec["template"]["spec"]))
        elif kind == "CronJob":
            out.append((f"CronJob/{name}", spec["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def _get(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_overlays_validate_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    name, objs = overlay
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim",
            "Deployment", "Service", "CronJob", "NetworkPolicy"} <= kinds, kinds
    for o in objs:
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)


def test_everything_lives_in_the_overlay_namespace(overlay):
    name, objs = overlay
    ns = OVERLAYS[name]
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"] == [ns]
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
    for o in objs:
        if o["kind"] not in cluster_scoped:
            assert o["metadata"].get("namespace") == ns, (o["kind"], o["metadata"]["name"])
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mtrec"


def test_every_container_follows_the_policy(overlay):
    _, objs = overlay
    specs = _pod_specs(objs)
    assert len(specs) >= 3
    for where, spec in specs:
        pod_sc = spec.get("securityContext") or {}
        assert pod_sc.get("runAsNonRoot") is True, where
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            check_container_policy(c, f"{where}/{c['name']}", pod_security=pod_sc)
        for v in spec.get("volumes") or []:
            assert "hostPath" not in v, f"{where}: hostPath volume {v['name']}"


def test_policy_check_rejects_a_bad_container():
    bad = {"name": "x", "image": "ghcr.io/mtrec/mtrec:latest", "resources": {},
           "securityContext": {"privileged": True, "capabilities": {"add": ["NET_ADMIN"]}},
           "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}
    with pytest.raises(AssertionError, match="limits"):
        check_container_policy(bad, "bad")
    fixed = dict(bad, resources={"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
    with pytest.raises(AssertionError, match="runAsNonRoot"):
        check_container_policy(fixed, "bad")
    assert not image_is_pinned("ghcr.io/mtrec/mtrec:latest") and not image_is_pinned("redis")
    assert image_is_pinned("localhost:5000/mtrec:0.1.0") and not image_is_pinned("localhost:5000/mtrec")
    assert looks_like_secret_value("MTREC_WAREHOUSE_URL", "postgresql://u:p4ss@db:5432/x")
    assert not looks_like_secret_value("MTREC_WAREHOUSE_URL", "postgresql://db:5432/x")


def test_no_secret_values_in_the_repo(overlay):
    _, objs = overlay
    for o in objs:
        if o["kind"] == "Secret":
            assert not o.get("data") and not o.get("stringData"), f"Secret/{o['metadata']['name']} holds values"
        if o["kind"] == "ConfigMap":
            for key, value in (o.get("data") or {}).items():
                assert not looks_like_secret_value(key, value), f"ConfigMap/{o['metadata']['name']}:{key}"
                assert "password" not in value.lower(), f"ConfigMap/{o['metadata']['name']}:{key}"
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "kind: Secret" not in text, path
            assert not looks_like_secret_value("", text), path
    # the warehouse URL is read from the Secret by reference only
    refs = [e for _, spec in _pod_specs(objs) for c in spec["containers"] for e in c.get("env") or []
            if e["name"] == "MTREC_WAREHOUSE_URL"]
    assert refs and all(e["valueFrom"]["secretKeyRef"] == {"name": "mtrec-warehouse", "key": "url"} for e in refs)


def test_config_map_holds_a_valid_mtrec_config(overlay, tmp_path):
    from mtrec.config import load_config

    _, objs = overlay
    cm = _get(objs, "ConfigMap", "mtrec-config")
    path = tmp_path / "mtrec.yaml"
    path.write_text(cm["data"]["mtrec.yaml"])
    cfg = load_config(path, environ={})
    assert cfg.online_store.type == "redis"
    host = cfg.online_store.redis_url.split("//", 1)[1].split(":", 1)[0]
    _get(objs, "Service", host)  # the online store URL points at the Redis Service of this deployment
    assert cfg.warehouse_url is None  # from the Secret, never from the ConfigMap


def test_names_agree_with_the_pipeline_the_dag_and_the_image(overlay):
    import sys

    _, objs = overlay
    sys.path.insert(0, str(REPO / "components"))
    sys.path.insert(0, str(REPO / "dags"))
    try:
        import mtrec_components
        import mtrec_daily
        import pipeline
    finally:
        sys.path.remove(str(REPO / "components"))
        sys.path.remove(str(REPO / "dags"))
    s = mtrec_daily.Settings()
    _get(objs, "ConfigMap", pipeline.CONFIG_MAP)
    _get(objs, "PersistentVolumeClaim", pipeline.HOME_PVC)
    _get(objs, "ServiceAccount", s.service_account)
    assert (s.config_map, s.home_pvc, s.warehouse_secret) == (pipeline.CONFIG_MAP, pipeline.HOME_PVC,
                                                               pipeline.WAREHOUSE_SECRET)
    assert s.image == mtrec_components.DEFAULT_IMAGE
    images = {c["image"] for _, spec in _pod_specs(objs) for c in spec["containers"]}
    assert mtrec_components.DEFAULT_IMAGE in images  # the schedule runs the image the pipeline was compiled for
    dockerfile = (REPO / "components" / "Dockerfile").read_text()
    daily = _get(objs, "CronJob", "mtrec-daily")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = daily["containers"][0]["command"][-1]
    assert script == "/opt/mtrec/kfp/submit_run.py" and "/opt/mtrec/kfp/" in dockerfile
    for _, spec in _pod_specs(objs):
        for c in spec["containers"]:
            for m in c.get("volumeMounts") or []:
                vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
                if "persistentVolumeClaim" in vol and vol["persistentVolumeClaim"]["claimName"] == pipeline.HOME_PVC:
                    assert m["mountPath"] == pipeline.HOME_MOUNT
                if "configMap" in vol and vol["configMap"]["name"] == pipeline.CONFIG_MAP:
                    assert m["mountPath"] == pipeline.CONFIG_MOUNT


def test_schedule_and_gpu_retraining(overlay):
    name, objs = overlay
    daily = _get(objs, "CronJob", "mtrec-daily")["spec"]
    assert daily["schedule"] == "30 0 * * *" and daily["timeZone"] == "Etc/UTC"
    assert daily["concurrencyPolicy"] == "Forbid"
    assert daily.get("suspend", False) is (name == "dev")
    args = daily["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--ds-offset-days") + 1] == "-1"
    retrain = _get(objs, "CronJob", "mtrec-retrain")["spec"]
    assert retrain["suspend"] is True  # a template for `kubectl create job --from=cronjob/mtrec-retrain`
    pod = retrain["jobTemplate"]["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    if name != "dev":
        assert limits["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "mtrec-cuda" in pod["containers"][0]["image"]
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod
    pvc = _get(objs, "PersistentVolumeClaim", "mtrec-home")["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"]
