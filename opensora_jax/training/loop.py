"""The STDiT3 training run: config → data → (VAE, T5 | precomputed features) → jitted steps → checkpoints.

Metrics go to stdout and OUT_DIR/metrics.jsonl (one JSON object per step). Checkpoints (orbax, async,
keep K) hold the whole TrainState and the data iterator state, so a killed run resumes exactly: the
resumed run's losses equal those of a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opensora_jax.models.stdit3 import STDiT3, STDiT3Config, preset
from opensora_jax.training.checkpointing import RunCheckpointer
from opensora_jax.training.optim import make_optimizer, trainable_filter
from opensora_jax.training.state import StepConfig, init_state, train_step

log = logging.getLogger(__name__)


def _write_json(path: pathlib.Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def model_config(config: ml_collections.ConfigDict) -> STDiT3Config:
    """STDiT3 architecture (preset + overrides) with the run's dtypes and remat switch."""
    arch = dict(config.model.to_dict()) if "model" in config else {}
    execution = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                     attention=config.get("attention", "xla"))
    if config.get("model_preset"):
        return preset(config.model_preset, **arch, **execution)
    return STDiT3Config(**arch, **execution)


def build_model(config: ml_collections.ConfigDict) -> STDiT3:
    """A fresh STDiT3 (seeded init) or, with `from_pretrained`, one loaded from a checkpoint."""
    cfg = model_config(config)
    if config.get("from_pretrained"):
        from convert.registry import load_model

        model, _ = load_model("stdit3", config.from_pretrained, config=cfg.to_dict(), dtype=jnp.dtype(cfg.param_dtype))
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
        sizes = {k: jnp.asarray(np.asarray(batch[k], np.float32)).astype(self.model_dtype)
                 for k in ("height", "width", "num_frames", "fps")}
        if "latent" in batch:
            return dict(x0=jnp.asarray(np.asarray(batch["latent"])), y=jnp.asarray(np.asarray(batch["y"])),
                        mask=jnp.asarray(np.asarray(batch["mask"])), **sizes)
        if self.vae is None or self.text_encoder is None:
            raise ValueError("raw video batches need `vae` and `t5` checkpoints (or train from precomputed features)")
        x0 = self.encode_video(batch["video"], step)
        y, mask = self.encode_text(batch["text"])
        return dict(x0=x0, y=y, mask=mask, **sizes)

    def encode_video(self, video, step: int) -> jax.Array:
        """Latents (B, T', H', W', C) of a (B, T, H, W, 3) video batch; posterior sampled with key (seed, step)."""
        from opensora_jax.models.vae.opensora_v1_2 import encode_jit

        video = jnp.asarray(np.asarray(video), self.vae.dtype)
        return encode_jit(self.vae, video, jax.random.fold_in(self.key, step))

    def encode_text(self, texts) -> tuple[jax.Array, jax.Array]:
        """T5 embeddings y (B, L, C) and mask (B, L) of B captions."""
        text = self.text_encoder.encode([str(t) for t in np.asarray(texts)])
        return text["y"][:, 0], text["mask"]


def make_loader(config: ml_collections.ConfigDict):
    """The data source of the run: precomputed features (`data.features`) or a CSV of videos (`data.csv`)."""
    data = config.data
    if data.get("features"):
        from opensora_jax.data.features import FeatureLoader

        return FeatureLoader(data.features, seed=config.seed, num_workers=data.num_workers)
    if not data.get("csv"):
        raise ValueError("no training data: set data.csv (video CSV) or data.features (precomputed features)")
    return make_video_loader(data.csv, data.bucket_config, resolutions=data.get("resolutions"), seed=config.seed,
                             frame_interval=data.frame_interval, num_workers=data.num_workers)


def make_video_loader(csv, bucket_config, *, resolutions=None, seed: int = 0, frame_interval: int = 1,
                      num_workers: int = 0, num_epochs: int | None = None):
    """A VideoLoader of a CSV; bucket_config is a name of `bucket_configs.NAMED_BUCKET_CONFIGS` or a dict,
    resolutions a name of `NAMED_RESOLUTION_TABLES` (or empty). Shared with `python -m opensora_jax.data.features`."""
    from opensora_jax.data import bucket_configs
    from opensora_jax.data.loader import VideoLoader

    buckets = bucket_config
    if isinstance(buckets, str):
        if buckets not in bucket_configs.NAMED_BUCKET_CONFIGS:
            raise ValueError(f"bucket_config {buckets!r} unknown; names: {sorted(bucket_configs.NAMED_BUCKET_CONFIGS)}")
        buckets = bucket_configs.NAMED_BUCKET_CONFIGS[buckets]
    else:
        # JSON round trips (config.json, --config overrides) turn frame-count keys into strings.
        buckets = {res: {int(t): tuple(v) if isinstance(v, list) else v for t, v in per_t.items()}
                   for res, per_t in dict(buckets).items()}
    table = None
    if resolutions:
        if resolutions not in bucket_configs.NAMED_RESOLUTION_TABLES:
            raise ValueError(f"resolutions {resolutions!r} unknown; names: {sorted(bucket_configs.NAMED_RESOLUTION_TABLES)}")
        table = bucket_configs.NAMED_RESOLUTION_TABLES[resolutions]
    return VideoLoader(csv, buckets, seed=seed, frame_interval=frame_interval, num_workers=num_workers,
                       resolutions=table, num_epochs=num_epochs)


def load_frozen_encoders(config: ml_collections.ConfigDict, model_max_length: int):
    """(vae, text_encoder) from config paths, or (None, None) when training from features."""
    if config.data.get("features"):
        return None, None
    if not config.get("vae") or not config.get("t5"):
        raise ValueError("training from videos needs `vae` and `t5` checkpoint paths in the config")
    from convert.registry import load_model
    from opensora_jax.text import TextEncoder

    vae, _ = load_model("vae", config.vae, dtype=jnp.dtype(config.get("vae_dtype", "float32")))
    from opensora_jax.pipeline import default_tokenizer_dir

    tok = config.get("tokenizer") or default_tokenizer_dir(config.t5)
    return vae, TextEncoder.from_pretrained(tok, config.t5, model_max_length=model_max_length)


def export_model(graphdef, state, out_dir, *, config: dict, use_ema: bool = True) -> pathlib.Path:
    """Writes the (EMA) model as a converted STDiT3 directory that sample.py loads directly."""
    from convert.checkpoint import save_converted

    params = state.ema if use_ema else state.params
    model = nnx.merge(graphdef, jax.tree.map(lambda p, q: p.astype(q.dtype), params, state.params), state.rest)
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    return save_converted(out_dir, flat, config=config, model="stdit3", overwrite=True,
                          extra_meta={"step": int(state.step), "ema": use_ema})


def _step(graphdef, tx, step_cfg, state, inputs, mesh):
    """One train_step, with the batch split over the mesh and the model's sharding constraints active."""
    if mesh is None:
        return train_step(graphdef, tx, step_cfg, state, inputs)
    from opensora_jax.parallel import shard_batch, sharding_context

    with sharding_context(mesh):
        return train_step(graphdef, tx, step_cfg, state, shard_batch(inputs, mesh))


def train(config: ml_collections.ConfigDict, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) training to `config.steps` updates; `stop_after` ends early (tests). Returns a summary."""
    out_dir = pathlib.Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config.to_dict())

    mesh = None
    if config.get("mesh"):
        from opensora_jax.parallel import make_mesh, shard_params

        mesh = make_mesh(config.mesh)
    model = build_model(config)
    if mesh is not None:
        shard_params(model, mesh)  # optimizer state and EMA inherit these placements
    cfg = model.cfg
    tx = make_optimizer(**config.optimizer.to_dict())
    trainable = trainable_filter(freeze_y_embedder=config.freeze_y_embedder, only_train_temporal=config.only_train_temporal)
    graphdef, state = init_state(model, tx, trainable, config.seed)
    del model
    step_cfg = StepConfig(mask_ratios=tuple(sorted(dict(config.mask_ratios).items())),
                          timestep_method=config.scheduler.timestep_method,
                          use_timestep_transform=config.scheduler.use_timestep_transform, ema_decay=config.ema_decay)

    checkpointer = RunCheckpointer(out_dir / "checkpoints", every=config.ckpt_every, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpoint)
    loader = make_loader(config)
    iterator = iter(loader)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        iterator.set_state(data_state["iterator"])
        print(f"resumed from step {int(state.step)} ({checkpointer.directory})", flush=True)
    vae, text_encoder = load_frozen_encoders(config, cfg.model_max_length)
    encoder = BatchEncoder(vae, text_encoder, seed=config.seed, model_dtype=cfg.dtype)

    metrics_file = open(out_dir / "metrics.jsonl", "a")
    start_step, step = int(state.step), int(state.step)
    started = time.perf_counter()
    try:
        while step < config.steps and (stop_after is None or step - start_step < stop_after):
            try:
                batch = next(iterator)
            except StopIteration:
                print(f"data exhausted after step {step}", flush=True)
                break
            inputs = encoder(batch, step)
            state, metrics = _step(graphdef, tx, step_cfg, state, inputs, mesh)
            step += 1
            record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                      "shape": list(inputs["x0"].shape), "time_s": round(time.perf_counter() - started, 3)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % config.log_every == 0 or step == 1:
                print(f"step {step:6d}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
                      f"latent {record['shape']}  {record['time_s']:.1f}s", flush=True)
            checkpointer.maybe_save(step, state, {"iterator": iterator.get_state()})
        checkpointer.maybe_save(step, state, {"iterator": iterator.get_state()}, force=step % config.ckpt_every != 0)
    finally:
        checkpointer.close()
        metrics_file.close()
    skipped = dict(getattr(loader, "skipped", {}) or {})
    if skipped or getattr(loader, "substitutions", 0):
        print(f"bad data: skipped {skipped}, substituted {getattr(loader, 'substitutions', 0)} samples", flush=True)
    exported = None
    if config.get("export_ema"):
        exported = export_model(graphdef, state, out_dir / "ema_model", config=cfg.to_dict())
        print(f"exported EMA model to {exported}", flush=True)
    return {"step": step, "skipped": skipped, "exported": exported}
