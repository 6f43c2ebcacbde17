"""The ranker, its trainer and its artifact, on in-memory tables with a planted signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mtrec.config import load_config
from mtrec.errors import ConfigError, ModelError
from mtrec.models import ARCHITECTURES, build_model
from mtrec.testing import toy_table
from mtrec.training import RankerArtifact, evaluate_predictions, train_model
from mtrec.training.encoding import FeatureEncoder, to_device
from mtrec.training.metrics import auc, gauc, ranking_at_k
from mtrec.training.trainer import make_spec


def _cfg(tmp_path, **training):
    return load_config(environ={}, overrides={"home": str(tmp_path), "training": {
        "epochs": 3, "batch_size": 256, "warmup_steps": 5, "learning_rate": 5e-3, **training}})


@pytest.fixture(scope="module")
def tables():
    return toy_table(6000, seed=1), toy_table(3000, seed=2, day="2024-01-02")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_split_forward_equals_full_forward(tmp_path, tables, name):
    train, _ = tables
    cfg = _cfg(tmp_path)
    enc = FeatureEncoder.fit(train)
    model = build_model(make_spec(cfg, enc, name)).eval()
    tensors, text = enc.transform(train.subset(np.arange(len(train)) < 300), labels=False)
    b = to_device(tensors, torch.device("cpu"))
    with torch.no_grad():
        full = model(b, text)
        # user side for 300 rows, item side for 300 rows, then pairs gathered in another order
        u, i = model.user_side(b, text), model.item_side(b, text)
        order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
        ug = {k: v[order] for k, v in u.items()}
        ig = {k: v[order] for k, v in i.items()}
        split = model.pair(ug, ig, b["scenario"][order], text)
    assert set(full) == {"click", "like"}
    for t in full:
        assert torch.allclose(full[t][order], split[t], atol=1e-6), t
        assert bool(((full[t] > 0) & (full[t] < 1)).all())
    if name == "msmt":  # like is chained on click (ESMM): p(like) = p(click) * p(like | click)
        assert bool((full["like"] <= full["click"] + 1e-7).all())


def test_coded_sequences_encode_as_the_item_ids(tables):
    """Scoring passes sequences as codes into a vocabulary: the tensors equal those of the item-id array (unknown
    items, padding, and sequences shorter than the model's)."""
    from dataclasses import replace

    from mtrec.features.frame import CodedSequences

    train, _ = tables
    enc = FeatureEncoder.fit(train)
    seq = train.sequences[:400].copy()
    seq[0, 0] = "never-seen-item"
    vocab, codes = np.unique(seq, return_inverse=True)
    codes = codes.reshape(seq.shape)
    items = np.append(vocab[vocab != ""], "")  # "" last: code -1 pads
    remap = np.where(vocab == "", -1, np.cumsum(vocab != "") - 1)
    coded = CodedSequences(remap[codes], items)
    assert (coded.decode() == seq).all()
    rows = train.subset(np.arange(len(train)) < 400)
    for cut in (seq.shape[1], seq.shape[1] - 2):  # shorter than the model's length: padded to it
        want, _ = enc.transform(replace(rows, sequences=seq[:, :cut]), labels=False)
        got, _ = enc.transform(replace(rows, sequences=CodedSequences(coded.codes[:, :cut], items)), labels=False)
        for k in ("seq", "seq_text"):
            assert torch.equal(want[k], got[k]), k
        assert int((want["seq"] == 0).sum()) > 0  # padding present and encoded the same


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_one_side_encodings_give_the_sides_of_the_full_one(tmp_path, tables, name):
    """Scoring encodes user rows and item rows apart: each side's tensors, and the model's side computed from
    them, equal those of the full encoding; the other side's inputs are not built."""
    train, _ = tables
    enc = FeatureEncoder.fit(train)
    model = build_model(make_spec(_cfg(tmp_path), enc, name)).eval()
    rows = train.subset(np.arange(len(train)) < 300)
    full, text = enc.transform(rows, labels=False)
    users, _ = enc.transform(rows, labels=False, sides=("user",))
    items, _ = enc.transform(rows, labels=False, sides=("item",))
    assert set(users) == {"scenario", "user", "user_cat", "user_num", "seq", "seq_text"}
    assert set(items) == {"scenario", "item", "item_cat", "item_num", "text"}
    for part in (users, items):
        for k, v in part.items():
            assert torch.equal(v, full[k]), k
    with torch.no_grad():
        for side, part in (("user_side", users), ("item_side", items)):
            want, got = getattr(model, side)(full, text), getattr(model, side)(part, text)
            assert set(want) == set(got)
            for k in want:
                assert torch.equal(want[k], got[k]), (side, k)


@pytest.mark.parametrize("name", ["msmt", "mmoe"])
def test_learns_the_signal_and_shuffled_labels_do_not(tmp_path, tables, name):
    train, holdout = tables
    cfg = _cfg(tmp_path)
    good = train_model(cfg, train, holdout, model_name=name, progress=False)
    p = good.artifact.predict(holdout)
    y = holdout.frame["click"].to_numpy()
    real_auc = roc_auc_score(y, p["click"])
    assert real_auc > 0.72, real_auc
    assert good.history[-1]["train_loss"] < good.history[0]["train_loss"]

    # Shuffled labels: nothing to learn. Its holdout log loss is no better than predicting the base rate, and its
    # AUC stays near 0.5 (AUC ignores scale, so a near-constant model's residual tilt sets it: checked on msmt,
    # the model under test; any model's direction on shuffled labels is a coin flip).
    shuffled = train.subset(np.ones(len(train), dtype=bool))
    perm = np.random.default_rng(0).permutation(len(shuffled))
    shuffled.frame[["click", "like"]] = shuffled.frame[["click", "like"]].to_numpy()[perm]
    bad = train_model(cfg, shuffled, None, model_name=name, progress=False)
    p_bad = bad.artifact.predict(holdout)["click"]
    bad_auc = roc_auc_score(y, p_bad)
    base = log_loss(y, np.full(len(y), train.frame["click"].mean()))
    assert log_loss(y, p_bad) > base - 0.005 > log_loss(y, p["click"])
    assert bad_auc < real_auc - 0.1, (bad_auc, real_auc)
    if name == "msmt":
        assert abs(bad_auc - 0.5) < 0.05, bad_auc


def test_overfits_a_small_batch(tmp_path):
    small = toy_table(256, seed=3)
    cfg = _cfg(tmp_path, epochs=60, batch_size=256, warmup_steps=0, learning_rate=1e-2, min_id_count=1,
               early_stopping_patience=100)
    out = train_model(cfg, small, None, progress=False)
    p = out.artifact.predict(small)
    assert roc_auc_score(small.frame["click"], p["click"]) > 0.99
    assert out.history[-1]["train_loss"] < 0.15 < out.history[0]["train_loss"]  # memorized: loss near zero


def test_artifact_roundtrip_hash_and_no_pickle(tmp_path, tables):
    train, holdout = tables
    out = train_model(_cfg(tmp_path, epochs=1), train, None, progress=False)
    sha = out.artifact.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["SHA256", "metadata.json", "model.safetensors", "vocab.json"]
    meta = json.loads((tmp_path / "art" / "metadata.json").read_text())
    assert meta["model_name"] == "msmt" and meta["feature_service"] == "mtrec_ranker_v1"
    assert meta["encoder"]["numeric"]["u_tenure_days"]["log"] is True
    loaded = RankerArtifact.load(tmp_path / "art", expected_sha256=sha)
    a, b = out.artifact.predict(holdout), loaded.predict(holdout)
    for t in a:
        np.testing.assert_allclose(a[t], b[t], rtol=1e-6)
    with pytest.raises(ModelError, match="expects"):
        RankerArtifact.load(tmp_path / "art", expected_sha256="0" * 64)
    weights = tmp_path / "art" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="refusing"):
        RankerArtifact.load(tmp_path / "art", expected_sha256=sha)


def test_unseen_ids_scenarios_and_sparse_labels(tmp_path):
    train = toy_table(3000, seed=4, like_missing=0.6)
    cfg = _cfg(tmp_path, epochs=2, task_weighting="uncertainty")
    out = train_model(cfg, train, None, progress=False)
    assert np.isfinite(out.history[-1]["train_loss"])
    cold = toy_table(500, seed=5, users=50, scenarios=("home", "brand_new"))
    cold.frame["user_id"] = "never_seen_" + cold.frame["user_id"]
    cold.frame.loc[:10, "user_id"] = None  # anonymous impressions
    cold.frame["item_id"] = cold.frame["item_id"] + "_new"
    cold.frame["i_category"] = "unheard_of"
    cold.frame["u_tenure_days"] = np.nan
    p = out.artifact.predict(cold)
    for t in ("click", "like"):
        assert np.isfinite(p[t]).all() and ((p[t] > 0) & (p[t] < 1)).all()


def test_unknown_model_name_is_a_config_error(tmp_path, tables):
    with pytest.raises(ConfigError, match="training.model"):
        train_model(_cfg(tmp_path), tables[0], None, model_name="resnet", progress=False)


def test_metrics_against_references():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) + 0.3 * y
    s[:50] = 0.5  # ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s))
    users = np.repeat(np.arange(50), 10)
    per_user = [roc_auc_score(y[users == k], s[users == k]) for k in range(50) if 0 < y[users == k].sum() < 10]
    weights = [10 for k in range(50) if 0 < y[users == k].sum() < 10]
    assert gauc(s, y, users) == pytest.approx(np.average(per_user, weights=weights))
    # one group: positives ranked 1 and 3 of 4 -> DCG = 1 + 1/2, IDCG = 1 + 1/log2(3)
    ndcg, recall = ranking_at_k(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]), np.zeros(4), k=2)
    assert ndcg == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert recall == pytest.approx(0.5)


def test_evaluate_predictions_slices(tables):
    _, holdout = tables
    m = evaluate_predictions(holdout, {"click": holdout.frame["click"].to_numpy() * 0.8 + 0.1,
                                       "like": np.full(len(holdout), 0.1)}, ["click", "like"])
    assert set(m) == {"home", "search", "__all__"}
    assert m["home"]["click"]["auc"] == pytest.approx(1.0)
    assert m["__all__"]["like"]["auc"] == pytest.approx(0.5)
    assert m["__all__"]["click"]["n"] == len(holdout)


def run_single(out: Path) -> dict:
    out.mkdir()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ddp_worker.py")), str(out), "--single"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical weights and the loss goes down."""
    script = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["state_sha"] == r1["state_sha"]
    assert r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"]
    assert r0["holdout_auc"] > 0.65  # learned the planted signal (shuffled labels give ~0.5)
    # same result shape and a loss close to one process on the same data (each rank sees half of every epoch)
    single = run_single(tmp_path / "single")
    assert len(single["history"]) == len(r0["history"]) and set(single) == set(r0)
    assert abs(r0["history"][-1]["train_loss"] - single["history"][-1]["train_loss"]) < 0.1 * single["history"][-1]["train_loss"]
    assert abs(r0["holdout_auc"] - single["holdout_auc"]) < 0.03


def _scorer_inputs(cfg, train, name, trace):
    """A ModelScorer over an untrained `name` ranker, the user and item sides of 300 rows and a candidate grid."""
    from mtrec.scoring.rank import ModelScorer

    enc = FeatureEncoder.fit(train)
    spec = make_spec(cfg, enc, name)
    torch.manual_seed(0)
    scorer = ModelScorer(RankerArtifact(build_model(spec), enc, spec), "v", torch.device("cpu"), trace=trace)
    sub = train.subset(np.arange(len(train)) < 300)
    batch = scorer.encode(sub)
    u = scorer.user_side(batch, torch.arange(300))
    with torch.no_grad():
        i = scorer.art.model.eval().item_side(to_device(batch, torch.device("cpu")), scorer._text)
    cand = torch.randint(0, 300, (300, 40), generator=torch.Generator().manual_seed(1))
    return scorer, u, i, cand


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_traced_pair_grid_equals_eager(tmp_path, tables, name):
    """Batch scoring traces the pair grid of traceable rankers (it then runs without the GIL); the traced grid
    must give the eager probabilities on blocks of every shape, the first one included."""
    train, _ = tables
    cfg = _cfg(tmp_path)
    traced, u, i, cand = _scorer_inputs(cfg, train, name, trace=True)
    eager, *_ = _scorer_inputs(cfg, train, name, trace=False)
    for rows, width in [(slice(0, 50), 40), (slice(50, 53), 7), (slice(100, 101), 1), (slice(120, 300), 33)]:
        a, b = traced.grid(u, i, rows, cand[rows, :width]), eager.grid(u, i, rows, cand[rows, :width])
        assert set(a) == set(b) == {"click", "like"}
        for t in a:
            assert a[t].shape == (rows.stop - rows.start, width)
            torch.testing.assert_close(a[t], b[t], atol=1e-6, rtol=1e-5)
    assert (traced._traced is not None) == (name != "single_task")  # single_task routes rows per scenario
    assert eager._traced is None
    # a whole chunk's blocks in the compiled loop (what the stage calls) = the eager loop; past a block's
    # width the grid is not written
    blocks = [(slice(0, 10), 40), (slice(10, 100), 25), (slice(100, 300), 3)]
    a, b = traced.grid_blocks(u, i, cand, blocks), eager.grid_blocks(u, i, cand, blocks)
    assert (traced._loop is not None) == (name != "single_task")
    for t in a:
        assert a[t].shape == b[t].shape == cand.shape
        for rows, width in blocks:
            torch.testing.assert_close(a[t][rows, :width], b[t][rows, :width], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("failure", ["cannot trace", "traces wrong"])
def test_a_bad_trace_falls_back_to_eager(tmp_path, tables, monkeypatch, caplog, failure):
    train, _ = tables
    cfg = _cfg(tmp_path)
    scorer, u, i, cand = _scorer_inputs(cfg, train, "msmt", trace=True)
    expected = scorer._pairs(*[{k: v[:20] for k, v in u.items() if k != "_scenario"}, i, u["_scenario"][:20],
                               cand[:20], scorer._text])

    def fake_trace(module, *args, **kwargs):
        if failure == "cannot trace":
            raise RuntimeError("unsupported op")
        return lambda *a: {t: p + 1e-3 for t, p in module(*a).items()}

    monkeypatch.setattr(torch.jit, "trace", fake_trace)
    with caplog.at_level("WARNING", logger="mtrec.scoring.rank"):
        got = scorer.grid(u, i, slice(0, 20), cand[:20])
    assert scorer._traced is None
    assert "eagerly" in caplog.text
    for t in expected:
        torch.testing.assert_close(got[t], expected[t])


def test_few_valued_lookup_equals_the_row_by_row_lookup():
    """Attributes and scenarios are looked up once per distinct value: the same indices as a lookup of every row,
    for missing values (None, NaN, NA, ""), values that only match once made strings, and unknown values."""
    import pandas as pd

    from mtrec.training.encoding import _lookup, _lookup_few

    rng = np.random.default_rng(0)
    values = [None, np.nan, pd.NA, "", "us", "de", 1, "1", 2.0, "x", "nan", "None"]
    for n in (0, 1, 7, 1000):
        v = np.array([values[i] for i in rng.integers(0, len(values), n)], dtype=object)
        for vocab in (pd.Index(["de", "us", "1", "2.0", "None"]), pd.Index([])):
            row_by_row, few = _lookup(vocab, v), _lookup_few(vocab, v)
            assert few.dtype == row_by_row.dtype and few.tolist() == row_by_row.tolist()
    assert _lookup_few(pd.Index(["de", "us"]), np.array(["us", None, "fr", "de"], dtype=object)).tolist() == [3, 1, 1, 2]
