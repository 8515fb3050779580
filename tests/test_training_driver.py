"""The shared training loop driver on a toy step (no model): metrics fetched only at log steps, the NaN guard
keeping the last good checkpoint the latest, device prefetch order and iterator states, exceptions from the
data iterator, clean thread shutdown, and exact resume despite batches prefetched ahead."""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opensora_jax.parallel import make_mesh
from opensora_jax.training.checkpointing import RunCheckpointer
from opensora_jax.training.driver import NonFiniteLossError, Prefetcher, run_loop, to_device


class ToyIterator:
    """Batch i is {"x": [i + 1, i + 1]} (NaN where i is in `nan_at`); raises at batch `fail_at`; state = batches
    pulled. Counts `next` calls and records `close`."""

    def __init__(self, num_batches=100, *, nan_at=(), fail_at=None):
        self.num_batches, self.nan_at, self.fail_at = num_batches, set(nan_at), fail_at
        self.position, self.pulled, self.closed = 0, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        self.pulled += 1
        i = self.position
        if i == self.fail_at:
            raise ValueError(f"broken clip in batch {i}")
        if i >= self.num_batches:
            raise StopIteration
        self.position += 1
        value = np.nan if i in self.nan_at else float(i + 1)
        return {"x": np.full((2,), value, np.float32), "text": np.array(["a", "b"])}

    def get_state(self):
        return {"batch": self.position}

    def set_state(self, state):
        self.position = state["batch"]

    def close(self):
        self.closed = True


def toy_step(state, batch, step):
    """w ← 0.5·w + mean(x); loss = w², all on device (async): the driver's step protocol."""
    w = 0.5 * state["w"] + jnp.mean(batch["x"])
    return {"w": w}, {"loss": w * w, "grad_norm": jnp.abs(w)}, {"shape": list(batch["x"].shape)}


def expected_losses(num_steps):
    w, out = 0.0, {}
    for i in range(num_steps):
        w = 0.5 * w + (i + 1)
        out[i + 1] = w * w
    return out


class FakeCheckpointer:
    """RunCheckpointer's protocol, in memory: saves every `every` steps."""

    def __init__(self, every=1000):
        self.every, self.saves, self.closed = every, [], False

    def latest_step(self):
        return self.saves[-1][0] if self.saves else None

    def due(self, step):
        return step % self.every == 0 and step != self.latest_step()

    def maybe_save(self, step, state, data_state, *, force=False):
        if force or self.due(step):
            self.saves.append((step, state, data_state))
            return True
        return False

    def close(self):
        self.closed = True


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "device-prefetch" and t.is_alive()]


def _state():
    return {"w": jnp.zeros((), jnp.float32)}


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_are_fetched_only_at_log_steps(tmp_path, monkeypatch, capsys):
    fetches = []
    real_get = jax.device_get

    def counting_get(tree):
        fetches.append(len(tree) if isinstance(tree, list) else 1)
        return real_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_get)
    checkpointer = FakeCheckpointer()
    iterator = ToyIterator()
    # Any implicit device→host transfer (float() of a metric, np.asarray of a device array) raises here;
    # the driver's explicit jax.device_get is allowed.
    with jax.transfer_guard_device_to_host("disallow"):
        result = run_loop(_state(), toy_step, iterator, checkpointer, metrics_path=tmp_path / "metrics.jsonl",
                          start_step=0, total_steps=10, log_every=4)
    # one fetch each at step 1 (the first), 4 and 8, and one for steps 9-10 at the end
    assert fetches == [1, 3, 4, 2]
    assert result.step == 10 and not result.exhausted
    records = _records(tmp_path / "metrics.jsonl")
    want = expected_losses(10)
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert list(r) == ["step", "loss", "grad_norm", "shape", "time_s"]
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-6) and r["shape"] == [2]
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert printed == ["1", "4", "8"]
    # the final save carries the iterator state right after the 10th batch, not of batches prefetched later
    assert [(s, d) for s, _, d in checkpointer.saves] == [(10, {"iterator": {"batch": 10}})]
    assert checkpointer.closed and iterator.closed and not _prefetch_threads()


def test_metrics_are_checked_before_every_checkpoint(tmp_path, monkeypatch):
    fetches = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: (fetches.append(len(tree)), real_get(tree))[1])
    checkpointer = FakeCheckpointer(every=3)
    run_loop(_state(), toy_step, ToyIterator(), checkpointer, metrics_path=tmp_path / "metrics.jsonl",
             start_step=0, total_steps=7, log_every=100)
    assert fetches == [1, 2, 3, 1]  # step 1 (logged), before the saves at 3 and 6, the end (7)
    assert [s for s, _, _ in checkpointer.saves] == [3, 6, 7]
    assert [d["iterator"]["batch"] for _, _, d in checkpointer.saves] == [3, 6, 7]


# --------------------------------------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("total_steps", [8, 5])  # the bad step before a due save / as the last step
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, total_steps):
    directory = tmp_path / "checkpoints"
    checkpointer = RunCheckpointer(directory, every=2, keep=5, async_save=True)
    iterator = ToyIterator(nan_at={4})  # batch 4 → step 5
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss = nan at step 5") as info:
        run_loop(_state(), toy_step, iterator, checkpointer, metrics_path=tmp_path / "metrics.jsonl",
                 start_step=0, total_steps=total_steps, log_every=100)
    assert info.value.step == 5 and info.value.metric == "loss"
    assert iterator.closed and not _prefetch_threads()

    reopened = RunCheckpointer(directory, every=2, keep=5, async_save=False)
    try:
        # orbax also saves the first step of a run that has no checkpoint yet
        assert reopened.latest_step() == 4 and sorted(reopened.manager.all_steps()) == [1, 2, 4]
        state, data = reopened.restore(_state())
    finally:
        reopened.close()
    assert float(state["w"]) == pytest.approx(np.sqrt(expected_losses(4)[4]))
    assert data == {"iterator": {"batch": 4}}
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]  # the bad step is not logged


def test_any_non_finite_metric_is_caught(tmp_path):
    def step(state, batch, step):
        state, metrics, fields = toy_step(state, batch, step)
        return state, {**metrics, "grad_norm": jnp.where(step == 2, jnp.inf, metrics["grad_norm"])}, fields

    with pytest.raises(NonFiniteLossError, match="grad_norm = inf at step 3"):
        run_loop(_state(), step, ToyIterator(), FakeCheckpointer(), metrics_path=tmp_path / "m.jsonl",
                 start_step=0, total_steps=6, log_every=100)


# --------------------------------------------------------------------------------------------- prefetch


def test_prefetch_yields_batches_in_order_with_their_iterator_states():
    iterator = ToyIterator(num_batches=5)
    with Prefetcher(iterator, size=2) as batches:
        items = list(batches)
    assert [float(item.batch["x"][0]) for item in items] == [1, 2, 3, 4, 5]
    assert [item.data_state for item in items] == [{"batch": k} for k in range(1, 6)]
    assert all(isinstance(item.batch["x"], jax.Array) for item in items)
    assert all(isinstance(item.batch["text"], np.ndarray) for item in items)  # strings stay on the host
    assert not _prefetch_threads()


def test_prefetch_keeps_at_most_size_batches_ready_and_stops_when_closed():
    iterator = ToyIterator(num_batches=10**6)
    batches = Prefetcher(iterator, size=2)
    deadline = time.time() + 10
    while iterator.pulled < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert iterator.pulled == 3  # two queued, the third waiting for room
    assert next(batches).data_state == {"batch": 1}
    batches.close()
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(batches)


def test_to_device_shards_over_a_mesh():
    mesh = make_mesh("data=8")
    placed = to_device({"x": np.zeros((8, 3), np.float32), "text": np.array(["a"] * 8)}, mesh)
    assert placed["x"].sharding.spec[0] is not None and len(placed["x"].sharding.device_set) == 8
    assert isinstance(placed["text"], np.ndarray)


def test_iterator_exceptions_surface_in_the_main_thread(tmp_path):
    with Prefetcher(ToyIterator(fail_at=3), size=2) as batches:
        assert [item.data_state["batch"] for item in (next(batches), next(batches), next(batches))] == [1, 2, 3]
        with pytest.raises(ValueError, match="broken clip in batch 3"):
            next(batches)

    iterator, checkpointer = ToyIterator(fail_at=3), FakeCheckpointer(every=2)
    with pytest.raises(ValueError, match="broken clip in batch 3"):
        run_loop(_state(), toy_step, iterator, checkpointer, metrics_path=tmp_path / "metrics.jsonl",
                 start_step=0, total_steps=10, log_every=100)
    assert [s for s, _, _ in checkpointer.saves] == [2]  # no save on the way out of a failure
    assert iterator.closed and checkpointer.closed and not _prefetch_threads()


def test_step_failure_stops_the_prefetch_thread(tmp_path):
    def failing_step(state, batch, step):
        if step == 2:
            raise RuntimeError("device out of memory")
        return toy_step(state, batch, step)

    iterator, checkpointer = ToyIterator(num_batches=10**6), FakeCheckpointer()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_loop(_state(), failing_step, iterator, checkpointer, metrics_path=tmp_path / "metrics.jsonl",
                 start_step=0, total_steps=100, log_every=1)
    assert iterator.closed and checkpointer.closed and not _prefetch_threads()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_data_exhaustion_ends_the_run_with_a_checkpoint(tmp_path):
    checkpointer = FakeCheckpointer()
    result = run_loop(_state(), toy_step, ToyIterator(num_batches=3), checkpointer,
                      metrics_path=tmp_path / "metrics.jsonl", start_step=0, total_steps=10, log_every=100)
    assert result.step == 3 and result.exhausted
    assert [(s, d) for s, _, d in checkpointer.saves] == [(3, {"iterator": {"batch": 3}})]


# --------------------------------------------------------------------------------------------- resume


def test_resume_after_stop_matches_an_uninterrupted_run(tmp_path):
    def run(directory, **kwargs):
        checkpointer = RunCheckpointer(directory / "checkpoints", every=2, keep=3, async_save=True)
        state, iterator = {**_state(), "step": jnp.zeros((), jnp.int32)}, ToyIterator()
        if checkpointer.latest_step() is not None:
            state, data = checkpointer.restore(state)
            iterator.set_state(data["iterator"])
        start = int(state["step"])

        def step_fn(state, batch, step):
            new, metrics, fields = toy_step(state, batch, step)
            return {**new, "step": state["step"] + 1}, metrics, fields

        return run_loop(state, step_fn, iterator, checkpointer, metrics_path=directory / "metrics.jsonl",
                        start_step=start, total_steps=7, log_every=100, **kwargs)

    run(tmp_path / "reference")
    run(tmp_path / "resumed", stop_after=3)  # prefetched ahead of step 3; the step-3 checkpoint must not see that
    run(tmp_path / "resumed")
    expected = {r["step"]: r["loss"] for r in _records(tmp_path / "reference" / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in _records(tmp_path / "resumed" / "metrics.jsonl")}
    assert got == expected and sorted(got) == list(range(1, 8))
