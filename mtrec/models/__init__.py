"""Model architectures (no training loop here: see mtrec.training)."""

from mtrec.models.ranker import (
    ARCHITECTURES,
    MSMT,
    MMoE,
    ModelSpec,
    Ranker,
    SharedBottom,
    SingleTask,
    build_model,
)

__all__ = ["ARCHITECTURES", "MMoE", "ModelSpec", "MSMT", "Ranker", "SharedBottom", "SingleTask", "build_model"]
