"""Frame resizing and value ranges shared by reference loading and the training data.

The reference's `resize_crop` (resize to cover the target, then centre crop) for images (PIL bicubic) and
videos (torch-style bilinear without antialias), and its Normalize(mean=0.5, std=0.5) to [-1, 1].
Frames are channels-last: (H, W, C) images, (T, H, W, C) videos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fill_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after scaling (height, width) by the larger of the two target/source ratios, so that the
    result covers `target` (rounded like the reference: Python's round, half to even)."""
    th, tw = target
    rh, rw = th / height, tw / width
    if rh > rw:
        return th, round(width * rh)
    return round(height * rw), tw


def resize_crop_image(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Reference `resize_crop` for an image: PIL bicubic resize to cover `target`, then a centred crop.

    image: (H, W, 3) uint8 → (th, tw, 3) uint8. The crop offset is round(excess / 2), half to even.
    """
    h, w = image.shape[:2]
    sh, sw = fill_size(h, w, target)
    resized = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BICUBIC))
    th, tw = target
    top, left = int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0))
    return resized[top : top + th, left : left + tw]


def bilinear_resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (T, H, W, C) float frames to size (H', W'), half-pixel centres, no antialias:
    the sampling of torch's `interpolate(mode="bilinear", align_corners=False)`."""
    frames = np.asarray(frames, np.float32)
    rows = _linear_weights(frames.shape[1], size[0])
    cols = _linear_weights(frames.shape[2], size[1])
    out = _interpolate_axis(frames, 1, *rows)
    return _interpolate_axis(out, 2, *cols)


def _linear_weights(n_in: int, n_out: int):
    """For each output index: the two source indices and their weights (source clamped at 0)."""
    scale = np.float32(n_in) / np.float32(n_out)
    # scale·(i + 0.5) − 0.5 with a single float32 rounding: torch's CPU kernel compiles it to an FMA, and
    # rounding the product first moves far source positions by up to ~1e-5 pixel.
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w_hi = (src - lo).astype(np.float32)
    return lo, hi, np.float32(1) - w_hi, w_hi


def _interpolate_axis(x: np.ndarray, axis: int, lo, hi, w_lo, w_hi) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.take(x, lo, axis) * w_lo.reshape(shape) + np.take(x, hi, axis) * w_hi.reshape(shape)


def resize_crop_video(frames: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Reference `resize_crop` for a video: (T, H, W, C) float in [0, 1] → (T, th, tw, C), bilinear
    resize (no antialias) to cover `target`, then a crop offset by ⌊excess / 2⌋."""
    _, h, w, _ = frames.shape
    sh, sw = fill_size(h, w, target)
    resized = bilinear_resize(frames, (sh, sw))
    th, tw = target
    top, left = (sh - th) // 2, (sw - tw) // 2
    return resized[:, top : top + th, left : left + tw]




def uint8_to_unit(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [0, 1]."""
    return frames_uint8.astype(np.float32) / np.float32(255)


def unit_to_signed(x: np.ndarray) -> np.ndarray:
    """[0, 1] → [-1, 1], the reference's Normalize(mean=0.5, std=0.5)."""
    return (x - np.float32(0.5)) / np.float32(0.5)
