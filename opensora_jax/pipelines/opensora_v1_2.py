"""Text/image-to-video sampling pipeline for Open-Sora v1.2: load T5, STDiT3 and the VAE once, generate many.

Follows the reference's inference script (spec §1.2): prompt JSON options and loop segments, score
suffixes, caption cleaning, T5, RFlow sampling with the frame-conditioning mask (always passed, all ones
for plain text-to-video), VAE decode in the model dtype, uint8 frames, loop clips joined.
Outputs are uint8 videos (B, T, H, W, 3).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opensora_jax import presets, video_io
from opensora_jax.checkpoints import ModelLoader, load_model, resolve_checkpoint
from opensora_jax.checks import positive_number
from opensora_jax.conditioning import masks, prompts as prompt_syntax, references
from opensora_jax.errors import UserError
from opensora_jax.lora_files import check_adapters_for, load_adapters
from opensora_jax.models.lora import merge_lora
from opensora_jax.models.vae.opensora_v1_2 import decode_jit, encode_jit
from opensora_jax.parallel import make_mesh, sharding_context
from opensora_jax.pipelines.common import Generation, check_checkpoints, check_run_settings, per_prompt, stage_bar
from opensora_jax.schedulers.rflow import RFlowSampler
from opensora_jax.text import captions
from opensora_jax.text.t5 import TextEncoder
from opensora_jax.text.tokenizer import default_tokenizer_dir


MAX_STEPS = 1000  # the scheduler's num_timesteps: more steps than timesteps is meaningless
MAX_FRAMES = max(presets.NUM_FRAMES_MAP.values())


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
    def from_checkpoints(cls, *, stdit3, vae, t5, tokenizer=None, dtype="bfloat16", attention="auto",
                         scheduler: dict | None = None, mesh=None, lora=None,
                         load: ModelLoader = load_model) -> "Pipeline":
        """Loads each model through `load` (default: converted directories written by `python -m convert`;
        the CLIs pass `convert.load_model`, which also reads the reference's weights).

        `mesh` (a jax Mesh or a spec such as "sequence=8"): parameters are placed sharded as they load and
        generation runs with the model's sharding constraints active. `lora`: a LoRA adapter directory, merged into
        the STDiT3 as it loads (sampling then costs what the base model does).
        """
        for name, path in (("stdit3", stdit3), ("vae", vae), ("t5", t5)):
            if not path:
                raise UserError(f"no {name} checkpoint given (a converted directory, the reference weights, "
                                "or a hub id in the local cache)")
        stdit3, vae, t5 = (resolve_checkpoint(p, f"{n} checkpoint") for n, p in (("stdit3", stdit3), ("vae", vae), ("t5", t5)))
        dt = jnp.dtype(dtype)
        if isinstance(mesh, str):
            mesh = make_mesh(mesh) if mesh else None
        model, _ = load("stdit3", stdit3, overrides={"dtype": dt.name, "attention": attention}, dtype=dt, mesh=mesh)
        if lora:
            load_adapters(lora, model)
            merge_lora(model)
        vae_model, _ = load("vae", vae, dtype=dt, mesh=mesh)
        text_encoder = TextEncoder.from_pretrained(tokenizer or default_tokenizer_dir(t5), t5, load=load,
                                                   model_max_length=model.cfg.model_max_length, mesh=mesh)
        return cls(text_encoder, model, vae_model, RFlowSampler(**(scheduler or {})), dtype=dt, mesh=mesh)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, load: ModelLoader = load_model) -> "Pipeline":
        """The pipeline a sampling config (configs/opensora_v1_2/sample.py) names."""
        return cls.from_checkpoints(
            stdit3=config.stdit3, vae=config.vae, t5=config.t5, tokenizer=config.tokenizer or None,
            dtype=config.dtype, attention=config.attention, scheduler=config.scheduler.to_dict(),
            mesh=config.get("mesh") or None, lora=config.get("lora") or None, load=load)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, prompts: Sequence[str]) -> None:
        """Everything a sampling config can get wrong, checked before any model loads: sizes, counts, the
        scheduler, the prompts' syntax, mask strategies and every reference file (decoded at the target size).
        A mistake raises UserError naming the flag (or config field) and what would be valid."""
        check_run_settings(config)
        check_checkpoints(config, {"stdit3": ("stdit3",), "vae": ("vae",), "t5": ("t5",), "tokenizer": None})
        steps = config.scheduler.num_sampling_steps
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise UserError(f"--steps must be a whole number in 1..{MAX_STEPS}, got {steps!r}")
        cfg = config.scheduler.cfg_scale
        if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
            raise UserError(f"--cfg-scale must be a finite number ≥ 0, got {cfg!r}")
        positive_number("--fps", config.fps)
        if config.get("lora"):
            check_adapters_for(config.lora, "stdit3")
        if not isinstance(config.loop, int) or config.loop < 1:
            raise UserError(f"--loop must be a whole number ≥ 1, got {config.loop!r}")
        shared, listed = cls.generate_kwargs(config, len(prompts))
        if shared["num_frames"] > MAX_FRAMES:
            raise UserError(f"--num-frames {config.num_frames!r} is {shared['num_frames']} frames; at most "
                            f"{MAX_FRAMES} (the longest preset, 32s) are supported")
        if min(shared["height"], shared["width"]) < 16:
            raise UserError(f"video size {shared['height']}x{shared['width']} is too small (at least 16x16)")
        texts, refs, strategies = prompt_syntax.apply_prompt_options(
            list(prompts), listed["reference_paths"], listed["mask_strategies"])
        for text in texts:
            for segment in prompt_syntax.split_loop_prompt(text)[0]:
                if not segment.strip():
                    raise UserError(f"prompt {text!r} has an empty text")
        for strategy in strategies:
            masks.parse_mask_strategy(strategy)
        for paths in refs:
            references.load_references(paths, (shared["height"], shared["width"]))

    @staticmethod
    def generate_kwargs(config: ml_collections.ConfigDict, n_prompts: int) -> tuple[dict, dict]:
        """`generate` arguments from a sampling config: (the same for every batch, per-prompt lists or None)."""
        if config.get("image_size"):  # an explicit (H, W) wins over resolution + aspect ratio (the demo: 32×32)
            height, width = (int(v) for v in config.image_size)
        else:
            height, width = presets.image_size(config.resolution, config.aspect_ratio)
        shared = dict(
            height=height, width=width, num_frames=presets.num_frames(config.num_frames), fps=config.fps,
            aes=config.aes, flow=config.flow, camera_motion=config.camera_motion,
            clean_captions=config.clean_captions, loop=config.loop,
            condition_frame_length=config.condition_frame_length,
            condition_frame_edit=config.condition_frame_edit, align=config.align or None, progress=config.progress)
        listed = dict(reference_paths=per_prompt(config.reference_path, n_prompts, "reference_path"),
                      mask_strategies=per_prompt(config.mask_strategy, n_prompts, "mask_strategy"))
        return shared, listed

    # -------------------------------------------------------------------------------------------- prompts

    def prepare_prompts(self, prompts: Sequence[str], *, aes=None, flow=None, camera_motion=None,
                        clean: bool = True) -> list[str]:
        """Score suffixes then caption cleaning, per loop segment; returns the prompts in loop form."""
        out = []
        for prompt in prompts:
            texts, starts = prompt_syntax.split_loop_prompt(prompt)
            texts = captions.append_score_to_prompts(texts, aes=aes, flow=flow, camera_motion=camera_motion)
            if clean:
                texts = [captions.preprocess(t) for t in texts]
            out.append(prompt_syntax.merge_loop_prompt(texts, starts))
        return out

    # ----------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], **kwargs) -> "Generation":
        """Generates one video per prompt; see `_generate` for the arguments. Runs under the pipeline's mesh."""
        if self.mesh is None:
            return self._generate(prompts, **kwargs)
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
        progress_callback=None,
    ) -> Generation:
        """Generates one video per prompt.

        height/width: pixel size (the decoded video is 8·⌊H/8⌋ × 8·⌊W/8⌋). num_frames: pixel frames per
        clip. `noise` (B, T', H', W', 4) replaces the seeded initial latent noise (of the first loop).
        `progress_callback(stage, done, total)`: told each denoising step ("denoising") and the VAE decode's start
        and end ("VAE decode"), for a progress display beside the tqdm bars of `progress`.
        Returns uint8 videos (B, T_total, H', W', 3) with T_total = num_frames + (loop−1)·(num_frames − 17·cfl/5).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("generate needs at least one prompt")
        if loop < 1:
            raise UserError(f"loop must be ≥ 1, got {loop}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        texts, ref_paths, strategies = prompt_syntax.apply_prompt_options(prompts, reference_paths, mask_strategies)
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
                refs, strategies = masks.append_generated(
                    refs, strategies, previous, loop_i, condition_frame_length, condition_frame_edit)
                timings["encode_loop_s"] = timings.get("encode_loop_s", 0.0) + time.perf_counter() - t0
            loop_key = jax.random.fold_in(key, 1000 + loop_i)
            z = noise if (noise is not None and loop_i == 0) else jax.random.normal(loop_key, latent_shape, jnp.float32)
            z = jnp.asarray(z).astype(self.dtype)
            z, cond_mask = masks.apply_mask_strategy(z, refs, strategies, loop_i, align=align)

            t0 = time.perf_counter()
            encoded = self.text_encoder.encode([prompt_syntax.prompt_for_loop(p, loop_i) for p in sent])
            timings["text_s"] = timings.get("text_s", 0.0) + time.perf_counter() - t0

            t0 = time.perf_counter()
            samples = self.sampler.sample(
                self.model, z, encoded["y"][:, 0], encoded["mask"], cond_mask=jnp.asarray(cond_mask, jnp.float32),
                key=jax.random.fold_in(loop_key, 1), cfg_scale=cfg_scale, progress=progress,
                on_step=None if progress_callback is None else
                functools.partial(progress_callback, "denoising"), **args)
            timings["denoise_s"] = timings.get("denoise_s", 0.0) + time.perf_counter() - t0

            t0 = time.perf_counter()
            with stage_bar("VAE decode", enabled=progress, on_progress=progress_callback):
                video = jax.block_until_ready(decode_jit(self.vae, samples.astype(self.dtype), num_frames))
            clips.append(video)
            latents.append(np.asarray(samples))
            timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t0

        videos = np.stack([
            masks.join_loop_clips([video_io.to_uint8(np.asarray(c[i])) for c in clips], condition_frame_length)
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
            for j, ref in enumerate(references.load_references(paths, size)):
                z = encode_jit(self.vae, jnp.asarray(ref[None], self.dtype), jax.random.fold_in(key, 1000 * i + j))
                latents.append(z[0])
            encoded.append(latents)
        if any(encoded):
            timings["encode_refs_s"] = time.perf_counter() - t0
        return encoded


