"""The step loop shared by the trainers (STDiT3 `loop.train`, VAE `vae_train.train_vae`).

    batches (background thread: next → iterator state → device_put)  →  step_fn (jitted, async)
        →  device metrics kept pending  →  fetched together at log steps, before checkpoints, at the end
        →  metrics.jsonl (one record per step) + checked finite  →  checkpoint (state + iterator state)

The host never waits on a step except at those fetch points, and the step never waits on the host for
its input while the prefetch queue holds a batch. A non-finite metric stops the run with
`NonFiniteLossError` before any checkpoint of the bad state is written, so the latest checkpoint on disk
is the last good one. Each batch carries the iterator state captured right after it was pulled, and a
checkpoint saves the state of the last batch trained on, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import queue
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from opensora_jax.parallel import shard_batch

# step_fn(state, batch, step) → (new state, metrics {name: device scalar}, host fields {name: JSON value}).
# `step` counts the updates done before this one; host fields (shapes, frame counts) go into the record as is.
StepFn = Callable[[Any, Any, int], tuple[Any, dict, dict]]


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite metric; the run stopped without checkpointing that state."""

    def __init__(self, step: int, metric: str, value, metrics: dict):
        self.step, self.metric, self.value, self.metrics = step, metric, value, metrics
        super().__init__(
            f"non-finite {metric} = {value} at step {step} (metrics of that step: {metrics}); training stopped "
            f"without saving this state, so the latest checkpoint is the last good one")


# ------------------------------------------------------------------------------------------- prefetch


def _is_numeric(leaf) -> bool:
    return isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "biuf"


def to_device(batch: dict, mesh=None) -> dict:
    """A host batch with its numeric arrays on device: batch-sharded over `mesh` when given, else on the
    default device. Other entries (string arrays such as captions) stay on the host."""

    def place(leaf):
        if not _is_numeric(leaf):
            return leaf
        return jax.device_put(leaf) if mesh is None else shard_batch(leaf, mesh)

    return {key: place(value) for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class Prefetched:
    """A batch ready on device and the data iterator's state right after it was pulled."""

    batch: Any
    data_state: dict


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class Prefetcher:
    """Iterates `Prefetched` items made by a background thread that pulls host batches from `iterator`
    (which must have `get_state()`), places them with `place`, and keeps up to `size` ready.

    The thread owns the iterator until `close()` returns. An exception raised by the iterator (or by
    `place`) is re-raised by `__next__` in the consuming thread once the batches before it are consumed.
    Use as a context manager, or call `close()`, so the thread stops on every exit path.
    """

    def __init__(self, iterator, *, place: Callable[[Any], Any] = to_device, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be ≥ 1, got {size}")
        self._iterator, self._place = iterator, place
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    break
                # A deep copy: the state must not change when the iterator moves on.
                state = copy.deepcopy(self._iterator.get_state())
                if not self._put(Prefetched(self._place(batch), state)):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(error))

    def _put(self, item) -> bool:
        """Queues `item`, waiting for room; False when `close()` was called meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> Prefetched:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (after the `next()` it may be in) and drops the batches not consumed."""
        self._stop.set()
        self._thread.join()
        self._finished = True
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------- metrics


def _host_value(value):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


def _first_non_finite(metrics: dict):
    """(name, value) of the first metric with a non-finite entry, or None."""
    for name, value in metrics.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            return name, _host_value(value)
    return None


class MetricsLog:
    """Records of dispatched steps whose device metrics are not fetched yet. `flush` fetches them all with
    one `jax.device_get`, checks them, and appends one JSON line per step to `path`."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._file = open(self.path, "a")
        self._pending: list[tuple[int, dict, dict]] = []

    def add(self, step: int, metrics: dict, fields: dict) -> None:
        """Keeps step `step`'s device `metrics` and host `fields` (written after the metrics)."""
        self._pending.append((step, metrics, fields))

    def flush(self) -> list[dict]:
        """The pending records, fetched, checked and written (in step order); raises NonFiniteLossError at the
        first step with a non-finite metric after writing the records of the steps before it."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        fetched = jax.device_get([metrics for _, metrics, _ in pending])
        records = []
        for (step, on_device, fields), values in zip(pending, fetched):
            metrics = {name: values[name] for name in on_device}  # the step's key order (device_get sorts)
            bad = _first_non_finite(metrics)
            if bad is not None:
                self._write(records)
                raise NonFiniteLossError(step, *bad, {k: _host_value(v) for k, v in metrics.items()})
            records.append({"step": step, **{k: _host_value(v) for k, v in metrics.items()}, **fields})
        self._write(records)
        return records

    def _write(self, records: list[dict]) -> None:
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file; records still pending are dropped (their steps were not checkpointed)."""
        self._pending = []
        self._file.close()


# ------------------------------------------------------------------------------------------- the loop


def format_record(record: dict) -> str:
    """A log line of a metrics record: step, then every scalar field, then the elapsed time."""
    parts = [f"step {record['step']:6d}"]
    parts += [f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "time_s") and isinstance(v, float)]
    parts.append(f"{record.get('time_s', 0.0):.1f}s")
    return "  ".join(parts)


@dataclasses.dataclass(frozen=True)
class LoopResult:
    state: Any
    step: int  # updates done in total (the resumed-from step plus this run's)
    exhausted: bool  # the data iterator ended before `total_steps`


def _is_log_step(step: int, start_step: int, log_every: int) -> bool:
    return step == start_step + 1 or (log_every > 0 and step % log_every == 0)


def _save_final(checkpointer, step: int, state, data_state: dict) -> None:
    if checkpointer.latest_step() != step:
        checkpointer.maybe_save(step, state, {"iterator": data_state}, force=True)


def run_loop(state, step_fn: StepFn, iterator, checkpointer, *, metrics_path, start_step: int, total_steps: int,
             log_every: int, stop_after: int | None = None, place: Callable[[Any], Any] = to_device,
             prefetch: int = 2, log_line: Callable[[dict], str] = format_record,
             after_step: Callable[[int, Any], None] | None = None) -> LoopResult:
    """Runs `step_fn` from `start_step` to `total_steps` updates (at most `stop_after` of them) on batches of
    `iterator` (positioned for `start_step`; it needs `get_state()`), prefetched to device with `place`.

    Appends one record per step to `metrics_path`: {"step", **metrics, **host fields, "time_s"}, and prints
    `log_line` of the first step's record and of every `log_every`-th. `checkpointer` (a `RunCheckpointer`)
    saves state and iterator state when due and at the end. `after_step(step, state)` runs after each step
    (e.g. evals). The loop owns `iterator` and `checkpointer`: on every exit it stops the prefetch thread,
    closes the iterator (when it has `close`) and closes the checkpointer (waiting for async saves).
    Raises NonFiniteLossError, with nothing of the bad state saved, when a fetched metric is NaN or infinite.
    """
    step, exhausted = start_step, False
    data_state = copy.deepcopy(iterator.get_state())
    log = MetricsLog(metrics_path)
    started = time.perf_counter()
    try:
        with Prefetcher(iterator, place=place, size=prefetch) as batches:
            while step < total_steps and (stop_after is None or step - start_step < stop_after):
                try:
                    item = next(batches)
                except StopIteration:
                    print(f"data exhausted after step {step}", flush=True)
                    exhausted = True
                    break
                state, metrics, fields = step_fn(state, item.batch, step)
                step, data_state = step + 1, item.data_state
                log.add(step, metrics, {**fields, "time_s": round(time.perf_counter() - started, 3)})
                if _is_log_step(step, start_step, log_every):
                    print(log_line(log.flush()[-1]), flush=True)
                if checkpointer.due(step):
                    log.flush()  # check before saving: a bad state must never become the latest checkpoint
                    checkpointer.maybe_save(step, state, {"iterator": data_state})
                if after_step is not None:
                    after_step(step, state)
        log.flush()
        _save_final(checkpointer, step, state, data_state)
    finally:
        _close_all(log, iterator, checkpointer)
    return LoopResult(state, step, exhausted)


def _close_all(log: MetricsLog, iterator, checkpointer) -> None:
    try:
        log.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    finally:
        checkpointer.close()
