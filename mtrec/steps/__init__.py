"""Pipeline stages in order: validate, features, train, evaluate, score, publish."""

STAGES = ("validate", "features", "train", "evaluate", "score", "publish")
