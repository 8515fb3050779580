"""What every family's sampling pipeline shares: the result type, prompt lists, progress and output files.

Videos are uint8 (B, T, H, W, 3). `save_generation` writes MP4 (PNG for one frame), a frame grid and a JSON
sidecar per video, each under a temporary name first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import ml_collections
import numpy as np

from opensora_jax import video_io
from opensora_jax.checks import (check_checkpoint, check_dtype, check_mesh, check_writable_dir, one_of,
                                 positive_number, readable_file)
from opensora_jax.errors import UserError


DTYPES = ("bfloat16", "float32")
ATTENTIONS = ("auto", "blockwise", "xla", "cudnn", "splash")


@dataclasses.dataclass
class Generation:
    """One generate() call's result."""

    videos: np.ndarray  # uint8 (B, T, H, W, 3)
    prompts_sent: list[str]  # per sample, as given to T5 (suffixes and cleaning applied; loop form joined)
    seed: int
    timings: dict[str, float]
    latents: list[np.ndarray] = dataclasses.field(default_factory=list)  # per loop clip: (B, T', H', W', 4)


def read_prompt_csv(path) -> list[dict[str, str]]:
    """Rows of a prompt CSV (the reference's format: a `text` column, optional `ref`, `neg`, `name`)."""
    import csv

    path = pathlib.Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {str(path)!r} is not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"--prompt-file {str(path)!r}: not a valid CSV: {e}") from None
    if not rows or "text" not in rows[0]:
        raise UserError(f"--prompt-file {str(path)!r}: a prompt CSV needs a header with a 'text' column "
                        f"(optional: ref, neg, name); got {sorted(rows[0]) if rows else 'no rows'}")
    for i, row in enumerate(rows):
        if not (row.get("text") or "").strip():
            raise UserError(f"--prompt-file {str(path)!r}: row {i + 2} has an empty text")
    return rows


def prompt_csv_column(config: ml_collections.ConfigDict, column: str) -> list[str] | None:
    """A column of the prompt CSV for the CSV's prompts (None without a CSV or that column); prompts given
    with --prompt come first and get ''."""
    if not str(config.get("prompt_file") or "").endswith(".csv"):
        return None
    rows = read_prompt_csv(config.prompt_file)
    if column not in rows[0]:
        return None
    return [""] * len(config.prompts or []) + [(row.get(column) or "").strip() for row in rows]


def read_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """Prompts from `config.prompts` and/or `config.prompt_file` (UTF-8, one per line, blank lines skipped; a
    .csv file is read as the reference's prompt CSV, its `text` column)."""
    prompts = list(config.prompts or [])
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("--prompt: every prompt needs some text (got an empty one)")
    if config.prompt_file:
        readable_file(config.prompt_file, "--prompt-file")
    if config.prompt_file and str(config.prompt_file).endswith(".csv"):
        prompts += [row["text"].strip() for row in read_prompt_csv(config.prompt_file)]
    elif config.prompt_file:
        path = pathlib.Path(config.prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {str(path)!r} is not UTF-8 text") from None
        if "\x00" in text:
            raise UserError(f"--prompt-file {str(path)!r} is a binary file, not one prompt per line")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    return prompts


def check_run_settings(config: ml_collections.ConfigDict) -> None:
    """Checks what every family's sampling run shares before any model loads: counts, rates, the output
    directory. A mistake raises UserError naming the flag and what would be valid."""
    for flag, value in (("--num-sample", config.num_sample), ("--batch-size", config.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be a whole number ≥ 1, got {value!r}")
    if not isinstance(config.seed, int) or config.seed < 0:
        raise UserError(f"--seed must be a whole number ≥ 0, got {config.seed!r}")
    positive_number("--save-fps", config.save_fps)
    upscale = config.get("save_upscale", 1)
    if not isinstance(upscale, int) or upscale < 1:
        raise UserError(f"--config.save_upscale must be a whole number ≥ 1, got {upscale!r}")
    check_writable_dir(config.out_dir, "--out-dir")
    if config.get("dtype"):
        check_dtype("--dtype", config.dtype, DTYPES)
    if config.get("attention"):
        one_of("--attention", config.attention, ATTENTIONS)
    check_mesh("--mesh", config.get("mesh"))


def check_checkpoints(config: ml_collections.ConfigDict, fields: dict) -> None:
    """Each checkpoint flag that is set names an existing path (or a hub id) and, where it is a converted
    directory, one of the models `fields` gives for it ({config field: model names, or None for any})."""
    for field, models in fields.items():
        value = config.get(field)
        if value:
            check_checkpoint(value, f"--{field.replace('_', '-')}", models=models)


def next_free_index(out_dir, name_prefix: str = "sample") -> int:
    """One past the highest `{name_prefix}_NNNN.*` already in `out_dir` (0 for an empty or new directory), so a
    new run never overwrites an earlier one."""
    pattern = re.compile(rf"{re.escape(name_prefix)}_(\d+)\.(?:mp4|png|json)$")
    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        return 0
    taken = [int(m.group(1)) for f in out_dir.iterdir() if (m := pattern.match(f.name))]
    return max(taken, default=-1) + 1


def per_prompt(values, n: int, name: str) -> list[str] | None:
    """A per-prompt list option: empty → None, one value → repeated, else exactly n values."""
    values = list(values or [])
    if not values:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{name} has {len(values)} entries for {n} prompts (give one, or one per prompt)")
    return values


def write_json(path, payload) -> None:
    """Writes `payload` as indented JSON under a temporary name, then renames it into place."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class stage_bar:
    """A one-step progress bar around a long compiled call (e.g. the VAE decode), showing its elapsed time.
    `on_progress(desc, done, total)`, if given, hears (desc, 0, 1) on entry and (desc, 1, 1) on exit."""

    def __init__(self, desc: str, enabled: bool, on_progress=None):
        self.desc, self.enabled, self.bar, self.on_progress = desc, enabled, None, on_progress

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1, desc=self.desc, unit="call")
        if self.on_progress is not None:
            self.on_progress(self.desc, 0, 1)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
        if self.on_progress is not None and exc[0] is None:
            self.on_progress(self.desc, 1, 1)


def save_generation(gen: Generation, out_dir, *, fps: float, config: dict, name_prefix: str = "sample",
                    start_index: int = 0, frame_grid: bool = True, upscale: int = 1) -> list[pathlib.Path]:
    """Writes each video (MP4, or PNG for one frame) plus a JSON sidecar: config, seed, prompt sent, timings.

    frame_grid: also a PNG of 8 evenly spaced frames beside each MP4 (`{stem}_grid.png`), to check a
    video at a glance. upscale: nearest-neighbour enlargement of what is written (small demo videos).
    """
    if not (isinstance(upscale, int) and upscale >= 1):
        raise ValueError(f"upscale must be an integer ≥ 1, got {upscale!r}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (frames, prompt) in enumerate(zip(gen.videos, gen.prompts_sent)):
        stem = out_dir / f"{name_prefix}_{start_index + i:04d}"
        if upscale > 1:
            frames = np.repeat(np.repeat(frames, upscale, axis=1), upscale, axis=2)
        grid = None
        if frames.shape[0] == 1:
            path = pathlib.Path(f"{stem}.png")
            video_io.write_image(frames[0], path)
        else:
            path = pathlib.Path(f"{stem}.mp4")
            video_io.write_video(frames, path, fps)
            if frame_grid:
                grid = pathlib.Path(f"{stem}_grid.png")
                video_io.save_frame_grid(frames, grid)
        sidecar = {"video": path.name, "prompt_sent": prompt, "seed": gen.seed, "timings": gen.timings,
                   "frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                   "frame_grid": grid.name if grid else None, "config": config}
        write_json(f"{stem}.json", sidecar)
        paths.append(path)
    return paths


def safe_name(text: str, limit: int = 50) -> str:
    """A file-name-safe slug of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "sample"
