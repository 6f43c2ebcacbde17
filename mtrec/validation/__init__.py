"""Data-quality validation: Great Expectations suites as code, warehouse aggregates and attribute drift."""

from mtrec.validation.results import CRITICAL, INFO, WARNING, CheckResult

__all__ = ["CRITICAL", "INFO", "WARNING", "CheckResult"]
