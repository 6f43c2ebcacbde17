"""Typed errors a user can cause; each names the table, column and date at fault."""

from __future__ import annotations


class MtrecError(Exception):
    """Base class: a one-line message meant for the person running mtrec."""

    exit_code = 1

    def __init__(self, message: str, *, table: str | None = None, column: str | None = None,
                 ds: object | None = None) -> None:
        parts = []
        if table:
            parts.append(f"table {table}")
        if column:
            parts.append(f"column {column}")
        if ds is not None:
            parts.append(f"date {ds}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
        self.table, self.column, self.ds = table, column, ds


class ConfigError(MtrecError):
    """Invalid configuration (names the key)."""

    exit_code = 2


class DataContractError(MtrecError):
    """Input data does not match the data contract (missing column, wrong type, bad timestamp)."""


class DataValidationError(MtrecError):
    """A critical data-quality expectation failed for a ds partition."""


class WarehouseError(MtrecError):
    """The warehouse cannot be reached or a statement failed."""


class ModelError(MtrecError):
    """A model artifact is missing, corrupt, or incompatible."""


class StageError(MtrecError):
    """A pipeline stage cannot run (e.g. missing upstream data)."""
