"""Tools for models trained from scratch (the demo): the caption-trained tokenizer + random T5 directory,
latent statistics written into a VAE's shift/scale, and sample.py's choice of the demo model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from opensora_jax.tools import tiny_t5
from opensora_jax.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def captions_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_tools")
    return make_dataset(root / "data", num_clips=48, frames=6, size=(16, 16), seed=0, format="npy",
                        short_caption_ratio=0.5)


def test_tiny_t5_directory_encodes_the_captions(captions_csv, tmp_path):
    from opensora_jax.text.t5 import TextEncoder

    out = tiny_t5.make_text_encoder(captions_csv, tmp_path / "t5", d_model=32, num_layers=1, num_heads=4, d_ff=64)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == "t5" and meta["config"]["d_model"] == 32
    encoder = TextEncoder.from_pretrained(out / "tokenizer", out, model_max_length=16)
    captions = tiny_t5.read_captions(captions_csv)
    ids, mask = encoder.tokenize(captions[:8])
    unk = encoder.tokenizer.unk_token_id
    assert not np.any(ids[mask.astype(bool)] == unk)  # every caption word is in the vocabulary
    assert np.asarray(ids).max() < meta["config"]["vocab_size"]
    emb = encoder.encode(["a blue square moving up", "a red square moving up"])
    assert emb["y"].shape == (2, 1, 16, 32)
    assert not np.allclose(emb["y"][0], emb["y"][1])  # the colour word changes the embedding
    again = tiny_t5.make_text_encoder(captions_csv, tmp_path / "t5_again", d_model=32, num_layers=1,
                                      num_heads=4, d_ff=64)
    np.testing.assert_array_equal(
        np.asarray(TextEncoder.from_pretrained(again / "tokenizer", again, model_max_length=16)
                   .encode(["a blue square moving up"])["y"]), np.asarray(emb["y"][:1]))  # deterministic
    with pytest.raises(FileExistsError, match="--overwrite"):
        tiny_t5.make_text_encoder(captions_csv, out)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        tiny_t5.make_text_encoder(tmp_path / "missing.csv", tmp_path / "x")


@pytest.mark.slow  # default run kept near 15 minutes; run with -m slow
def test_latent_stats_normalise_the_latents(captions_csv, tmp_path):
    from convert.checkpoint import save_converted
    from convert.registry import load_model
    from opensora_jax.models.vae.opensora_v1_2 import build, encode_jit
    from opensora_jax.tools import latent_stats
    from tests.tiny import VAE_CONFIG

    from flax import nnx

    vae = build(VAE_CONFIG, rngs=nnx.Rngs(3))
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(vae))}
    src = save_converted(tmp_path / "vae", flat, config=VAE_CONFIG, model="vae")
    videos = [np.random.default_rng(k).uniform(-1, 1, (2, 5, 16, 16, 3)).astype(np.float32) for k in range(3)]
    mean, std, count = latent_stats.latent_moments(vae, videos)
    assert mean.shape == std.shape == (4,) and count == 3 * 2 * 2 * 2 * 2
    out = latent_stats.write_with_stats(src, tmp_path / "vae_stats", mean, std)
    normalised, config = load_model("vae", out)
    assert config["shift"] == pytest.approx(mean.tolist()) and config["scale"] == pytest.approx(std.tolist())
    z = np.concatenate([np.asarray(encode_jit(normalised, jnp.asarray(v), None)).reshape(-1, 4) for v in videos])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-3)


def test_sample_cli_picks_the_demo_model_only_without_checkpoints():
    from opensora_jax.cli import sample

    assert sample.uses_demo(["--prompt", "a blue square moving up"])
    assert sample.uses_demo(["--prompt", "x", "--steps", "4", "--config.seed=3"])
    for argv in (["--stdit3", "ckpt"], ["--vae=v"], ["--config.t5=t"], ["--config", "configs/opensora_v1_2/sample.py"]):
        assert not sample.uses_demo(["--prompt", "x", *argv]), argv
    demo = sample.make_config(["--prompt", "a blue square moving up"])
    assert demo.stdit3.endswith("assets/demo/stdit3") and tuple(demo.image_size) == (32, 32)
    assert demo.aes is None
    full = sample.make_config(["--prompt", "x", "--stdit3", "a", "--vae", "b", "--t5", "c"])
    assert full.resolution == "240p" and not full.image_size and full.aes == 6.5


def test_shape_metrics_read_colour_and_motion_off_rendered_clips():
    """The judge is right on every ground-truth clip of the grid, and says None for empty or still clips."""
    from opensora_jax.tools import shape_metrics as sm
    from opensora_jax.data.synthetic import render_clip

    grid = sm.prompt_grid()
    assert len(grid) == 8 * 3 * 4 and grid[0][0] == "a red circle moving left"
    for k, (prompt, colour, shape, direction) in enumerate(grid):
        frames = render_clip(shape, colour, direction, 17, 32, 32, np.random.default_rng(k))
        blurred = (0.8 * frames + 10).astype(np.uint8)  # dimmer and a grey floor: still judged right
        for clip in (frames, blurred):
            j = sm.judge(clip, prompt=prompt, seed=0, colour=colour, direction=direction)
            assert j.ok, (prompt, j)
    black = np.zeros((17, 32, 32, 3), np.uint8)
    assert sm.dominant_colour(black) is None and sm.motion_direction(black) is None
    still = np.repeat(render_clip("square", "red", "left", 1, 32, 32, np.random.default_rng(0)), 17, 0)
    assert sm.motion_direction(still) is None and sm.dominant_colour(still) == "red"
    wrong = sm.judge(still, prompt="x", seed=0, colour="blue", direction="left")
    assert not wrong.ok and not wrong.colour_ok and not wrong.direction_ok
    assert sm.summary([wrong, sm.judge(frames, prompt="y", seed=0, colour=colour, direction=direction)])[
        "match_rate"] == 0.5


def test_sample_cli_without_checkpoints_names_the_missing_demo_model(tmp_path, monkeypatch, capsys):
    from opensora_jax.cli import sample
    from opensora_jax.config_utils import run_cli

    config = tmp_path / "demo_config.py"
    config.write_text("from configs.demo.sample import get_config as _g\n\n\ndef get_config():\n    c = _g()\n"
                      f"    c.stdit3 = {str(tmp_path / 'nowhere' / 'stdit3')!r}\n    return c\n")
    monkeypatch.setattr(sample, "DEMO_CONFIG", config)
    assert run_cli(sample.main, ["--prompt", "a blue square moving up", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nowhere/stdit3 is missing" in err and "--stdit3" in err
    assert not (tmp_path / "out").exists()


def test_standardizing_2d_latents_is_exact():
    """After the reparametrisation the scaled 2D latents have zero mean / unit std per channel, and the
    2D VAE reconstructs exactly what it did before."""
    from flax import nnx

    from opensora_jax.models.vae.opensora_v1_2 import build
    from opensora_jax.models.vae.spatial import decode_frames, encode_frames
    from opensora_jax.tools import latent_stats
    from tests.tiny import VAE_CONFIG

    vae = build(VAE_CONFIG, rngs=nnx.Rngs(5))
    video = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16, 3)).astype(np.float32)
    before = np.asarray(decode_frames(vae.spatial, encode_frames(vae.spatial, jnp.asarray(video))))
    mean, std, _ = latent_stats.spatial_latent_moments(vae, [video])
    latent_stats.standardize_spatial_latents(vae, mean, std)
    z = np.asarray(encode_frames(vae.spatial, jnp.asarray(video))).reshape(-1, 4)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)
    after = np.asarray(decode_frames(vae.spatial, encode_frames(vae.spatial, jnp.asarray(video))))
    np.testing.assert_allclose(after, before, atol=2e-5)
    with pytest.raises(ValueError, match="positive"):
        latent_stats.standardize_spatial_latents(vae, mean, np.zeros(4))
