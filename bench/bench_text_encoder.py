"""Titles embedded per second by the offline all-MiniLM-L6-v2 encoder on this machine (target >= 300/s on 2 CPU
cores), and the cost of the same titles once cached (should be ~nothing)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_mb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--titles", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import torch

    from mtrec.features.text import EmbeddingCache, TextEncoder

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    words = ["wireless", "headphones", "organic", "coffee", "beans", "running", "shoes", "vintage", "denim",
             "jacket", "smart", "watch", "yoga", "mat", "cast", "iron", "pan", "kids", "puzzle", "travel", "mug"]
    titles = [" ".join(rng.choice(words, int(rng.integers(3, 9)))).capitalize() + f" {i}" for i in range(args.titles)]
    enc = TextEncoder()
    enc.encode(titles[:64], progress=False)  # load weights and warm up
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp), enc)
        t = time.perf_counter()
        cache.embed(titles, progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        cache.embed(titles, progress=False)
        warm = time.perf_counter() - t
    emit("text_encoder", "titles_per_second", args.titles / cold, "titles/s", "target 300 titles/s", 300.0)
    emit("text_encoder", "cached_titles_per_second", args.titles / max(warm, 1e-9), "titles/s",
         "cold encoding speed", args.titles / cold)
    emit("text_encoder", "peak_rss_mb", peak_rss_mb(), "MB", "none", None)


if __name__ == "__main__":
    main()
