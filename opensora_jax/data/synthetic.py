"""A synthetic captioned video dataset: coloured shapes moving across a black background.

Each clip shows one shape (circle, square or triangle) of one colour moving left, right, up or down,
captioned exactly "a {colour} {shape} moving {direction} on a black background". Clips are H.264 MP4s
(or, with --format npy, lossless (T, H, W, 3) uint8 .npy arrays, much faster to read) under OUT_DIR/clips/, listed in OUT_DIR/train.csv in the training format
(path,text,num_frames,height,width,fps; paths relative to the CSV). Everything is a function of the
seed: clip k is drawn from np.random.default_rng([seed, k]).

    python -m opensora_jax.data.synthetic OUT_DIR --num-clips 64 --frames 32 --size 64 64 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys

import numpy as np

from opensora_jax import video_io
from opensora_jax.errors import UserError

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "purple": (128, 0, 255),
}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) unit steps
CSV_NAME = "train.csv"
CSV_COLUMNS = ("path", "text", "num_frames", "height", "width", "fps")
FORMATS = ("mp4", "npy")


def caption(shape: str, colour: str, direction: str, *, background: bool = True) -> str:
    """"a {colour} {shape} moving {direction}", followed by " on a black background" when `background`."""
    text = f"a {colour} {shape} moving {direction}"
    return text + " on a black background" if background else text


def shape_mask(shape: str, height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Boolean (H, W) mask of a shape centred at (cy, cx) (pixel centres), fitting a circle of `radius`."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":  # apex up, base at the bottom as wide as the height
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise UserError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render_clip(
    shape: str, colour: str, direction: str, num_frames: int, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 frames (T, H, W, 3): the shape travels in `direction` across most of the frame at constant speed."""
    if direction not in DIRECTIONS:
        raise UserError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if colour not in COLOURS:
        raise UserError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
    radius = rng.uniform(0.12, 0.2) * min(height, width)
    dy, dx = DIRECTIONS[direction]
    # Along the motion axis: from near one edge to near the other; across it: a random fixed position.
    extent = height if dy else width
    lo, hi = radius, extent - 1 - radius
    start, end = (hi, lo) if (dy or dx) < 0 else (lo, hi)
    across_extent = width if dy else height
    across = rng.uniform(radius, across_extent - 1 - radius)
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for k, along in enumerate(np.linspace(start, end, num_frames)):
        cy, cx = (along, across) if dy else (across, along)
        frames[k][shape_mask(shape, height, width, cy, cx, radius)] = COLOURS[colour]
    return frames


def make_dataset(
    out_dir, *, num_clips: int = 64, frames: int = 32, size: tuple[int, int] = (64, 64), seed: int = 0, fps: int = 24,
    format: str = "mp4", short_caption_ratio: float = 0.0,
) -> pathlib.Path:
    """Write num_clips clips (`format` mp4 or npy) and the CSV under out_dir; returns the CSV's path.

    A fraction `short_caption_ratio` of the captions (drawn per clip) leaves out " on a black background",
    so a model trained on them also follows the short prompts people type ("a blue square moving up").
    """
    height, width = size
    if num_clips < 1 or frames < 1:
        raise UserError(f"need --num-clips ≥ 1 and --frames ≥ 1, got {num_clips} and {frames}")
    if height < 8 or width < 8 or height % 2 or width % 2:
        raise UserError(f"--size H W must be even and at least 8 (H.264 yuv420p), got {height} {width}")
    if not 0.0 <= short_caption_ratio <= 1.0:
        raise UserError(f"--short-caption-ratio must lie in [0, 1], got {short_caption_ratio}")
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = pathlib.Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(num_clips):
        rng = np.random.default_rng([seed, k])
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        relative = f"clips/clip_{k:05d}.{format}"
        clip = render_clip(shape, colour, direction, frames, height, width, rng)
        if format == "npy":
            video_io.write_array_video(clip, out / relative)
        else:
            video_io.write_video(clip, out / relative, fps)
        short = short_caption_ratio > 0 and rng.random() < short_caption_ratio  # drawn after the clip: clips stay put
        rows.append((relative, caption(shape, colour, direction, background=not short), frames, height, width, fps))
    csv_path = out / CSV_NAME
    tmp = csv_path.with_name(f".{CSV_NAME}.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.data.synthetic",
        description="Write a synthetic text-to-video dataset: MP4 clips of a coloured shape (circle, square, "
        "triangle) moving left/right/up/down on a black background, captioned like 'a red circle moving "
        f"left on a black background', and OUT_DIR/{CSV_NAME} (path,text,num_frames,height,width,fps).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write clips/ and the CSV into (created)")
    parser.add_argument("--num-clips", type=int, default=64, metavar="N", help="number of clips (default 64)")
    parser.add_argument(
        "--frames",
        type=int,
        default=32,
        metavar="T",
        help="frames per clip (default 32; a bucket of T frames takes clips of more than T frames)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(64, 64),
        metavar=("H", "W"),
        help="frame height and width, even (default 64 64)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="random seed; same seed, same dataset (default 0)"
    )
    parser.add_argument("--fps", type=int, default=24, help="frame rate written into the MP4s and the CSV (default 24)")
    parser.add_argument("--short-caption-ratio", type=float, default=0.0, metavar="P",
                        help="fraction of captions without ' on a black background' (default 0)")
    parser.add_argument("--format", choices=FORMATS, default="mp4",
                        help="clip files: mp4 (H.264, lossy) or npy (lossless uint8 arrays, no decoder; default mp4)")
    args = parser.parse_args(argv)
    try:
        path = make_dataset(
            args.out_dir,
            num_clips=args.num_clips,
            frames=args.frames,
            size=tuple(args.size),
            seed=args.seed,
            fps=args.fps,
            format=args.format,
            short_caption_ratio=args.short_caption_ratio,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.num_clips} clips and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
