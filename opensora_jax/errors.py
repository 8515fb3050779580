"""Exceptions that separate the user's mistakes from our own bugs.

The CLIs print a `UserError` as one `error: ...` line and exit with status 2; any other exception keeps its
traceback, because it is a bug of ours. `UserError` subclasses ValueError so callers that catch ValueError
keep working.
"""

from __future__ import annotations

from collections.abc import Sequence


class UserError(ValueError):
    """A bad flag, config value, input file or checkpoint: something the user can fix."""


class CheckpointError(UserError):
    """Every problem found while matching checkpoint arrays to a module, one per line (`.problems`)."""

    def __init__(self, problems: Sequence[str], context: str = "checkpoint"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{context}: {len(self.problems)} problem(s):\n{lines}")
