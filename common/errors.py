"""Typed errors that say what was expected and what was received."""

from __future__ import annotations


class CldlrError(Exception):
    """Base class of every error cldlr raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(CldlrError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class SchemaError(CldlrError, ValueError):
    """A federation schema file is invalid."""


class ContractError(CldlrError, ValueError):
    """A site folder does not follow the data contract; carries the full validation report."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class ImageReadError(CldlrError, OSError):
    """An image or mask file cannot be decoded."""
