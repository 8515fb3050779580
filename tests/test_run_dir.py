"""A training directory holds one run: a changed config is refused before anything is written (or starts
over when asked), and metrics.jsonl is trimmed to the step a run resumes from."""

from __future__ import annotations

import json

import pytest

from opensora_jax.errors import UserError
from opensora_jax.training import run_dir

CONFIG = {"steps": 10, "log_every": 1, "seed": 0, "model": {"depth": 2, "hidden_size": 32}, "data": {"num_workers": 0}}


def _checkpointed(tmp_path, config=CONFIG):
    run_dir.prepare(tmp_path, config, has_checkpoint=False)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    assert run_dir.has_checkpoint(tmp_path)


def test_a_changed_architecture_is_refused_before_anything_is_written(tmp_path):
    _checkpointed(tmp_path)
    before = (tmp_path / "config.json").read_text()
    changed = {**CONFIG, "model": {"depth": 4, "hidden_size": 32}}
    with pytest.raises(UserError, match=r"model\.depth \(2 → 4\).*--config\.resume=False"):
        run_dir.prepare(tmp_path, changed, has_checkpoint=True)
    assert (tmp_path / "config.json").read_text() == before


def test_run_control_fields_may_change_on_resume(tmp_path):
    _checkpointed(tmp_path)
    longer = {**CONFIG, "steps": 20, "log_every": 5, "data": {"num_workers": 2}}
    run_dir.prepare(tmp_path, longer, has_checkpoint=True)
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 20
    assert run_dir.has_checkpoint(tmp_path)


def test_resume_false_starts_over(tmp_path):
    _checkpointed(tmp_path)
    fresh = {**CONFIG, "model": {"depth": 4, "hidden_size": 32}, "resume": False}
    run_dir.prepare(tmp_path, fresh, has_checkpoint=True)
    assert not run_dir.has_checkpoint(tmp_path) and not (tmp_path / "metrics.jsonl").exists()


def test_metrics_are_trimmed_to_the_restored_step(tmp_path):
    _checkpointed(tmp_path)
    assert run_dir.trim_metrics(tmp_path, 3) == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert run_dir.trim_metrics(tmp_path, 3) == 0
