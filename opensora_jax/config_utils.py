"""Loading ml_collections config files and applying `--config.a.b=value` overrides (no absl needed)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import signal
import sys
import warnings

import ml_collections

from opensora_jax.errors import UserError


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Runs `get_config()` of a Python config file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} defines no get_config()")
    return module.get_config()


def _parse_value(text: str, current):
    """Parses an override string into the type of the field it replaces."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return type(current)(text) if not (isinstance(current, int) and "." in text) else float(text)
    if isinstance(current, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Sets dotted fields (`{"scheduler.cfg_scale": "4.5"}`), keeping each field's type. Unknown fields raise."""
    for dotted, text in overrides.items():
        node, *parents = config, *dotted.split(".")[:-1]
        for name in parents:
            if name not in node:
                raise UserError(f"config has no field {dotted!r} (no {name!r})")
            node = node[name]
        leaf = dotted.split(".")[-1]
        if leaf not in node:
            raise UserError(f"config has no field {dotted!r}; fields here: {sorted(node.keys())}")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, TypeError) as e:
            raise UserError(f"--config.{dotted}={text}: {e}") from None
    return config


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.x=y` / `--config.x y` arguments from the rest."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_from_cli(argv: list[str], parser, flags: dict[str, tuple], list_fields=frozenset()):
    """The CLIs' shared path: `--config FILE`, then `--config.a.b=v` overrides, then plain flags.

    `flags` maps "--flag" → (dotted config field, type, help); list fields collect repeated flags.
    Returns (config, parsed argparse namespace).
    """
    rest, overrides = split_config_overrides(argv)
    args = parser.parse_args(rest)
    config = load_config_file(args.config)
    apply_overrides(config, overrides)
    for flag, (field, _, _) in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = list(value) if field in list_fields else value
    return config, args


def config_parser(prog: str, description: str, config_help: str, flags: dict[str, tuple],
                  list_fields=frozenset(), *, config_required: bool = True):
    """An argparse parser with `--config FILE` (help `config_help`) and every flag of `flags` (see add_flags)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, default=None,
                        help=f"{config_help}; override any field with --config.FIELD=VALUE")
    add_flags(parser, flags, list_fields)
    from opensora_jax.checks import one_line_errors

    return one_line_errors(parser)


def add_flags(parser, flags: dict[str, tuple], list_fields=frozenset()) -> None:
    """Adds each "--flag" of `flags` with its help text and the config field it sets."""
    for flag, (field, kind, text) in flags.items():
        parser.add_argument(flag, type=kind, default=None, action="append" if field in list_fields else "store",
                            help=f"{text} [config: {field}]")


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


_python_formatwarning = warnings.formatwarning

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def _exit_on_interrupt(signum, frame) -> None:
    # Ending here, not by a KeyboardInterrupt raised wherever Python happens to be, avoids unwinding through
    # XLA's compiler (which can crash the process). Every file is written under a temporary name and renamed,
    # so nothing half-written is left under a final name; stale temporaries are removed by the next run.
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def run_cli(main, argv=None) -> int:
    """Runs a CLI's main(). The user's mistakes (`USER_ERRORS`: a UserError, a missing or existing file) print
    one `error: ...` line and give exit status 2; Ctrl-C prints `interrupted` and exits with 130; any other
    exception is ours and keeps its traceback."""
    previous = signal.signal(signal.SIGINT, _exit_on_interrupt) if _in_main_thread() else None
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (a cut prompt, unknown words, a fallback kernel) as one `warning: ...` line; others as
    Python prints them."""
    if category.__module__.startswith("opensora_jax"):
        return f"warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def console_entry(main):
    """A `[project.scripts]` entry point for `main`: the same code path as `python -m ...`."""

    def entry() -> None:
        sys.exit(run_cli(main))

    return entry
