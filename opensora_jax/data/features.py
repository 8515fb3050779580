"""Precomputed features: VAE latents and T5 embeddings stored per batch, read back as training batches.

Layout on disk (one writer = one `name`; several writers, e.g. one per process, share a directory):

    ROOT/{name}-{k:06d}.npz     one batch: latent, y, mask, num_frames, height, width, fps, ar, index
    ROOT/{name}.index.json      {"version": 1, "shards": [{"file", "batch_size", "latent_shape"}, ...]}

Every file is written under a temporary name and renamed, so a reader never sees a partial one.
bfloat16 arrays (and other ml_dtypes) are stored as same-width unsigned integers and viewed back.

A read batch has the loader's keys with `latent` (B, T', H', W', C), `y` (B, L, C) and `mask` (B, L)
in place of `video` and `text`; num_frames, height, width, fps, ar float32 (B,) and index int64 (B,)
are as written.

Encoding a dataset once (one epoch of the training loader through the frozen VAE and T5) is the CLI
`python -m opensora_jax.cli.features` (`opensora-features`); then `python train.py ... --features OUT_DIR`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Callable, Iterable, Mapping

import grain
import ml_dtypes
import numpy as np

from opensora_jax.data.buckets import SHARD_MODES
from opensora_jax.data.loader import EpochIterator, default_process
from opensora_jax.errors import UserError

FORMAT_VERSION = 1
INDEX_SUFFIX = ".index.json"
_DTYPE_PREFIX = "__dtype__"  # npz entry holding the real dtype of an array stored as raw unsigned ints
CARRIED_KEYS = ("num_frames", "height", "width", "fps", "ar", "index")
NULL_TEXT_FILE = "null_text.npz"  # Open-Sora 2.0 features: the encodings of "" that text dropout swaps in


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

    def encode(batch):
        y, mask = encode_text([str(t) for t in batch["text"]])
        return {"latent": encode_video(batch["video"]), "y": y, "mask": mask}

    return write_feature_batches(batches, out_dir, encode, name=name, max_batches=max_batches)


def write_feature_batches(
    batches: Iterable[Mapping[str, np.ndarray]],
    out_dir,
    encode: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    *,
    name: str = "features",
    max_batches: int | None = None,
) -> str:
    """Like `write_features` with any encoder: `encode(batch)` returns the arrays to store ({name: (B, ...)}, one
    of them `latent`); the loader's CARRIED_KEYS are stored beside them. Returns the index path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not name or os.sep in name:
        raise UserError(f"name must be a plain file-name prefix, got {name!r}")
    shards = []
    for k, batch in enumerate(batches):
        if max_batches is not None and k >= max_batches:
            break
        b = len(batch["video"])
        encoded = {key: np.asarray(arr) for key, arr in encode(batch).items()}
        entries = {}
        for key, arr in encoded.items():
            if arr.shape[0] != b:
                raise ValueError(f"{key} has batch dimension {arr.shape[0]}, expected {b} (shape {arr.shape})")
            entries.update(_encodable(key, arr))
        entries.update({key: np.asarray(batch[key]) for key in CARRIED_KEYS if key in batch})
        file = f"{name}-{k:06d}.npz"
        _atomic_write(os.path.join(out_dir, file), functools.partial(_save_npz, entries=entries))
        shards.append({"file": file, "batch_size": b, "latent_shape": list(encoded["latent"].shape)})
    index = {"version": FORMAT_VERSION, "shards": shards}
    path = os.path.join(out_dir, name + INDEX_SUFFIX)
    _atomic_write(path, lambda f: f.write(json.dumps(index, indent=1).encode()))
    return path


def write_arrays(path, arrays: Mapping[str, np.ndarray]) -> None:
    """One .npz of named arrays, written atomically (e.g. the null text encodings beside 2.0 features)."""
    entries = {}
    for key, arr in arrays.items():
        entries.update(_encodable(key, np.asarray(arr)))
    _atomic_write(os.fspath(path), functools.partial(_save_npz, entries=entries))


def load_null_text(root) -> tuple[np.ndarray, np.ndarray]:
    """(null_txt (1, L, D), null_vec (1, D')) stored beside Open-Sora 2.0 features (`cli/features_v2_0.py`)."""
    path = os.path.join(os.fspath(root), NULL_TEXT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: these are not Open-Sora 2.0 features (write them with "
                        "python -m opensora_jax.cli.features_v2_0)")
    arrays = load_shard(path)
    return arrays["null_txt"], arrays["null_vec"]


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
            raise UserError(f"{path!r}: unsupported feature index version {index.get('version')!r}")
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
            raise UserError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
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
                    raise UserError(
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
