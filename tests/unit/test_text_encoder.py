"""The offline text encoder and its content-hash cache."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from mtrec.features.text import EmbeddingCache, TextEncoder, TextEncoderError, embed_items


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return TextEncoder("all-MiniLM-L6-v2", batch_size=16)


def test_default_model_loads_offline_and_is_semantic(encoder):
    vecs, missing = encoder.encode(["football match goal league", "soccer team wins the cup",
                                    "chocolate cake recipe"], progress=False)
    assert vecs.shape == (3, 384) and not missing.any()
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.1


def test_missing_and_very_long_titles(encoder):
    vecs, missing = encoder.encode(["", None, float("nan"), "   ", "word " * 2000], progress=False)
    assert missing.tolist() == [True, True, True, True, False]
    assert not vecs[:4].any() and np.linalg.norm(vecs[4]) == pytest.approx(1.0, abs=1e-4)


def test_unloadable_model_names_where_it_looked(tmp_path):
    with pytest.raises(TextEncoderError, match=str(tmp_path / "nope")):
        TextEncoder(str(tmp_path / "nope"))


def test_cache_embeds_only_new_or_changed_titles(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, encoder)
    titles = ["red running shoes", "jazz piano album", "red running shoes"]
    first, _ = cache.embed(titles, progress=False)
    assert cache.stats == {"hits": 0, "misses": 2}
    calls = encoder.calls
    again = EmbeddingCache(tmp_path, encoder)  # persisted across instances
    second, _ = again.embed(titles, progress=False)
    assert encoder.calls == calls and again.stats["misses"] == 0
    np.testing.assert_allclose(first, second)
    third, _ = again.embed(["red running shoes", "jazz piano album live"], progress=False)
    assert again.stats == {"hits": 1, "misses": 1} and encoder.calls == calls + 1
    assert not np.allclose(third[1], second[1])


def test_embed_items_uses_latest_title(encoder, tmp_path):
    items = pd.DataFrame({"item_id": ["a", "a", "b"], "title": ["old cooking pasta", "new laptop chip", None],
                          "updated_at": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-01-01"], utc=True)})
    ids, vecs, missing = embed_items(items, EmbeddingCache(tmp_path, encoder), progress=False)
    assert ids == ["a", "b"] and missing.tolist() == [False, True]
    ref, _ = encoder.encode(["new laptop chip"], progress=False)
    np.testing.assert_allclose(vecs[0], ref[0], atol=1e-5)
