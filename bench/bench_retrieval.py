"""Scoring's user-side Feast retrieval as the history grows: the embedded offline store (reads the daily snapshot
files a retrieval can match) against Feast's own DuckDB store (reads every day's file).

For each history length (--days), a home is generated and its features computed; then the same `--rows` entity
rows (known users x scenarios) are retrieved as of the end of the last day, `--repeat` times in a fresh process
(after one warm-up retrieval: imports and the registry are paid once per process), with one DuckDB thread as the
score stage's planner has it; the stores alternate over `--rounds` processes each. Prints the median seconds per
store and history, the snapshot store's time against Feast's store, and how each grows from the shortest history
to the longest (flat: 1.0).

    python bench/bench_retrieval.py                       # 7 and 28 days, 20k users
    python bench/bench_retrieval.py --days 7 56 --users 10000
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, in_child  # noqa: E402

END = dt.date(2026, 3, 31)
STORES = {"snapshot store": None, "feast duckdb store": {"type": "duckdb"}}


def _retrieve(home: str, offline_store: dict | None, rows: int, repeat: int, queue) -> None:
    import pandas as pd

    from mtrec.config import load_config
    from mtrec.data.raw import end_of_day
    from mtrec.features import store as FS
    from mtrec.features.training_set import _retrieve as retrieve
    from mtrec.features.training_set import set_offline_threads
    from mtrec.warehouse import open_warehouse

    cfg = load_config(environ={}, overrides={"home": home})
    wh = open_warehouse(cfg)
    # the first `rows` of known users x scenarios: the same entity rows whatever the history
    keys = wh.query_df("SELECT u.user_id, s.scenario FROM (SELECT DISTINCT user_id FROM users) u "
                       "CROSS JOIN (SELECT DISTINCT scenario FROM events) s ORDER BY 1, 2 LIMIT :n", {"n": rows})
    wh.close()
    keys["event_timestamp"] = pd.Timestamp(end_of_day(END))
    store = FS.feature_store(cfg, offline_store=offline_store)
    refs = FS.service_features(store, "user")
    retrieve(store, keys.head(100), refs)  # warm-up
    set_offline_threads(cfg, 1)
    seconds = []
    for _ in range(repeat):
        t = time.perf_counter()
        got = retrieve(store, keys, refs)
        seconds.append(time.perf_counter() - t)
    queue.put({"seconds": statistics.median(seconds), "rows": len(got)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, nargs="+", default=[7, 28])
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=50000, help="entity rows (user, scenario) per retrieval")
    ap.add_argument("--repeat", type=int, default=3, help="retrievals per process (median)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per store, alternating (median)")
    args = ap.parse_args()
    from mtrec.config import load_config
    from mtrec.data.generate import generate_into_warehouse
    from mtrec.steps import features

    seconds: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for days in args.days:
            home = str(Path(tmp) / f"home-{days}")
            cfg = load_config(environ={}, overrides={"home": home})
            generate_into_warehouse(cfg, users=args.users, items=args.items, days=days, end_date=END, seed=3,
                                    progress=False)
            features.run(cfg, END, materialize=False)
            runs: dict[str, list[dict]] = {name: [] for name in STORES}
            for _ in range(args.rounds):  # the stores alternate (the machine's speed drifts)
                for name, offline_store in STORES.items():
                    runs[name].append(in_child(_retrieve, home, offline_store, args.rows, args.repeat))
            for name in STORES:
                seconds[name, days] = statistics.median(r["seconds"] for r in runs[name])
                emit("retrieval", f"user_retrieval_seconds[{name}, {days} days, {runs[name][0]['rows']} rows]",
                     seconds[name, days], "s", "none", None)
            emit("retrieval", f"snapshot_store_vs_feast_store[{days} days]", seconds["snapshot store", days], "s",
                 "feast duckdb store", seconds["feast duckdb store", days])
    lo, hi = min(args.days), max(args.days)
    for name in STORES:
        emit("retrieval", f"growth[{name}, {lo}->{hi} days]", seconds[name, hi], "s", f"{lo} days",
             seconds[name, lo])


if __name__ == "__main__":
    main()
