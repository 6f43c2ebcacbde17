"""Synthetic users, items and impressions realistic enough to tell recommendation models apart."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TOPIC_WORDS: dict[str, list[str]] = {
    "sports": "goal match league striker coach stadium season playoff tournament champion referee score team "
              "football tennis racing sprint medal final derby keeper".split(),
    "tech": "laptop smartphone chip software cloud battery processor gadget robot startup code wireless "
            "camera drone server update app tablet sensor network".split(),
    "food": "recipe chocolate pasta spicy bakery cheese dessert grill vegan soup kitchen flavor sauce "
            "breakfast noodle salad coffee cake spice chef".split(),
    "travel": "beach island flight hotel mountain passport cruise hiking resort journey city tour luggage "
              "backpack museum coast villa safari train map".split(),
    "music": "guitar album concert singer melody band piano jazz festival rhythm vinyl song drum chorus "
             "orchestra rap playlist tour lyric studio".split(),
    "fashion": "dress sneaker jacket denim runway style handbag silk boots vintage tailored scarf couture "
               "outfit jewelry cotton trend linen coat watch".split(),
    "finance": "stock market savings budget loan interest crypto dividend invest pension tax bank portfolio "
               "mortgage credit fund inflation bond broker trade".split(),
    "home": "sofa garden lamp kitchen furniture cozy decor plant rug shelf bedroom paint tiles candle "
            "cushion curtain mirror patio storage clean".split(),
}
FILLER = "the new best top guide review amazing simple ultimate daily with for your great quick".split()
TOPICS = list(TOPIC_WORDS)
CATEGORIES = [f"cat_{t}" for t in TOPICS]
COUNTRIES = [f"c{i:02d}" for i in range(10)]
DEVICES = ["ios", "android", "web"]
AGE_BUCKETS = ["18-24", "25-34", "35-44", "45-54", "55+"]
N_BRANDS = 50
DIM = 16


@dataclass(frozen=True)
class GeneratorSpec:
    end_date: dt.date
    users: int = 2000
    items: int = 500
    days: int = 14
    seed: int = 42
    scenarios: tuple[str, ...] = ("home", "search", "notify")
    events_per_user_day: float = 8.0
    new_users_per_day: float = 0.15
    new_items_per_day: float = 0.02
    chunk_events: int = 500_000

    @property
    def start_date(self) -> dt.date:
        return self.end_date - dt.timedelta(days=self.days - 1)


@dataclass
class DayBatch:
    ds: dt.date
    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    truth: pd.DataFrame


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _ScenarioBehaviour:
    name: str
    share: float
    click_bias: float      # base logit of a click
    relevance: float       # weight of the user-item match
    popularity: float      # weight of log popularity
    freshness: float       # boost for items created in the last days
    like_bias: float
    like_drift: float      # change of the like logit per day (label rates drift)


def _behaviours(scenarios: tuple[str, ...], rng: np.random.Generator) -> list[_ScenarioBehaviour]:
    """Scenario behaviour from position, so any names work: the first is the big feed, the last the small one."""
    n = len(scenarios)
    if n == 1:
        shares = np.array([1.0])
    else:
        small = 0.08
        rest = 0.67 ** np.arange(n - 1)  # the first scenario is the big feed, then decreasing
        shares = np.append(rest / rest.sum() * (1 - small), small)
    presets = [  # (click_bias, relevance, popularity, freshness, like_bias, like_drift)
        (-2.9, 1.0, 0.55, 0.0, -1.5, 0.02),   # feed: popularity matters
        (-2.2, 2.0, 0.15, 0.0, -1.0, -0.015),  # search: relevance dominates
        (-4.1, 0.8, 0.25, 1.2, -1.8, 0.04),   # small: fresh items get a boost
    ]
    out = []
    for i, name in enumerate(scenarios):
        p = presets[min(i, 1)] if i < n - 1 or n == 1 else presets[2]
        jitter = rng.normal(0, 0.1, size=6) if i >= 2 and i < n - 1 else np.zeros(6)
        out.append(_ScenarioBehaviour(name, float(shares[i]), *(np.array(p) + jitter)))
    return out


class _World:
    """Latent state that persists across days: users, items and their preferences."""

    def __init__(self, spec: GeneratorSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        self.topic_vecs = rng.normal(0, 1, size=(len(TOPICS), DIM))
        self.topic_vecs /= np.linalg.norm(self.topic_vecs, axis=1, keepdims=True)
        # age buckets shift topic preference so user attributes carry signal for cold users
        self.age_topic = rng.normal(0, 1.0, size=(len(AGE_BUCKETS), len(TOPICS)))
        self.country_topic = rng.normal(0, 0.5, size=(len(COUNTRIES), len(TOPICS)))
        self.behaviours = _behaviours(spec.scenarios, rng)
        self.n_users = 0
        self.n_items = 0
        self.user_vec = np.zeros((0, DIM))
        self.user_activity = np.zeros(0)
        self.user_bias = np.zeros(0)
        self.item_vec = np.zeros((0, DIM))
        self.item_pop = np.zeros(0)
        self.item_quality = np.zeros(0)
        self.item_day = np.zeros(0, dtype=np.int64)

    def add_users(self, n: int, day: int, day_start: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
        age = rng.integers(0, len(AGE_BUCKETS), n)
        country = rng.integers(0, len(COUNTRIES), n)
        device = rng.choice(len(DEVICES), n, p=[0.45, 0.4, 0.15])
        logits = self.age_topic[age] + self.country_topic[country] + rng.normal(0, 0.8, (n, len(TOPICS)))
        mix = np.exp(logits * 1.5)
        mix /= mix.sum(axis=1, keepdims=True)
        vec = mix @ self.topic_vecs + rng.normal(0, 0.15, (n, DIM))
        ids = np.arange(self.n_users, self.n_users + n)
        self.user_vec = np.vstack([self.user_vec, vec])
        # heavy-tailed activity: a few users produce many sessions
        self.user_activity = np.append(self.user_activity, rng.pareto(2.0, n) + 0.3)
        self.user_bias = np.append(self.user_bias, rng.normal(0, 0.4, n) + 0.15 * (device == 0))
        self.n_users += n
        tenure = np.where(day == 0, rng.integers(0, 1500, n), 0).astype(float) + rng.random(n)
        updated = day_start - pd.to_timedelta(rng.integers(1, 15 * 86_400, n), unit="s")
        return pd.DataFrame({
            "user_id": [f"u{i:07d}" for i in ids],
            "updated_at": updated if day == 0 else pd.Series([day_start] * n),
            "age_bucket": np.array(AGE_BUCKETS)[age], "country": np.array(COUNTRIES)[country],
            "device": np.array(DEVICES)[device], "tenure_days": np.round(tenure, 1),
        })

    def add_items(self, n: int, day: int, day_start: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
        topic = rng.integers(0, len(TOPICS), n)
        vec = self.topic_vecs[topic] + rng.normal(0, 0.35, (n, DIM))
        ids = np.arange(self.n_items, self.n_items + n)
        # Zipf-like popularity: rank-based power law, shuffled across ids
        ranks = rng.permutation(np.arange(1, n + 1)) + (self.n_items // 4)
        pop = 1.0 / np.power(ranks, 0.9)
        self.item_vec = np.vstack([self.item_vec, vec])
        self.item_pop = np.append(self.item_pop, pop)
        self.item_quality = np.append(self.item_quality, rng.normal(0, 0.8, n))
        self.item_day = np.append(self.item_day, np.full(n, day))
        self.n_items += n
        same_cat = rng.random(n) < 0.7
        category = np.where(same_cat, topic, rng.integers(0, len(TOPICS), n))
        titles = []
        for t in topic:
            words = TOPIC_WORDS[TOPICS[t]]
            k = int(rng.integers(2, 5))
            chosen = [words[j] for j in rng.choice(len(words), k, replace=False)]
            chosen += [FILLER[j] for j in rng.choice(len(FILLER), int(rng.integers(1, 3)), replace=False)]
            rng.shuffle(chosen)
            titles.append(" ".join(chosen).capitalize())
        price = np.round(np.exp(rng.normal(3.0, 0.8, n)), 2)
        updated = day_start - pd.to_timedelta(rng.integers(1, 7200, n), unit="s") if day == 0 else \
            pd.Series([day_start] * n)
        return pd.DataFrame({
            "item_id": [f"i{i:07d}" for i in ids], "title": titles, "updated_at": updated,
            "category": np.array(CATEGORIES)[category], "brand": [f"b{j:02d}" for j in rng.integers(0, N_BRANDS, n)],
            "price": price,
        })


def generate(spec: GeneratorSpec) -> Iterator[DayBatch]:
    """Yield one DayBatch per day (several for days larger than spec.chunk_events), deterministic by seed."""
    world = _World(spec)
    for day in range(spec.days):
        ds = spec.start_date + dt.timedelta(days=day)
        day_start = pd.Timestamp(ds, tz="UTC")
        rng = np.random.default_rng([spec.seed, day + 1])
        first_user = world.n_users
        if day == 0:
            users = world.add_users(spec.users, 0, day_start, rng)
            items = world.add_items(spec.items, 0, day_start, rng)
        else:
            users = world.add_users(max(1, rng.poisson(spec.users * spec.new_users_per_day)), day, day_start, rng)
            items = world.add_items(max(1, rng.poisson(spec.items * spec.new_items_per_day)), day, day_start, rng)
        # Who is active today: new users are very active on their first day (cold start dominates impressions).
        activity = world.user_activity.copy()
        is_new = np.arange(world.n_users) >= first_user
        activity[is_new] *= 8.0 if day > 0 else 1.0
        p_active = np.clip(activity / activity.mean() * 0.45, 0, 0.95)
        active = np.flatnonzero(rng.random(world.n_users) < p_active)
        n_events_target = int(spec.events_per_user_day * len(active))
        yield from _day_events(world, spec, ds, day, day_start, active, n_events_target, rng, users, items)


def _day_events(world: _World, spec: GeneratorSpec, ds: dt.date, day: int, day_start: pd.Timestamp,
                active: np.ndarray, n_target: int, rng: np.random.Generator, users: pd.DataFrame,
                items: pd.DataFrame) -> Iterator[DayBatch]:
    behaviours = world.behaviours
    shares = np.array([b.share for b in behaviours])
    # Sessions: a user in one scenario, a burst of 1-12 impressions within minutes.
    sess_len_mean = 4.0
    n_sessions = max(1, int(n_target / sess_len_mean))
    sess_user = rng.choice(active, n_sessions) if len(active) else np.zeros(n_sessions, dtype=np.int64)
    sess_scen = rng.choice(len(behaviours), n_sessions, p=shares)
    sess_len = np.clip(rng.geometric(1 / sess_len_mean, n_sessions), 1, 12)
    # diurnal start times (seconds into the day), peaking in the evening
    hour = np.clip(rng.normal(19, 4.5, n_sessions), 0, 23.99)
    sess_start = (hour * 3600).astype(np.int64)
    ev_sess = np.repeat(np.arange(n_sessions), sess_len)
    n_events = len(ev_sess)
    offsets = np.concatenate([np.arange(k) for k in sess_len]) if n_sessions else np.zeros(0, dtype=np.int64)
    secs = np.minimum(sess_start[ev_sess] + offsets * rng.integers(5, 90, n_events), 86_399)
    user = sess_user[ev_sess]
    scen = sess_scen[ev_sess]

    # Exposure: mostly popularity-driven, partly relevance-driven (the system already personalises a bit).
    pop = world.item_pop.copy()
    fresh = (day - world.item_day) <= 2
    pop_p = pop / pop.sum()
    n_items = world.n_items
    item = rng.choice(n_items, n_events, p=pop_p)
    # a third of impressions come from a topic-matched pool
    personal = rng.random(n_events) < 0.35
    if personal.any():
        cand = rng.choice(n_items, (int(personal.sum()), 8), p=pop_p)
        scores = np.einsum("nd,nkd->nk", world.user_vec[user[personal]], world.item_vec[cand])
        item[personal] = cand[np.arange(len(cand)), scores.argmax(1)]
    # the small scenario favours fresh items
    for s, b in enumerate(behaviours):
        if b.freshness > 0:
            m = (scen == s) & (rng.random(n_events) < 0.4)
            fresh_ids = np.flatnonzero(fresh)
            if m.any() and len(fresh_ids):
                item[m] = rng.choice(fresh_ids, int(m.sum()))

    position = (offsets % 20) + 1
    match = np.einsum("nd,nd->n", world.user_vec[user], world.item_vec[item])
    b_click = np.array([b.click_bias for b in behaviours])[scen]
    b_rel = np.array([b.relevance for b in behaviours])[scen]
    b_pop = np.array([b.popularity for b in behaviours])[scen]
    b_fresh = np.array([b.freshness for b in behaviours])[scen]
    logit_click = (b_click + b_rel * match + b_pop * (np.log(world.item_pop[item]) + 4.0) / 2.0
                   + b_fresh * fresh[item] + world.user_bias[user] - 0.06 * (position - 1)
                   + 0.3 * world.item_quality[item])
    p_click = _sigmoid(logit_click)
    b_like = np.array([b.like_bias + b.like_drift * day for b in behaviours])[scen]
    p_like_given = _sigmoid(b_like + 1.2 * world.item_quality[item] + 0.8 * match)
    click = (rng.random(n_events) < p_click).astype(np.int64)
    like = (click == 1) & (rng.random(n_events) < p_like_given)
    dwell = np.where(click == 1, np.round(rng.gamma(2.0, 20.0, n_events) * (1 + like), 1), 0.0)

    order = np.lexsort((np.arange(n_events), secs))
    ts = day_start + pd.to_timedelta(secs[order], unit="s") + pd.to_timedelta(rng.integers(0, 1000, n_events)[order],
                                                                             unit="ms")
    events = pd.DataFrame({
        "event_id": [f"e{ds:%Y%m%d}{i:09d}" for i in range(n_events)],
        "user_id": [f"u{u:07d}" for u in user[order]],
        "item_id": [f"i{i:07d}" for i in item[order]],
        "scenario": np.array([b.name for b in behaviours])[scen[order]],
        "event_timestamp": ts,
        "click": click[order], "like": like[order].astype(np.int64),
        "position": position[order].astype(np.int64), "dwell_seconds": dwell[order],
    })
    truth = pd.DataFrame({"event_id": events["event_id"], "p_click": p_click[order],
                          "p_like": (p_click * p_like_given)[order]})
    for start in range(0, max(n_events, 1), spec.chunk_events):
        sl = slice(start, start + spec.chunk_events)
        first = start == 0
        yield DayBatch(ds=ds, events=events.iloc[sl].reset_index(drop=True),
                       users=users if first else users.iloc[0:0], items=items if first else items.iloc[0:0],
                       truth=truth.iloc[sl].reset_index(drop=True))
