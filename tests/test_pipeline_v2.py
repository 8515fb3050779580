"""Open-Sora 2.0 end to end with tiny random models: sizes and prompt suffixes, every cond type, the CLI writing
videos and PNGs, a clear error for a bad frame count, Ctrl-C leaving no half-written file."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from opensora_jax import presets_v2_0 as sizes
from opensora_jax import video_io
from opensora_jax.conditioning.latent_conditions import COND_TYPES
from opensora_jax.errors import UserError
from opensora_jax.pipelines.opensora_v2_0 import Pipeline, inference_prompt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.tiny import write_tiny_v2_checkpoints

    return write_tiny_v2_checkpoints(tmp_path_factory.mktemp("tiny_v2"))


@pytest.fixture(scope="module")
def pipeline(ckpts):
    return Pipeline.from_checkpoints(mmdit=ckpts["mmdit"], vae=ckpts["vae"], t5=ckpts["t5"], clip=ckpts["clip"],
                                     dtype="float32", t5_max_length=32)


def test_sizes_follow_the_reference_table():
    assert sizes.image_size("256px", "16:9") == (192, 336)
    assert sizes.image_size("256px", "2.39:1") == (160, 384)
    assert sizes.image_size("768px", "4:3") == (656, 880)
    assert sizes.image_size("768px", "3:4") == (880, 656)
    assert sizes.image_size("768px", "16:9", compression=32) == (576, 1024)
    assert sizes.latent_hw(192, 336) == (24, 42) and sizes.latent_frames(129) == 33
    assert sizes.latent_hw(576, 1024, spatial_compression=32, patch_size=1) == (18, 32)
    assert sizes.latent_frames(128, causal=False) == 32
    with pytest.raises(UserError, match="W:H"):
        sizes.image_size("256px", "7:5")
    with pytest.raises(UserError, match="e.g. 129 or 133"):
        sizes.check_num_frames(130)
    with pytest.raises(UserError, match="multiple of 4"):
        sizes.check_num_frames(129, causal=False)


def test_prompt_suffixes_as_the_reference_inference():
    assert inference_prompt("raining, sea", 24, "4") == "raining, sea. 24 FPS. 4 motion score."
    assert inference_prompt("a cat. 16 FPS.", 24, "4") == "a cat. 16 FPS. 4 motion score."
    assert inference_prompt("a cat.", 24, "") == "a cat. 24 FPS."


# Three cond types in the default run (one of each kind); the rest with `pytest -m slow`.
FAST_COND_TYPES = ("t2v", "i2v_loop", "v2v_tail")


@pytest.mark.parametrize("cond_type", [c if c in FAST_COND_TYPES else pytest.param(c, marks=pytest.mark.slow)
                                       for c in COND_TYPES])
def test_every_cond_type_makes_a_video_of_the_right_shape(pipeline, tmp_path, cond_type):
    ref = tmp_path / ("ref.mp4" if cond_type.startswith("v2v") else "ref.png")
    if ref.suffix == ".mp4":
        video_io.write_video(np.random.default_rng(0).integers(0, 255, (48, 32, 48, 3), np.uint8), ref, 24)
    else:
        video_io.write_image(np.full((40, 60, 3), 180, np.uint8), ref)
    refs = None if cond_type == "t2v" else [str(ref)] * 2
    gen = pipeline.generate(["a cat", "a dog"], height=32, width=48, num_frames=9 if "v2v" not in cond_type else 41,
                            num_steps=2, cond_type=cond_type, reference_paths=refs, progress=False)
    frames = 9 if "v2v" not in cond_type else 41
    assert gen.videos.shape == (2, frames, 32, 48, 3) and gen.videos.dtype == np.uint8
    assert gen.prompts_sent == ["a cat. 24 FPS. 4 motion score.", "a dog. 24 FPS. 4 motion score."]
    assert gen.latents[0].shape == (2, sizes.latent_frames(frames), 4, 6, 4)


def test_i2v_head_pastes_the_encoded_reference_into_sample_0(pipeline, tmp_path):
    ref = tmp_path / "ref.png"
    video_io.write_image(np.full((32, 48, 3), 30, np.uint8), ref)
    kwargs = dict(height=32, width=48, num_frames=9, num_steps=2, cond_type="i2v_head", progress=False)
    gen = pipeline.generate(["a", "b"], reference_paths=[str(ref)] * 2, **kwargs)
    both = pipeline.generate(["a", "b"], reference_paths=[str(ref)] * 2, paste_all_samples=True, **kwargs)
    np.testing.assert_array_equal(gen.latents[0][0], both.latents[0][0])  # sample 0: pasted either way
    assert not np.allclose(gen.latents[0][1, 0], both.latents[0][1, 0])  # sample 1: only with paste_all_samples
    np.testing.assert_array_equal(gen.latents[0][1, 1:], both.latents[0][1, 1:])


def test_prompt_csv_gives_texts_references_and_negatives(tmp_path):
    from opensora_jax.config_utils import load_config_file
    from opensora_jax.pipelines.run import check

    ref = tmp_path / "ref.png"
    video_io.write_image(np.full((32, 32, 3), 90, np.uint8), ref)
    (tmp_path / "p.csv").write_text(f"text,ref,neg\na cat,{ref},blurry\na dog,,\n")
    config = load_config_file("configs/opensora_v2_0/sample_256px.py")
    config.prompt_file, config.cond_type, config.out_dir = str(tmp_path / "p.csv"), "i2v_head", str(tmp_path / "o")
    assert check(config) == ["a cat", "a dog"]
    _, listed = Pipeline.generate_kwargs(config, 2)
    assert listed["reference_paths"] == [str(ref), ""] and listed["negative_prompts"] == ["blurry", ""]
    (tmp_path / "bad.csv").write_text("prompt\na cat\n")
    config.prompt_file = str(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="'text' column"):
        check(config)


def test_ckpt_dir_finds_the_reference_layout(tmp_path):
    from opensora_jax.config_utils import load_config_file

    config = load_config_file("configs/opensora_v2_0/sample_256px.py")
    config.ckpt_dir = str(tmp_path)
    for rel in ("Open_Sora_v2.safetensors", "hunyuan_vae.safetensors"):
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "google" / "t5-v1_1-xxl").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        Pipeline.checkpoint_paths(config)
    (tmp_path / "openai" / "clip-vit-large-patch14").mkdir(parents=True)
    config.t5 = "elsewhere/t5"
    paths = Pipeline.checkpoint_paths(config)
    assert paths == {"mmdit": str(tmp_path / "Open_Sora_v2.safetensors"), "vae": str(tmp_path / "hunyuan_vae.safetensors"),
                     "t5": "elsewhere/t5", "clip": str(tmp_path / "openai" / "clip-vit-large-patch14")}


def _cli(ckpts, out_dir, *extra):
    return [sys.executable, "sample.py", "--family", "opensora_v2_0", "--prompt", "a cat",
            "--config.image_size=(32, 48)", "--num-frames", "9", "--steps", "2", "--dtype", "float32", "--no-progress",
            "--mmdit", str(ckpts["mmdit"]), "--vae", str(ckpts["vae"]), "--t5", str(ckpts["t5"]),
            "--clip", str(ckpts["clip"]), "--config.t5_max_length=32", "--out-dir", str(out_dir), *extra]


def test_cli_writes_mp4_sidecar_and_png_for_one_frame(ckpts, tmp_path):
    done = subprocess.run(_cli(ckpts, tmp_path / "out"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    read = video_io.read_video(tmp_path / "out" / "sample_0000.mp4")
    assert read.frames.shape == (9, 32, 48, 3)
    sidecar = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert sidecar["prompt_sent"] == "a cat. 24 FPS. 4 motion score."
    assert json.loads((tmp_path / "out" / "config.json").read_text())["family"] == "opensora_v2_0"
    done = subprocess.run(_cli(ckpts, tmp_path / "out", "--num-frames", "1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "sample_0001.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (("--num-frames", "10"), "e.g. 9 or 13"),
    (("--cond-type", "i2v_middle"), "cond type"),
    (("--cond-type", "i2v_head"), "needs --reference"),
    (("--aspect-ratio", "7:5", "--config.image_size=()"), "aspect ratio"),
])
def test_cli_mistakes_are_one_line_exit_2(ckpts, tmp_path, extra, message):
    done = subprocess.run(_cli(ckpts, tmp_path / "out", *extra), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1


def test_ctrl_c_leaves_no_half_written_file(ckpts, tmp_path):
    proc = subprocess.Popen(_cli(ckpts, tmp_path / "out", "--steps", "200"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "out" / "config.json").exists():
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not list((tmp_path / "out").glob("sample_*"))
