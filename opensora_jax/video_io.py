"""Reading and writing videos and images (spec §1.2 step 13).

Frames cross this module's API as uint8 arrays (T, H, W, 3), RGB, channels-last. `to_uint8` turns a
decoded video in [-1, 1] into such frames with the reference's rounding. Writers never leave a
half-written file under the target name: they write a hidden temporary file in the target's directory
and rename it into place once the encoder has succeeded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pathlib
import subprocess
import tempfile
import uuid
import warnings
from fractions import Fraction

import imageio.v3 as iio
import imageio_ffmpeg
import ml_dtypes
import numpy as np
from PIL import Image
from opensora_jax.errors import UserError

# The reference's extension lists (its datasets/utils.py, and torchvision's IMG_EXTENSIONS).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
# Ours: a clip stored losslessly as a NumPy array (T, H, W, 3) uint8 — no decoder process per read, which
# dominates the step time of tiny-model training on small clips (the demo dataset).
ARRAY_VIDEO_EXTENSIONS = (".npy",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_CRF = 23  # libx264's own default, which the reference's writer (PyAV) leaves in place


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB and the stream's fps (None for a still image)."""

    frames: np.ndarray
    fps: float | None


def _extension(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def is_video_path(path) -> bool:
    """True when the file extension is one of VIDEO_EXTENSIONS or ARRAY_VIDEO_EXTENSIONS (case-insensitive)."""
    return _extension(path) in VIDEO_EXTENSIONS + ARRAY_VIDEO_EXTENSIONS


def is_array_video_path(path) -> bool:
    """True for a clip stored as a .npy array (T, H, W, 3) uint8."""
    return _extension(path) in ARRAY_VIDEO_EXTENSIONS


def is_image_path(path) -> bool:
    """True when the file extension is one of IMAGE_EXTENSIONS (case-insensitive)."""
    return _extension(path) in IMAGE_EXTENSIONS


def read_video(path) -> Video:
    """Every frame of a video file, or an image file as a 1-frame video; frames (T, H, W, 3) uint8 RGB.

    Videos are decoded by imageio-ffmpeg's ffmpeg; images by imageio (Pillow), converted to RGB.
    Raises FileNotFoundError for a missing file and ValueError for an unsupported extension.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if is_array_video_path(path):
        return Video(frames=read_array_video(path), fps=None)
    if is_video_path(path):
        return _read_video_file(path)
    if is_image_path(path):
        return Video(frames=read_image(path)[None], fps=None)
    raise UserError(
        f"unsupported file type {_extension(path)!r} for {path!r}; "
        f"videos: {', '.join(VIDEO_EXTENSIONS + ARRAY_VIDEO_EXTENSIONS)}; images: {', '.join(IMAGE_EXTENSIONS)}"
    )


def read_array_video(path, *, mmap: bool = False) -> np.ndarray:
    """A .npy clip: (T, H, W, 3) uint8 (memory-mapped with `mmap`). Raises ValueError naming the file for
    any other shape or dtype, and never unpickles."""
    path = os.fspath(path)
    frames = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise UserError(f"{path!r}: a .npy clip must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    return frames


def write_array_video(frames, path) -> None:
    """Save uint8 frames (T, H, W, 3) losslessly as a .npy clip, atomically (no fps: keep it in the CSV)."""
    frames = _check_frames(frames, "write_array_video")
    if not is_array_video_path(path):
        raise UserError(f"{os.fspath(path)!r}: array clips are written as {', '.join(ARRAY_VIDEO_EXTENSIONS)}")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)

    _write_atomically(path, write)


def read_frames(path) -> np.ndarray:
    """`read_video(path).frames`: (T, H, W, 3) uint8."""
    return read_video(path).frames


def read_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (alpha dropped, grayscale expanded, like PIL's convert("RGB"))."""
    try:
        return np.asarray(iio.imread(os.fspath(path), index=0, mode="RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's; imageio's text can span lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot decode {os.fspath(path)!r} as an image: {reason}") from None


class VideoDecodeError(UserError):
    """ffmpeg could not decode a video file; the message is one line: the file and ffmpeg's own reason."""


def ffmpeg_reason(error: BaseException) -> str:
    """The last line of ffmpeg's log inside an imageio-ffmpeg error (its reason, without the version banner)."""
    text = str(error)
    log = text.split("=== stderr ===", 1)[-1]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else text.strip().splitlines()[0] if text.strip() else type(error).__name__


def decode_error(path, error: BaseException) -> VideoDecodeError:
    """A one-line VideoDecodeError for `path` from an imageio-ffmpeg failure (which embeds ffmpeg's whole log)."""
    return VideoDecodeError(f"cannot decode {os.fspath(path)!r}: {ffmpeg_reason(error)}")


def _read_video_file(path: str) -> Video:
    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    try:
        with warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg with fork + exec; JAX warns about any fork, but a child that
            # execs at once is safe.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    except (OSError, RuntimeError) as e:  # ffmpeg's stderr is captured by imageio-ffmpeg: keep only its reason
        raise decode_error(path, e) from None
    finally:
        reader.close()
    if not frames:
        raise UserError(f"{path!r} holds no video frames")
    fps = float(meta["fps"]) or None  # imageio-ffmpeg reports 0 when it cannot tell
    return Video(frames=np.stack(frames), fps=fps)


def to_uint8(video) -> np.ndarray:
    """Float video in [-1, 1] (any layout) → uint8 the way the reference saves samples.

    clamp to [-1, 1], (x + 1) / 2, x·255 + 0.5, clamp to [0, 255], truncate: round-half-up. Each step
    is computed in the input's floating dtype (bfloat16 included), as the reference does with its
    bf16 decoder output, so bf16 inputs round like the reference's bf16 tensors. NaN maps to 0.
    """
    x = np.asarray(video)
    if not _is_float_dtype(x.dtype):
        raise TypeError(f"to_uint8 expects a floating-point video in [-1, 1], got dtype {x.dtype}")
    dt = x.dtype

    def c(v):
        return np.asarray(v, dtype=dt)

    x = np.where(np.isnan(x), c(-1), x)
    x = np.minimum(np.maximum(x, c(-1)), c(1))  # np.clip would promote bfloat16 to float32
    x = (x + c(1)) / c(2)
    x = x * c(255)
    x = x + c(0.5)  # a separate rounding step, like the reference's mul then add_
    x = np.minimum(np.maximum(x, c(0)), c(255))
    return x.astype(np.float64).astype(np.uint8)


def _is_float_dtype(dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)  # numpy floats and ml_dtypes' bfloat16 & co.
    except ValueError:
        return False
    return True


def _check_frames(frames, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"{what} expects uint8 frames (use to_uint8 for float video), got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"{what} expects frames (T, H, W, 3) with T, H, W ≥ 1, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


def _temporary_sibling(path: pathlib.Path) -> pathlib.Path:
    # Same directory, so the final rename is atomic; same suffix, so the encoder picks the format.
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")


def _write_atomically(path, write) -> None:
    """Run write(temporary_path), then rename the result to `path`; on any error remove the temporary."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist (writing {str(path)!r})")
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_video(frames, path, fps: float, *, crf: int = DEFAULT_CRF) -> None:
    """Encode uint8 frames (T, H, W, 3) as an H.264 (yuv420p, libx264 `crf`) MP4 at `fps`, atomically.

    H and W must be even (yuv420p halves the chroma planes); the VAE's outputs, multiples of 8, are.
    """
    frames = _check_frames(frames, "write_video")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UserError(f"H.264 yuv420p needs even frame sizes, got H×W = {h}×{w}; crop or pad the frames")
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise UserError(f"fps must be a positive number, got {fps!r}")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise UserError(f"crf must be an integer in 0..51 (lower is better quality), got {crf!r}")
    _write_atomically(path, lambda tmp: _encode_mp4(frames, tmp, fps, crf))


def _ffmpeg_mp4_command(path, width: int, height: int, fps, crf: int) -> list[str]:
    rate = str((fps if isinstance(fps, Fraction) else Fraction(float(fps))).limit_denominator(100000))
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", rate, "-i", "-",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-f", "mp4", os.fspath(path),
    ]  # fmt: skip


def _encode_mp4(frames: np.ndarray, path, fps, crf: int) -> None:
    """Pipe raw RGB frames to ffmpeg; raise with ffmpeg's message when it fails."""
    _, h, w, _ = frames.shape
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty ffmpeg cannot block us
        # close_fds=False lets Python use posix_spawn instead of fork (our descriptors are non-inheritable
        # anyway), which avoids JAX's warning about forking a multithreaded process.
        command = _ffmpeg_mp4_command(path, w, h, fps, crf)
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=log, close_fds=False)
        try:
            for frame in frames:
                proc.stdin.write(frame.tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg exited early; its exit status and log tell why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
        if code != 0:
            log.seek(0)
            message = log.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"ffmpeg failed (exit {code}) writing {os.fspath(path)!r}: {message}")


def write_image(frame, path) -> None:
    """Write one uint8 frame (H, W, 3) (or (1, H, W, 3)) as a PNG, atomically."""
    frame = np.asarray(frame)
    frames = _check_frames(frame[None] if frame.ndim == 3 else frame, "write_image")
    if frames.shape[0] != 1:
        raise ValueError(f"write_image takes one frame, got {frames.shape[0]}")
    _write_atomically(path, lambda tmp: Image.fromarray(frames[0]).save(tmp, format="PNG"))


def save_sample(video, save_path, fps: float) -> str:
    """Save a float video (T, H, W, 3) in [-1, 1] like the reference's `save_sample`; returns the path.

    `save_path` has no extension: T == 1 gives `save_path + ".png"`, otherwise `save_path + ".mp4"`
    (H.264 at `fps`). Pixels are converted with `to_uint8`.
    """
    frames = to_uint8(video)
    if frames.ndim != 4:
        raise ValueError(f"save_sample expects a video (T, H, W, 3), got shape {frames.shape}")
    if frames.shape[0] == 1:
        out = f"{os.fspath(save_path)}.png"
        write_image(frames[0], out)
    else:
        out = f"{os.fspath(save_path)}.mp4"
        write_video(frames, out, fps)
    return out


def _grid_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """Up to max_frames frame indices spread evenly from the first frame to the last."""
    return np.unique(np.linspace(0, num_frames - 1, min(num_frames, max_frames)).round().astype(int))


def frame_grid(frames, *, max_frames: int = 8, columns: int = 4, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile up to `max_frames` evenly spaced frames of (T, H, W, 3) into one (H', W', 3) uint8 image.

    Float frames are taken to be in [-1, 1] and go through `to_uint8`.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    frames = _check_frames(frames, "frame_grid")
    if max_frames < 1 or columns < 1 or padding < 0:
        raise ValueError(f"need max_frames ≥ 1, columns ≥ 1, padding ≥ 0; got {max_frames}, {columns}, {padding}")
    picked = frames[_grid_indices(frames.shape[0], max_frames)]
    n, h, w, _ = picked.shape
    cols = min(n, columns)
    rows = -(-n // cols)
    canvas = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, np.uint8)
    for k, frame in enumerate(picked):
        top = padding + (k // cols) * (h + padding)
        left = padding + (k % cols) * (w + padding)
        canvas[top : top + h, left : left + w] = frame
    return canvas


def save_frame_grid(frames, path, *, max_frames: int = 8, columns: int = 4, padding: int = 2) -> None:
    """Write `frame_grid(frames, ...)` as a PNG at `path`, for eyeballing a result."""
    write_image(frame_grid(frames, max_frames=max_frames, columns=columns, padding=padding), path)
