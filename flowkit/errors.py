"""Exceptions raised by flowkit. Every message is a complete sentence.

The CLI maps `FlowkitError` subclasses to exit codes: bad input (recipes, arguments,
files) exits 2, failures at run time (`TrainingError`) exit 1.
"""

from __future__ import annotations

from nflows.transforms.base import InverseNotAvailable

__all__ = [
    "FlowkitError",
    "RecipeError",
    "UnknownPartError",
    "PluginError",
    "ShapeError",
    "DataError",
    "TrainingError",
    "InverseNotAvailable",
]


class FlowkitError(Exception):
    """Base class of every error flowkit raises on purpose."""

    exit_code = 2


class RecipeError(FlowkitError):
    """A recipe (TOML file, preset or ``--set`` override) is invalid.

    Carries every problem found, so a user fixes them in one pass.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = prefix + self.problems[0]
        else:
            message = f"{prefix}{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class UnknownPartError(FlowkitError):
    """A name is not registered under a kind of part."""

    def __init__(self, kind: str, name: str, available: list[str], suggestion: str | None) -> None:
        self.kind, self.name, self.available, self.suggestion = kind, name, available, suggestion
        hint = f' Did you mean "{suggestion}"?' if suggestion else ""
        names = ", ".join(available) if available else "none"
        super().__init__(f'"{name}" is not a registered {kind}.{hint} Available: {names}.')


class PluginError(FlowkitError):
    """A plugin is broken: duplicate registration, bad hook, bad name."""


class ShapeError(FlowkitError, ValueError):
    """A tensor or an image size does not fit a part."""


class DataError(FlowkitError):
    """A dataset file is missing, unreadable or of the wrong type."""


class TrainingError(FlowkitError):
    """Training failed at run time (NaN or Inf loss, and similar)."""

    exit_code = 1
