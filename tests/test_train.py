"""Training end to end on a tiny synthetic dataset: the loss falls, shapes follow the buckets, bad files are
reported, and a run killed with SIGKILL resumes to exactly the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs.demo.train_tiny import get_config
from opensora_jax.data.synthetic import make_dataset
from opensora_jax.training.loop import train
from tests.tiny import STDIT3_CONFIG

BUCKETS = {"32px": {17: (1.0, 2)}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("train")
    ckpts = tiny_checkpoints
    csv = make_dataset(root / "data", num_clips=6, frames=20, size=(32, 32), seed=0)
    return root, ckpts, csv


def _config(setup, out_dir, steps, **extra):
    root, ckpts, csv = setup
    c = get_config()
    c.out_dir = str(out_dir)
    c.model = dict(STDIT3_CONFIG)
    c.vae, c.t5 = str(ckpts["vae"]), str(ckpts["t5"])
    c.data.csv = str(csv)
    c.data.bucket_config = BUCKETS
    c.steps, c.ckpt_every, c.log_every = steps, 3, 1
    c.export_ema = False
    for k, v in extra.items():
        c[k] = v
    return c


def _losses(out_dir):
    """step → loss, the last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def test_loss_falls_and_shapes_follow_buckets(setup, tmp_path):
    config = _config(setup, tmp_path / "run", steps=40)
    config.optimizer.lr = 3e-3
    config.mask_ratios = {}
    train(config)
    recs = _losses(tmp_path / "run")
    assert sorted(recs) == list(range(1, 41))
    assert all(r["shape"] == [2, 5, 4, 4, 4] for r in recs.values())  # 17 frames, 32×32 px → 5×4×4 latents
    first = sum(recs[s]["loss"] for s in range(1, 9)) / 8
    last = sum(recs[s]["loss"] for s in range(33, 41)) / 8
    print(f"loss first 8 steps {first:.4f} → last 8 steps {last:.4f}")
    assert last < 0.8 * first


@pytest.mark.slow  # ~65 s on 2 cores: two training subprocesses
def test_sigkill_resume_matches_uninterrupted_run(setup, tmp_path):
    steps = 9
    reference = _config(setup, tmp_path / "reference", steps)
    train(reference)
    expected = _losses(tmp_path / "reference")

    config_file = tmp_path / "run_config.json"
    killed = _config(setup, tmp_path / "killed", steps)
    config_file.write_text(json.dumps(killed.to_dict()))
    cmd = [sys.executable, "-c", (
        "import json, sys, ml_collections; from opensora_jax.training.loop import train; "
        f"train(ml_collections.ConfigDict(json.load(open({str(config_file)!r}))))")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = len(metrics.read_text().splitlines())
    assert steps_before < steps

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    got = _losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-7), step


def test_missing_and_corrupt_files_are_skipped_and_reported(setup, tmp_path):
    root, _, csv = setup
    lines = csv.read_text().splitlines()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 10)
    bad_csv = csv.parent / "bad.csv"  # relative clip paths resolve against the CSV's directory
    first = lines[1].split(",")
    extra = [",".join([str(tmp_path / "missing.mp4"), *first[1:]]), ",".join([str(corrupt), *first[1:]])]
    bad_csv.write_text("\n".join(lines + extra) + "\n")
    config = _config(setup, tmp_path / "run", steps=4)
    config.data.csv = str(bad_csv)
    summary = train(config)
    assert summary["step"] == 4
    assert sum(summary["skipped"].values()) >= 2, summary


@pytest.mark.slow  # ~65 s on 2 cores; sharded = unsharded train steps are also checked in tests/test_parallel.py
def test_training_on_a_mesh_matches_one_device(setup, tmp_path):
    """The same run on fsdp=2 x data=... fake devices logs the same losses as on one device."""
    single = _config(setup, tmp_path / "single", steps=3)
    train(single)
    sharded = _config(setup, tmp_path / "sharded", steps=3, mesh="data=2,fsdp=2,tensor=2")
    train(sharded)
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "sharded")
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-4), step


def test_lora_fine_tuning_of_stdit3_trains_only_adapters(setup, tmp_path):
    """LoRA on v1.2's STDiT3: only the adapters change, and they are exported for sample.py --lora."""
    import numpy as np
    from flax import nnx

    from opensora_jax.lora_files import read_adapter_meta
    from opensora_jax.training import loop

    config = _config(setup, tmp_path / "lora", steps=3)
    config.lora.rank, config.lora.alpha = 4, 4.0
    config.mask_ratios = {}
    summary = train(config)
    assert (tmp_path / "lora" / "lora").is_dir() and summary["exported"] is not None
    assert read_adapter_meta(summary["exported"])["model"] == "stdit3"
    assert sorted(_losses(tmp_path / "lora")) == [1, 2, 3]
    base = dict(nnx.to_flat_state(nnx.state(loop.build_model(config), nnx.Param)))  # the run's seeded init
    trained = nnx.merge(summary["graphdef"], summary["state"].params, summary["state"].rest)
    after = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    adapters = [k for k in after if k not in base]
    assert adapters and all(isinstance(after[k], nnx.LoRAParam) for k in adapters)
    for key, value in base.items():  # every base weight bit-identical after training
        np.testing.assert_array_equal(np.asarray(after[key].get_value()), np.asarray(value.get_value()))
    assert any(k[-1] == "b" and float(np.abs(np.asarray(after[k].get_value())).max()) > 0 for k in adapters)
