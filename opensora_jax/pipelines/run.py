"""Config-driven sampling runs for any family: a sampling config → the family's pipeline → videos on disk.

The config's `family` (default "opensora_v1_2") picks the pipeline from `opensora_jax.families`; the pipeline
turns the config into `generate` arguments (`generate_kwargs`), and this loop batches the prompts, seeds each
batch and writes the videos, their sidecars and OUT_DIR/config.json.
"""

from __future__ import annotations

import pathlib

import ml_collections

from opensora_jax import families
from opensora_jax.checkpoints import ModelLoader, load_model
from opensora_jax.pipelines.common import next_free_index, read_prompts, save_generation, write_json

DEFAULT_FAMILY = "opensora_v1_2"


def load_pipeline(config: ml_collections.ConfigDict, *, load: ModelLoader = load_model):
    """The pipeline of `config.family`, with its models loaded through `load`."""
    return families.pipeline_class(config.get("family", DEFAULT_FAMILY)).from_config(config, load=load)


def check(config: ml_collections.ConfigDict) -> list[str]:
    """Validates `config` for its family's pipeline without loading anything; returns the prompts."""
    prompts = read_prompts(config)
    families.pipeline_class(config.get("family", DEFAULT_FAMILY)).check_config(config, prompts)
    return prompts


def run(config: ml_collections.ConfigDict, pipeline=None, *, load: ModelLoader = load_model) -> list[pathlib.Path]:
    """Generates every prompt of `config` (num_sample times each) and saves videos + sidecars + config.json.

    The config is checked first (`check`), so a mistake costs no model load. New files take the next free
    index in OUT_DIR (sample_0003.mp4 after sample_0002.*) unless `config.overwrite`, which starts at 0."""
    prompts = check(config)
    if pipeline is None:
        pipeline = load_pipeline(config, load=load)
    shared, listed = pipeline.generate_kwargs(config, len(prompts))
    out_dir = pathlib.Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config.to_dict())

    paths, index = [], 0 if config.get("overwrite", False) else next_free_index(out_dir)
    for k in range(config.num_sample):
        for start in range(0, len(prompts), config.batch_size):
            batch = prompts[start : start + config.batch_size]
            per_batch = {name: None if values is None else values[start : start + len(batch)]
                         for name, values in listed.items()}
            gen = pipeline.generate(batch, seed=config.seed + k * 100003 + start, **shared, **per_batch)
            saved = save_generation(gen, out_dir, fps=config.save_fps, config=config.to_dict(), start_index=index,
                                    frame_grid=config.get("frame_grid", True), upscale=config.get("save_upscale", 1))
            for path in saved:
                print(f"saved {path}", flush=True)
            paths += saved
            index += len(batch)
    return paths
