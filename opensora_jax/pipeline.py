"""Text/image-to-video sampling pipeline for Open-Sora v1.2: load T5, STDiT3 and the VAE once, generate many.

Follows the reference's inference script (spec §1.2): prompt JSON options and loop segments, score
suffixes, caption cleaning, T5, RFlow sampling with the frame-conditioning mask (always passed, all ones
for plain text-to-video), VAE decode in the model dtype, uint8 frames, loop clips joined.
Outputs are uint8 videos (B, T, H, W, 3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opensora_jax import captions, conditioning, presets, video_io
from opensora_jax.models.vae.opensora_v1_2 import decode_jit, encode_jit
from opensora_jax.schedulers.rflow import RFlowSampler


@dataclasses.dataclass
class Generation:
    """One generate() call's result."""

    videos: np.ndarray  # uint8 (B, T, H, W, 3)
    prompts_sent: list[str]  # per sample, as given to T5 (suffixes and cleaning applied; loop form joined)
    seed: int
    timings: dict[str, float]
    latents: list[np.ndarray] = dataclasses.field(default_factory=list)  # per loop clip: (B, T', H', W', 4)


class Pipeline:
    """Holds the three models and the sampler; `generate` runs prompts → uint8 videos."""

    def __init__(self, text_encoder, model, vae, sampler: RFlowSampler, *, dtype=jnp.bfloat16, mesh=None):
        self.text_encoder = text_encoder
        self.model = model
        self.vae = vae
        self.sampler = sampler
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh

    @classmethod
    def from_checkpoints(cls, *, stdit3, vae, t5, tokenizer=None, dtype="bfloat16", attention="xla",
                         scheduler: dict | None = None, mesh=None) -> "Pipeline":
        """Loads each model from a converted directory (python -m convert) or the reference's weights.

        `mesh` (a jax Mesh or a spec such as "sequence=8"): parameters are placed sharded as they load and
        generation runs with the model's sharding constraints active.
        """
        from opensora_jax.parallel import make_mesh

        from convert.registry import load_model, resolve_checkpoint, resolve_config
        from opensora_jax.text import TextEncoder

        for name, path in (("stdit3", stdit3), ("vae", vae), ("t5", t5)):
            if not path:
                raise ValueError(f"no {name} checkpoint given (a converted directory, the reference weights, "
                                 "or a hub id in the local cache)")
        stdit3, vae, t5 = (resolve_checkpoint(p, f"{n} checkpoint") for n, p in (("stdit3", stdit3), ("vae", vae), ("t5", t5)))
        dt = jnp.dtype(dtype)
        if isinstance(mesh, str):
            mesh = make_mesh(mesh) if mesh else None
        model_config = {**resolve_config("stdit3", stdit3), "dtype": dt.name, "attention": attention}
        model, _ = load_model("stdit3", stdit3, config=model_config, dtype=dt, mesh=mesh)
        vae_model, _ = load_model("vae", vae, dtype=dt, mesh=mesh)
        text_encoder = TextEncoder.from_pretrained(tokenizer or default_tokenizer_dir(t5), t5,
                                                   model_max_length=model.cfg.model_max_length, mesh=mesh)
        return cls(text_encoder, model, vae_model, RFlowSampler(**(scheduler or {})), dtype=dt, mesh=mesh)

    # -------------------------------------------------------------------------------------------- prompts

    def prepare_prompts(self, prompts: Sequence[str], *, aes=None, flow=None, camera_motion=None,
                        clean: bool = True) -> list[str]:
        """Score suffixes then caption cleaning, per loop segment; returns the prompts in loop form."""
        out = []
        for prompt in prompts:
            texts, starts = conditioning.split_loop_prompt(prompt)
            texts = captions.append_score_to_prompts(texts, aes=aes, flow=flow, camera_motion=camera_motion)
            if clean:
                texts = [captions.preprocess(t) for t in texts]
            out.append(conditioning.merge_loop_prompt(texts, starts))
        return out

    # ----------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], **kwargs) -> "Generation":
        """Generates one video per prompt; see `_generate` for the arguments. Runs under the pipeline's mesh."""
        if self.mesh is None:
            return self._generate(prompts, **kwargs)
        from opensora_jax.parallel import sharding_context

        with sharding_context(self.mesh):
            return self._generate(prompts, **kwargs)

    def _generate(
        self,
        prompts: Sequence[str],
        *,
        height: int,
        width: int,
        num_frames: int,
        fps: float = presets.DEFAULT_FPS,
        seed: int = 42,
        aes: float | None = 6.5,
        flow: float | None = None,
        camera_motion: str | None = None,
        clean_captions: bool = True,
        reference_paths: Sequence[str] | None = None,
        mask_strategies: Sequence[str] | None = None,
        loop: int = 1,
        condition_frame_length: int = 5,
        condition_frame_edit: float = 0.0,
        align: int | None = 5,
        cfg_scale: float | None = None,
        noise: jax.Array | None = None,
        progress: bool = True,
    ) -> Generation:
        """Generates one video per prompt.

        height/width: pixel size (the decoded video is 8·⌊H/8⌋ × 8·⌊W/8⌋). num_frames: pixel frames per
        clip. `noise` (B, T', H', W', 4) replaces the seeded initial latent noise (of the first loop).
        Returns uint8 videos (B, T_total, H', W', 3) with T_total = num_frames + (loop−1)·(num_frames − 17·cfl/5).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if loop < 1:
            raise ValueError(f"loop must be ≥ 1, got {loop}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        texts, ref_paths, strategies = conditioning.apply_prompt_options(prompts, reference_paths, mask_strategies)
        b = len(texts)
        key = jax.random.key(seed)
        refs = self._encode_references(ref_paths, (height, width), jax.random.fold_in(key, 1), timings)
        sent = self.prepare_prompts(texts, aes=aes, flow=flow, camera_motion=camera_motion, clean=clean_captions)
        latent_shape = (b, *self.vae.latent_size(num_frames, height, width), self.vae.config.latent_channels)
        args = {name: jnp.full((b,), value, self.dtype) for name, value in
                (("height", height), ("width", width), ("num_frames", num_frames),
                 ("fps", presets.model_fps(fps, num_frames)))}

        clips, latents = [], []
        for loop_i in range(loop):
            if loop_i > 0:
                t0 = time.perf_counter()
                previous = encode_jit(self.vae, jnp.asarray(clips[-1]), jax.random.fold_in(key, 100 + loop_i))
                refs, strategies = conditioning.append_generated(
                    refs, strategies, previous, loop_i, condition_frame_length, condition_frame_edit)
                timings["encode_loop_s"] = timings.get("encode_loop_s", 0.0) + time.perf_counter() - t0
            loop_key = jax.random.fold_in(key, 1000 + loop_i)
            z = noise if (noise is not None and loop_i == 0) else jax.random.normal(loop_key, latent_shape, jnp.float32)
            z = jnp.asarray(z).astype(self.dtype)
            z, cond_mask = conditioning.apply_mask_strategy(z, refs, strategies, loop_i, align=align)

            t0 = time.perf_counter()
            encoded = self.text_encoder.encode([conditioning.prompt_for_loop(p, loop_i) for p in sent])
            timings["text_s"] = timings.get("text_s", 0.0) + time.perf_counter() - t0

            t0 = time.perf_counter()
            samples = self.sampler.sample(
                self.model, z, encoded["y"][:, 0], encoded["mask"], cond_mask=jnp.asarray(cond_mask, jnp.float32),
                key=jax.random.fold_in(loop_key, 1), cfg_scale=cfg_scale, progress=progress, **args)
            timings["denoise_s"] = timings.get("denoise_s", 0.0) + time.perf_counter() - t0

            t0 = time.perf_counter()
            with _stage_bar("VAE decode", enabled=progress):
                video = jax.block_until_ready(decode_jit(self.vae, samples.astype(self.dtype), num_frames))
            clips.append(video)
            latents.append(np.asarray(samples))
            timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t0

        videos = np.stack([
            conditioning.join_loop_clips([video_io.to_uint8(np.asarray(c[i])) for c in clips], condition_frame_length)
            for i in range(b)
        ])
        timings["total_s"] = time.perf_counter() - start
        return Generation(videos=videos, prompts_sent=sent, seed=seed, timings=timings, latents=latents)

    def _encode_references(self, ref_paths, size, key, timings) -> list[list]:
        """Each prompt's references, VAE-encoded (sampled posteriors, as the reference) to (T', H', W', 4)."""
        t0 = time.perf_counter()
        encoded = []
        for i, paths in enumerate(ref_paths):
            latents = []
            for j, ref in enumerate(conditioning.load_references(paths, size)):
                z = encode_jit(self.vae, jnp.asarray(ref[None], self.dtype), jax.random.fold_in(key, 1000 * i + j))
                latents.append(z[0])
            encoded.append(latents)
        if any(encoded):
            timings["encode_refs_s"] = time.perf_counter() - t0
        return encoded


class _stage_bar:
    """A one-step progress bar around a long compiled call (e.g. the VAE decode), showing its elapsed time."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1, desc=self.desc, unit="call")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def default_tokenizer_dir(t5_path) -> pathlib.Path:
    """Where the T5 tokenizer is looked for when none is given: T5_DIR/tokenizer (a converted directory),
    else the T5 checkpoint's own directory (a transformers repo)."""
    t5_path = pathlib.Path(t5_path)
    directory = t5_path if t5_path.is_dir() else t5_path.parent
    return directory / "tokenizer" if (directory / "tokenizer").is_dir() else directory


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
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        os.replace(tmp, f"{stem}.json")
        paths.append(path)
    return paths


def safe_name(text: str, limit: int = 50) -> str:
    """A file-name-safe slug of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "sample"
