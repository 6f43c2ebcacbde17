"""Time and peak memory to build a ~1M-impression point-in-time training set with sequences (target < 60 s, < 4 GB)."""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_mb  # noqa: E402

END = dt.date(2024, 6, 30)


def _build(home: str, start: dt.date, end: dt.date, queue) -> None:
    from mtrec.config import load_config
    from mtrec.features.training_set import build_training_set
    from mtrec.warehouse import open_warehouse

    cfg = load_config(environ={}, overrides={"home": home})
    wh = open_warehouse(cfg)
    t = time.perf_counter()
    table = build_training_set(cfg, wh, start, end)
    queue.put((time.perf_counter() - t, len(table), peak_rss_mb()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=36000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--days", type=int, default=8)
    args = ap.parse_args()
    from mtrec.config import load_config
    from mtrec.data.generate import generate_into_warehouse
    from mtrec.steps import features

    with tempfile.TemporaryDirectory() as tmp:
        home = str(Path(tmp) / "home")
        cfg = load_config(environ={}, overrides={"home": home})
        generate_into_warehouse(cfg, users=args.users, items=args.items, days=args.days, end_date=END, progress=False)
        t = time.perf_counter()
        features.run(cfg, END)
        emit("training_set", "features_stage_seconds", time.perf_counter() - t, "s", "none", None)
        start = END - dt.timedelta(days=args.days - 2)
        queue: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_build, args=(home, start, END, queue))
        proc.start()
        seconds, rows, rss = queue.get()
        proc.join()
        emit("training_set", "impressions", rows, "rows", "target 1M", 1_000_000)
        emit("training_set", "build_seconds", seconds, "s", "target 60 s", 60.0)
        emit("training_set", "rows_per_second", rows / seconds, "rows/s", "1M rows in 60 s", 1_000_000 / 60)
        emit("training_set", "peak_rss_mb", rss, "MB", "target 4 GB", 4096.0)


if __name__ == "__main__":
    main()
