"""Batch scoring throughput and memory.

Prints JSON lines: scored (user, item) pairs per second of the full score stage (candidates, features through
Feast, user/item sides, pairs, top-K, Parquet) against the same model's pair forward alone on pre-built tensors
(the full path should reach 80% of it; target 500k pairs/s on 2 CPU cores), and the peak RSS of scoring N and
2N users (target under 3 GB for 200k users, and flat as the user count doubles).

    python bench/bench_scoring.py --users 20000 40000      # quick
    python bench/bench_scoring.py --users 100000 200000    # the issue's memory target (slow to generate)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

END = dt.date(2026, 1, 31)


def _setup(home: str, users: int, items: int, days: int, threads: int) -> None:
    """Generate data, compute features, train a champion (forced: the bench measures scoring, not the gate)."""
    from mtrec.config import load_config
    from mtrec.data.generate import generate_into_warehouse
    from mtrec.steps import evaluate, features, train

    cfg = load_config(environ={}, overrides={"home": home, "training": {"epochs": 1, "train_days": days - 2,
                                                                         "num_threads": threads}})
    generate_into_warehouse(cfg, users=users, items=items, days=days, end_date=END, seed=7, progress=False)
    features.run(cfg, END)
    train.run(cfg, END, retrain="always")
    evaluate.run(cfg, END, force=True, reason="bench")


def _score(home: str, threads: int, queue) -> None:
    from _common import peak_rss_mb

    from mtrec.config import load_config
    from mtrec.steps import score

    cfg = load_config(environ={}, overrides={"home": home, "training": {"num_threads": threads}})
    t = time.perf_counter()
    res = score.run(cfg, END, run_id=f"bench-{threads}")
    seconds = time.perf_counter() - t
    queue.put({"seconds": seconds, "users": sum(res.users.values()), "rows": sum(res.rows.values()),
               "pairs": res.details.get("pairs", 0), "rss": peak_rss_mb()})


def _forward_only(home: str, threads: int, n_pairs: int, queue) -> None:
    """The champion's pair forward on pre-built user/item sides (no features, no candidates, no I/O)."""
    import numpy as np
    import pandas as pd
    import torch

    from mtrec.config import load_config
    from mtrec.features.training_set import build_scoring_table
    from mtrec.registry import ModelRegistry
    from mtrec.scoring.candidates import active_users, universe
    from mtrec.scoring.rank import ModelScorer
    from mtrec.warehouse import open_warehouse

    torch.set_num_threads(threads)
    cfg = load_config(environ={}, overrides={"home": home})
    wh = open_warehouse(cfg)
    reg = ModelRegistry(cfg, wh)
    mv = reg.champion()
    scorer = ModelScorer(reg.load(mv.version), mv.version, torch.device("cpu"))
    scenario = "home"
    uni = universe(wh, cfg, END, scenario)
    users = active_users(wh, cfg, END, scenario)[:2048]
    u = scorer.users(build_scoring_table(cfg, wh, END, pd.DataFrame({"user_id": users, "scenario": scenario,
                                                                     "item_id": ""})))
    i = scorer.items(build_scoring_table(cfg, wh, END, pd.DataFrame({"user_id": "", "scenario": scenario,
                                                                     "item_id": uni.items})), uni)
    rng = np.random.default_rng(0)
    width = 90  # the default candidate count per user (popular 50 + similar 30 + fresh 10)
    cand = torch.from_numpy(rng.integers(0, len(uni.items), (len(users), width)))
    step = max(1, 65_536 // width)
    done, t = 0, time.perf_counter()
    while done < n_pairs:
        for r in range(0, len(users), step):
            rows = slice(r, min(r + step, len(users)))
            scorer.grid(u, i, rows, cand[rows])
            done += (rows.stop - rows.start) * width
    n_pairs = done
    queue.put({"seconds": time.perf_counter() - t, "pairs": n_pairs})


def _guarded(target, args, queue) -> None:
    try:
        target(*args, queue)
    except BaseException:  # noqa: BLE001 - report the child's failure instead of hanging the parent
        import traceback

        queue.put({"error": traceback.format_exc()})


def _in_child(target, *args):
    """Run in a fresh process (its own peak RSS); a failure in the child is raised here."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_guarded, args=(target, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[10000, 20000])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rss = {}
    for n_users in args.users:
        with tempfile.TemporaryDirectory() as tmp:
            home = str(Path(tmp) / "home")
            _setup(home, n_users, args.items, args.days, args.threads)
            full = _in_child(_score, home, args.threads)
            pairs_per_s = full["pairs"] / full["seconds"]
            fwd = _in_child(_forward_only, home, args.threads, max(full["pairs"], 200_000))
            fwd_per_s = fwd["pairs"] / fwd["seconds"]
            emit("scoring", f"full_path_pairs_per_second[{n_users} users]", pairs_per_s, "pairs/s",
                 "target 500k pairs/s", 500_000.0)
            emit("scoring", f"forward_only_pairs_per_second[{n_users} users]", fwd_per_s, "pairs/s",
                 "target 500k pairs/s", 500_000.0)
            emit("scoring", f"full_path_vs_forward[{n_users} users]", pairs_per_s / fwd_per_s, "ratio",
                 "target >= 0.8 of forward alone", None)
            emit("scoring", f"users_per_second[{n_users} users]", full["users"] / full["seconds"], "user-scenarios/s",
                 "none", None)
            emit("scoring", f"peak_rss_mb[{n_users} users]", full["rss"], "MB", "target 3 GB", 3072.0)
            rss[n_users] = full["rss"]
            print(json.dumps({"bench": "scoring", "detail": full}), file=sys.stderr)
    if len(rss) >= 2:
        lo, hi = min(rss), max(rss)
        emit("scoring", f"peak_rss_growth[{lo}->{hi} users]", rss[hi] / rss[lo], "ratio",
             "flat: close to 1.0 as users double", 1.0)


if __name__ == "__main__":
    main()
