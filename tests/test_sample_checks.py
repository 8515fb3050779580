"""sample.py checks its whole config before loading any model: each mistake is one UserError naming the flag,
and nothing is written. Later runs into the same directory take fresh file names."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from opensora_jax import video_io
from opensora_jax.cli import sample
from opensora_jax.errors import UserError
from opensora_jax.pipelines import run as sampling_run
from opensora_jax.pipelines.common import next_free_index


def _config(tmp_path, *argv):
    return sample.make_config(["--prompt", "a blue square moving up", "--out-dir", str(tmp_path / "out"), *argv])


BAD = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--num-sample", "0"], "--num-sample"),
    (["--batch-size", "0"], "--batch-size"),
    (["--save-fps", "0"], "--save-fps"),
    (["--fps", "-24"], "--fps"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--loop", "0"], "--loop"),
    (["--num-frames", "100000"], "--num-frames"),
    (["--num-frames", "many"], "frame count"),
    (["--seed", "-1"], "--seed"),
    (["--mask-strategy", "0,0,x"], "mask"),
    (["--reference", "missing.png"], "missing.png"),
    (["--prompt", "  "], "--prompt"),
]


@pytest.mark.parametrize("argv, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_mistake_is_caught_before_any_model_loads(tmp_path, argv, named):
    config = _config(tmp_path, *argv)
    with pytest.raises((UserError, FileNotFoundError), match=named):
        sampling_run.check(config)
    assert not (tmp_path / "out").exists()


def test_bad_files_are_named(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(UserError, match="notes.png.*could not be decoded"):
        sampling_run.check(_config(tmp_path, "--reference", str(not_an_image)))
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x00\x01\x02\xff")
    with pytest.raises(UserError, match="--prompt-file"):
        sampling_run.check(_config(tmp_path, "--prompt-file", str(binary)))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(UserError, match="--out-dir"):
        sampling_run.check(_config(tmp_path, "--out-dir", str(a_file / "sub")))


def test_a_good_config_passes_and_a_decodable_reference_is_accepted(tmp_path):
    image = tmp_path / "ref.png"
    video_io.write_image(np.zeros((32, 32, 3), np.uint8), image)
    assert sampling_run.check(_config(tmp_path, "--reference", str(image))) == ["a blue square moving up"]


def test_new_runs_take_the_next_free_index(tmp_path):
    out = tmp_path / "samples"
    assert next_free_index(out) == 0
    out.mkdir()
    for name in ("sample_0000.mp4", "sample_0000.json", "sample_0002.png", "other_0009.mp4", "sample_x.mp4"):
        (out / name).write_text("")
    assert next_free_index(out) == 3
    assert next_free_index(pathlib.Path(out), "other") == 10


def test_demo_mode_refuses_the_size_flags_it_cannot_honour():
    from opensora_jax.config_utils import run_cli

    for flag in (["--resolution", "720p"], ["--aspect-ratio", "1:1"]):
        with pytest.raises(UserError, match="demo model samples only 32x32"):
            sample.main(["--prompt", "a red circle moving left", *flag])
    assert run_cli(sample.main, ["--prompt", "x", "--resolution", "nope"]) == 2
