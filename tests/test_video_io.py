"""Video / image reading and writing, uint8 conversion, atomic writes (spec §1.2 step 13)."""

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from opensora_jax import video_io


def _smooth_video(t=8, h=32, w=48):
    """Gradients that move over time: easy on H.264, so a round trip stays close."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 40 + 3 * xx + 4 * tt
    g = 60 + 4 * yy
    b = np.full_like(r, 150)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _files(directory):
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------------------------- to_uint8


def test_to_uint8_rounds_half_up_and_clamps():
    x = np.array([-5.0, -1.0, 0.0, 1.0, 5.0, np.nan], np.float32)
    np.testing.assert_array_equal(video_io.to_uint8(x), [0, 0, 128, 255, 255, 0])  # 127.5 → 128
    # y·255 = 100.3 → 100 and 100.7 → 101: a floor of y·255 + 0.5, not a truncation of y·255
    y = np.array([100.3, 100.7]) / 255
    np.testing.assert_array_equal(video_io.to_uint8((2 * y - 1).astype(np.float64)), [100, 101])


def test_to_uint8_steps_in_the_input_dtype():
    # In bfloat16, (0.328125 + 1) / 2 · 255 rounds to 169, + 0.5 ties to 170: the reference's bf16 tensors
    # give 170 (checked against torch when this was written); float32 arithmetic gives 169.
    assert video_io.to_uint8(np.array([0.328125], np.float32))[0] == 169
    assert video_io.to_uint8(np.array([0.328125], ml_dtypes.bfloat16))[0] == 170
    assert video_io.to_uint8(jnp.asarray([0.328125], jnp.bfloat16))[0] == 170


def test_to_uint8_keeps_shape_and_rejects_integers():
    out = video_io.to_uint8(np.zeros((2, 4, 6, 3), np.float32))
    assert out.shape == (2, 4, 6, 3) and out.dtype == np.uint8
    with pytest.raises(TypeError, match="floating-point"):
        video_io.to_uint8(np.zeros(3, np.uint8))


# ------------------------------------------------------------------------------------------ video files


def test_mp4_round_trip(tmp_path):
    frames = _smooth_video()
    path = tmp_path / "clip.mp4"
    video_io.write_video(frames, path, fps=24)
    video = video_io.read_video(path)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == 24.0
    assert np.abs(video.frames.astype(int) - frames).mean() < 3
    assert _files(tmp_path) == ["clip.mp4"]


def test_mp4_fractional_fps(tmp_path):
    video_io.write_video(_smooth_video(t=3), tmp_path / "ntsc.mp4", fps=30000 / 1001)
    assert abs(video_io.read_video(tmp_path / "ntsc.mp4").fps - 29.97) < 0.01


def test_write_video_rejects_bad_input(tmp_path):
    frames = _smooth_video(t=2)
    with pytest.raises(TypeError, match="uint8 frames"):
        video_io.write_video(frames.astype(np.float32), tmp_path / "a.mp4", 24)
    with pytest.raises(ValueError, match="even frame sizes.*31×48"):
        video_io.write_video(frames[:, :31], tmp_path / "a.mp4", 24)
    with pytest.raises(ValueError, match=r"shape \(2, 32, 48\)"):
        video_io.write_video(frames[..., 0], tmp_path / "a.mp4", 24)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        video_io.write_video(frames, tmp_path / "a.mp4", 0)
    with pytest.raises(ValueError, match="crf must be an integer in 0..51"):
        video_io.write_video(frames, tmp_path / "a.mp4", 24, crf=99)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video_io.write_video(frames, tmp_path / "missing" / "a.mp4", 24)
    assert _files(tmp_path) == []


def test_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    make_command = video_io._ffmpeg_mp4_command

    def bad_codec(*args):
        command = make_command(*args)
        command[command.index("libx264")] = "no_such_encoder"
        return command

    monkeypatch.setattr(video_io, "_ffmpeg_mp4_command", bad_codec)  # the real ffmpeg then fails
    with pytest.raises(RuntimeError, match="ffmpeg failed.*no_such_encoder"):
        video_io.write_video(_smooth_video(t=2), tmp_path / "a.mp4", 24)
    assert _files(tmp_path) == []


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.mp4"
    target.write_bytes(b"old")

    def half_write(frames, path, fps, crf):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_encode_mp4", half_write)
    with pytest.raises(KeyboardInterrupt):
        video_io.write_video(_smooth_video(t=2), target, 24)
    assert _files(tmp_path) == ["a.mp4"] and target.read_bytes() == b"old"


# ------------------------------------------------------------------------------------------ image files


def test_png_round_trip_and_rgb_conversion(tmp_path):
    frame = _smooth_video(t=1)[0]
    video_io.write_image(frame, tmp_path / "f.png")
    video = video_io.read_video(tmp_path / "f.png")
    assert video.fps is None
    np.testing.assert_array_equal(video.frames, frame[None])
    Image.fromarray(frame[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(video_io.read_frames(tmp_path / "gray.png")[0], np.repeat(frame[..., :1], 3, -1))
    Image.fromarray(np.dstack([frame, np.full(frame.shape[:2], 7, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(video_io.read_frames(tmp_path / "rgba.png")[0], frame)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        video_io.read_video(tmp_path / "missing.mp4")
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"unsupported file type '.gif'.*\.mp4.*\.png"):
        video_io.read_video(tmp_path / "a.gif")


def test_save_sample_png_for_one_frame_mp4_otherwise(tmp_path):
    still = np.zeros((1, 16, 16, 3), np.float32)
    assert video_io.save_sample(still, tmp_path / "s0", fps=24) == str(tmp_path / "s0.png")
    np.testing.assert_array_equal(video_io.read_frames(tmp_path / "s0.png"), 128)
    clip = np.linspace(-1, 1, 4 * 16 * 16 * 3, dtype=np.float32).reshape(4, 16, 16, 3)
    assert video_io.save_sample(clip, tmp_path / "s1", fps=8) == str(tmp_path / "s1.mp4")
    video = video_io.read_video(tmp_path / "s1.mp4")
    assert video.frames.shape == (4, 16, 16, 3) and video.fps == 8.0
    assert _files(tmp_path) == ["s0.png", "s1.mp4"]


def test_frame_grid_layout(tmp_path):
    frames = np.stack([np.full((4, 6, 3), 10 * i, np.uint8) for i in range(10)])
    grid = video_io.frame_grid(frames, max_frames=6, columns=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    picked = [grid[1 + r * 5, 1 + c * 7, 0] for r in range(2) for c in range(3)]
    assert picked == [0, 20, 40, 50, 70, 90]  # evenly spaced over 0..9, first and last included
    assert grid[0, 0, 0] == 0
    video_io.save_frame_grid(frames, tmp_path / "grid.png", max_frames=4)
    assert video_io.read_frames(tmp_path / "grid.png").shape == (1, 4 + 4, 4 * 8 + 2, 3)
    assert video_io.frame_grid(np.zeros((1, 4, 6, 3), np.float32)).max() == 128  # float input: to_uint8
