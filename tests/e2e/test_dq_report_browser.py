"""The DQ report of a failed day opens in headless Chromium offline and shows the failing expectation."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.data.raw import load_frames
from mtrec.errors import DataValidationError
from mtrec.steps import validate
from mtrec.warehouse import open_warehouse

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
END = dt.date(2024, 3, 3)


def _frames(days: int = 6, per_day: int = 900) -> dict[str, pd.DataFrame]:
    """Other names than the demo: scenarios shelf/inbox, tasks open -> buy, users with a 'tier' attribute."""
    rng = np.random.default_rng(3)
    evs = []
    for k in range(days):
        d = END - dt.timedelta(days=days - 1 - k)
        ev = pd.DataFrame({
            "event_id": [f"{d}-{i}" for i in range(per_day)],
            "user_id": [f"u{j}" for j in rng.integers(0, 200, per_day)],
            "item_id": [f"i{j}" for j in rng.integers(0, 80, per_day)],
            "scenario": ["shelf", "inbox"] * (per_day // 2),
            "event_timestamp": pd.Timestamp(d, tz="UTC") + pd.to_timedelta(rng.integers(0, 86_400, per_day), "s"),
            "open": (rng.random(per_day) < 0.2).astype(int)})
        ev["buy"] = ev["open"] * (rng.random(per_day) < 0.25).astype(int)
        evs.append(ev)
    t0 = pd.Timestamp(END - dt.timedelta(days=30), tz="UTC")
    users = pd.DataFrame({"user_id": [f"u{j}" for j in range(200)], "updated_at": t0,
                          "tier": rng.choice(["free", "pro"], 200)})
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(80)], "title": "x", "updated_at": t0})
    return {"events": pd.concat(evs, ignore_index=True), "users": users, "items": items}


@pytest.fixture
def failed_report(tmp_path: Path) -> tuple[Path, str]:
    cfg = load_config(environ={}, overrides={
        "home": str(tmp_path / "home"),
        "tasks": [{"name": "open"}, {"name": "buy", "depends_on": "open"}]})
    wh = open_warehouse(cfg)
    try:
        load_frames(wh, cfg, _frames())
        wh.execute('UPDATE events SET "buy" = 1, "open" = 0 WHERE ds = :d AND event_id LIKE :p',
                   {"d": END, "p": f"{END}-1_"})  # ten rows
        with pytest.raises(DataValidationError, match="implies_open"):
            validate.run(cfg, END, run_id="browser-test", wh=wh)
    finally:
        wh.close()
    from mtrec.reports.dq import report_path
    return report_path(cfg, END), "10 of 900 rows"


def test_report_is_self_contained(failed_report) -> None:
    path, observed = failed_report
    html = path.read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", html)
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    assert html.count("<svg") >= 3  # row counts + one label-rate chart per task
    assert "implies_open" in html and observed in html
    index = (path.parent / "index.html").read_text()
    assert END.isoformat() in index and "failed" in index


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI (scripts/ensure_chromium.sh installs it)")
        pytest.skip(f"{CHROMIUM} not installed (run scripts/ensure_chromium.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_report_renders_offline_with_failure_first(failed_report, browser) -> None:
    path, observed = failed_report
    url = path.resolve().as_uri()
    requests: list[str] = []
    page = browser.new_page()

    def route(r):
        requests.append(r.request.url)
        if r.request.url == url:
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    page.wait_for_load_state("load")
    assert requests == [url], f"requests other than the page itself: {requests}"
    text = page.inner_text("body")
    assert "implies_open" in text and observed in text
    # failures come before the trends and the passed expectations
    fail_at = text.index("Failures")
    assert fail_at < text.index("implies_open") < text.index("Trends") < text.index("Passed expectations")
    assert page.locator("section#trends svg").count() >= 3
    assert page.locator("tr.fail-critical").count() >= 1

    index_url = (path.parent / "index.html").resolve().as_uri()
    requests.clear()
    page.unroute("**/*")
    page.route("**/*", lambda r: (requests.append(r.request.url),
                                  r.continue_() if r.request.url == index_url else r.abort()))
    page.goto(index_url)
    assert requests == [index_url]
    assert END.isoformat() in page.inner_text("body") and "failed" in page.inner_text("body")
    page.close()
