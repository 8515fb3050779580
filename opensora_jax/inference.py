"""Config-driven sampling runs: an ml_collections config (configs/opensora_v1_2/sample.py) → videos on disk."""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections

from opensora_jax import presets
from opensora_jax.pipeline import Pipeline, save_generation


def read_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """Prompts from `config.prompts` and/or `config.prompt_file` (one per line, blank lines skipped)."""
    prompts = list(config.prompts or [])
    if config.prompt_file:
        path = pathlib.Path(config.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    return prompts


def per_prompt(values, n: int, name: str) -> list[str] | None:
    """A per-prompt list option: empty → None, one value → repeated, else exactly n values."""
    values = list(values or [])
    if not values:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts (give one, or one per prompt)")
    return values


def run(config: ml_collections.ConfigDict, pipeline: Pipeline | None = None) -> list[pathlib.Path]:
    """Generates every prompt of `config` (num_sample times each) and saves videos + sidecars + config.json."""
    prompts = read_prompts(config)
    if config.get("image_size"):  # an explicit (H, W) wins over resolution + aspect ratio (the demo: 32×32)
        height, width = (int(v) for v in config.image_size)
    else:
        height, width = presets.image_size(config.resolution, config.aspect_ratio)
    num_frames = presets.num_frames(config.num_frames)
    refs = per_prompt(config.reference_path, len(prompts), "reference_path")
    strategies = per_prompt(config.mask_strategy, len(prompts), "mask_strategy")
    if pipeline is None:
        pipeline = Pipeline.from_checkpoints(
            stdit3=config.stdit3, vae=config.vae, t5=config.t5, tokenizer=config.tokenizer or None,
            dtype=config.dtype, attention=config.attention, scheduler=config.scheduler.to_dict(),
            mesh=config.get("mesh") or None)
    out_dir = pathlib.Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "config.json"
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    os.replace(tmp, record)

    paths, index = [], 0
    for k in range(config.num_sample):
        for start in range(0, len(prompts), config.batch_size):
            batch = prompts[start : start + config.batch_size]
            gen = pipeline.generate(
                batch, height=height, width=width, num_frames=num_frames, fps=config.fps,
                seed=config.seed + k * 100003 + start, aes=config.aes, flow=config.flow,
                camera_motion=config.camera_motion, clean_captions=config.clean_captions,
                reference_paths=None if refs is None else refs[start : start + len(batch)],
                mask_strategies=None if strategies is None else strategies[start : start + len(batch)],
                loop=config.loop, condition_frame_length=config.condition_frame_length,
                condition_frame_edit=config.condition_frame_edit, align=config.align or None,
                progress=config.progress)
            saved = save_generation(gen, out_dir, fps=config.save_fps, config=config.to_dict(), start_index=index,
                                    frame_grid=config.get("frame_grid", True), upscale=config.get("save_upscale", 1))
            for path in saved:
                print(f"saved {path}", flush=True)
            paths += saved
            index += len(batch)
    return paths
