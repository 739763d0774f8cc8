"""User-facing errors: one line that names the problem and what to do, exit code 2."""

from __future__ import annotations


class LrsweepError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits with code 2."""

    exit_code = 2


class ConfigError(LrsweepError):
    """A study file or --set override is invalid."""


class DataError(LrsweepError):
    """The corpus cannot be read or is too small."""


class ModelError(LrsweepError):
    """The model cannot be found or loaded."""


class StudyError(LrsweepError):
    """The sweep's study or output folder is inconsistent."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that quote a cause."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
