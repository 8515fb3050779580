"""Checks of user-given values shared by the CLIs and pipelines, each failing with a UserError that names the
flag and what would be valid."""

from __future__ import annotations

import math
import os
import pathlib

from opensora_jax.errors import UserError


def positive_number(flag: str, value) -> float:
    """`value` as a float when it is a finite number > 0; else a UserError naming `flag`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{flag} must be a finite number > 0, got {value!r}")
    return number


def check_writable_dir(path, flag: str) -> None:
    """A directory that exists and is writable, or can be created: its nearest existing ancestor is a
    writable directory."""
    path = pathlib.Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{flag} {str(path)!r}: {str(probe)!r} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"has a parent {str(probe)!r} that is not a directory"
        raise UserError(f"{flag} {str(path)!r} {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: {str(probe)!r} is not writable")
