"""python -m convert MODEL SRC OUT_DIR: reference PyTorch weights → converted checkpoint (params/ + config.json).

The source is planned whole first (every problem reported at once, nothing written), then streamed: each
tensor is read, transformed, cast and written before the next is read, so memory stays at about one tensor
whatever the model's size.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax.numpy as jnp

from convert.checkpoint import convert_to_dir, streams
from convert.keymap import ConversionError
from convert.registry import CONVERTERS, converter, load_flat
from opensora_jax.checkpoints import save_converted
from opensora_jax.tensor_files import open_source
from opensora_jax.checks import check_writable_dir, one_line_errors
from opensora_jax.config_utils import console_entry, run_cli
from opensora_jax.errors import CheckpointError, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a reference Open-Sora / transformers checkpoint into an opensora_jax checkpoint "
        "directory (params/ as sharded safetensors + config.json). Every source key must be consumed and every "
        "parameter filled; all problems are reported at once, before anything is written. Tensors are then "
        "converted and written one at a time, to a temporary directory renamed into place only when complete.",
    )
    parser.add_argument("model", choices=sorted(CONVERTERS), help="which model the checkpoint holds")
    parser.add_argument("src", help="a .safetensors file, a *.safetensors.index.json of a sharded set, or a "
                        "directory holding either (a config.json beside it sets the architecture)")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored parameters (default: float32)")
    parser.add_argument("--config", default=None,
                        help="JSON file with the architecture (reference config kwargs, or a parity fixture's "
                        "case.json); default: read from the source directory's config.json, else the released "
                        "architecture")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .pt/.pth/.bin/.ckpt pickle checkpoints; pickle can execute code, so only "
                        "for files you trust")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _read_config(path: str) -> dict:
    """The architecture JSON of --config: reference config kwargs, or a fixture's case.json (its `config`)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a JSON object of architecture fields, got {type(config).__name__}")
    if "component" in config and isinstance(config.get("config"), dict):  # a parity fixture's case.json
        return config["config"]
    return config


def _wrong_model(error: ConversionError, args) -> UserError | None:
    """One line when SRC's keys and the model's do not meet at all (another model's checkpoint), else None."""
    missing = [p for p in error.problems if p.startswith("missing source key")]
    unused = [p for p in error.problems if p.startswith("unused source key")]
    other = [p for p in error.problems if not p.startswith(("missing source key", "unused source key",
                                                              "unfilled parameter", "... and "))]
    if other or not missing or len(error.problems) < 20:
        return None
    example = missing[0].rsplit(": ", 1)[-1]
    found = f"; it holds keys such as {unused[0].split(': ', 1)[1].split(' ')[0]}" if unused else ""
    return UserError(f"SRC {args.src!r} does not hold a {args.model} checkpoint: {len(missing)} of the keys one has "
                     f"are missing (e.g. {example}){found}; give the model it holds (one of "
                     f"{', '.join(sorted(CONVERTERS))}) or, if it is a {args.model}, its architecture with --config FILE")


def _check_paths(args) -> None:
    """SRC readable and OUT_DIR free (or --overwrite) before a single tensor is read."""
    if not pathlib.Path(args.src).exists():
        raise FileNotFoundError(f"SRC {args.src!r}: no such file or directory")
    if args.config and not pathlib.Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config!r}: no such file")
    out = pathlib.Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT_DIR {args.out_dir!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"OUT_DIR {args.out_dir!r} is not empty; pass --overwrite to replace it")
    check_writable_dir(out, "OUT_DIR")


def _with_hint(error: ConversionError, args) -> ConversionError:
    """Many problems at once usually mean the architecture guessed for SRC is not the checkpoint's."""
    if args.config or len(error.problems) < 20:
        return error
    wrong = _wrong_model(error, args)
    if wrong is not None:
        return wrong
    shown = error.problems[:10] + [f"... and {len(error.problems) - 10} more"]
    return ConversionError(shown + [
        "so many mismatches usually mean the architecture is wrong: put the model's config.json beside SRC "
        "or pass --config FILE"], f"converting {args.src} as {args.model}")


def main(argv=None) -> int:
    args = one_line_errors(build_parser()).parse_args(argv)
    _check_paths(args)
    module = converter(args.model)
    try:
        config = _read_config(args.config) if args.config else module.config_from_source(args.src)
    except CheckpointError as e:
        if len(e.problems) != 1:
            raise
        raise UserError(str(e).replace(":\n  - ", ": ").replace("1 problem(s): ", "")) from None
    except ValueError as e:  # the architecture read off SRC's shapes is not a valid one
        raise UserError(f"SRC {args.src!r}: {e}") from None
    start = time.time()
    dtype = jnp.dtype(args.dtype)
    abstract = module.abstract_model(config, dtype)
    meta = {"source": str(args.src), "dtype": args.dtype}
    # The converted model's architecture, where conversion changes it (e.g. MMDiT's fused → unfused layout).
    stored = module.converted_config(config) if hasattr(module, "converted_config") else config
    try:
        if streams(module):
            opener = getattr(module, "open_reference", open_source)
            with opener(args.src, allow_pickle=args.allow_pickle) as source:
                out, layout = convert_to_dir(module.table(config), source, abstract, args.out_dir, config=stored,
                                             model=args.model, dtype=dtype, extra_meta=meta, overwrite=args.overwrite)
            shapes = [shape for _, shape in layout.values()]
        else:  # a converter that only offers a whole-model load_params: the model is held in memory
            flat = load_flat(module, args.src, config, abstract, dtype=dtype, allow_pickle=args.allow_pickle)
            out = save_converted(args.out_dir, flat, config=stored, model=args.model, overwrite=args.overwrite,
                                 extra_meta=meta)
            shapes = [a.shape for a in flat.values()]
            del flat
    except ConversionError as e:
        raise _with_hint(e, args) from None
    if hasattr(module, "after_save"):
        copied = module.after_save(args.src, out)
        if copied:
            print(f"copied {', '.join(copied)} into {out / 'tokenizer'}")
    n_params = sum(math.prod(shape) for shape in shapes)
    print(f"converted {len(shapes)} arrays ({n_params:,} values, {args.dtype}) from {args.src} → {out} "
          f"in {time.time() - start:.1f}s")
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
