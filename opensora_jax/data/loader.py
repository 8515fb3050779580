"""The training data pipeline (grain): batches of one bucket shape each, checkpointable.

Each batch is a dict of numpy arrays (B = the bucket's batch size):

    video       float32 (B, T, H, W, 3)  in [-1, 1], channels-last
    text        str     (B,)             captions
    num_frames  float32 (B,)             T of the bucket
    height      float32 (B,)             H of the bucket
    width       float32 (B,)             W of the bucket
    fps         float32 (B,)             native fps // frame interval (fixed, or ⌈fps / fps_max⌉ per video); 120
                                         for images
    ar          float32 (B,)             H / W of the bucket
    index       int64   (B,)             CSV row id of each sample actually loaded

An epoch's batch plan (`buckets.plan_epoch`) is computed up front in the main process; grain maps each
planned batch to its arrays, in this process (num_workers=0) or in worker processes. A sample whose
file fails to decode is replaced by the next sample of its bucket's shuffled member list that loads,
and counted; the loader's `skipped` merges those counts with the rows the CSV reader dropped.

Iterator state is {"epoch", "batch"} (+ a fingerprint of the settings and the bad-file log), plain
JSON: a restored iterator yields exactly the batch that would have come next.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Mapping

import grain
import numpy as np

from opensora_jax.data import bucket_configs, csv_dataset
from opensora_jax.data.buckets import BucketKey, Buckets, EpochPlan, PlannedBatch, plan_epoch
from opensora_jax.data.csv_dataset import BadDataLog, CsvDataset, Sample
from opensora_jax.data.video import TooShortError, load_sample, sample_rng
from opensora_jax.errors import UserError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_FAILURES = "_failures"  # private batch entry: (k, 4) str rows (reason, row id, path, message)


def _prepare_worker_processes() -> None:
    # grain's worker processes read absl flags; in a program that never parsed them they would fail.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), each taken from JAX when None."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


class EpochIterator:
    """Iterates the batches of epoch after epoch; `make_dataset(epoch)` gives an epoch's grain MapDataset.

    State: {"version", "epoch", "batch" (batches of that epoch already yielded), **fingerprint,
    "extra"}. set_state refuses a state whose fingerprint (seed, sharding, ...) differs.
    """

    def __init__(
        self,
        make_dataset: Callable[[int], grain.MapDataset],
        *,
        fingerprint: Mapping,
        num_epochs: int | None = None,
        num_workers: int = 0,
        num_threads: int = 1,
        prefetch: int = 2,
        finish: Callable[[dict], dict] = lambda batch: batch,
        extra_state: Callable[[], dict] = dict,
        load_extra_state: Callable[[dict], None] = lambda extra: None,
    ):
        self._make_dataset = make_dataset
        self._fingerprint = dict(fingerprint)
        self._num_epochs = num_epochs
        self._num_workers = num_workers
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._mp_options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        self._finish = finish
        self._extra_state = extra_state
        self._load_extra_state = load_extra_state
        self.epoch = 0
        self.batch = 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._num_epochs is not None and self.epoch >= self._num_epochs:
                raise StopIteration
            if self._it is None:
                self._it = self._open(self.epoch, self.batch)
            try:
                batch = next(self._it)
            except StopIteration:
                self.close()
                self.epoch += 1
                self.batch = 0
                continue
            self.batch += 1
            return self._finish(batch)

    def _open(self, epoch: int, start: int):
        ds = self._make_dataset(epoch)
        if len(ds) == 0:
            raise UserError(
                f"epoch {epoch} has no batches: too few samples for any bucket's batch size "
                f"(settings: {self._fingerprint})"
            )
        it_ds = ds[start:].to_iter_dataset(self._read_options)
        if self._num_workers > 0:
            _prepare_worker_processes()
            it_ds = it_ds.mp_prefetch(self._mp_options)
        return iter(it_ds)

    def close(self) -> None:
        """Stop worker processes and prefetch threads (iteration may continue; they restart on demand)."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            **self._fingerprint,
            "extra": self._extra_state(),
        }

    def set_state(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"unsupported iterator state version {state.get('version')!r} (want {STATE_VERSION})")
        for key, value in self._fingerprint.items():
            if _jsonish(state.get(key)) != _jsonish(value):
                raise UserError(
                    f"iterator state was saved with {key}={state.get(key)!r}, this iterator has {key}={value!r}"
                )
        self.close()
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self._load_extra_state(state.get("extra", {}))


def _jsonish(value):
    """Tuples and lists compare equal (a state may have gone through JSON)."""
    if isinstance(value, (tuple, list)):
        return [_jsonish(v) for v in value]
    return value


class LoadBatch:
    """grain map: PlannedBatch → batch dict (see the module docstring). Runs in worker processes."""

    def __init__(
        self,
        samples: Mapping[int, Sample],
        buckets: Buckets,
        members: Mapping[BucketKey, list[int]],
        *,
        seed: int,
        epoch: int,
    ):
        self.samples = samples
        self.buckets = buckets
        self.members = members
        self.seed = seed
        self.epoch = epoch
        self._positions: dict[BucketKey, dict[int, int]] = {}

    def _load(self, index: int, shape: tuple[int, int, int]):
        sample = self.samples[index]
        t, h, w = shape
        return load_sample(
            sample.path,
            t,
            (h, w),
            frame_interval=self.buckets.interval(sample.fps),
            rng=sample_rng(self.seed, self.epoch, index),
            fallback_fps=sample.fps,
        )

    def _candidates(self, key: BucketKey, index: int):
        """Substitutes for a failed sample: the bucket's members after it, wrapping around."""
        members = self.members[key]
        if key not in self._positions:
            self._positions[key] = {m: p for p, m in enumerate(members)}
        start = self._positions[key][index]
        for k in range(1, len(members)):
            yield members[(start + k) % len(members)]

    def __call__(self, planned: PlannedBatch) -> dict:
        key = planned.bucket
        shape = self.buckets.shape(key)
        videos, fps, texts, loaded, failures = [], [], [], [], []
        for index in planned.indices:
            for candidate in itertools.chain((index,), self._candidates(key, index)):
                try:
                    video, f = self._load(candidate, shape)
                except Exception as e:  # noqa: BLE001 - a bad file must not end the run
                    failures.append(
                        (_reason(e), str(candidate), self.samples[candidate].path, f"{type(e).__name__}: {e}")
                    )
                    continue
                break
            else:
                raise RuntimeError(f"no sample of bucket {key} could be loaded (epoch {self.epoch})")
            videos.append(video)
            fps.append(f)
            texts.append(self.samples[candidate].text)
            loaded.append(candidate)
        t, h, w = shape
        b = len(loaded)
        return {
            "video": np.stack(videos),
            "text": np.array(texts, dtype=str),
            "num_frames": np.full(b, t, np.float32),
            "height": np.full(b, h, np.float32),
            "width": np.full(b, w, np.float32),
            "fps": np.array(fps, np.float32),
            "ar": np.full(b, h / w, np.float32),
            "index": np.array(loaded, np.int64),
            _FAILURES: np.array(failures, dtype=str).reshape(len(failures), 4),
        }


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return csv_dataset.MISSING
    if isinstance(error, TooShortError):
        return csv_dataset.TOO_SHORT
    return csv_dataset.DECODE_ERROR


class VideoLoader:
    """Batches of a CSV dataset bucketed by `bucket_config` (see buckets.py), one bucket shape per batch.

    dataset: a CsvDataset or the path of a CSV.
    bucket_config: a {res: {T: (keep_prob, batch_size)}} dict or a Buckets.
    seed: drives bucket assignment, the batch plan and the temporal crops (per sample: seed, epoch, id).
    num_epochs: None iterates forever.
    num_workers: grain worker processes (0 = load in this process); num_threads: loading threads per
        process; prefetch: batches buffered per worker / thread pool.
    process_index / process_count: this process's share of the plan (default: JAX's); shard: "rows"
        or "batches", see `buckets.plan_epoch`.
    """

    def __init__(
        self,
        dataset: CsvDataset | str,
        bucket_config: Mapping | Buckets,
        *,
        seed: int = 0,
        num_epochs: int | None = None,
        frame_interval: int = 1,
        resolutions=None,
        fps_max: float | None = None,
        num_workers: int = 0,
        num_threads: int = 1,
        prefetch: int = 2,
        process_index: int | None = None,
        process_count: int | None = None,
        shard: str = "rows",
    ):
        self.dataset = dataset if isinstance(dataset, CsvDataset) else CsvDataset(dataset)
        if isinstance(bucket_config, Buckets):
            self.buckets = bucket_config
        else:
            self.buckets = Buckets(bucket_config, frame_interval=frame_interval, resolutions=resolutions,
                                   fps_max=fps_max)
        self.seed = seed
        self.num_epochs = num_epochs
        self.num_workers = num_workers
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.process_index, self.process_count = default_process(process_index, process_count)
        self.shard = shard
        self.bad = BadDataLog()  # load-time failures
        self._samples = {s.index: s for s in self.dataset.samples}
        self._plans: dict[int, EpochPlan] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """reason → distinct files skipped, from reading the CSV and from loading."""
        total = collections.Counter(self.dataset.skipped)
        total.update(self.bad.skipped)
        return dict(sorted(total.items()))

    @property
    def substitutions(self) -> int:
        """How many times a sample that failed to load was replaced by another."""
        return self.bad.events

    def plan(self, epoch: int) -> EpochPlan:
        """This process's batch plan for `epoch` (cached: the latest two epochs)."""
        if epoch not in self._plans:
            groups = self.buckets.group(
                ((s.index, s.num_frames, s.height, s.width, s.fps) for s in self.dataset.samples),
                seed=self.seed,
                epoch=epoch,
            )
            self._plans[epoch] = plan_epoch(
                groups,
                self.buckets,
                seed=self.seed,
                epoch=epoch,
                process_index=self.process_index,
                process_count=self.process_count,
                shard=self.shard,
            )
            for old in sorted(self._plans)[:-2]:
                del self._plans[old]
        return self._plans[epoch]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.plan(epoch).batches)

    def epoch_dataset(self, epoch: int) -> grain.MapDataset:
        """An epoch's planned batches mapped to batch dicts (the private failure entry still attached)."""
        plan = self.plan(epoch)
        load = LoadBatch(self._samples, self.buckets, plan.members, seed=self.seed, epoch=epoch)
        return grain.MapDataset.source(plan.batches).map(load)

    def _finish(self, batch: dict) -> dict:
        for reason, index, path, message in batch.pop(_FAILURES):
            self.bad.report(str(reason), str(path), f"row id {index}: {message}; substituted")
        return batch

    def __iter__(self) -> EpochIterator:
        return EpochIterator(
            self.epoch_dataset,
            fingerprint={
                "seed": self.seed,
                "process_index": self.process_index,
                "process_count": self.process_count,
                "shard": self.shard,
            },
            num_epochs=self.num_epochs,
            num_workers=self.num_workers,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            finish=self._finish,
            extra_state=lambda: {"bad_files": self.bad.state(), "substitutions": self.bad.events},
            load_extra_state=lambda extra: self.bad.load_state(
                extra.get("bad_files", {}), extra.get("substitutions", 0)
            ),
        )


def make_video_loader(csv, bucket_config, *, resolutions=None, seed: int = 0, frame_interval: int = 1,
                      num_workers: int = 0, num_epochs: int | None = None, fps_max: float | None = None):
    """A VideoLoader of a CSV; bucket_config is a name of `bucket_configs.NAMED_BUCKET_CONFIGS` or a dict,
    resolutions a name of `NAMED_RESOLUTION_TABLES` (or empty). Shared by train.py and the feature writer."""
    buckets = bucket_config
    if isinstance(buckets, str):
        if buckets not in bucket_configs.NAMED_BUCKET_CONFIGS:
            raise UserError(f"bucket_config {buckets!r} unknown; names: {sorted(bucket_configs.NAMED_BUCKET_CONFIGS)}")
        buckets = bucket_configs.NAMED_BUCKET_CONFIGS[buckets]
    else:
        # JSON round trips (config.json, --config overrides) turn frame-count keys into strings.
        buckets = {res: {int(t): tuple(v) if isinstance(v, list) else v for t, v in per_t.items()}
                   for res, per_t in dict(buckets).items()}
    table = None
    if resolutions:
        if resolutions not in bucket_configs.NAMED_RESOLUTION_TABLES:
            raise UserError(f"resolutions {resolutions!r} unknown; names: {sorted(bucket_configs.NAMED_RESOLUTION_TABLES)}")
        table = bucket_configs.NAMED_RESOLUTION_TABLES[resolutions]
    return VideoLoader(csv, buckets, seed=seed, frame_interval=frame_interval, num_workers=num_workers,
                       resolutions=table, num_epochs=num_epochs, fps_max=fps_max)
