"""`mtrec data load`: contract checks before anything is written; one line naming file, column and row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtrec.data.raw import load_files
from mtrec.errors import DataContractError
from mtrec.warehouse import open_warehouse


def _events(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": [f"e{i}" for i in range(n)], "user_id": ["u1", "u2"] * (n // 2), "item_id": ["i1"] * n,
        "scenario": ["home"] * n, "event_timestamp": ["2024-03-01T10:00:00Z"] * n,
        "click": [1, 0] * (n // 2), "like": [1, 0] * (n // 2)})


def _run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTREC_HOME": str(home)}
    env.pop("MTREC_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "mtrec.cli", *args], capture_output=True, text=True, env=env,
                          cwd=home.parent, timeout=120)


def test_load_then_reload_is_idempotent(cfg, tmp_path):
    path = tmp_path / "events.csv"
    _events().to_csv(path, index=False)
    wh = open_warehouse(cfg)
    try:
        load_files(wh, cfg, {"events": str(path)})
        load_files(wh, cfg, {"events": str(path)})
        assert wh.scalar("SELECT count(*) FROM events") == 4
        assert str(wh.scalar("SELECT min(ds) FROM events")).startswith("2024-03-01")
    finally:
        wh.close()


@pytest.mark.parametrize(("mutate", "column", "what"), [
    (lambda df: df.drop(columns=["scenario"]), "scenario", "missing required column"),
    (lambda df: df.assign(event_timestamp=["2024-03-01T10:00:00Z", "yesterday", "x", "y"]), "event_timestamp",
     "unparsable timestamp 'yesterday' at row 2"),
    (lambda df: df.assign(click=["1", "0", "maybe", "1"]), "click", "non-integer value 'maybe' at row 3"),
    (lambda df: df.assign(user_id=["u1", None, "u2", "u3"]), "user_id", "null value at row 2"),
])
def test_bad_file_is_refused_whole(cfg, tmp_path, mutate, column, what):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    _events().to_csv(good, index=False)
    mutate(_events()).to_csv(bad, index=False)
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u9"], "updated_at": ["2024-02-01T00:00:00Z"]}).to_csv(users, index=False)
    wh = open_warehouse(cfg)
    try:
        load_files(wh, cfg, {"events": str(good)})
        before = wh.query_df("SELECT * FROM events ORDER BY event_id")
        with pytest.raises(DataContractError) as info:
            load_files(wh, cfg, {"users": str(users), "events": str(bad)})
        msg = str(info.value)
        assert f"column {column}" in msg and what in msg and str(bad) in msg and "\n" not in msg
        pd.testing.assert_frame_equal(wh.query_df("SELECT * FROM events ORDER BY event_id"), before)
        assert not wh.table_exists("users")  # the good users file in the same call was not loaded either
    finally:
        wh.close()


def test_cli_missing_column_exits_nonzero_with_one_line(tmp_path):
    home = tmp_path / "home"
    bad = tmp_path / "events.csv"
    _events().drop(columns=["item_id"]).to_csv(bad, index=False)
    proc = _run_cli(home, "data", "load", "--events", str(bad))
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "item_id" in lines[0] and "Traceback" not in proc.stderr
