"""The app's generation worker: one loaded pipeline, one generation at a time, through sample.py's own path.

Each request becomes a sampling config (`controls.request_config`) that `pipelines.run.run` checks, samples and
saves exactly as sample.py does (same seeding, same files: MP4 or PNG, frame grid, JSON sidecar), so a video made
in the page equals `python sample.py` with the same settings. Progress reaches the caller as
`on_progress(stage, done, total)` through the pipeline's `progress_callback`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import secrets
import threading
import time
from typing import Callable

import ml_collections

from opensora_jax.app.controls import Controls, Request, request_config, sample_command
from opensora_jax.pipelines.run import run

ProgressFn = Callable[[str, int, int], None]
MAX_SEED = 2**31 - 1


@dataclasses.dataclass
class Result:
    """One generation's files and its exact settings."""

    video: pathlib.Path  # .mp4, or .png for a one-frame video
    grid: pathlib.Path | None  # the frame grid PNG beside an MP4
    sidecar: pathlib.Path  # the JSON sidecar
    settings: dict  # what the page shows: the form's values as sampled, the sample.py command, timings

    @property
    def is_video(self) -> bool:
        return self.video.suffix == ".mp4"


class _WithProgress:
    """The pipeline as `run` sees it, with the caller's progress callback added to each `generate`."""

    def __init__(self, pipeline, on_progress: ProgressFn | None):
        self._pipeline, self._on_progress = pipeline, on_progress

    def generate_kwargs(self, config, n_prompts):
        return self._pipeline.generate_kwargs(config, n_prompts)

    def generate(self, prompts, **kwargs):
        return self._pipeline.generate(prompts, progress_callback=self._on_progress, **kwargs)


def _use_scheduler_of(pipeline, config: ml_collections.ConfigDict) -> None:
    """v1.2 keeps its steps and guidance in the sampler it builds at load time from `config.scheduler` (2.0 takes
    them per `generate` call): a request's own values get a sampler built the same way."""
    if "scheduler" in config and hasattr(pipeline, "sampler"):
        pipeline.sampler = type(pipeline.sampler)(**config.scheduler.to_dict())


class Generator:
    """Holds the loaded pipeline and the app's starting config; `generate` makes one video per request."""

    def __init__(self, base_config: ml_collections.ConfigDict, pipeline, controls: Controls,
                 model_argv: list[str] | None = None):
        self.base_config, self.pipeline, self.controls = base_config, pipeline, controls
        self.model_argv = list(model_argv or [])
        self._lock = threading.Lock()  # one generation at a time, whoever calls
        self.intervals: list[tuple[float, float]] = []  # (start, end) monotonic times of each generation run

    def config_for(self, request: Request) -> ml_collections.ConfigDict:
        """The sampling config of `request` (a random seed drawn where `request.seed` is None)."""
        if request.seed is None:
            request = dataclasses.replace(request, seed=secrets.randbelow(MAX_SEED))
        return request_config(self.base_config, self.controls, request)

    def generate(self, request: Request, on_progress: ProgressFn | None = None) -> Result:
        """Checks, samples and saves one video; a user mistake raises UserError (or FileNotFoundError) before any
        sampling starts."""
        config = self.config_for(request)
        with self._lock:
            started = time.monotonic()
            _use_scheduler_of(self.pipeline, config)
            [path] = run(config, _WithProgress(self.pipeline, on_progress))
            self.intervals.append((started, time.monotonic()))
        sidecar = path.with_suffix(".json")
        saved = json.loads(sidecar.read_text())
        grid = path.with_name(saved["frame_grid"]) if saved.get("frame_grid") else None
        return Result(path, grid, sidecar, self._settings(config, saved))

    def _settings(self, config: ml_collections.ConfigDict, saved: dict) -> dict:
        family_v2 = self.controls.family == "opensora_v2_0"
        up = config.get("save_upscale", 1)
        settings = {
            "prompt": config.prompts[0],
            "prompt_sent": saved["prompt_sent"],
            "seed": config.seed,
            "size": f"{saved['height'] // up}x{saved['width'] // up}" + (
                f", saved enlarged {up}x to {saved['height']}x{saved['width']}" if up > 1 else ""),
            "frames": saved["frames"],
            "steps": config.num_steps if family_v2 else config.scheduler.num_sampling_steps,
            "guidance": config.guidance if family_v2 else config.scheduler.cfg_scale,
        }
        if family_v2:
            settings["negative_prompt"] = (list(config.negative_prompt) or [""])[0]
            settings["conditioning"] = config.cond_type
        else:
            settings["conditioning"] = (list(config.mask_strategy) or ["none"])[0]
        settings["reference"] = (list(config.reference_path) or [None])[0]
        settings["video"] = saved["video"]
        settings["timings_s"] = {k: round(v, 2) for k, v in saved["timings"].items()}
        settings["command"] = sample_command(config, self.model_argv, self.controls)
        return settings
