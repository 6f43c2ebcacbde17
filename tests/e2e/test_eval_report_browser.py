"""The evaluation report renders in headless Chromium and shows the decision and its reasons."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec.config import GateSpec
from mtrec.evaluation.gate import judge
from mtrec.reports.evaluation import write_report
from mtrec.steps.evaluate import build_evaluation

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DS = dt.date(2024, 6, 2)


def _evaluation(champion_noise: float, cand_noise: float, scenarios=("home", "video", "shop"),
                tasks=("open", "buy", "share")) -> dict:
    """An evaluation.json payload from the real gate on generated predictions (other names, three tasks)."""
    rng = np.random.default_rng(11)
    n = 2400
    z = rng.normal(0, 1.5, n)
    frame = pd.DataFrame({"user_id": rng.integers(0, 300, n).astype(str),
                          "scenario": rng.choice(list(scenarios), n)})
    for i, t in enumerate(tasks):
        frame[t] = (rng.random(n) < 1 / (1 + np.exp(-(z - 0.5 - i)))).astype(int)

    def model(noise, seed):
        r = np.random.default_rng(seed)
        zz = z + r.normal(0, noise, n)
        return {t: 1 / (1 + np.exp(-(zz - 0.5 - i))) for i, t in enumerate(tasks)}

    preds = {"candidate": model(cand_noise, 1), "champion": model(champion_noise, 2), "popularity": model(2.5, 3)}
    spec = GateSpec(min_positives=30)
    outcome = judge(frame, preds, tasks=list(tasks), spec=spec, task_weights=dict.fromkeys(tasks, 1.0),
                    reference="champion", reference_label="champion v0001-20240601")
    history = [{"epoch": e, "train_loss": 0.6 - 0.05 * e, "valid_auc": 0.7 + 0.01 * e} for e in range(1, 5)]
    return build_evaluation(
        ds=DS, run_id="manual__2024-06-02__abc", holdout=frame, tasks=list(tasks), predictions=preds, metrics={},
        outcome=outcome, decision=outcome.decision, reasons=outcome.reasons, forced=False, forced_reason=None,
        warnings=[], candidate={"version": "v0002-20240602", "model_name": "msmt", "trained_through": "2024-06-02",
                                "sha256": "ab" * 32},
        champion={"version": "v0001-20240601", "model_name": "msmt", "trained_through": "2024-06-01"},
        holdout_days=(DS, DS), train_window=(DS - dt.timedelta(days=14), DS - dt.timedelta(days=1), 12345),
        training={"history": history}, gate_config=spec.model_dump())


def test_evaluation_json_shape_and_self_contained_html(tmp_path):
    ev = _evaluation(champion_noise=0.3, cand_noise=1.5)
    assert ev["decision"] == "rejected" and ev["reasons"]
    assert ev["holdout"]["first_day"] == ev["holdout"]["last_day"] == "2024-06-02"
    assert set(ev["metrics"]) == {"candidate", "champion", "baselines"}
    assert set(ev["metrics"]["baselines"]) == {"popularity"}
    cell = ev["metrics"]["candidate"]["video"]["buy"]
    assert {"auc", "logloss", "gauc", "auc_ci"} <= set(cell) and cell["auc_ci"][0] <= cell["auc"] <= cell["auc_ci"][1]
    assert any(r["outcome"] == "fail" for r in ev["rules"])
    json.dumps(ev, allow_nan=False)  # strict JSON: other tools read it
    html = write_report(ev, tmp_path / "evaluation.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", html), "report must not reference external URLs"
    assert "http://" not in html and "https://" not in html
    assert html.count("<svg") >= 3 * 2 + 2  # ROC + calibration per task, training curves


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI (scripts/ensure_chromium.sh installs it)")
        pytest.skip(f"{CHROMIUM} not installed (run scripts/ensure_chromium.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("case", ["rejected", "blessed"])
def test_report_renders_decision_and_reasons_in_chromium(tmp_path, browser, case):
    ev = _evaluation(champion_noise=0.3, cand_noise=1.5) if case == "rejected" else _evaluation(1.5, 0.3)
    assert ev["decision"] == case
    path = write_report(ev, tmp_path / "evaluation.html")
    page = browser.new_page()
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.resolve().as_uri())
    banner = page.inner_text("#decision")
    assert case.upper() in banner.upper()
    for reason in ev["reasons"]:
        assert reason in banner
    text = page.inner_text("body")
    assert "2024-06-02 .. 2024-06-02" in text and "12345 impressions" in text
    assert "scenario video, task buy" in text or "video" in text
    assert page.locator("svg").count() >= 8
    assert external == []
    page.close()
