"""Resolution × frame-count buckets and the per-epoch batch plan (spec §8.2).

A bucket config maps a resolution name to frame-count buckets:

    {"240p": {1: (0.3, 297), 51: (0.4, 20), 102: ((0.4, 0.33), 10)}, ...}

Each value is (keep_prob, batch_size); keep_prob is p_res, or a pair (p_res, p_T). T = 1 is the image
bucket. A bucket whose p_res is 0 may have batch_size None (it never receives a sample).

Assignment of a sample (t frames, h×w pixels, row id) follows the reference's `Bucket.get_bucket_id`,
draw for draw, so the same seed gives the same buckets as the reference:

  * resolutions are tried by pixel budget, largest first; one is skipped when h·w < 0.8·budget;
  * an image (t == 1) needs a `1` entry there and is kept with probability p;
  * a video tries that resolution's frame buckets, longest first: a bucket is passed over with
    probability 1 − p_T, else taken when t > T·frame_interval (strictly; the `1` entry never takes a
    video); the resolution is then kept with probability p_res, otherwise the next smaller resolution
    is tried (not a shorter bucket of the same resolution);
  * every draw for bucket (res, T) comes from a fresh `np.random.default_rng(seed + epoch +
    id·num_bucket + bucket_index)`, where bucket_index numbers the (res, T) pairs in trial order and
    num_bucket counts every (res, T, aspect-ratio) combination; with a pair (p_res, p_T) the p_T draw
    comes first and the p_res draw second from the same generator;
  * the aspect-ratio key is that resolution's table key closest to h / w (keys are H/W numbers, or W:H names
    taken at their nominal ratio as Open-Sora 2.0 does).

The batch plan of an epoch groups the samples by (res, T, ar) bucket, shuffles each group, cuts it into
batches (dropping the tail that does not fill one) and shuffles the order of the batches, all with one
`np.random.default_rng(seed + epoch)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from opensora_jax.presets import RESOLUTIONS
from opensora_jax.errors import UserError

# A sample is kept at a resolution when it has at least this fraction of the resolution's pixel budget.
MIN_PIXEL_FRACTION = 0.8

ResolutionTable = Mapping[str, tuple[int, Mapping[str, tuple[int, int]]]]


class BucketKey(NamedTuple):
    """A bucket: resolution name, frame count, aspect-ratio key of that resolution's table."""

    resolution: str
    num_frames: int
    ar_key: str


class PlannedBatch(NamedTuple):
    """One batch of the plan: its bucket and the row ids of its samples."""

    bucket: BucketKey
    indices: tuple[int, ...]


class EpochPlan(NamedTuple):
    """This process's batches of one epoch, and each bucket's full shuffled member list (row ids,
    the dropped tail included), which orders substitutes for samples that fail to load."""

    batches: list[PlannedBatch]
    members: dict[BucketKey, list[int]]


def _probabilities(value, where: str) -> tuple[float, float | None]:
    """keep_prob → (p_res, p_T or None)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise UserError(f"{where}: keep_prob must be a number or a pair (p_res, p_T), got {value!r}")
        p_res, p_t = (_probability(v, where) for v in value)
        return p_res, p_t
    return _probability(value, where), None


def _probability(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise UserError(f"{where}: a keep probability must be a number in [0, 1], got {value!r}")
    return float(value)


def aspect_ratio_value(key: str) -> float:
    """H / W of a resolution table's aspect-ratio key: a number ("0.56", v1.2) or a W:H name ("16:9", 2.0)."""
    if ":" in key:
        w, h = (float(v) for v in key.split(":"))
        return h / w
    return float(key)


class Buckets:
    """A parsed bucket config. `resolutions` defaults to the v1.2 tables of `presets.RESOLUTIONS`."""

    def __init__(self, bucket_config: Mapping, *, frame_interval: int = 1, resolutions: ResolutionTable | None = None,
                 fps_max: float | None = None):
        self.resolutions_table = RESOLUTIONS if resolutions is None else resolutions
        if not isinstance(frame_interval, int) or frame_interval < 1:
            raise UserError(f"frame_interval must be a positive integer, got {frame_interval!r}")
        if fps_max is not None and not fps_max > 0:
            raise UserError(f"fps_max must be a number > 0 (or None), got {fps_max!r}")
        self.frame_interval = frame_interval
        self.fps_max = fps_max
        if not bucket_config:
            raise UserError("bucket_config is empty")
        for res in bucket_config:
            if res not in self.resolutions_table:
                raise UserError(
                    f"bucket_config: unknown resolution {res!r}; valid: {', '.join(self.resolutions_table)}"
                )
        # Trial order: pixel budget descending (ties keep the config's order), then T descending.
        self.resolutions = sorted(bucket_config, key=lambda r: self.resolutions_table[r][0], reverse=True)
        self._probs: dict[str, dict[int, tuple[float, float | None]]] = {}
        self._batch_sizes: dict[tuple[str, int], int | None] = {}
        self._index: dict[tuple[str, int], int] = {}
        self.num_bucket = 0
        for res in self.resolutions:
            entries = bucket_config[res]
            if not entries:
                raise UserError(f"bucket_config[{res!r}] has no frame buckets")
            self._probs[res] = {}
            for t in sorted(entries, reverse=True):
                where = f"bucket_config[{res!r}][{t!r}]"
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
                    raise UserError(f"{where}: frame counts must be positive integers")
                value = entries[t]
                if not isinstance(value, (tuple, list)) or len(value) != 2:
                    raise UserError(f"{where}: expected (keep_prob, batch_size), got {value!r}")
                probs = _probabilities(value[0], where)
                bs = value[1]
                if bs is None:
                    if probs[0] != 0:
                        raise UserError(f"{where}: batch_size None is only allowed with keep probability 0")
                elif isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
                    raise UserError(f"{where}: batch_size must be a positive integer, got {bs!r}")
                t = int(t)
                self._probs[res][t] = probs
                self._batch_sizes[(res, t)] = None if bs is None else int(bs)
                self._index[(res, t)] = len(self._index)
                self.num_bucket += len(self.resolutions_table[res][1])

    def __repr__(self) -> str:
        return f"Buckets({len(self._index)} (res, T) pairs, num_bucket={self.num_bucket})"

    def bucket_index(self, resolution: str, num_frames: int) -> int:
        """Position of (resolution, T) in trial order: the offset added to a sample's seed."""
        return self._index[(resolution, num_frames)]

    def interval(self, fps: float | None) -> int:
        """The frame interval of a video at `fps`: with `fps_max` (Open-Sora 2.0), ⌈fps / fps_max⌉ for faster
        videos (1 for the rest and when fps is unknown); otherwise the fixed `frame_interval`."""
        if self.fps_max is None:
            return self.frame_interval
        if fps is None or not math.isfinite(fps) or fps <= self.fps_max:
            return 1
        return math.ceil(fps / self.fps_max)

    def assign_bucket(
        self, t: int, h: int, w: int, sample_id: int, *, seed: int = 0, epoch: int = 0, fps: float | None = None
    ) -> BucketKey | None:
        """The bucket of a sample with t frames of h×w pixels (at `fps`), or None when no bucket keeps it."""
        base = seed + epoch + sample_id * self.num_bucket
        interval = self.interval(fps)
        pixels = h * w
        for res in self.resolutions:
            if pixels < self.resolutions_table[res][0] * MIN_PIXEL_FRACTION:
                continue
            chosen = self._choose(res, t, base, interval)
            if chosen is not None:
                ar_key = min(self.resolutions_table[res][1], key=lambda k: abs(aspect_ratio_value(k) - h / w))
                return BucketKey(res, chosen, ar_key)
        return None

    def _choose(self, res: str, t: int, base: int, interval: int) -> int | None:
        """The frame bucket of resolution `res` that keeps the sample, or None to try the next resolution."""
        buckets = self._probs[res]
        if t == 1:
            if 1 not in buckets:
                return None
            rng = np.random.default_rng(base + self._index[(res, 1)])
            return 1 if rng.random() < buckets[1][0] else None
        for bucket_t, (p_res, p_t) in buckets.items():
            rng = np.random.default_rng(base + self._index[(res, bucket_t)])
            if p_t is not None and rng.random() > p_t:
                continue
            if bucket_t != 1 and t > bucket_t * interval:
                return bucket_t if p_res >= 1 or rng.random() < p_res else None
        return None

    def shape(self, key: BucketKey) -> tuple[int, int, int]:
        """(T, H, W) of a bucket's batches."""
        h, w = self.resolutions_table[key.resolution][1][key.ar_key]
        return key.num_frames, h, w

    def batch_size(self, key: BucketKey) -> int:
        bs = self._batch_sizes[(key.resolution, key.num_frames)]
        if bs is None:
            raise ValueError(f"bucket {key} has batch_size None (keep probability 0) yet holds samples")
        return bs

    def group(
        self, samples: Iterable[tuple], *, seed: int = 0, epoch: int = 0
    ) -> dict[BucketKey, list[int]]:
        """(row id, t, h, w) or (row id, t, h, w, fps) for each sample → {bucket: row ids}, buckets in order of
        first appearance."""
        groups: dict[BucketKey, list[int]] = {}
        for sample_id, t, h, w, *fps in samples:
            key = self.assign_bucket(t, h, w, sample_id, seed=seed, epoch=epoch, fps=fps[0] if fps else None)
            if key is not None:
                groups.setdefault(key, []).append(sample_id)
        return groups


SHARD_MODES = ("rows", "batches")


def plan_epoch(
    groups: Mapping[BucketKey, list[int]],
    buckets: Buckets,
    *,
    seed: int = 0,
    epoch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shard: str = "rows",
) -> EpochPlan:
    """This process's batches of one epoch, deterministic from (groups, seed, epoch).

    shard="rows": every process gets the same bucket at every step and its own `batch_size` rows of a
        global batch of batch_size·process_count samples (what one SPMD train step over all hosts
        needs: same shapes everywhere).
    shard="batches": the reference's way: whole batches dealt round-robin (process p takes batches
        p, p + P, ...), the batch count cut to a multiple of P; processes may hold different shapes at
        the same step, so this suits independent per-process work such as feature extraction.
    """
    if shard not in SHARD_MODES:
        raise UserError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    rng = np.random.default_rng(seed + epoch)
    per_global_batch = process_count if shard == "rows" else 1
    members: dict[BucketKey, list[int]] = {}
    order: list[tuple[BucketKey, int]] = []  # (bucket, batch number within the bucket)
    for key, ids in groups.items():
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        members[key] = shuffled
        order += [(key, n) for n in range(len(shuffled) // (buckets.batch_size(key) * per_global_batch))]
    order = [order[i] for i in rng.permutation(len(order))]

    batches = []
    if shard == "rows":
        for key, n in order:
            bs = buckets.batch_size(key)
            start = (n * process_count + process_index) * bs
            batches.append(PlannedBatch(key, tuple(members[key][start : start + bs])))
    else:
        order = order[: len(order) - len(order) % process_count]
        for key, n in order[process_index::process_count]:
            bs = buckets.batch_size(key)
            batches.append(PlannedBatch(key, tuple(members[key][n * bs : (n + 1) * bs])))
    return EpochPlan(batches, members)


def scale_batch_sizes(bucket_config: Mapping, factor: int) -> dict:
    """A copy of bucket_config with every batch size multiplied by `factor` (e.g. local devices per
    process, to turn the reference's per-GPU sizes into per-process sizes)."""
    return {
        res: {t: (p, None if bs is None else bs * factor) for t, (p, bs) in entries.items()}
        for res, entries in bucket_config.items()
    }
