"""Does a generated clip match its caption? Colour and motion checks for the synthetic-shapes captions,
and the prompt-grid evaluation of a model trained on them (the demo).

    python -m opensora_jax.tools.shape_metrics [--model-dir assets/demo] [--seeds 2] [--out-dir DIR]

prints, for every prompt of the grid colours × shapes × directions and every seed, the colour and the
direction read off the generated frames, and the rate at which both match the prompt.

Frames are uint8 (T, H, W, 3). The shape is the set of pixels whose brightest channel exceeds half of the
frame's brightest value (and at least 64), so blur and a dim background do not count.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import sys
import time

import numpy as np

from opensora_jax.data.synthetic import COLOURS, DIRECTIONS, SHAPES, caption

MIN_BRIGHT = 64  # uint8 level below which a pixel is background
MIN_TRAVEL = 2.0  # pixels the centroid must move for a clip to move at all


def _foreground(frame: np.ndarray) -> np.ndarray:
    level = frame.max(axis=-1).astype(np.float32)
    return level >= max(MIN_BRIGHT, 0.5 * float(level.max()))


def dominant_colour(frames: np.ndarray) -> str | None:
    """The palette colour nearest (RGB distance) to the mean colour of the foreground pixels of all frames;
    None when no frame has a foreground."""
    pixels = [f[_foreground(f)] for f in frames if f.max() >= MIN_BRIGHT]
    pixels = [p for p in pixels if len(p)]
    if not pixels:
        return None
    mean = np.concatenate(pixels).astype(np.float32).mean(axis=0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))]


def centroids(frames: np.ndarray) -> np.ndarray:
    """(T, 2) foreground centroid (y, x) per frame, NaN where a frame has no foreground."""
    out = np.full((len(frames), 2), np.nan, np.float32)
    for t, frame in enumerate(frames):
        if frame.max() < MIN_BRIGHT:
            continue
        fg = np.argwhere(_foreground(frame))
        if len(fg):
            out[t] = fg.mean(axis=0)
    return out


def motion_direction(frames: np.ndarray, *, min_travel: float = MIN_TRAVEL) -> str | None:
    """left / right / up / down: the main axis and sign of the centroid's travel from the first third of the
    clip to the last third; None when it travels less than `min_travel` pixels or the shape is missing."""
    c = centroids(frames)
    third = max(1, len(frames) // 3)
    start, end = np.nanmean(c[:third], axis=0), np.nanmean(c[-third:], axis=0)
    if np.any(np.isnan(start)) or np.any(np.isnan(end)):
        return None
    dy, dx = end - start
    if max(abs(dy), abs(dx)) < min_travel:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


@dataclasses.dataclass(frozen=True)
class Judgement:
    prompt: str
    seed: int
    colour: str | None
    direction: str | None
    want_colour: str
    want_direction: str

    @property
    def colour_ok(self) -> bool:
        return self.colour == self.want_colour

    @property
    def direction_ok(self) -> bool:
        return self.direction == self.want_direction

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.direction_ok


def judge(frames: np.ndarray, *, prompt: str, seed: int, colour: str, direction: str) -> Judgement:
    return Judgement(prompt, seed, dominant_colour(frames), motion_direction(frames), colour, direction)


def prompt_grid(colours=tuple(COLOURS), shapes=SHAPES, directions=tuple(DIRECTIONS)) -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, direction) for every combination, prompts in the short form people type."""
    return [(caption(s, c, d, background=False), c, s, d) for c, s, d in itertools.product(colours, shapes, directions)]


def evaluate(pipeline, *, seeds=(0,), height: int = 32, width: int = 32, num_frames: int = 17, batch_size: int = 48,
             save_dir=None, grid=None) -> list[Judgement]:
    """Generates every grid prompt with every seed (t2v, no score suffixes) and judges each clip."""
    grid = prompt_grid() if grid is None else grid
    judgements = []
    for seed in seeds:
        for start in range(0, len(grid), batch_size):
            chunk = grid[start : start + batch_size]
            gen = pipeline.generate([p for p, *_ in chunk], height=height, width=width, num_frames=num_frames,
                                    seed=seed * 1_000_003 + start, aes=None, progress=False)
            for (prompt, colour, _, direction), frames in zip(chunk, gen.videos):
                judgements.append(judge(np.asarray(frames), prompt=prompt, seed=seed, colour=colour,
                                        direction=direction))
                if save_dir is not None:
                    from opensora_jax import video_io

                    name = f"{seed}_{prompt.replace(' ', '_')}.png"
                    video_io.save_frame_grid(np.repeat(np.repeat(frames, 4, 1), 4, 2), pathlib.Path(save_dir) / name)
    return judgements


def summary(judgements: list[Judgement]) -> dict:
    n = len(judgements)
    return {"clips": n, "match_rate": sum(j.ok for j in judgements) / n,
            "colour_rate": sum(j.colour_ok for j in judgements) / n,
            "direction_rate": sum(j.direction_ok for j in judgements) / n}


def main(argv=None) -> int:
    from opensora_jax.pipelines.opensora_v1_2 import Pipeline

    parser = argparse.ArgumentParser(prog="python -m opensora_jax.tools.shape_metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo"
    parser.add_argument("--model-dir", default=str(default_dir),
                        help="directory with stdit3/, vae/, t5/ (default: the committed demo model)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    parser.add_argument("--out-dir", default=None, help="also save a frame grid PNG per clip here")
    parser.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo" /
                                                "sample.py"),
                        help="sampling config whose scheduler settings are used (default: configs/demo/sample.py)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.model_dir)
    for part in ("stdit3", "vae", "t5"):
        if not (root / part).is_dir():
            parser.error(f"{root / part} not found: --model-dir needs stdit3/, vae/ and t5/ subdirectories")
    if args.out_dir:
        pathlib.Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    from opensora_jax.config_utils import load_config_file

    scheduler = load_config_file(args.config).scheduler.to_dict()
    pipeline = Pipeline.from_checkpoints(stdit3=root / "stdit3", vae=root / "vae", t5=root / "t5", dtype="float32",
                                         scheduler=scheduler)
    started = time.perf_counter()
    judgements = evaluate(pipeline, seeds=range(args.seeds), save_dir=args.out_dir)
    for j in judgements:
        mark = "ok  " if j.ok else "MISS"
        print(f"{mark} seed {j.seed}  {j.prompt:34s} colour {j.colour!s:8s} direction {j.direction!s:6s}")
    s = summary(judgements)
    print(f"{s['clips']} clips in {time.perf_counter() - started:.0f} s: match {s['match_rate']:.1%} "
          f"(colour {s['colour_rate']:.1%}, direction {s['direction_rate']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
