"""The Open-Sora 2.0 training run: config → data → (autoencoder, T5 + CLIP | precomputed features) → jitted MMDiT
updates (`mmdit_step`) → checkpoints, with exact resume (the shared `driver.run_loop`).

Batches of videos are encoded on the fly by the frozen autoencoder (Hunyuan VAE: posterior sample; Video DC-AE),
with the reference frames a condition mix needs encoded on their own, and the captions (plus the reference's
" {fps} FPS, {m} motion score." suffix) by T5 and CLIP. Feature batches (`cli/features_v2_0.py`) carry all of
these already.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opensora_jax.checkpoints import ModelLoader, load_model, save_module
from opensora_jax.conditioning.training_conditions import (check_weights, needed_references, reference_frames,
                                                           usable_types)
from opensora_jax.data.features import FeatureLoader, load_null_text
from opensora_jax.data.loader import make_video_loader
from opensora_jax.errors import UserError
from opensora_jax.models import mmdit
from opensora_jax.models.vae import hunyuan
from opensora_jax.parallel import make_mesh, shard_batch, shard_params, sharding_context
from opensora_jax.text.opensora_v2_0 import TextConditioner
from opensora_jax.training import run_dir
from opensora_jax.training.checkpointing import start_or_resume
from opensora_jax.training.driver import run_loop, to_device
from opensora_jax.training.mmdit_step import StepConfig, init_state, train_step
from opensora_jax.training.optim import make_optimizer

AUTOENCODERS = ("hunyuan_vae", "dc_ae")


# ------------------------------------------------------------------------------------------------ the model


def model_config(config: ml_collections.ConfigDict) -> mmdit.MMDiTConfig:
    """The MMDiT architecture (preset + `model` overrides) with the run's dtypes, remat and attention."""
    arch = dict(config.model.to_dict()) if "model" in config else {}
    execution = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                     attention=config.get("attention", "auto"))
    blocks = config.get("remat_blocks")
    if blocks:
        execution["remat_blocks"] = tuple(int(n) for n in blocks)
    if config.get("model_preset"):
        return mmdit.preset(config.model_preset, **arch, **execution)
    return mmdit.MMDiTConfig(**arch, **execution)


def init_from(model: mmdit.MMDiT, source: nnx.Module) -> list[str]:
    """Copies `source`'s weights into `model` (in place), as the reference starts 2.0 training from a 2.0
    checkpoint or from Flux.1-dev. Shapes must match. The only differences allowed: `cond_in` absent from the
    source (kept as initialised: zeros, so the model starts as the source) and `guidance_in` absent from the model
    (Flux's guidance embedder, dropped). Returns notes on what was not copied."""
    target = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    given = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    missing = sorted("/".join(map(str, k)) for k in target if k not in given)
    extra = sorted("/".join(map(str, k)) for k in given if k not in target)
    bad_missing = [k for k in missing if not k.startswith("cond_in/")]
    bad_extra = [k for k in extra if not k.startswith("guidance_in/")]
    if bad_missing or bad_extra:
        raise UserError(f"from_pretrained does not fit this model: missing {bad_missing[:5]}, unexpected "
                        f"{bad_extra[:5]} (check model_preset / model overrides against the checkpoint)")
    for key, var in target.items():
        if key not in given:
            continue
        value = given[key].get_value()
        if value.shape != var.get_value().shape:
            raise UserError(f"from_pretrained: {'/'.join(map(str, key))} has shape {value.shape}, the model "
                            f"{var.get_value().shape}")
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    notes = []
    if missing:
        notes.append(f"cond_in not in the checkpoint: zero-initialised ({len(missing)} arrays)")
    if extra:
        notes.append(f"guidance_in of the checkpoint not used ({len(extra)} arrays)")
    return notes


def build_model(config: ml_collections.ConfigDict, load: ModelLoader = load_model) -> mmdit.MMDiT:
    """A fresh MMDiT (seeded init), initialised from `from_pretrained` when set (a converted 2.0 directory, the
    reference's safetensors, or Flux.1-dev in its fused layout, converted as it loads)."""
    cfg = model_config(config)
    model = mmdit.MMDiT(cfg, rngs=nnx.Rngs(config.seed))
    if config.get("from_pretrained"):
        source, _ = load("mmdit", config.from_pretrained, dtype=jnp.dtype(cfg.param_dtype))
        for note in init_from(model, source):
            print(f"from_pretrained: {note}", flush=True)
    return model


def trainable(config: ml_collections.ConfigDict):
    """The nnx filter of what gets gradients: every parameter, or only the LoRA adapters."""
    from opensora_jax.models import lora as lora_lib

    return lora_lib.lora_filter if lora_enabled(config) else nnx.Param


def lora_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config fine-tunes LoRA adapters (lora.rank > 0) instead of every parameter."""
    return bool(config.get("lora") and config.lora.get("rank", 0))


def lora_config(config: ml_collections.ConfigDict):
    """The run's `models.lora.LoRAConfig`: rank, alpha (default: the rank, scale 1), targets (default: the model's
    attention projections)."""
    from opensora_jax.models import lora as lora_lib

    lo = config.lora
    targets = tuple(lo.targets) if lo.get("targets") else None
    return lora_lib.LoRAConfig(rank=int(lo.rank), alpha=float(lo.get("alpha") or lo.rank), targets=targets)


# ------------------------------------------------------------------------------------------------ the batches


def caption_suffix(fps: float | None, motion: float | None = None) -> str:
    """The reference's training caption suffix: " {fps} FPS, {m} motion score." (parts only where known)."""
    parts = []
    if fps is not None and math.isfinite(fps) and int(fps) != 0:
        parts.append(f"{int(fps)} FPS")
    if motion is not None and math.isfinite(motion):
        parts.append(f"{int(motion + 0.5)} motion score")
    return " " + ", ".join(parts) + "." if parts else ""


class BatchEncoder:
    """A loader batch → the train step's inputs: x0 latents, the reference latents of the condition mix, T5 `txt`
    and CLIP `y_vec`, and the null encodings for text dropout. Feature batches pass through."""

    def __init__(self, autoencoder, text: TextConditioner | None, *, kind: str, references: tuple[str, ...],
                 seed: int = 0, caption_suffix: bool = True, null=None):
        self.ae, self.text, self.kind = autoencoder, text, kind
        self.references = references
        self.key = jax.random.key(seed + 7919)
        self.caption_suffix = caption_suffix
        self._null = null
        self._warned: set[str] = set()

    def null(self):
        """(null_txt (1, L, D), null_vec (1, D')): the encodings of ""."""
        if self._null is None:
            self._null = tuple(np.asarray(a) for a in self.text.null(1))
        return self._null

    def __call__(self, batch: dict, step: int) -> dict:
        if "latent" in batch:
            out = {"x0": jnp.asarray(batch["latent"]), "txt": jnp.asarray(batch["txt"]),
                   "y_vec": jnp.asarray(batch["y_vec"])}
            out.update({f"ref_{n}": jnp.asarray(batch[f"ref_{n}"]) for n in self.references
                        if batch["latent"].shape[1] > 1})
            null_txt, null_vec = self.null()
            return {**out, "null_txt": jnp.asarray(null_txt), "null_vec": jnp.asarray(null_vec)}
        if self.ae is None or self.text is None:
            raise UserError("raw video batches need the `ae`, `t5` and `clip` checkpoints (or train from features)")
        key = jax.random.fold_in(self.key, step)
        out = self.encode_video(batch["video"], key)
        out["txt"], out["y_vec"] = self.encode_text(batch)
        null_txt, null_vec = self.null()
        return {**out, "null_txt": jnp.asarray(null_txt), "null_vec": jnp.asarray(null_vec)}

    def _encode(self, video, key):
        video = jnp.asarray(video, self.ae.dtype if hasattr(self.ae, "dtype") else jnp.float32)
        if self.kind == "hunyuan_vae":
            return hunyuan.encode_jit(self.ae, video, key, sample=True)
        return self.ae.encode(video)  # the DC-AE jits its tiles itself; its encoder is deterministic

    def encode_video(self, video, key) -> dict:
        """x0 of the whole clip and, for videos, each reference latent encoded from its own frames."""
        keys = jax.random.split(key, 1 + len(self.references))
        out = {"x0": self._encode(video, keys[0])}
        if video.shape[1] > 1:
            for name, k in zip(self.references, keys[1:]):
                n = reference_frames(name)
                frames = video[:, :n] if name in ("head", "v2v_head", "v2v_head_easy") else video[:, -n:]
                if n > 1 and video.shape[1] <= n:
                    continue  # v2v needs a longer clip; such clips never draw it
                out[f"ref_{name}"] = self._encode(frames, k)
        return out

    def captions(self, batch: dict) -> list[str]:
        texts = [str(t) for t in np.asarray(batch["text"])]
        if not self.caption_suffix:
            return texts
        fps = np.asarray(batch.get("fps", np.full(len(texts), np.nan)), np.float64)
        motion = np.asarray(batch.get("motion", np.full(len(texts), np.nan)), np.float64)
        images = np.asarray(batch.get("num_frames", np.full(len(texts), 2)), np.float64) == 1
        return [t + ("" if image else caption_suffix(f, m)) for t, f, m, image in zip(texts, fps, motion, images)]

    def encode_text(self, batch: dict):
        """(txt (B, L, D), y_vec (B, D')) of the batch's captions (suffixed). A tokenizer warning (unknown words,
        truncation) is shown the first time its text appears, not at every step."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.text.encode(self.captions(batch))
        for warning in caught:
            text = str(warning.message).split(": ", 1)[-1]  # without "prompt i '...'": the same words warn once
            if text not in self._warned:
                self._warned.add(text)
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return out


def load_frozen(config: ml_collections.ConfigDict, load: ModelLoader = load_model):
    """(autoencoder, text conditioner), or (None, None) when training from features."""
    if config.data.get("features"):
        return None, None
    missing = [k for k in ("ae", "t5", "clip") if not config.get(k)]
    if missing:
        raise UserError(f"training from videos needs checkpoint paths for {missing} in the config "
                        f"(--config.{missing[0]}=PATH), or data.features")
    kind = config.get("ae_type", "hunyuan_vae")
    if kind not in AUTOENCODERS:
        raise UserError(f"ae_type {kind!r} unknown; choose one of {AUTOENCODERS}")
    ae_dtype = jnp.dtype(config.get("ae_dtype", "float32"))
    ae, _ = load(kind, config.ae, dtype=ae_dtype)
    text = TextConditioner.from_pretrained(
        config.t5, config.clip, t5_tokenizer=config.get("t5_tokenizer") or None,
        clip_tokenizer=config.get("clip_tokenizer") or None, t5_max_length=config.get("t5_max_length", 512),
        dtype=jnp.dtype(config.get("text_dtype", "float32")), load=load)
    return ae, text


def make_loader(config: ml_collections.ConfigDict):
    """Precomputed features (`data.features`) or a CSV of videos (`data.csv`) bucketed with the 2.0 tables."""
    data = config.data
    if data.get("features"):
        return FeatureLoader(data.features, seed=config.seed, num_workers=data.num_workers)
    if not data.get("csv"):
        raise UserError("no training data: set data.csv (video CSV) or data.features (precomputed features)")
    return make_video_loader(data.csv, data.bucket_config, resolutions=data.get("resolutions") or "opensora_v2_0",
                             seed=config.seed, frame_interval=data.frame_interval, num_workers=data.num_workers,
                             fps_max=data.get("fps_max") or None)


# ------------------------------------------------------------------------------------------------ the run


def step_config(config: ml_collections.ConfigDict, mix) -> StepConfig:
    dropout = config.get("text_dropout") or {}
    ema = float(config.get("ema_decay") or 0.0)
    return StepConfig(cond_weights=mix, t5_dropout=float(dropout.get("t5", 0.31622777)),
                      clip_dropout=float(dropout.get("clip", 0.31622777)), sigma_min=float(config.sigma_min),
                      causal=config.get("ae_type", "hunyuan_vae") != "dc_ae", ema_decay=ema if ema > 0 else None,
                      no_ref_loss=bool(config.get("no_i2v_ref_loss", False)))


def pixel_frames(latent_frames: int, *, causal: bool = True, time_compression: int = 4) -> int:
    """Pixel frames behind `latent_frames` (the inverse of presets_v2_0.latent_frames): 1 for an image."""
    if latent_frames == 1:
        return 1
    return (latent_frames - 1) * time_compression + 1 if causal else latent_frames * time_compression


def make_step_fn(graphdef, tx, base_cfg: StepConfig, encoder: BatchEncoder, mesh=None):
    """The driver's step function: encode the (device) batch, pick the condition mix its length allows, update."""

    def step_fn(state, batch, step):
        inputs = encoder(batch, step)
        x0 = inputs["x0"]
        # The clip length from the latent's (static) shape: reading batch["num_frames"] would sync with the device.
        frames = pixel_frames(x0.shape[1], causal=base_cfg.causal)
        cfg = dataclasses.replace(base_cfg, cond_weights=usable_types(base_cfg.cond_weights, frames))
        if mesh is None:
            state, metrics = train_step(graphdef, tx, cfg, state, inputs)
        else:
            with sharding_context(mesh):
                state, metrics = train_step(graphdef, tx, cfg, state, shard_batch(inputs, mesh))
        return state, metrics, {"shape": list(x0.shape)}

    return step_fn


ENCODER_KEYS = ("latent", "txt", "y_vec", "video", "text", "num_frames", "fps", "motion",
                "ref_head", "ref_tail", "ref_v2v_head", "ref_v2v_tail", "ref_v2v_head_easy", "ref_v2v_tail_easy")


def batch_placer(mesh=None):
    def place(batch: dict) -> dict:
        return to_device({k: batch[k] for k in ENCODER_KEYS if k in batch}, mesh)

    return place


def _log_line(record: dict) -> str:
    return (f"step {record['step']:6d}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
            f"latent {record['shape']}  {record['time_s']:.1f}s")


def export(graphdef, state, out_dir, *, config: ml_collections.ConfigDict, cfg: mmdit.MMDiTConfig) -> pathlib.Path:
    """Writes what the run trained: the LoRA adapters (with their config), or the whole model (EMA weights when
    kept) as a converted MMDiT directory that sample.py loads."""
    params = state.ema if state.ema else state.params
    params = jax.tree.map(lambda p, q: p.astype(q.dtype), params, state.params)
    model = nnx.merge(graphdef, params, state.rest)
    if lora_enabled(config):
        from opensora_jax.lora_files import save_adapters

        return save_adapters(out_dir / "lora", model, lora_config(config), base=config.get("from_pretrained") or None)
    return save_module(out_dir / "model", model, config=cfg.to_dict(), model="mmdit", overwrite=True,
                       extra_meta={"step": int(state.step), "ema": bool(state.ema)})


def train(config: ml_collections.ConfigDict, *, stop_after: int | None = None, load: ModelLoader = load_model) -> dict:
    """Runs (or resumes) Open-Sora 2.0 training to `config.steps` updates; `stop_after` ends early (tests)."""
    mix = check_weights(config.get("cond_weights") or {"t2v": 1.0})
    out_dir = pathlib.Path(config.out_dir)
    run_dir.prepare(out_dir, config.to_dict(), has_checkpoint=run_dir.has_checkpoint(out_dir))
    mesh = make_mesh(config.mesh) if config.get("mesh") else None
    model = build_model(config, load)
    cfg = model.cfg
    if any(n != "t2v" for n, _ in mix) and not cfg.cond_embed:
        raise UserError(f"cond_weights {dict(mix)} condition on images, which needs model.cond_embed=True")
    if lora_enabled(config):
        from opensora_jax.models import lora as lora_lib

        lora_lib.apply_lora(model, lora_config(config), nnx.Rngs(config.seed + 1))
    if mesh is not None:
        shard_params(model, mesh)
    tx = make_optimizer(**config.optimizer.to_dict())
    graphdef, state = init_state(model, tx, trainable(config), config.seed, ema=bool(config.get("ema_decay")))
    del model

    loader = make_loader(config)
    ae, text = load_frozen(config, load)
    references = needed_references([n for n, _ in mix]) if cfg.cond_embed else ()
    null = None
    if config.data.get("features"):
        null = load_null_text(config.data.features)
    encoder = BatchEncoder(ae, text, kind=config.get("ae_type", "hunyuan_vae"), references=references,
                           seed=config.seed, caption_suffix=config.get("caption_suffix", True), null=null)
    checkpointer, iterator, state = start_or_resume(config, out_dir, state, loader)

    result = run_loop(state, make_step_fn(graphdef, tx, step_config(config, mix), encoder, mesh), iterator,
                      checkpointer, metrics_path=out_dir / "metrics.jsonl", start_step=int(state.step),
                      total_steps=config.steps, log_every=config.log_every, stop_after=stop_after,
                      place=batch_placer(mesh), prefetch=config.get("prefetch", 2), log_line=_log_line)
    state, step = result.state, result.step
    skipped = dict(getattr(loader, "skipped", {}) or {})
    if skipped or getattr(loader, "substitutions", 0):
        print(f"bad data: skipped {skipped}, substituted {getattr(loader, 'substitutions', 0)} samples", flush=True)
    exported = None
    if config.get("export", True):
        exported = export(graphdef, state, out_dir, config=config, cfg=cfg)
        print(f"exported {'LoRA adapters' if lora_enabled(config) else 'the model'} to {exported}", flush=True)
    return {"step": step, "skipped": skipped, "exported": exported, "state": state, "graphdef": graphdef}
