"""Training loop, artifact, metrics and the popularity baseline (architectures live in mtrec.models)."""

from mtrec.training.artifact import RankerArtifact
from mtrec.training.encoding import FeatureEncoder
from mtrec.training.metrics import evaluate_predictions, mean_auc, popularity_predictions
from mtrec.training.trainer import TrainOutcome, train_model

__all__ = ["FeatureEncoder", "RankerArtifact", "TrainOutcome", "evaluate_predictions", "mean_auc",
           "popularity_predictions", "train_model"]
