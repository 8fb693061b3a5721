"""The VerticalsError hierarchy: the only exception types the apps raise on bad input or configuration."""

from __future__ import annotations


class VerticalsError(Exception):
    """Base class of every error the suite reports to a user as a one-line message."""


class ConfigError(VerticalsError, ValueError):
    """An invalid configuration value: the message names the field, what was expected and what was given."""


class InputValidationError(VerticalsError, ValueError):
    """Input data that breaks a rule of its schema (names the file/row/column and the expected value)."""


class AdapterError(VerticalsError):
    """A source that cannot be read (unreadable file, wrong format); wraps the third-party error."""


class NotFittedError(VerticalsError, ValueError, AttributeError):
    """A predictor used before `fit` or `load`."""
