"""mtrec: batch MLOps pipeline for a multi-scenario, multi-task recommender."""

__version__ = "0.1.0"
