"""Precomputed features: VAE latents and T5 embeddings stored per batch, read back as training batches.

Layout on disk (one writer = one `name`; several writers, e.g. one per process, share a directory):

    ROOT/{name}-{k:06d}.npz     one batch: latent, y, mask, num_frames, height, width, fps, ar, index
    ROOT/{name}.index.json      {"version": 1, "shards": [{"file", "batch_size", "latent_shape"}, ...]}

Every file is written under a temporary name and renamed, so a reader never sees a partial one.
bfloat16 arrays (and other ml_dtypes) are stored as same-width unsigned integers and viewed back.

A read batch has the loader's keys with `latent` (B, T', H', W', C), `y` (B, L, C) and `mask` (B, L)
in place of `video` and `text`; num_frames, height, width, fps, ar float32 (B,) and index int64 (B,)
are as written.

Encoding a dataset once (one epoch of the training loader through the frozen VAE and T5):

    python -m opensora_jax.data.features --csv data/train.csv --vae ckpt/vae --t5 ckpt/t5 OUT_DIR
    python train.py --config ... --features OUT_DIR
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping

import grain
import ml_dtypes
import numpy as np

from opensora_jax.data.buckets import SHARD_MODES
from opensora_jax.data.loader import EpochIterator, default_process

FORMAT_VERSION = 1
INDEX_SUFFIX = ".index.json"
_DTYPE_PREFIX = "__dtype__"  # npz entry holding the real dtype of an array stored as raw unsigned ints
CARRIED_KEYS = ("num_frames", "height", "width", "fps", "ar", "index")


def _encodable(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """npz entries for one array; ml_dtypes (bfloat16, ...) are stored as raw bits plus their dtype name."""
    if array.dtype.type.__module__.startswith("ml_dtypes"):
        raw = array.view(f"u{array.dtype.itemsize}")
        return {name: raw, _DTYPE_PREFIX + name: np.array(array.dtype.name)}
    return {name: array}


def _decoded(npz) -> dict[str, np.ndarray]:
    out = {k: npz[k] for k in npz.files if not k.startswith(_DTYPE_PREFIX)}
    for k in npz.files:
        if k.startswith(_DTYPE_PREFIX):
            name = k[len(_DTYPE_PREFIX) :]
            out[name] = out[name].view(np.dtype(getattr(ml_dtypes, str(npz[k]))))
    return out


def _atomic_write(path: str, write: Callable) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_npz(f, entries: Mapping[str, np.ndarray]) -> None:
    np.savez(f, **entries)


def write_features(
    batches: Iterable[Mapping[str, np.ndarray]],
    out_dir,
    encode_video: Callable[[np.ndarray], np.ndarray],
    encode_text: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    *,
    name: str = "features",
    max_batches: int | None = None,
) -> str:
    """Encode loader batches and write one .npz per batch plus `{name}.index.json`; returns the index path.

    encode_video: video (B, T, H, W, 3) → latent (B, T', H', W', C).
    encode_text: B captions → (y (B, L, C), mask (B, L)).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not name or os.sep in name:
        raise ValueError(f"name must be a plain file-name prefix, got {name!r}")
    shards = []
    for k, batch in enumerate(batches):
        if max_batches is not None and k >= max_batches:
            break
        b = len(batch["video"])
        latent = np.asarray(encode_video(batch["video"]))
        y, mask = encode_text([str(t) for t in batch["text"]])
        y, mask = np.asarray(y), np.asarray(mask)
        for what, arr in (("latent", latent), ("y", y), ("mask", mask)):
            if arr.shape[0] != b:
                raise ValueError(f"{what} has batch dimension {arr.shape[0]}, expected {b} (shape {arr.shape})")
        entries = {}
        for key, arr in (("latent", latent), ("y", y), ("mask", mask)):
            entries.update(_encodable(key, arr))
        entries.update({key: np.asarray(batch[key]) for key in CARRIED_KEYS if key in batch})
        file = f"{name}-{k:06d}.npz"
        _atomic_write(os.path.join(out_dir, file), functools.partial(_save_npz, entries=entries))
        shards.append({"file": file, "batch_size": b, "latent_shape": list(latent.shape)})
    index = {"version": FORMAT_VERSION, "shards": shards}
    path = os.path.join(out_dir, name + INDEX_SUFFIX)
    _atomic_write(path, lambda f: f.write(json.dumps(index, indent=1).encode()))
    return path


def read_index(root) -> list[dict]:
    """Every shard listed by the *.index.json files under root (sorted by file name), paths made absolute."""
    root = os.fspath(root)
    indexes = sorted(glob.glob(os.path.join(glob.escape(root), "*" + INDEX_SUFFIX)))
    if not indexes:
        raise FileNotFoundError(f"no *{INDEX_SUFFIX} in {root!r}: write features there first")
    shards = []
    for path in indexes:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path!r}: unsupported feature index version {index.get('version')!r}")
        shards += [{**s, "file": os.path.join(root, s["file"])} for s in index["shards"]]
    return shards


def load_shard(path: str) -> dict[str, np.ndarray]:
    """One stored batch as a dict of arrays."""
    with np.load(path) as npz:
        return _decoded(npz)


class _LoadShard:
    """grain map: (file, row slice) → batch dict."""

    def __call__(self, item: tuple[str, int, int]) -> dict:
        path, start, stop = item
        return {k: v[start:stop] for k, v in load_shard(path).items()}


class FeatureLoader:
    """Stored feature batches, epoch after epoch, in an order shuffled per epoch by (seed + epoch).

    shard="batches": process p takes batches p, p + P, ... (the count cut to a multiple of P);
    shard="rows": every process reads every batch and keeps its B / P rows (B must divide by P).
    Iterators have get_state()/set_state() like the video loader's.
    """

    def __init__(
        self,
        root,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        num_workers: int = 0,
        num_threads: int = 1,
        prefetch: int = 2,
        process_index: int | None = None,
        process_count: int | None = None,
        shard: str = "batches",
    ):
        if shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
        self.shards = read_index(root)
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.num_workers = num_workers
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.process_index, self.process_count = default_process(process_index, process_count)
        self.shard = shard
        if shard == "rows":
            for s in self.shards:
                if s["batch_size"] % self.process_count:
                    raise ValueError(
                        f"{s['file']}: batch size {s['batch_size']} does not divide by process_count "
                        f"{self.process_count} (use shard='batches')"
                    )

    def plan(self, epoch: int) -> list[tuple[str, int, int]]:
        """This process's (file, first row, end row) items of `epoch`, in order."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self.shards))
        p, n = self.process_index, self.process_count
        if self.shard == "batches":
            order = order[: len(order) - len(order) % n][p::n]
            return [(self.shards[i]["file"], 0, self.shards[i]["batch_size"]) for i in order]
        items = []
        for i in order:
            rows = self.shards[i]["batch_size"] // n
            items.append((self.shards[i]["file"], p * rows, (p + 1) * rows))
        return items

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    def epoch_dataset(self, epoch: int) -> grain.MapDataset:
        return grain.MapDataset.source(self.plan(epoch)).map(_LoadShard())

    def __iter__(self) -> EpochIterator:
        return EpochIterator(
            self.epoch_dataset,
            fingerprint={
                "seed": self.seed,
                "shuffle": self.shuffle,
                "process_index": self.process_index,
                "process_count": self.process_count,
                "shard": self.shard,
                "num_shards": len(self.shards),
            },
            num_epochs=self.num_epochs,
            num_workers=self.num_workers,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
        )


# ---------------------------------------------------------------------------------------------------------
# CLI: python -m opensora_jax.data.features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.data.features",
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
        raise ValueError(f"OUT_DIR {out_dir!r} exists and is not a directory")
    existing = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if existing and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir!r} is not empty ({len(existing)} entries, e.g. {existing[0]!r}); "
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.csv):
        raise FileNotFoundError(f"--csv {args.csv!r} does not exist (or is not a file)")
    from convert.registry import resolve_checkpoint

    vae_path = resolve_checkpoint(args.vae, "--vae checkpoint")
    t5_path = resolve_checkpoint(args.t5, "--t5 checkpoint")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} does not exist")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max-batches must be at least 1, got {args.max_batches}")
    if not args.name or os.sep in args.name or args.name.startswith("."):
        raise ValueError(f"--name must be a plain file-name prefix, got {args.name!r}")
    bucket_config = args.bucket_config
    if bucket_config.lstrip().startswith("{"):
        try:
            bucket_config = json.loads(bucket_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--bucket-config is not valid JSON: {e}") from None
    _check_out_dir(args.out_dir, args.name, args.overwrite)

    import jax.numpy as jnp

    from opensora_jax.pipeline import default_tokenizer_dir
    from opensora_jax.text import TextEncoder
    from opensora_jax.training.loop import BatchEncoder, make_video_loader

    loader = make_video_loader(args.csv, bucket_config, resolutions=args.resolutions, seed=args.seed,
                               frame_interval=args.frame_interval, num_workers=args.num_workers, num_epochs=1)
    planned = loader.plan(0).batches
    if args.max_batches is not None:
        planned = planned[: args.max_batches]
    if not planned:
        raise ValueError(f"{args.csv}: no batches to encode: too few usable samples for any bucket's batch size "
                         f"(bucket config {args.bucket_config!r}; CSV rows skipped: {loader.skipped or 'none'})")
    total, samples = len(planned), sum(len(b.indices) for b in planned)
    print(f"{args.csv}: {len(loader.dataset.samples)} usable rows → {total} batches ({samples} samples) in "
          f"{len(collections.Counter(b.bucket for b in planned))} buckets", flush=True)

    dtype = jnp.dtype(args.dtype)
    from convert.registry import load_model

    started = time.perf_counter()
    vae, _ = load_model("vae", vae_path, dtype=dtype)
    tokenizer = args.tokenizer or default_tokenizer_dir(t5_path)
    t5_dtype = jnp.dtype(args.t5_dtype)
    text_encoder = TextEncoder.from_pretrained(tokenizer, t5_path, model_max_length=args.model_max_length,
                                               dtype=t5_dtype, param_dtype=t5_dtype)
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


if __name__ == "__main__":
    # The package __init__ has already imported this module as opensora_jax.data.features: run that copy.
    from opensora_jax.config_utils import run_cli
    from opensora_jax.data import features

    sys.exit(run_cli(features.main))
