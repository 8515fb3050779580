"""python -m opensora_jax.cli.features (opensora-features): encode a video dataset once into feature shards.

One epoch of the training loader (same CSV, buckets and seed as train.py) goes through the frozen VAE and T5
into OUT_DIR as one .npz per batch plus NAME.index.json (format: `opensora_jax.data.features`). Train from it
with `python train.py ... --features OUT_DIR`.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import time

import jax.numpy as jnp

import convert
from opensora_jax.checkpoints import resolve_checkpoint
from opensora_jax.checks import (check_checkpoint, check_csv, check_writable_dir, one_line_errors, one_of,
                                 whole_number)
from opensora_jax.config_utils import console_entry, run_cli
from opensora_jax.data.bucket_configs import NAMED_RESOLUTION_TABLES
from opensora_jax.data.features import INDEX_SUFFIX, load_shard, write_features
from opensora_jax.data.loader import make_video_loader
from opensora_jax.errors import UserError
from opensora_jax.text.t5 import TextEncoder
from opensora_jax.text.tokenizer import default_tokenizer_dir
from opensora_jax.training.loop import BatchEncoder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opensora-features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Encode a video dataset once: one epoch of the training loader (same CSV, buckets and seed as "
            "train.py) through the frozen VAE and T5, written to OUT_DIR as one .npz per batch plus "
            "NAME.index.json. Train from it with `python train.py ... --features OUT_DIR`.\n\n"
            "Batch k's latents are the VAE posterior sampled with the key train.py uses at step k when it "
            "encodes videos on the fly with the same seed, so (with --dtype = the config's vae_dtype) the "
            "features are exactly what that run would have encoded in its first epoch."),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the features into (created; must be "
                        "empty unless --overwrite)")
    parser.add_argument("--csv", required=True, help="training CSV (path, text, num_frames, height, width, fps, ...)")
    parser.add_argument("--vae", required=True, metavar="CKPT", help="VAE checkpoint: converted directory or "
                        "reference weights")
    parser.add_argument("--t5", required=True, metavar="CKPT", help="T5 encoder checkpoint: converted directory or "
                        "reference weights")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="T5 tokenizer directory (default: T5_DIR/"
                        "tokenizer if present, else the T5 checkpoint's directory)")
    parser.add_argument("--bucket-config", default="stage1", metavar="NAME",
                        help="bucket config: a name (stage1, stage2, stage3, synthetic) or a JSON literal "
                        "{res: {frames: [keep_prob, batch_size]}}; use the training run's (default stage1)")
    parser.add_argument("--resolutions", default="", metavar="NAME",
                        help="resolution table name (e.g. synthetic; default: the v1.2 table)")
    parser.add_argument("--frame-interval", type=int, default=1, metavar="N",
                        help="take every N-th frame of a clip (default 1)")
    parser.add_argument("--model-max-length", type=int, default=300, metavar="L",
                        help="T5 token length L of y (B, L, C) and mask (B, L); the STDiT3's model_max_length "
                        "(default 300)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="VAE weights and compute dtype, and the dtype latents are stored in; use the training "
                        "config's vae_dtype (default float32)")
    parser.add_argument("--t5-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="T5 weights and compute dtype, and the dtype of the stored y (default float32, as "
                        "train.py encodes captions)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of buckets, batch plan, crops and posterior samples; use the training run's "
                        "(default 0)")
    parser.add_argument("--name", default="shard", help="file prefix: NAME-000000.npz ..., NAME.index.json; give "
                        "each writer sharing OUT_DIR its own (default shard)")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N",
                        help="grain worker processes decoding videos (default 0: in this process)")
    parser.add_argument("--max-batches", type=int, default=None, metavar="N",
                        help="stop after N batches (default: the whole epoch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT_DIR, first deleting this NAME's earlier files (other "
                        "writers' files stay, and train.py --features reads every *.index.json there)")
    return parser


def _check_out_dir(out_dir: str, name: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"OUT_DIR {out_dir!r} exists and is not a directory")
    existing = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if existing and not overwrite:
        raise UserError(f"OUT_DIR {out_dir!r} is not empty ({len(existing)} entries, e.g. {existing[0]!r}); "
                         "choose another directory or pass --overwrite")
    ours = [f for f in existing if f == name + INDEX_SUFFIX or (f.startswith(name + "-") and f.endswith(".npz"))]
    for f in ours:
        os.remove(os.path.join(out_dir, f))
    others = [f for f in existing if f.endswith(INDEX_SUFFIX) and f not in ours]
    if others:
        print(f"note: {out_dir} also holds {others}; train.py --features reads those shards too", flush=True)


def _progress(batches, total: int, samples: int):
    """Yields the batches, printing a line each time one has been encoded and written."""
    start = last = time.perf_counter()
    for k, batch in enumerate(batches):
        yield batch
        now = time.perf_counter()
        done = k + 1
        mean = (now - start) / done
        eta = f", eta {mean * (total - done):.0f} s" if done > 1 else " incl. compile"
        print(f"batch {done}/{total}  {now - last:.2f} s  (mean {mean:.2f} s/batch{eta})  "
              f"video {tuple(batch['video'].shape)}", flush=True)
        last = now


def check_args(args) -> None:
    """Every flag and path, before the CSV's rows are read or a model loads (UserError naming the flag)."""
    check_csv(args.csv, "--csv")
    for flag, path, model in (("--vae", args.vae, "vae"), ("--t5", args.t5, "t5")):
        resolve_checkpoint(path, f"{flag} checkpoint")
        check_checkpoint(path, flag, model)
    if args.tokenizer is not None:
        check_checkpoint(args.tokenizer, "--tokenizer")
    if args.max_batches is not None:
        whole_number("--max-batches", args.max_batches, 1)
    whole_number("--frame-interval", args.frame_interval, 1)
    whole_number("--model-max-length", args.model_max_length, 1)
    whole_number("--seed", args.seed, 0)
    whole_number("--num-workers", args.num_workers, 0)
    if not args.name or os.sep in args.name or args.name.startswith("."):
        raise UserError(f"--name must be a plain file-name prefix, got {args.name!r}")
    if args.resolutions:
        one_of("--resolutions", args.resolutions, sorted(NAMED_RESOLUTION_TABLES))
    check_writable_dir(args.out_dir, "OUT_DIR")


def parse_bucket_config(text: str):
    """--bucket-config: a known name or a JSON literal."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--bucket-config is not valid JSON: {e}") from None
    return text  # a name: the loader checks it against bucket_configs (before any model loads)


def main(argv=None) -> int:
    args = one_line_errors(build_parser()).parse_args(argv)
    check_args(args)
    bucket_config = parse_bucket_config(args.bucket_config)
    vae_path = resolve_checkpoint(args.vae, "--vae checkpoint")
    t5_path = resolve_checkpoint(args.t5, "--t5 checkpoint")

    loader = make_video_loader(args.csv, bucket_config, resolutions=args.resolutions, seed=args.seed,
                               frame_interval=args.frame_interval, num_workers=args.num_workers, num_epochs=1)
    planned = loader.plan(0).batches
    if args.max_batches is not None:
        planned = planned[: args.max_batches]
    if not planned:
        raise UserError(f"{args.csv}: no batches to encode: too few usable samples for any bucket's batch size "
                         f"(bucket config {args.bucket_config!r}; CSV rows skipped: {loader.skipped or 'none'})")
    _check_out_dir(args.out_dir, args.name, args.overwrite)  # (with --overwrite removes this NAME's old files)
    total, samples = len(planned), sum(len(b.indices) for b in planned)
    print(f"{args.csv}: {len(loader.dataset.samples)} usable rows → {total} batches ({samples} samples) in "
          f"{len(collections.Counter(b.bucket for b in planned))} buckets", flush=True)

    dtype = jnp.dtype(args.dtype)
    started = time.perf_counter()
    vae, _ = convert.load_model("vae", vae_path, dtype=dtype)
    tokenizer = args.tokenizer or default_tokenizer_dir(t5_path)
    t5_dtype = jnp.dtype(args.t5_dtype)
    text_encoder = TextEncoder.from_pretrained(tokenizer, t5_path, model_max_length=args.model_max_length,
                                               dtype=t5_dtype, param_dtype=t5_dtype, load=convert.load_model)
    print(f"loaded VAE {vae_path} ({args.dtype}) and T5 {t5_path} ({args.t5_dtype}) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    encoder = BatchEncoder(vae, text_encoder, seed=args.seed)
    steps = itertools.count()  # write_features encodes batch k as the k-th call: posterior key (seed, k)
    started = time.perf_counter()
    with iter(loader) as iterator:
        index_path = write_features(
            _progress(itertools.islice(iterator, total), total, samples),
            args.out_dir,
            lambda video: encoder.encode_video(video, next(steps)),
            encoder.encode_text,
            name=args.name,
        )
    elapsed = time.perf_counter() - started

    with open(index_path, encoding="utf-8") as f:
        shards = json.load(f)["shards"]
    shapes = collections.Counter(tuple(s["latent_shape"]) for s in shards)
    first = load_shard(os.path.join(args.out_dir, shards[0]["file"]))
    print(f"wrote {len(shards)} shards ({sum(s['batch_size'] for s in shards)} samples) in {elapsed:.1f} s: "
          f"{index_path}")
    print("latent shapes (B, T', H', W', C): " + ", ".join(f"{list(s)} ×{n}" for s, n in sorted(shapes.items())))
    print(f"latent {first['latent'].dtype}, y {list(first['y'].shape[1:])} {first['y'].dtype}, "
          f"mask {list(first['mask'].shape[1:])} per sample")
    print(f"bad data: skipped {loader.skipped or 'none'}, substituted {loader.substitutions} samples", flush=True)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
