"""The STDiT3 training run: config → data → (VAE, T5 | precomputed features) → jitted steps → checkpoints.

Metrics go to stdout and OUT_DIR/metrics.jsonl (one JSON object per step). Checkpoints (orbax, async,
keep K) hold the whole TrainState and the data iterator state, so a killed run resumes exactly: the
resumed run's losses equal those of a run that never stopped.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opensora_jax.checkpoints import ModelLoader, load_model, save_module
from opensora_jax.data.features import FeatureLoader
from opensora_jax.data.loader import make_video_loader
from opensora_jax.errors import UserError
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config, preset
from opensora_jax.models.vae.opensora_v1_2 import encode_jit
from opensora_jax.parallel import make_mesh, shard_batch, shard_params, sharding_context
from opensora_jax.text.t5 import TextEncoder
from opensora_jax.text.tokenizer import default_tokenizer_dir
from opensora_jax.training import run_dir
from opensora_jax.training.checkpointing import start_or_resume
from opensora_jax.training.driver import run_loop, to_device
from opensora_jax.training.optim import make_optimizer, trainable_filter
from opensora_jax.training.state import StepConfig, init_state, train_step

log = logging.getLogger(__name__)


def model_config(config: ml_collections.ConfigDict) -> STDiT3Config:
    """STDiT3 architecture (preset + overrides) with the run's dtypes and remat switch."""
    arch = dict(config.model.to_dict()) if "model" in config else {}
    execution = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                     attention=config.get("attention", "auto"))
    if config.get("model_preset"):
        return preset(config.model_preset, **arch, **execution)
    return STDiT3Config(**arch, **execution)


def lora_config(config: ml_collections.ConfigDict):
    """The run's `models.lora.LoRAConfig` when it fine-tunes LoRA adapters (lora.rank > 0), else None."""
    lo = config.get("lora")
    if not lo or not lo.get("rank", 0):
        return None
    from opensora_jax.models.lora import LoRAConfig

    targets = tuple(lo.targets) if lo.get("targets") else None
    return LoRAConfig(rank=int(lo.rank), alpha=float(lo.get("alpha") or lo.rank), targets=targets)


def build_model(config: ml_collections.ConfigDict, load: ModelLoader = load_model) -> STDiT3:
    """A fresh STDiT3 (seeded init) or, with `from_pretrained`, one loaded from a checkpoint through `load`."""
    cfg = model_config(config)
    if config.get("from_pretrained"):
        model, _ = load("stdit3", config.from_pretrained, config=cfg.to_dict(), dtype=jnp.dtype(cfg.param_dtype))
        return model
    return STDiT3(cfg, rngs=nnx.Rngs(config.seed))


class BatchEncoder:
    """Turns a loader batch into the train step's inputs: latents x0, text y/mask and the size scalars.

    Raw batches (`video`, `text`) go through the frozen VAE (posterior sampled, as the reference trains)
    and T5; feature batches (`latent`, `y`, `mask`) pass through.
    """

    def __init__(self, vae=None, text_encoder=None, *, seed: int = 0, model_dtype=jnp.float32):
        self.vae, self.text_encoder = vae, text_encoder
        self.key = jax.random.key(seed + 7919)
        self.model_dtype = jnp.dtype(model_dtype)

    def __call__(self, batch: dict, step: int) -> dict:
        """Train-step inputs of a batch whose arrays are on the host or already on device."""
        sizes = {k: jnp.asarray(batch[k], jnp.float32).astype(self.model_dtype)
                 for k in ("height", "width", "num_frames", "fps")}
        if "latent" in batch:
            return dict(x0=jnp.asarray(batch["latent"]), y=jnp.asarray(batch["y"]), mask=jnp.asarray(batch["mask"]),
                        **sizes)
        if self.vae is None or self.text_encoder is None:
            raise ValueError("raw video batches need `vae` and `t5` checkpoints (or train from precomputed features)")
        x0 = self.encode_video(batch["video"], step)
        y, mask = self.encode_text(batch["text"])
        return dict(x0=x0, y=y, mask=mask, **sizes)

    def encode_video(self, video, step: int) -> jax.Array:
        """Latents (B, T', H', W', C) of a (B, T, H, W, 3) video batch; posterior sampled with key (seed, step)."""
        video = jnp.asarray(video, self.vae.dtype)
        return encode_jit(self.vae, video, jax.random.fold_in(self.key, step))

    def encode_text(self, texts) -> tuple[jax.Array, jax.Array]:
        """T5 embeddings y (B, L, C) and mask (B, L) of B captions."""
        text = self.text_encoder.encode([str(t) for t in np.asarray(texts)])
        return text["y"][:, 0], text["mask"]


def make_loader(config: ml_collections.ConfigDict):
    """The data source of the run: precomputed features (`data.features`) or a CSV of videos (`data.csv`)."""
    data = config.data
    if data.get("features"):
        return FeatureLoader(data.features, seed=config.seed, num_workers=data.num_workers)
    if not data.get("csv"):
        raise UserError("no training data: set data.csv (video CSV) or data.features (precomputed features)")
    return make_video_loader(data.csv, data.bucket_config, resolutions=data.get("resolutions"), seed=config.seed,
                             frame_interval=data.frame_interval, num_workers=data.num_workers)


def load_frozen_encoders(config: ml_collections.ConfigDict, model_max_length: int, load: ModelLoader = load_model):
    """(vae, text_encoder) from config paths through `load`, or (None, None) when training from features."""
    if config.data.get("features"):
        return None, None
    if not config.get("vae") or not config.get("t5"):
        raise UserError("training from videos needs `vae` and `t5` checkpoint paths in the config")
    vae, _ = load("vae", config.vae, dtype=jnp.dtype(config.get("vae_dtype", "float32")))
    tok = config.get("tokenizer") or default_tokenizer_dir(config.t5)
    return vae, TextEncoder.from_pretrained(tok, config.t5, model_max_length=model_max_length, load=load)


def export_model(graphdef, state, out_dir, *, config: dict, use_ema: bool = True) -> pathlib.Path:
    """Writes the (EMA) model as a converted STDiT3 directory that sample.py loads directly."""
    params = state.ema if use_ema else state.params
    model = nnx.merge(graphdef, jax.tree.map(lambda p, q: p.astype(q.dtype), params, state.params), state.rest)
    return save_module(out_dir, model, config=config, model="stdit3", overwrite=True,
                       extra_meta={"step": int(state.step), "ema": use_ema})


def _step(graphdef, tx, step_cfg, state, inputs, mesh):
    """One train_step, with the batch split over the mesh and the model's sharding constraints active."""
    if mesh is None:
        return train_step(graphdef, tx, step_cfg, state, inputs)
    with sharding_context(mesh):
        return train_step(graphdef, tx, step_cfg, state, shard_batch(inputs, mesh))


# The batch entries BatchEncoder reads; the prefetcher moves only these (their numeric arrays) to device.
ENCODER_KEYS = ("latent", "y", "mask", "video", "text", "height", "width", "num_frames", "fps")


def batch_placer(mesh=None):
    """The prefetcher's `place`: a loader batch's encoder inputs on device (batch-sharded over `mesh`)."""

    def place(batch: dict) -> dict:
        return to_device({k: batch[k] for k in ENCODER_KEYS if k in batch}, mesh)

    return place


def make_step_fn(graphdef, tx, step_cfg: StepConfig, encoder: BatchEncoder, mesh=None):
    """The driver's step function: encode the (device) batch, then one jitted update."""

    def step_fn(state, batch, step):
        inputs = encoder(batch, step)
        state, metrics = _step(graphdef, tx, step_cfg, state, inputs, mesh)
        return state, metrics, {"shape": list(inputs["x0"].shape)}

    return step_fn


def _log_line(record: dict) -> str:
    return (f"step {record['step']:6d}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
            f"latent {record['shape']}  {record['time_s']:.1f}s")


def train(config: ml_collections.ConfigDict, *, stop_after: int | None = None, load: ModelLoader = load_model) -> dict:
    """Runs (or resumes) training to `config.steps` updates; `stop_after` ends early (tests). Returns a summary.

    `load` reads the checkpoints the config names (from_pretrained, vae, t5): by default converted
    directories; train.py passes `convert.load_model`, which also reads the reference's weights."""
    out_dir = pathlib.Path(config.out_dir)
    run_dir.prepare(out_dir, config.to_dict(), has_checkpoint=run_dir.has_checkpoint(out_dir))

    mesh = None
    if config.get("mesh"):
        mesh = make_mesh(config.mesh)
    model = build_model(config, load)
    lora = lora_config(config)
    if lora is not None:
        from opensora_jax.models.lora import apply_lora, lora_filter

        apply_lora(model, lora, nnx.Rngs(config.seed + 1))
    if mesh is not None:
        shard_params(model, mesh)  # optimizer state and EMA inherit these placements
    cfg = model.cfg
    tx = make_optimizer(**config.optimizer.to_dict())
    if lora is not None:
        trainable = lora_filter
    else:
        trainable = trainable_filter(freeze_y_embedder=config.freeze_y_embedder,
                                     only_train_temporal=config.only_train_temporal)
    graphdef, state = init_state(model, tx, trainable, config.seed)
    del model
    step_cfg = StepConfig(mask_ratios=tuple(sorted(dict(config.mask_ratios).items())),
                          timestep_method=config.scheduler.timestep_method,
                          use_timestep_transform=config.scheduler.use_timestep_transform, ema_decay=config.ema_decay)

    loader = make_loader(config)
    vae, text_encoder = load_frozen_encoders(config, cfg.model_max_length, load)
    encoder = BatchEncoder(vae, text_encoder, seed=config.seed, model_dtype=cfg.dtype)
    checkpointer, iterator, state = start_or_resume(config, out_dir, state, loader)

    result = run_loop(state, make_step_fn(graphdef, tx, step_cfg, encoder, mesh), iterator, checkpointer,
                      metrics_path=out_dir / "metrics.jsonl", start_step=int(state.step), total_steps=config.steps,
                      log_every=config.log_every, stop_after=stop_after, place=batch_placer(mesh),
                      prefetch=config.get("prefetch", 2), log_line=_log_line)
    state, step = result.state, result.step
    skipped = dict(getattr(loader, "skipped", {}) or {})
    if skipped or getattr(loader, "substitutions", 0):
        print(f"bad data: skipped {skipped}, substituted {getattr(loader, 'substitutions', 0)} samples", flush=True)
    exported = None
    if lora is not None:
        from opensora_jax.lora_files import save_adapters

        use_ema = bool(config.get("export_ema"))
        params = state.ema if use_ema else state.params
        model = nnx.merge(graphdef, jax.tree.map(lambda p, q: p.astype(q.dtype), params, state.params), state.rest)
        exported = save_adapters(out_dir / "lora", model, lora, base=config.get("from_pretrained") or None)
        print(f"exported the {'EMA ' if use_ema else ''}LoRA adapters to {exported}", flush=True)
    elif config.get("export_ema"):
        exported = export_model(graphdef, state, out_dir / "ema_model", config=cfg.to_dict())
        print(f"exported EMA model to {exported}", flush=True)
    return {"step": step, "skipped": skipped, "exported": exported, "state": state, "graphdef": graphdef}
