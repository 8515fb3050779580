"""Text/image/video-to-video sampling for Open-Sora 2.0: T5 + CLIP → MMDiT with 3-way guidance → Hunyuan VAE
(or Video DC-AE) → uint8 videos (B, T, H, W, 3).

Follows the reference's inference (spec §1): prompts get " {fps} FPS." and " {m} motion score." suffixes; the
negative prompt defaults to ""; the latent noise is drawn from the seed; `cond_type` picks which latent frames the
references fix (opensora_jax.conditioning.latent_conditions); references are resized/cropped to cover the video
and encoded with the posterior sample; after sampling the reference frames are pasted back (batch element 0, as the
reference, or every sample with `paste_all_samples`); the decoded video is cut to `num_frames`.
"""

from __future__ import annotations

import math
import pathlib
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opensora_jax import presets_v2_0 as sizes
from opensora_jax import video_io
from opensora_jax.checkpoints import ModelLoader, load_model, resolve_checkpoint
from opensora_jax.checks import positive_number
from opensora_jax.conditioning import references
from opensora_jax.conditioning.latent_conditions import (check_cond_type, inference_condition, paste_references,
                                                         v2v_frames)
from opensora_jax.errors import UserError
from opensora_jax.lora_files import check_adapters_for, load_adapters
from opensora_jax.models.lora import merge_lora
from opensora_jax.models.mmdit import image_position_ids, pack, unpack
from opensora_jax.parallel import make_mesh, sharding_context
from opensora_jax.pipelines.common import Generation, check_checkpoints, check_run_settings, per_prompt, prompt_csv_column, stage_bar
from opensora_jax.schedulers import flow_v2
from opensora_jax.text.opensora_v2_0 import TextConditioner

VAE_KINDS = ("hunyuan_vae", "dc_ae")
# Pixel frames a v2v condition reads from its reference video (the reference: 33, or 65 for the _easy types).
V2V_REFERENCE_FRAMES = {"v2v_head": 33, "v2v_tail": 33, "v2v_head_easy": 65, "v2v_tail_easy": 65}
# Where each model lies in a directory laid out as the reference's ckpts/ (`--ckpt-dir`).
CKPT_DIR_LAYOUT = {
    "hunyuan_vae": {"mmdit": "Open_Sora_v2.safetensors", "vae": "hunyuan_vae.safetensors"},
    "dc_ae": {"mmdit": "Open_Sora_v2_Video_DC_AE.safetensors", "vae": "F32T4C128_AE.safetensors"},
    "text": {"t5": "google/t5-v1_1-xxl", "clip": "openai/clip-vit-large-patch14"},
}
_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")


def inference_prompt(text: str, fps: int, motion_score: str | int | None) -> str:
    """The reference's inference suffixes: "raining, sea" → "raining, sea. 24 FPS. 4 motion score."."""
    text = text.strip()
    if not _FPS_SUFFIX.search(text):
        if not text.endswith("."):
            text += "."
        text = f"{text} {fps} FPS."
    if motion_score is not None and str(motion_score) != "":
        text = f"{text} {motion_score} motion score."
    return text


def _encode_fn(kind: str):
    if kind == "hunyuan_vae":
        return nnx.jit(lambda vae, x, key: vae.encode(x, sample=True, key=key))
    return nnx.jit(lambda vae, x, key: vae.encode(x))


def _decode_fn():
    return nnx.jit(lambda vae, z: vae.decode(z))


def v2v_reference_frames(cond_type: str, num_frames: int, *, causal: bool = True) -> int:
    """Pixel frames a v2v reference video must have so that its clip covers the frames the condition fixes (0 for
    other cond types)."""
    if not cond_type.startswith("v2v"):
        return 0
    fixed = min(v2v_frames(cond_type, causal), sizes.latent_frames(num_frames, causal=causal))
    return (fixed - 1) * 4 + 1 if causal else fixed * 4


class Pipeline:
    """The 2.0 models and settings; `generate` runs prompts → uint8 videos."""

    def __init__(self, text: TextConditioner, model, vae, *, vae_kind: str = "hunyuan_vae", dtype=jnp.bfloat16,
                 mesh=None):
        if vae_kind not in VAE_KINDS:
            raise UserError(f"vae kind {vae_kind!r} unknown; choose one of {VAE_KINDS}")
        self.text, self.model, self.vae, self.vae_kind = text, model, vae, vae_kind
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self._encode, self._decode = _encode_fn(vae_kind), _decode_fn()

    # ----------------------------------------------------------------------------------- geometry of the VAE

    @property
    def causal(self) -> bool:
        """Hunyuan is causal (T = 4k+1 → k+1 latent frames); the DC-AE is not (T = 4k → k)."""
        return self.vae_kind == "hunyuan_vae"

    @staticmethod
    def spatial_compression(vae_kind: str) -> int:
        return 8 if vae_kind == "hunyuan_vae" else 32

    # --------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoints(cls, *, mmdit, vae, t5, clip, t5_tokenizer=None, clip_tokenizer=None,
                         vae_kind: str = "hunyuan_vae", dtype="bfloat16", attention="auto", mesh=None,
                         t5_max_length: int = 512, lora=None, load: ModelLoader = load_model) -> "Pipeline":
        """Loads the four models through `load` (converted directories; the CLIs pass `convert.load_model`, which
        also reads the reference's files). `mesh`: a jax Mesh or spec ("fsdp=8", "sequence=8"); parameters are
        placed sharded as they load and generation runs under it. `lora`: a LoRA adapter directory, merged into the
        MMDiT as it loads (sampling then costs what the base model does)."""
        for name, path in (("mmdit", mmdit), ("vae", vae), ("t5", t5), ("clip", clip)):
            if not path:
                raise UserError(f"no {name} checkpoint given (a converted directory or the reference's file; "
                                "--ckpt-dir DIR finds all four in the reference's ckpts/ layout)")
        dt = jnp.dtype(dtype)
        if isinstance(mesh, str):
            mesh = make_mesh(mesh) if mesh else None
        model, _ = load("mmdit", resolve_checkpoint(mmdit, "mmdit checkpoint"),
                        overrides={"dtype": dt.name, "attention": attention}, dtype=dt, mesh=mesh)
        if lora:
            load_adapters(lora, model)
            merge_lora(model)
        vae_model, _ = load(vae_kind, resolve_checkpoint(vae, f"{vae_kind} checkpoint"), dtype=dt, compute_dtype=dt,
                            mesh=mesh)
        text = TextConditioner.from_pretrained(resolve_checkpoint(t5, "t5 checkpoint"),
                                               resolve_checkpoint(clip, "clip checkpoint"),
                                               t5_tokenizer=t5_tokenizer or None, clip_tokenizer=clip_tokenizer or None,
                                               t5_max_length=t5_max_length, dtype=dt, param_dtype=dt, mesh=mesh,
                                               load=load)
        return cls(text, model, vae_model, vae_kind=vae_kind, dtype=dt, mesh=mesh)

    @staticmethod
    def checkpoint_paths(config: ml_collections.ConfigDict) -> dict[str, str]:
        """mmdit / vae / t5 / clip paths: the explicit ones, else from `ckpt_dir` in the reference's layout."""
        paths = {name: config.get(name, "") for name in ("mmdit", "vae", "t5", "clip")}
        if config.get("ckpt_dir"):
            root = pathlib.Path(config.ckpt_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"--ckpt-dir {str(root)!r}: no such directory")
            layout = {**CKPT_DIR_LAYOUT[config.vae_kind], **CKPT_DIR_LAYOUT["text"]}
            for name, rel in layout.items():
                if not paths[name]:
                    if not (root / rel).exists():
                        raise FileNotFoundError(f"--ckpt-dir {str(root)!r} has no {rel} (the {name} checkpoint); "
                                                f"pass --{name.replace('_', '-')} PATH instead")
                    paths[name] = str(root / rel)
        return paths

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, load: ModelLoader = load_model) -> "Pipeline":
        """The pipeline a 2.0 sampling config (configs/opensora_v2_0/*.py) names."""
        paths = cls.checkpoint_paths(config)
        return cls.from_checkpoints(**paths, t5_tokenizer=config.t5_tokenizer, clip_tokenizer=config.clip_tokenizer,
                                    vae_kind=config.vae_kind, dtype=config.dtype, attention=config.attention,
                                    t5_max_length=config.get("t5_max_length", 512), mesh=config.get("mesh") or None,
                                    lora=config.get("lora") or None, load=load)

    # ----------------------------------------------------------------------------------------------- checks

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, prompts: Sequence[str]) -> None:
        """Everything a 2.0 sampling config can get wrong, before any model loads (UserError naming the flag)."""
        check_run_settings(config)
        if config.vae_kind not in VAE_KINDS:
            raise UserError(f"--vae-kind must be one of {', '.join(VAE_KINDS)}, got {config.vae_kind!r}")
        check_checkpoints(config, {"mmdit": ("mmdit",), "vae": (config.vae_kind,), "t5": ("t5",), "clip": ("clip",),
                                   "t5_tokenizer": None, "clip_tokenizer": None})
        if not isinstance(config.num_steps, int) or not 1 <= config.num_steps <= 1000:
            raise UserError(f"--steps must be a whole number in 1..1000, got {config.num_steps!r}")
        for flag, value in (("--guidance", config.guidance), ("--guidance-img", config.guidance_img)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"{flag} must be a finite number ≥ 0, got {value!r}")
        if config.get("flow_shift") is not None:
            positive_number("--flow-shift", config.flow_shift)
        positive_number("--fps", config.fps)
        if config.get("lora"):
            check_adapters_for(config.lora, "mmdit")
        check_cond_type(config.cond_type)
        cls.checkpoint_paths(config) if config.get("ckpt_dir") else None
        shared, listed = cls.generate_kwargs(config, len(prompts))
        if listed["reference_paths"] is None and config.cond_type != "t2v":
            raise UserError(f"--cond-type {config.cond_type} needs --reference (an image or a video)")
        if listed["reference_paths"] is not None and config.cond_type == "t2v":
            raise UserError("--reference needs --cond-type (i2v_head, i2v_tail, i2v_loop, v2v_head, ...); "
                            "with t2v it would be ignored")
        for paths in listed["reference_paths"] or []:
            refs = references.split_reference_paths(paths)
            if config.cond_type == "i2v_loop" and len(refs) > 2:
                raise UserError(f"i2v_loop takes a head and a tail reference (';'-separated), got {len(refs)}")
            loaded = references.load_references(paths, (shared["height"], shared["width"]))
            causal = config.vae_kind == "hunyuan_vae"
            need = v2v_reference_frames(config.cond_type, shared["num_frames"], causal=causal)
            if loaded and need and len(loaded[0]) < need:
                raise UserError(f"--reference {paths!r} has {len(loaded[0])} frames; {config.cond_type} with "
                                f"--num-frames {shared['num_frames']} needs a video of at least {need}")

    @staticmethod
    def generate_kwargs(config: ml_collections.ConfigDict, n_prompts: int) -> tuple[dict, dict]:
        """`generate` arguments from a 2.0 sampling config: (the same for every batch, per-prompt lists or None)."""
        compression = Pipeline.spatial_compression(config.vae_kind) * (2 if config.vae_kind == "hunyuan_vae" else 1)
        if config.get("image_size"):
            height, width = (int(v) for v in config.image_size)
        else:
            height, width = sizes.image_size(config.resolution, config.aspect_ratio, compression)
        num_frames = sizes.check_num_frames(int(config.num_frames), causal=config.vae_kind == "hunyuan_vae")
        guidance = flow_v2.GuidanceV2(guidance=config.guidance, guidance_img=config.guidance_img,
                                      text_osci=config.text_osci, image_osci=config.image_osci,
                                      scale_temporal_osci=config.scale_temporal_osci)
        shared = dict(height=height, width=width, num_frames=num_frames, num_steps=config.num_steps,
                      guidance=guidance, shift=config.shift, flow_shift=config.get("flow_shift"), fps=config.fps,
                      motion_score=config.motion_score, cond_type=config.cond_type,
                      paste_all_samples=config.paste_all_samples, progress=config.progress)
        listed = dict(reference_paths=per_prompt(config.reference_path, n_prompts, "--reference"),
                      negative_prompts=per_prompt(config.negative_prompt, n_prompts, "--negative-prompt"))
        # A prompt CSV's `ref` and `neg` columns, where the flags give none (an empty cell: no reference / "").
        for name, column in (("reference_paths", "ref"), ("negative_prompts", "neg")):
            values = prompt_csv_column(config, column)
            if listed[name] is None and values is not None and any(values):
                listed[name] = values
        return shared, listed

    # ------------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], **kwargs) -> Generation:
        """Generates one video per prompt (see `_generate`); runs under the pipeline's mesh."""
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
        seed: int = 42,
        num_steps: int = 50,
        guidance: flow_v2.GuidanceV2 = flow_v2.GuidanceV2(),
        shift: bool = True,
        flow_shift: float | None = None,
        fps: int = 24,
        motion_score: str | int | None = "4",
        negative_prompts: Sequence[str] | None = None,
        cond_type: str = "t2v",
        reference_paths: Sequence[str] | None = None,
        paste_all_samples: bool = False,
        noise: jax.Array | None = None,
        progress: bool = True,
        progress_callback=None,
    ) -> Generation:
        """One video per prompt: uint8 (B, num_frames, H', W', 3) with H', W' the decoded size.

        `noise` (B, T', H', W', C) replaces the seeded initial latent. `reference_paths`: per prompt, ';'-separated
        files (i2v_loop: head;tail). t2v runs the 2-branch guidance batch (equal to the reference's 3 branches up to
        float32 rounding); image conditions run all 3. `progress_callback(stage, done, total)` hears the start and
        end of the denoising and of the VAE decode (a web page's progress display).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("generate needs at least one prompt")
        check_cond_type(cond_type)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        b = len(prompts)
        key = jax.random.key(seed)
        p = self.model.cfg.patch_size
        t_lat = sizes.latent_frames(num_frames, causal=self.causal)
        h_lat, w_lat = sizes.latent_hw(height, width, spatial_compression=self.spatial_compression(self.vae_kind),
                                       patch_size=p)
        channels = self.model.cfg.latent_channels
        shape = (b, t_lat, h_lat, w_lat, channels)

        refs = self._encode_references(reference_paths, cond_type, (height, width), num_frames, b,
                                       jax.random.fold_in(key, 1),
                                       timings)
        if cond_type != "t2v" and not any(refs):
            cond_type = "t2v"  # as the reference: no references, no condition
        mask, masked = inference_condition(shape, cond_type, refs, causal=self.causal)

        sent = [inference_prompt(t, fps, motion_score) for t in prompts]
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * b
        t0 = time.perf_counter()
        txt, vec = self.text.encode(sent + negatives + negatives)
        timings["text_s"] = time.perf_counter() - t0

        z = noise if noise is not None else jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        z = pack(jnp.asarray(z).astype(self.dtype), p)
        image_condition = cond_type != "t2v"
        cond = pack(jnp.concatenate([jnp.asarray(mask), jnp.asarray(masked)], -1), p).astype(self.dtype) \
            if image_condition else None
        tokens_per_frame = (h_lat // p) * (w_lat // p)
        ts = flow_v2.timesteps(num_steps, tokens_per_frame, t_lat, shift=shift, alpha=flow_shift)
        text_scales, image_scales = guidance.schedules(num_steps, t_lat, image_condition="i2v" in cond_type)
        t0 = time.perf_counter()
        with stage_bar(f"denoising ({num_steps} steps)", enabled=progress, on_progress=progress_callback):
            x = flow_v2.sample_jit(self.model, z, cond, txt.astype(self.dtype), vec.astype(self.dtype),
                                   image_position_ids(b, (t_lat, h_lat, w_lat), p), ts, text_scales, image_scales,
                                   tokens_per_frame=tokens_per_frame, branches=3 if image_condition else 2)
            x = jax.block_until_ready(x)
        timings["denoise_s"] = time.perf_counter() - t0
        latents = paste_references(np.asarray(unpack(x, (t_lat, h_lat, w_lat), p), np.float32), cond_type, refs,
                                   all_samples=paste_all_samples)

        t0 = time.perf_counter()
        with stage_bar("VAE decode", enabled=progress, on_progress=progress_callback):
            video = jax.block_until_ready(self._decode(self.vae, jnp.asarray(latents, self.dtype)))
        timings["decode_s"] = time.perf_counter() - t0
        videos = video_io.to_uint8(np.asarray(video[:, :num_frames], np.float32))
        timings["total_s"] = time.perf_counter() - start
        return Generation(videos=videos, prompts_sent=sent, seed=seed, timings=timings, latents=[latents])

    def _encode_references(self, reference_paths, cond_type, size, num_frames, batch, key, timings) -> list[list | None]:
        """Per prompt, its reference latents (T', H', W', C): i2v_head the first frame of the first file, i2v_tail the
        last frame of the last file, i2v_loop both; v2v the first / last 33 (65 for _easy) frames of the video,
        encoded as one clip. Encoded with the posterior sample where the VAE has one."""
        if cond_type == "t2v" or reference_paths is None:
            return [None] * batch
        t0 = time.perf_counter()
        out: list[list | None] = []
        for i, paths in enumerate(reference_paths):
            loaded = references.load_references(paths, size)
            if not loaded:
                out.append(None)
                continue
            if cond_type.startswith("v2v"):
                n = V2V_REFERENCE_FRAMES[cond_type]
                clip = loaded[0][:n] if "head" in cond_type else loaded[0][-n:]
                need = v2v_reference_frames(cond_type, num_frames, causal=self.causal)
                if len(clip) < need:
                    raise UserError(f"reference {paths!r} has {len(loaded[0])} frames; {cond_type} with "
                                    f"{num_frames} frames needs a video of at least {need}")
                clips = [clip[: self._largest_valid(len(clip))]]
            else:
                clips = ([loaded[0][:1]] if cond_type in ("i2v_head", "i2v_loop") else []) + \
                        ([loaded[-1][-1:]] if cond_type in ("i2v_tail", "i2v_loop") else [])
            latents = [np.asarray(self._encode(self.vae, jnp.asarray(c[None], self.dtype),
                                               jax.random.fold_in(key, 1000 * i + j))[0], np.float32)
                       for j, c in enumerate(clips)]
            out.append(latents)
        timings["encode_refs_s"] = time.perf_counter() - t0
        return out

    def _largest_valid(self, n: int) -> int:
        """The longest clip of at most n frames the autoencoder takes (causal 4k+1, else a multiple of 4)."""
        return (n - 1) // 4 * 4 + 1 if self.causal else max(n // 4 * 4, 4)
