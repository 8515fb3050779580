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


def whole_number(flag: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` when it is an int in [minimum, maximum]; else a UserError naming `flag` and the valid range."""
    valid = f"{minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                    and value > maximum):
        raise UserError(f"{flag} must be a whole number {valid}, got {value!r}")
    return value


def finite_number(flag: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a float when it is finite and within [minimum, maximum] (each bound optional)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (minimum is not None and number < minimum) or (
            maximum is not None and number > maximum):
        bounds = " ".join(b for b in (f"≥ {minimum:g}" if minimum is not None else "",
                                      f"≤ {maximum:g}" if maximum is not None else "") if b)
        raise UserError(f"{flag} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return number


def one_of(flag: str, value, choices) -> None:
    """A UserError naming `flag` and the valid choices unless `value` is one of them."""
    if value not in tuple(choices):
        raise UserError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _existing(path: pathlib.Path, flag: str) -> None:
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {str(path)!r} is a broken symbolic link (or a loop of them)")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file or directory")


def readable_file(path, flag: str) -> pathlib.Path:
    """`path` as a Path when it is a readable regular file; else a UserError/FileNotFoundError naming `flag`."""
    path = pathlib.Path(path)
    _existing(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory; give a file")
    if not path.is_file():
        raise UserError(f"{flag} {str(path)!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {str(path)!r} is not readable")
    return path


def readable_dir(path, flag: str) -> pathlib.Path:
    """`path` as a Path when it is a readable directory; else a UserError/FileNotFoundError naming `flag`."""
    path = pathlib.Path(path)
    _existing(path, flag)
    if not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file; give a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r} is not readable")
    return path


def check_dtype(flag: str, value, choices=("float32", "bfloat16")) -> None:
    """A compute/storage dtype name from `choices`."""
    one_of(flag, value, choices)


def check_mesh(flag: str, spec) -> None:
    """A mesh spec such as 'fsdp=8' or 'data=-1,sequence=4' (syntax and axis names; sizes are matched to the
    devices when the mesh is built)."""
    if spec in (None, ""):
        return
    if not isinstance(spec, str):
        raise UserError(f"{flag} must be a string such as 'fsdp=8', got {spec!r}")
    from opensora_jax.parallel import MeshConfig  # imports jax: only when a mesh is given

    try:
        MeshConfig.parse(spec)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def _converted_model(path: pathlib.Path) -> str | None:
    """The `model` of a converted checkpoint directory's config.json, None for anything else."""
    import json

    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and str(meta.get("format", "")).startswith("opensora_jax.converted"):
        return meta.get("model")
    return None


def check_checkpoint(path, flag: str, model: str | None = None, *, models=None) -> None:
    """A checkpoint path before anything loads: it exists (or is a hub id, left to the loader), and a
    converted directory holds `model` (or one of `models`), not another model's weights."""
    text = str(path)
    local = pathlib.Path(text)
    if not local.exists() and not local.is_symlink() and text.count("/") == 1 and not text.startswith((".", "/")):
        return  # "org/name": a hub id looked up in the local cache by the loader
    _existing(local, flag)
    if not os.access(local, os.R_OK):
        raise UserError(f"{flag} {text!r} is not readable")
    wanted = tuple(models or ((model,) if model else ()))
    found = _converted_model(local) if local.is_dir() else None
    if wanted and found is not None and found not in wanted:
        raise UserError(f"{flag} {text!r} holds a converted {found!r} checkpoint, not {' or '.join(wanted)}")


def check_csv(path, flag: str, required=("path", "text")) -> list[str]:
    """A readable UTF-8 CSV whose header has the `required` columns; returns the header. Reads the header only."""
    import csv

    path = readable_file(path, flag)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            head = f.read(1 << 16)
    except UnicodeDecodeError:
        raise UserError(f"{flag} {str(path)!r} is not UTF-8 text (a CSV with a header: "
                        f"{', '.join(required)}, ...)") from None
    if "\x00" in head:
        raise UserError(f"{flag} {str(path)!r} is a binary file, not a CSV")
    lines = head.splitlines()
    header = next(csv.reader(lines[:1]), []) if lines else []
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{flag} {str(path)!r} lacks the column(s) {', '.join(missing)}; a training CSV's header "
                        f"starts {','.join(required)}, got {','.join(header) or '(empty file)'}")
    return header


def one_line_errors(parser):
    """Makes `parser` report a bad command line as one `error: ...` line on stderr (exit status 2), as the
    CLIs report every other user mistake, instead of argparse's usage block. Returns the parser."""
    import sys

    def error(message: str):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser
