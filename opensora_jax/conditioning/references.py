"""Reference images and videos for frame conditioning: paths, loading, resizing to the target size.

Reference pixels come out channels-last, (T, H, W, 3) float32 in [-1, 1]; VAE encoding is the pipeline's job.
"""

from __future__ import annotations

import os
import re

import numpy as np

from opensora_jax import frames, video_io
from opensora_jax.errors import UserError

# ------------------------------------------------------------------------------------------- references

_URL = re.compile(r"^(?:http|ftp)s?://", re.IGNORECASE)


def is_url(path: str) -> bool:
    """True for http(s):// and ftp(s):// addresses."""
    return bool(_URL.match(path))


def split_reference_paths(reference_path: str | None) -> list[str]:
    """The ";"-separated paths of one prompt's reference_path ("" or None → []), whitespace-stripped."""
    if not reference_path:
        return []
    paths = [p.strip() for p in reference_path.split(";")]
    if not all(paths):
        raise UserError(f"empty path in reference_path {reference_path!r} (paths are separated by ';')")
    return paths



def _decoded(read, path: str, kind: str) -> np.ndarray:
    """`read(path)`, with a decoder's failure on a damaged or mislabelled file reported as the user's."""
    try:
        return read(path)
    except (OSError, ValueError, RuntimeError) as e:  # PIL, imageio and ffmpeg raise these for bad files
        raise UserError(f"reference {path!r} could not be decoded as an {kind}: {type(e).__name__}: {e}") from None


def load_reference(path: str, size: tuple[int, int]) -> np.ndarray:
    """One reference file resized and cropped to size (H, W): (T, H, W, 3) float32 in [-1, 1].

    Images give T = 1; videos all their frames. Local files only: a URL raises ValueError.
    """
    path = os.fspath(path)
    if is_url(path):
        raise UserError(
            f"reference {path!r} is a URL; downloading is not supported: download it and pass the local path"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such reference file: {path!r}")
    if video_io.is_video_path(path):
        video = _decoded(video_io.read_frames, path, "video")
        return frames.unit_to_signed(frames.resize_crop_video(frames.uint8_to_unit(video), size))
    if video_io.is_image_path(path):
        image = frames.resize_crop_image(_decoded(video_io.read_image, path, "image"), size)
        return frames.unit_to_signed(frames.uint8_to_unit(image))[None]
    raise UserError(
        f"unsupported reference file type {os.path.splitext(path)[1]!r} for {path!r}; "
        f"videos: {', '.join(video_io.VIDEO_EXTENSIONS)}; images: {', '.join(video_io.IMAGE_EXTENSIONS)}"
    )


def load_references(reference_path: str | None, size: tuple[int, int]) -> list[np.ndarray]:
    """Every reference of one prompt's ";"-separated reference_path, each (T, H, W, 3) in [-1, 1]."""
    return [load_reference(p, size) for p in split_reference_paths(reference_path)]
