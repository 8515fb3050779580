"""python -m convert MODEL SRC OUT_DIR: reference PyTorch weights → orbax checkpoint + config.json."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax.numpy as jnp

from convert.keymap import ConversionError
from convert.registry import CONVERTERS, converter, load_flat
from opensora_jax.checkpoints import save_converted
from opensora_jax.checks import check_writable_dir
from opensora_jax.config_utils import console_entry, run_cli
from opensora_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a reference Open-Sora / transformers checkpoint into an opensora_jax checkpoint "
        "directory (orbax params/ + config.json). Every source key must be consumed and every parameter "
        "filled; all problems are reported at once. Output is written to a temporary directory and renamed "
        "into place only when complete.",
    )
    parser.add_argument("model", choices=sorted(CONVERTERS), help="which model the checkpoint holds")
    parser.add_argument("src", help="a .safetensors file, a *.safetensors.index.json of a sharded set, or a "
                        "directory holding either (a config.json beside it sets the architecture)")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored parameters (default: float32)")
    parser.add_argument("--config", default=None,
                        help="JSON file with the architecture (reference config kwargs); default: read from "
                        "the source directory's config.json, else the released architecture")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .pt/.pth/.bin/.ckpt pickle checkpoints; pickle can execute code, so only "
                        "for files you trust")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: not valid JSON: {e}") from None


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
    shown = error.problems[:10] + [f"... and {len(error.problems) - 10} more"]
    return ConversionError(shown + [
        "so many mismatches usually mean the architecture is wrong: put the model's config.json beside SRC "
        "or pass --config FILE"], f"converting {args.src} as {args.model}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_paths(args)
    module = converter(args.model)
    config = _read_config(args.config) if args.config else module.config_from_source(args.src)
    start = time.time()
    abstract = module.abstract_model(config, jnp.dtype(args.dtype))
    try:
        flat = load_flat(module, args.src, config, abstract, dtype=jnp.dtype(args.dtype),
                         allow_pickle=args.allow_pickle)
    except ConversionError as e:
        raise _with_hint(e, args) from None
    out = save_converted(args.out_dir, flat, config=config, model=args.model, overwrite=args.overwrite,
                         extra_meta={"source": str(args.src), "dtype": args.dtype})
    if hasattr(module, "after_save"):
        copied = module.after_save(args.src, out)
        if copied:
            print(f"copied {', '.join(copied)} into {out / 'tokenizer'}")
    n_params = sum(a.size for a in flat.values())
    print(f"converted {len(flat)} arrays ({n_params:,} values, {args.dtype}) from {args.src} → {out} "
          f"in {time.time() - start:.1f}s")
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
