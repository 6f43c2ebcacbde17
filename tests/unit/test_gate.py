"""The gate on plain numpy predictions: broken models rejected, better ones blessed, seed twins never flip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtrec.config import GateSpec
from mtrec.evaluation.bootstrap import Resamples, interval, metric_replicates, weighted_auc
from mtrec.evaluation.gate import ALL, BLESSED, FAIL, REJECTED, judge

TASKS = ["click", "like"]
WEIGHTS = {"click": 1.0, "like": 1.0}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def holdout():
    """3000 impressions of 400 users in two scenarios; labels drawn from a known latent score."""
    rng = np.random.default_rng(7)
    n = 3000
    users = rng.integers(0, 400, n).astype(str)
    users[:60] = ""  # anonymous impressions
    scen = np.where(rng.random(n) < 0.5, "feed", "search")
    z = rng.normal(0, 1.5, n)
    click = (rng.random(n) < _sigmoid(z - 0.5)).astype(int)
    like = click * (rng.random(n) < _sigmoid(z - 0.5)).astype(int)
    df = pd.DataFrame({"user_id": users, "scenario": scen, "click": click, "like": like})
    df.attrs["z"] = z
    return df


def _model(holdout, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    z = holdout.attrs["z"] + rng.normal(0, noise, len(holdout))
    p_click = _sigmoid(z - 0.5)
    return {"click": p_click, "like": p_click * _sigmoid(z - 0.5)}


def _judge(holdout, cand, ref, spec=None, reference="champion"):
    return judge(holdout, {"candidate": cand, reference: ref}, tasks=TASKS, spec=spec or GateSpec(),
                 task_weights=WEIGHTS, reference=reference)


def test_weighted_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 80).astype(float)  # many ties
    y = rng.integers(0, 2, 80)
    w = rng.integers(0, 3, (3, 80)).astype(float)
    got = weighted_auc(s, y, w)
    for b in range(3):
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        num = sum(w[b, i] * w[b, j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0) for i in pos for j in neg)
        den = w[b, pos].sum() * w[b, neg].sum()
        assert got[b] == pytest.approx(num / den)


def test_bootstrap_interval_brackets_the_point_and_shrinks_with_data(holdout):
    preds = _model(holdout, 0.5, 1)["click"]
    lab = holdout["click"].to_numpy(float)
    rs = Resamples.draw(holdout["user_id"], 200, 0)
    small, large = np.arange(300), np.arange(len(holdout))
    p_s, r_s = metric_replicates("auc", preds, lab, small, rs)
    p_l, r_l = metric_replicates("auc", preds, lab, large, rs)
    lo_s, hi_s = interval(r_s, 0.95)
    lo_l, hi_l = interval(r_l, 0.95)
    assert lo_s < p_s < hi_s and lo_l < p_l < hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # anonymous rows are their own clusters, users are shared clusters
    assert len(np.unique(rs.cluster[:60])) == 60 and (rs.user[:60] == -1).all()
    gp, gr = metric_replicates("gauc", preds, lab, large, rs)
    assert 0.5 < gp < 1 and np.isfinite(gr).all()


@pytest.mark.parametrize("broken", ["shuffled", "random"])
def test_broken_candidate_is_rejected_by_the_floor(holdout, broken):
    champion = _model(holdout, 0.6, 1)
    rng = np.random.default_rng(3)
    if broken == "shuffled":  # a model that learned from shuffled labels ranks at random
        cand = {t: rng.permutation(p) for t, p in _model(holdout, 0.1, 2).items()}
    else:
        cand = {t: rng.random(len(holdout)) for t in TASKS}
    out = _judge(holdout, cand, champion)
    assert out.decision == REJECTED
    assert any("below floor" in r and "all scenarios, task click" in r for r in out.reasons)


def test_better_candidate_is_blessed_and_worse_one_rejected(holdout):
    good, champion = _model(holdout, 0.2, 2), _model(holdout, 1.2, 1)
    out = _judge(holdout, good, champion)
    assert out.decision == BLESSED, out.reasons
    assert out.primary["improvement"] > 0.01 and out.primary["lo"] > 0
    back = _judge(holdout, champion, good)
    assert back.decision == REJECTED
    assert any("drop" in r and "rejected" in r and "scenario feed" in r for r in back.reasons)


def test_seed_twins_never_flip_the_champion(holdout):
    """Same quality, different noise: at most one direction is blessed, identical models never are."""
    spec = GateSpec()
    for seed in range(4):
        a, b = _model(holdout, 0.8, 10 + seed), _model(holdout, 0.8, 20 + seed)
        forth = _judge(holdout, a, b, spec).decision
        back = _judge(holdout, b, a, spec).decision
        assert not (forth == BLESSED and back == BLESSED)
    same = _model(holdout, 0.8, 5)
    out = _judge(holdout, same, same, spec)
    assert out.decision == REJECTED and "improvement +0.0000" in out.reasons[0]


def test_regression_in_one_scenario_rejects_despite_overall_gain(holdout):
    champion = _model(holdout, 0.7, 1)
    cand = _model(holdout, 0.1, 2)
    search = (holdout["scenario"] == "search").to_numpy()
    rng = np.random.default_rng(4)
    for t in TASKS:  # broken on one scenario only
        cand[t] = np.where(search, rng.random(len(holdout)), cand[t])
    spec = GateSpec(default_floor_auc=0.5)
    out = _judge(holdout, cand, champion, spec)
    assert out.decision == REJECTED
    failed = [r for r in out.rules if r.outcome == FAIL and r.rule == "slice"]
    assert "search" in {r.scenario for r in failed} and "feed" not in {r.scenario for r in failed}
    assert "scenario search, task click: AUC" in " ".join(out.reasons)


def test_small_slices_are_not_judged_and_noise_does_not_reject(holdout):
    spec = GateSpec(min_positives=10_000)
    out = _judge(holdout, _model(holdout, 0.2, 2), _model(holdout, 1.0, 1), spec)
    assert all(r.outcome == "not judged" for r in out.rules if r.rule == "slice")
    # without a judged task there is no evidence of an improvement: conservative rejection
    assert out.decision == REJECTED and "cannot be shown" in out.reasons[-1]
    assert {s.scenario for s in out.slices} == {ALL, "feed", "search"}


def test_first_run_candidate_must_beat_popularity(holdout):
    pop = _model(holdout, 1.0, 9)
    good = _judge(holdout, _model(holdout, 0.3, 2), pop, reference="popularity")
    assert good.decision == BLESSED and good.reference == "popularity"
    assert "vs popularity" in good.reasons[0]
    bad = _judge(holdout, _model(holdout, 1.6, 2), pop, reference="popularity")
    assert bad.decision == REJECTED
