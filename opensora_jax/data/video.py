"""Loading one training sample (spec §8.1): temporal crop, resize-and-crop, normalisation.

Output layout: (T, H, W, 3) float32 in [-1, 1], channels-last. An image is a 1-frame video told fps 120
(IMG_FPS); a video's fps is its native fps // frame_interval (24 // frame_interval when unknown).
Randomness (the temporal crop's start) comes from `sample_rng(seed, epoch, index)`, so a sample loads
identically in any worker process and after a resume.
"""

from __future__ import annotations

import dataclasses
import os

import imageio_ffmpeg
import numpy as np
from PIL import Image

from opensora_jax import video_io
from opensora_jax.frames import resize_crop_image, resize_crop_video, uint8_to_unit, unit_to_signed
from opensora_jax.presets import DEFAULT_FPS, IMG_FPS
from opensora_jax.errors import UserError


class TooShortError(ValueError):
    """A video has fewer frames than its bucket needs."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's random choices, a function of (seed, epoch, row id) only."""
    return np.random.default_rng([seed, epoch, index])


def temporal_crop_indices(
    total_frames: int, num_frames: int, frame_interval: int, rng: np.random.Generator
) -> np.ndarray:
    """Frame indices of the reference's temporal_random_crop (int64, length num_frames).

    span = num_frames·frame_interval; begin ~ U{0 .. max(0, total − span − 1)} (both ends included);
    end = min(begin + span, total); indices = linspace(begin, end − 1, num_frames) cast to int.
    Raises TooShortError when end − begin < num_frames (the reference asserts).
    """
    span = num_frames * frame_interval
    begin = int(rng.integers(0, max(0, total_frames - span - 1) + 1))
    end = min(begin + span, total_frames)
    if end - begin < num_frames:
        raise TooShortError(
            f"not enough frames: {total_frames} frames cannot give {num_frames} at interval {frame_interval}"
        )
    return np.linspace(begin, end - 1, num_frames, dtype=int).astype(np.int64)


def temporal_random_crop(
    frames: np.ndarray, num_frames: int, frame_interval: int, rng: np.random.Generator
) -> np.ndarray:
    """frames[temporal_crop_indices(len(frames), ...)]."""
    return frames[temporal_crop_indices(len(frames), num_frames, frame_interval, rng)]


def load_sample(
    path,
    num_frames: int,
    size: tuple[int, int],
    *,
    frame_interval: int = 1,
    rng: np.random.Generator,
    fallback_fps: float | None = None,
) -> tuple[np.ndarray, float]:
    """One video or image resized and cropped to size (H, W): ((T, H, W, 3) float32 in [-1, 1], fps).

    Videos: all frames are decoded, `num_frames` picked by the temporal crop, then bilinear
    resize-to-cover and centre crop. Images (num_frames must be 1): bicubic resize-to-cover and crop.
    fallback_fps: used when the container does not state its fps (e.g. the CSV's fps column).
    Raises FileNotFoundError, TooShortError, or the decoder's error.
    """
    path = os.fspath(path)
    if video_io.is_image_path(path):
        if num_frames != 1:
            raise UserError(f"{path!r} is an image but its bucket has {num_frames} frames")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path!r}")
        image = resize_crop_image(video_io.read_image(path), size)
        return unit_to_signed(uint8_to_unit(image))[None], float(IMG_FPS)
    video = video_io.read_video(path)
    frames = temporal_random_crop(video.frames, num_frames, frame_interval, rng)
    out = unit_to_signed(resize_crop_video(uint8_to_unit(frames), size))
    native = video.fps or fallback_fps or DEFAULT_FPS
    return np.ascontiguousarray(out, dtype=np.float32), float(native // frame_interval)


@dataclasses.dataclass(frozen=True)
class ProbeInfo:
    num_frames: int
    height: int
    width: int
    fps: float | None


def probe(path) -> ProbeInfo:
    """Frame count, size and fps of a file, for CSV rows that lack them. Videos are decoded once."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if video_io.is_image_path(path):
        with Image.open(path) as im:
            w, h = im.size
        return ProbeInfo(1, h, w, None)
    if video_io.is_array_video_path(path):
        t, h, w, _ = video_io.read_array_video(path, mmap=True).shape
        return ProbeInfo(int(t), int(h), int(w), None)
    if not video_io.is_video_path(path):
        raise UserError(f"unsupported file type {os.path.splitext(path)[1]!r} for {path!r}")
    try:
        reader = imageio_ffmpeg.read_frames(path)
        try:
            meta = next(reader)
        finally:
            reader.close()
        frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    except (OSError, RuntimeError) as e:  # one line with ffmpeg's reason, not its 20-line banner
        raise video_io.decode_error(path, e) from None
    if frames < 1:
        raise UserError(f"{path!r} holds no video frames")
    w, h = meta["size"]
    return ProbeInfo(int(frames), int(h), int(w), float(meta["fps"]) or None)
