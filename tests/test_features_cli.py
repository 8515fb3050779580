"""`python -m opensora_jax.cli.features`: one epoch of the training loader encoded to disk, read back by
FeatureLoader as exactly what train.py would have encoded on the fly, and trained from."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs.demo.train_tiny import get_config
from opensora_jax.config_utils import run_cli
from opensora_jax.cli.features import main
from opensora_jax.data.features import FeatureLoader, load_shard, read_index
from opensora_jax.data.synthetic import make_dataset
from opensora_jax.data.loader import make_video_loader
from opensora_jax.training.loop import BatchEncoder, train
from tests.tiny import STDIT3_CONFIG

SEED = 3
MAX_LEN = STDIT3_CONFIG["model_max_length"]
# The data and buckets of test_train.py (same shapes: the compiled VAE encode and train step are shared when
# both files run in one process); the bucket config goes in as a JSON literal.
BUCKETS = {"32px": {"17": [1.0, 2]}}
LATENT = [2, 5, 4, 4, 4]  # 17 frames, 32×32 px → 5×4×4 latents with 4 channels


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("features_cli")
    ckpts = tiny_checkpoints
    csv = make_dataset(root / "data", num_clips=6, frames=20, size=(32, 32), seed=0)  # → 3 batches of 2 × 17 frames
    return root, ckpts, csv


def _argv(setup, out_dir, *extra):
    _, ckpts, csv = setup
    return ["--csv", str(csv), "--vae", str(ckpts["vae"]), "--t5", str(ckpts["t5"]), "--bucket-config", json.dumps(BUCKETS),
            "--resolutions", "synthetic", "--model-max-length", str(MAX_LEN), "--seed", str(SEED), *extra,
            str(out_dir)]


@pytest.fixture(scope="module")
def written(setup):
    root = setup[0]
    out = root / "features"
    assert main(_argv(setup, out)) == 0
    return out


def test_features_are_what_training_encodes_on_the_fly(setup, written, capsys):
    from convert.registry import load_model
    from opensora_jax.text.tokenizer import default_tokenizer_dir
    from opensora_jax.text.t5 import TextEncoder

    _, ckpts, csv = setup
    index = json.loads((written / "shard.index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-{k:06d}.npz" for k in range(3)]
    assert all(s["latent_shape"] == LATENT for s in index["shards"])

    # Batch k of epoch 0 of the training loader (same seed), encoded as train.py's step k would encode it.
    vae, _ = load_model("vae", ckpts["vae"])
    text_encoder = TextEncoder.from_pretrained(default_tokenizer_dir(ckpts["t5"]), ckpts["t5"], model_max_length=MAX_LEN)
    encoder = BatchEncoder(vae, text_encoder, seed=SEED)
    loader = make_video_loader(str(csv), BUCKETS, resolutions="synthetic", seed=SEED, num_epochs=1)
    with iter(loader) as it:
        for k, batch in enumerate(it):
            stored = load_shard(str(written / f"shard-{k:06d}.npz"))
            expected = encoder(batch, k)
            assert stored["latent"].dtype == np.float32 and list(stored["latent"].shape) == LATENT
            np.testing.assert_allclose(stored["latent"], np.asarray(expected["x0"]), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(stored["y"], np.asarray(expected["y"]))
            np.testing.assert_array_equal(stored["mask"], np.asarray(expected["mask"]))
            np.testing.assert_array_equal(stored["index"], batch["index"])
    assert k == 2

    got = list(FeatureLoader(written, shuffle=False, num_epochs=1))
    assert [list(b["latent"].shape) for b in got] == [LATENT] * 3
    assert got[0]["y"].shape == (2, MAX_LEN, 32) and got[0]["mask"].shape == (2, MAX_LEN)


def test_rerun_with_overwrite_is_deterministic_and_refuses_without(setup, written, tmp_path, capsys):
    before = {s["file"]: load_shard(s["file"]) for s in read_index(written)}
    with pytest.raises(ValueError, match="not empty"):
        main(_argv(setup, written))
    (written / "shard-000007.npz").write_bytes(b"stale")  # a longer earlier run's leftover: removed
    assert main(_argv(setup, written, "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "3 batches (6 samples)" in out and "wrote 3 shards (6 samples)" in out
    assert "[2, 5, 4, 4, 4] ×3" in out and "skipped none" in out
    assert sorted(p.name for p in written.iterdir()) == [f"shard-{k:06d}.npz" for k in range(3)] + ["shard.index.json"]
    for s in read_index(written):
        after = load_shard(s["file"])
        assert after.keys() == before[s["file"]].keys()
        for key in after:
            np.testing.assert_array_equal(after[key], before[s["file"]][key])

    # --max-batches and another name (bfloat16 storage is covered by test_data's write_features test).
    part = tmp_path / "part"
    assert main(_argv(setup, part, "--max-batches", "1", "--name", "part0")) == 0
    (shard,) = read_index(part)
    assert shard["file"].endswith("part0-000000.npz") and shard["latent_shape"] == LATENT
    np.testing.assert_array_equal(load_shard(shard["file"])["latent"], before[str(written / "shard-000000.npz")]["latent"])


def test_user_errors(setup, tmp_path, capsys):
    _, ckpts, csv = setup
    with pytest.raises(FileNotFoundError, match="--csv"):
        main(["--csv", str(tmp_path / "nope.csv"), "--vae", str(ckpts["vae"]), "--t5", str(ckpts["t5"]), str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--vae checkpoint"):
        main(["--csv", str(csv), "--vae", str(tmp_path / "novae"), "--t5", str(ckpts["t5"]), str(tmp_path / "o")])
    assert run_cli(main, _argv(setup, tmp_path / "o", "--bucket-config", "nosuch")) == 2
    assert "bucket_config 'nosuch' unknown" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "opensora_jax.cli.features", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--csv", "--vae", "--t5", "--tokenizer", "--bucket-config", "--resolutions", "--model-max-length",
                 "--dtype", "--t5-dtype", "--seed", "--name", "--num-workers", "--max-batches", "--overwrite", "OUT_DIR"):
        assert flag in proc.stdout


def test_train_from_written_features(setup, written, tmp_path):
    c = get_config()
    c.out_dir = str(tmp_path / "run")
    c.model = dict(STDIT3_CONFIG)
    c.data.csv = ""
    c.data.features = str(written)
    c.vae = c.t5 = ""
    c.steps, c.ckpt_every, c.log_every = 2, 2, 1
    c.export_ema = False
    summary = train(c)
    assert summary["step"] == 2
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["shape"] == LATENT and np.isfinite(r["loss"]) for r in recs)
