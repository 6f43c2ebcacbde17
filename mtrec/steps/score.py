"""Score stage: rank candidates for every active user in every scenario and stage the top-K as Parquet.

Staged output (the publish stage's input): `runs/<ds>/<run_id>/scores/<scenario>.parquet` with exactly the
columns of `daily_recommendations`, then `scores/_SUCCESS.json` listing the scenarios and their row counts
(merged under a file lock, so scenarios scored in parallel by an orchestrator each add their own entry).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.config import MtrecConfig
from mtrec.errors import ModelError, StageError
from mtrec.steps.base import SUCCESS, StageResult, new_run_id, stage_warehouse, tracked
from mtrec.steps.publish import SUCCESS_FILE, scores_dir
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

# columns that hold one value per staged file besides those the chunks hold as dictionaries (DICTIONARY_COLUMNS):
# dictionary-encoded too (the others are not worth their dictionary)
CONSTANT_COLUMNS = ["ds", "created_at"]
PLAN_AHEAD = 2  # segments planned ahead of the one being ranked (each holds its users' input tensors)
# DuckDB worker threads (warehouse and Feast's offline store) once the lanes rank: a query then runs on its caller's
# thread alone, as the planner is ahead of the lanes; more workers would take turns with the lanes, at a cost
LEAN_DUCKDB_THREADS = 1


@dataclass
class ScoreResult(StageResult):
    rows: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    model_version: str = ""
    scores_dir: str = ""


def resolve_model(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, model: str):
    """(ModelVersion or None, label): champion | as-of (the champion in force for ds) | an explicit version.
    None means no champion exists (yet, or as of ds): scoring falls back to popularity."""
    from mtrec.registry import ModelRegistry

    reg = ModelRegistry(cfg, wh)
    if model == "champion":
        mv = reg.champion()
    elif model == "as-of":
        mv = reg.champion_as_of(ds)
    else:
        mv = reg.get(model)
    return mv, (mv.version if mv else "popularity")


def make_scorer(cfg: MtrecConfig, wh: Warehouse, mv):
    from mtrec.registry import ModelRegistry
    from mtrec.scoring.rank import ModelScorer, PopularityScorer
    from mtrec.training.artifact import pick_device

    if mv is None:
        return PopularityScorer(cfg.task_names)
    art = ModelRegistry(cfg, wh).load(mv.version)
    missing = [t for t in art.tasks if t not in cfg.task_names]
    if missing:
        raise ModelError(f"model {mv.version} predicts tasks {art.tasks}, the config has {cfg.task_names}",
                         table="model_registry")
    return ModelScorer(art, mv.version, pick_device(cfg.training.device), trace=cfg.scoring.trace)


def _merge_success(path: Path, ds: dt.date, run_id: str, model_version: str, rows: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.exists() else {}
        if current.get("model_version") not in (None, model_version):
            current = {}  # a rescore with another model replaces the previous staging
        current.update({"ds": ds.isoformat(), "run_id": run_id, "model_version": model_version})
        current.setdefault("scenarios", {}).update(rows)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        os.replace(tmp, path)


def _close_readers(readers: list, wh: Warehouse) -> None:
    for r in readers:
        if r is not wh:
            r.close()


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, scenarios: list[str] | None,
          model: str) -> ScoreResult:
    import torch
    from tqdm.auto import tqdm

    from mtrec.data.raw import end_of_day, known_scenarios
    from mtrec.features import store as FS
    from mtrec.features.frame import distinct_index
    from mtrec.features.training_set import (
        load_item_embeddings,
        retrieve_side,
        sequence_codes,
        set_offline_threads,
    )
    from mtrec.scoring.candidates import SimilarCache, active_users, scenario_universes
    from mtrec.scoring.rank import (
        DICTIONARY_COLUMNS,
        WARM_UP_USERS,
        ItemContext,
        item_contexts,
        plan_users,
        rank_plans,
        retrieval_blocks,
        scoring_workers,
        segments,
        staging_schema,
        universe_features,
        warm_up,
    )

    torch.set_num_threads(cfg.training.num_threads or 1)
    started, cpu_started = time.perf_counter(), time.process_time()
    # the Feast store is opened (registry, repo, the offline store's modules) while the model loads and the users
    # are fetched
    opening = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mtrec-score-open")
    store_ready = opening.submit(FS.open_for_retrieval, cfg)
    # the planner: item sides and segments' plans, in order, in one thread (`plan`, `planned`)
    planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrec-score-plan")
    contexts: dict[str, ItemContext | None] = {}
    n_items: dict[str, int] = {}
    scenario_items = None  # item_contexts(...): its body runs in the planner thread, from the first scenario on

    def item_side(scenario: str) -> ItemContext | None:
        """The scenario's item context, built once (scenarios are planned in order, in the planner thread)."""
        nonlocal scenario_items
        if scenario not in contexts:
            scenario_items = scenario_items or item_contexts(cfg, wh, ds, todo, scorer_ready.result,
                                                             store=store_ready.result(),
                                                             universes=universes.result(),
                                                             shared=shared_ready.result(),
                                                             features=item_features.result())
            contexts.clear()
            uni, contexts[scenario] = next(scenario_items)
            n_items[scenario] = len(uni.items)
        return contexts[scenario]

    cutoff = pd.Timestamp(end_of_day(ds))
    people: dict[str, list[str]] = {}
    first_items = None  # the future of the first scenario's item side, built ahead of its first plan
    scorer_ready: Future = Future()  # the model, loaded by the caller while the item features are retrieved
    warming: threading.Thread | None = None

    def early_warm_up() -> None:
        """`warm_up` on the first segment's first WARM_UP_USERS users, planned as soon as their scenario's item
        side, their features and sequences are ready (beside the first plan): the lanes' first chunks find the
        trace made and optimized. A failure here is left to the lanes, which meet it again and raise it."""
        try:
            items = first_items.result()
            few = head[:WARM_UP_USERS]
            if items is not None and few:
                warm_up(cfg, plan_users(cfg, wh, ds, items, few, scorer, head_sequences.result(),
                                        store=store_ready.result(), features=head_features.result()), scorer)
        except Exception as e:  # noqa: BLE001 - see above
            log.debug("scoring warm-up skipped: %s", e)
    # the opening threads' warehouse queries run on connections of their own (when the warehouse has them): beside
    # the caller's instead of one at a time
    readers: list[Warehouse] = []
    try:
        readers += [wh.reader() if hasattr(wh, "reader") else wh for _ in range(2)]
        all_scen = known_scenarios(wh, cfg, ds)
        todo = list(scenarios) if scenarios else all_scen
        unknown = [s for s in todo if s not in all_scen]
        if unknown:
            raise StageError(f"unknown scenario(s) {unknown}: known are {all_scen}", table="events", column="scenario",
                             ds=ds)
        # the start-up in the order the first ranked chunk needs it: the universes, their items' features and
        # what every item side shares (title embeddings, attribute columns), the first scenario's users, then the
        # first segment's own user features and sequences beside the model (ranking starts without waiting for the
        # other scenarios' users or everyone's sequences)
        universes = opening.submit(scenario_universes, readers[0], cfg, ds, todo)
        shared_ready = opening.submit(lambda: (load_item_embeddings(cfg, readers[0]), FS.attributes(cfg, readers[0])))
        item_features = opening.submit(lambda: universe_features(cfg, ds, universes.result(), store_ready.result()))
        head_scenario, head = (todo[0] if todo else ""), []
        if todo:  # the first item side is built as soon as its features and the model are ready
            first_items = planner.submit(item_side, head_scenario)
            people[head_scenario] = active_users(wh, cfg, ds, head_scenario)
            head = (segments(cfg, people[head_scenario], first=True) or [[]])[0]
        head_sequences = opening.submit(sequence_codes, readers[1], cfg, head, cutoff)
        head_features = opening.submit(lambda: retrieve_side(cfg, ds, "user", head, head_scenario,
                                                             store=store_ready.result()))
        mv, label = resolve_model(cfg, wh, ds, model)
        scorer = make_scorer(cfg, wh, mv)
        scorer_ready.set_result(scorer)
        if head:  # the trace made on a few users of the first segment, beside the first plan
            warming = threading.Thread(target=early_warm_up, name="mtrec-score-warm-up")
            warming.start()
        out = scores_dir(cfg, ds, run_id)
        out.mkdir(parents=True, exist_ok=True)
        people.update({scenario: active_users(wh, cfg, ds, scenario) for scenario in todo[1:]})
        universes.result()
        shared_ready.result()
    except BaseException:  # the opening threads' queries end before the caller closes the warehouse connection
        scorer_ready.cancel()  # (the planner waiting for the model stops)
        opening.shutdown(wait=True, cancel_futures=True)
        planner.shutdown(wait=True, cancel_futures=True)
        if warming is not None:
            warming.join()
        _close_readers(readers, wh)
        raise
    if mv is None:
        log.warning("score %s: no champion%s: ranking by smoothed popularity", ds,
                    " as of this date" if model == "as-of" else "")
    schema = staging_schema(cfg)
    created = dt.datetime.now(dt.UTC)  # bookkeeping column only
    rows: dict[str, int] = {}
    forward_started = scorer.forward_cpu_seconds  # (nothing ranked yet)
    pairs: list[int] = []  # scored pairs per user chunk
    everyone = distinct_index([u for p in people.values() for u in p])  # each user once

    # (scenario, its users' segment, last segment?) in order; a scenario without users or items still gets an
    # (empty) staged file
    # (the very first segment only HEAD_CHUNKS chunks per lane: ranking starts sooner)
    # with the block of segments whose features are retrieved at once (the stage's first segment is fetched apart)
    tasks = []
    for n, scenario in enumerate(todo):
        parts = segments(cfg, people[scenario], first=n == 0) or [[]]
        for block in retrieval_blocks(cfg, parts, first=n == 0):
            tasks += [(scenario, part, part is parts[-1], block) for part in block]

    def fetch_sequences():
        """Behaviour sequences depend on the user only: one pass for the users of every scenario, in an opening
        thread once the scenarios' users are listed, beside the first plans (the second segment needs them)."""
        t = time.perf_counter()
        seq = sequence_codes(readers[1], cfg, everyone, cutoff)
        log.info("score %s: %d users' behaviour sequences in %.1f s", ds, len(seq.users), time.perf_counter() - t)
        return seq

    sequences_ready = opening.submit(fetch_sequences)
    opening.shutdown(wait=False)
    duckdb_threads: dict[str, int | None] = {}  # DuckDB's settings before `go_lean`, restored at the end

    def go_lean() -> None:
        """Once the lanes rank (the second plan on), DuckDB queries run with LEAN_DUCKDB_THREADS (the start-up
        keeps DuckDB's default: the cores are not all busy yet)."""
        if not duckdb_threads:
            duckdb_threads["warehouse"] = wh.set_threads(LEAN_DUCKDB_THREADS) if hasattr(wh, "set_threads") else None
            duckdb_threads["offline"] = set_offline_threads(cfg, LEAN_DUCKDB_THREADS)

    retrieved: dict[int, pd.DataFrame] = {}  # the user-side features of the block being planned
    similar = SimilarCache(everyone)  # users' similar items, reused by the next scenarios (same universe)

    def block_features(scenario: str, block: list[list[str]]) -> pd.DataFrame:
        """One retrieval for a block's segments, made at its first."""
        if id(block) not in retrieved:
            retrieved.clear()
            retrieved[id(block)] = retrieve_side(cfg, ds, "user", [u for part in block for u in part], scenario,
                                                 store=store_ready.result())
        return retrieved[id(block)]

    def plan(scenario: str, part: list[str], last: bool, block: list[list[str]], first: bool = False,
             final: bool = False):
        t = time.perf_counter()
        if first and first_items is not None:
            first_items.result()  # (built ahead, in this thread: its failure is raised here)
        items = item_side(scenario)
        p = None
        if items and part:
            sequences, features = (head_sequences.result(), head_features.result()) if first else \
                (sequences_ready.result(), None)
            if not first:  # (no warehouse query is left in the opening threads)
                go_lean()
                features = block_features(scenario, block)
            p = plan_users(cfg, wh, ds, items, part, scorer, sequences, store=store_ready.result(),
                           features=features, tail=scoring_workers(cfg) if final else 0, similar=similar)
        log.info("score %s %s: %d users planned in %.1f s", ds, scenario, len(part), time.perf_counter() - t)
        return scenario, p, last

    def planned():
        """Plans in order, planned (warehouse, Feast, item side) in a thread up to PLAN_AHEAD plans ahead of the
        one being ranked (ranking uses no warehouse connection): when a scenario's last segment is handed out,
        the next scenario's item side and first segment are already under way, so the lanes do not wait."""
        ahead: deque = deque()
        try:
            for i in range(len(tasks)):
                while len(ahead) <= PLAN_AHEAD and i + len(ahead) < len(tasks):
                    k = i + len(ahead)
                    ahead.append(planner.submit(plan, *tasks[k], first=k == 0, final=k == len(tasks) - 1))
                yield ahead.popleft().result()
        finally:  # a failure downstream: plans not started are dropped
            for future in ahead:
                future.cancel()

    users = {scenario: len(people[scenario]) for scenario in todo}
    bar = tqdm(total=sum(users.values()), desc=f"score {ds}", unit="user-scenario", leave=False, mininterval=1.0)
    writers: dict[str, pq.ParquetWriter] = {}
    # the score and probabilities (float32 values as doubles) byte-stream split: half of each value's bytes are
    # then runs of zeros that the compressor takes whole (staged files 0.71x, the writer's CPU 0.75x here)
    float_encoding = {f.name: "BYTE_STREAM_SPLIT" for f in schema if pa.types.is_floating(f.type)}
    counts = {scenario: 0 for scenario in todo}

    def tmp_path(scenario: str) -> Path:
        return out / f".{scenario}.parquet.tmp{os.getpid()}"

    try:
        for scenario, table in rank_plans(cfg, ds, planned(), scorer, run_id=run_id, created_at=created,
                                          on_chunk=lambda _s, u, p: (bar.update(u), pairs.append(p)),
                                          warm=False):
            if scenario not in writers:
                # (read whole by publish, as plain strings: no statistics, no Arrow schema)
                writers[scenario] = pq.ParquetWriter(tmp_path(scenario), schema, write_statistics=False,
                                                     use_dictionary=[*CONSTANT_COLUMNS, *DICTIONARY_COLUMNS],
                                                     column_encoding=float_encoding,
                                                     store_schema=False)
            if table is not None:
                writers[scenario].write_table(table)
                counts[scenario] += table.num_rows
                continue
            writers.pop(scenario).close()  # the scenario is complete
            os.replace(tmp_path(scenario), out / f"{scenario}.parquet")
            rows[scenario] = counts[scenario]
            log.info("score %s %s: %d users, %d items in the universe, %d rows", ds, scenario, users[scenario],
                     n_items.get(scenario, 0), counts[scenario])
    finally:
        # a failure midway: the sequence fetch may still be running on the warehouse connection, which the caller
        # closes next
        opening.shutdown(wait=True, cancel_futures=True)
        planner.shutdown(wait=True, cancel_futures=True)
        if warming is not None:  # (it is short: a few users' pairs)
            warming.join()
        _close_readers(readers, wh)
        previous = dict(duckdb_threads)
        duckdb_threads["stage ended"] = None  # (a planner still running after a failure does not go lean)
        if previous.get("warehouse"):
            wh.set_threads(previous["warehouse"])
        if previous.get("offline"):
            set_offline_threads(cfg, previous["offline"])
        bar.close()
        for scenario, writer in writers.items():  # a failure midway: no partial file is left behind
            writer.close()
            tmp_path(scenario).unlink(missing_ok=True)
    _merge_success(out / SUCCESS_FILE, ds, run_id, label, rows)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    pairs_total = sum(pairs)
    total_users = sum(users.values())
    forward = scorer.forward_cpu_seconds - forward_started  # (this run's, should the scorer be reused)
    log.info("score %s: %d pairs in %.1f s (%.0f pairs/s)%s", ds, pairs_total, seconds, pairs_total / max(seconds, 1e-9),
             f"; the model's forward took {100 * forward / max(cpu, 1e-9):.0f}% of the CPU time ({forward:.1f} of "
             f"{cpu:.1f} s), the rest went to features, candidates, top-K and output" if mv else "")
    msg = (f"scored {total_users} user-scenario(s) with {label}: " + ", ".join(f"{s} {n} rows" for s, n in rows.items()))
    return ScoreResult(stage="score", ds=ds, run_id=run_id, status=SUCCESS, message=msg, rows=rows, users=users,
                       model_version=label, scores_dir=str(out),
                       details={"rows": rows, "users": users, "model_version": label, "model": model,
                                "seconds": round(seconds, 2), "pairs": pairs_total, "cpu_seconds": round(cpu, 2),
                                "forward_cpu_seconds": round(forward, 2),
                                "pairs_per_second": round(pairs_total / max(seconds, 1e-9), 1),
                                "users_per_second": round(total_users / max(seconds, 1e-9), 1)},
                       artifacts={"scores": str(out)},
                       warnings=[] if mv else [f"no champion{' as of ' + str(ds) if model == 'as-of' else ''}: "
                                               f"recommendations ranked by popularity"])


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str | None = None, wh: Warehouse | None = None,
        scenarios: list[str] | None = None, model: str = "champion") -> ScoreResult:
    """Rank every active user of each scenario with the model (champion | as-of | VERSION) and stage the top-K."""
    run_id = run_id or new_run_id(ds)
    with stage_warehouse(cfg, wh) as w:
        return tracked("score", cfg, ds, run_id, w, _body, cfg, ds, run_id, w, scenarios, model)
