"""The model artifact: safetensors weights + JSON metadata and vocabularies + a sha256 that loading verifies.

No pickle anywhere: a directory holds `model.safetensors`, `metadata.json` (model spec, encoder statistics,
tasks, feature service, data window, metrics, code version) and `vocab.json`; `SHA256` records the digest
of the three, and `load(..., expected_sha256=...)` refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mtrec.errors import ModelError
from mtrec.models import ModelSpec, build_model
from mtrec.training.encoding import FeatureEncoder, to_device

WEIGHTS, METADATA, VOCAB, DIGEST = "model.safetensors", "metadata.json", "vocab.json", "SHA256"
FILES = (WEIGHTS, METADATA, VOCAB)


def digest(directory: Path) -> str:
    """sha256 over the artifact's files (name and content, in a fixed order)."""
    h = hashlib.sha256()
    for name in FILES:
        path = directory / name
        if not path.exists():
            raise ModelError(f"artifact at {directory} is incomplete: {name} is missing")
        h.update(name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("training.device is cuda but no CUDA device is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class RankerArtifact:
    """A trained ranker with its feature encoder; `predict` takes a FeatureTable of the same service."""

    def __init__(self, model: torch.nn.Module, encoder: FeatureEncoder, spec: ModelSpec,
                 metadata: dict[str, Any] | None = None) -> None:
        self.model, self.encoder, self.spec = model, encoder, spec
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metadata.setdefault("model_name", spec.name)
        self.device = torch.device("cpu")

    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.tasks)

    def to(self, device: torch.device | str) -> RankerArtifact:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # -- inference -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tensors(self, tensors: dict[str, torch.Tensor], text: torch.Tensor,
                        batch_size: int = 16384) -> dict[str, np.ndarray]:
        self.model.eval()
        n = len(tensors["user"])
        text = text.to(self.device)
        out: dict[str, list[np.ndarray]] = {t: [] for t in self.spec.tasks}
        keys = [k for k in tensors if k != "labels"]
        for start in range(0, n, batch_size):
            batch = to_device({k: tensors[k][start:start + batch_size] for k in keys}, self.device)
            probs = self.model(batch, text)
            for t in self.spec.tasks:
                out[t].append(probs[t].float().cpu().numpy())
        return {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in out.items()}

    def predict(self, table, batch_size: int = 16384) -> dict[str, np.ndarray]:
        """{task: probability per row of table.frame} (features as of each row's feature_time)."""
        tensors, text = self.encoder.transform(table, labels=False)
        return self.predict_tensors(tensors, text, batch_size)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> str:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": "mtrec-ranker", "model": self.spec.name})
        meta = {**self.metadata, "model_name": self.spec.name, "spec": self.spec.to_json(),
                "encoder": self.encoder.to_json(), "format_version": 1}
        (directory / METADATA).write_text(json.dumps(meta, indent=2, default=str, sort_keys=True))
        (directory / VOCAB).write_text(json.dumps(self.encoder.vocabs, sort_keys=True))
        sha = digest(directory)
        (directory / DIGEST).write_text(sha + "\n")
        return sha

    @classmethod
    def load(cls, directory: str | Path, expected_sha256: str | None = None,
             device: str | torch.device = "cpu") -> RankerArtifact:
        directory = Path(directory)
        sha = digest(directory)
        recorded = (directory / DIGEST).read_text().strip() if (directory / DIGEST).exists() else None
        for what, want in (("the registry", expected_sha256), (DIGEST, recorded)):
            if want is not None and want != sha:
                raise ModelError(f"artifact at {directory} has sha256 {sha[:12]}..., {what} expects "
                                 f"{want[:12]}...: refusing a modified or corrupt model")
        meta = json.loads((directory / METADATA).read_text())
        vocabs = json.loads((directory / VOCAB).read_text())
        spec = ModelSpec(**meta["spec"])
        encoder = FeatureEncoder.from_json(meta["encoder"], vocabs)
        model = build_model(spec)
        state = load_file(str(directory / WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"artifact at {directory} does not fit model {spec.name}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        model.eval()
        meta.pop("spec", None)
        meta.pop("encoder", None)
        art = cls(model, encoder, spec, meta)
        return art.to(device)
