"""Training of the Open-Sora v1.2 video VAE (spec §12): stages, mixing, jitted G/D steps, checkpoints, export.

Layout: channels-last, video batches (B, T, H, W, 3) in [-1, 1].

One step (spec §12.6): mix (keep frame 0 only, or the first n frames; host-side, from (seed, step)) →
one forward with both posteriors sampled (key = fold_in(seed key, step)) → generator loss of the stage's
terms [+ λ·f(step)·g] → clip 1.0 → AdamW; with a discriminator, then D on (x, x_rec of the PRE-update
VAE) → clip → AdamW. All randomness is a function of (seed, step) and the data iterator is checkpointed,
so a resumed run reproduces an uninterrupted one exactly.

Which parameters train (§12.2): stage 1 the temporal VAE; stage 2 also the 2D encoder and quant_conv;
stage 3 everything. Stage 0 is ours: the 2D VAE alone as an image autoencoder (pixel NLL + per-image KL),
for models that have no pretrained 2D VAE to start stage 1 from (the demo model). The exported VAE (`export_vae`) is a converted directory that
`opensora_jax.checkpoints.load_model("vae", dir)` and sample.py load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from opensora_jax.checkpoints import ModelLoader, load_model, materialize, save_module
from opensora_jax.data.buckets import Buckets
from opensora_jax.data.loader import VideoLoader
from opensora_jax.errors import UserError
from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAE, OpenSoraVAEConfig
from opensora_jax.training import run_dir
from opensora_jax.training.checkpointing import RunCheckpointer
from opensora_jax.training.driver import run_loop, to_device
from opensora_jax.training.optim import make_optimizer
from opensora_jax.training.vae_losses import (
    GAN_LOSS_TYPES,
    LPIPS,
    BatchStat,
    NLayerDiscriminator,
    VAELossConfig,
    adaptive_weight,
    discriminator_loss,
    gan_gate,
    generator_loss,
    load_lpips,
    needs_pixels,
    spatial_forward,
    term_weights,
    vae_forward,
    vae_loss_terms,
)

# (vae, path, *, allow_pickle=False) → None: fills vae.spatial from reference 2D-VAE weights.
SpatialLoader = Callable[..., None]

# The layer the adaptive GAN weight is measured at: `temporal_vae.decoder.conv_out.conv.weight`
# (in stage 0, which trains the 2D VAE alone, its decoder's conv_out).
LAST_LAYER = ("temporal", "decoder", "conv_out", "conv", "kernel")
SPATIAL_LAST_LAYER = ("spatial", "decoder", "conv_out", "kernel")
STAGES = (0, 1, 2, 3)
MIXED_STRATEGIES = ("", "none", "mixed_video_image", "mixed_video_random")

# ------------------------------------------------------------------------------------------- stages


def _stage2_trainable(path, _value) -> bool:
    head = tuple(str(p) for p in path[:2])
    return head[:1] == ("temporal",) or head in (("spatial", "encoder"), ("spatial", "quant_conv"))


def last_layer(stage: int) -> tuple[str, ...]:
    """Path of the kernel the adaptive GAN weight is measured at in `stage`."""
    return SPATIAL_LAST_LAYER if stage == 0 else LAST_LAYER


def stage_trainable_filter(stage: int):
    """nnx filter of the parameters a stage trains: 0 the 2D VAE (ours); 1 temporal VAE; 2 + 2D encoder and
    quant_conv; 3 all."""
    if stage == 0:
        return nnx.All(nnx.Param, nnx.PathContains("spatial"))
    if stage == 1:
        return nnx.All(nnx.Param, nnx.PathContains("temporal"))
    if stage == 2:
        return nnx.All(nnx.Param, _stage2_trainable)
    if stage == 3:
        return nnx.Param
    raise ValueError(f"VAE training stage must be one of {STAGES}, got {stage!r}")


# ------------------------------------------------------------------------------------------- state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VAETrainState:
    step: jax.Array  # int32: updates done
    params: nnx.State  # trainable VAE parameters (float32)
    rest: nnx.State  # frozen VAE parameters and buffers
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step)
    disc_params: nnx.State | None = None  # discriminator parameters (None: no discriminator)
    disc_rest: nnx.State | None = None  # its BatchNorm running statistics
    disc_opt_state: optax.OptState | None = None


def init_vae_state(vae: OpenSoraVAE, tx, trainable, seed: int, discriminator=None, disc_tx=None, *,
                   last: tuple[str, ...] = LAST_LAYER):
    """(graphdef, disc_graphdef or None, VAETrainState) with fresh optimizer states, on one device.
    `last` is the decoder's output kernel (`last_layer(stage)`), which must be among the trainable ones."""
    graphdef, params, rest = nnx.split(vae, trainable, ...)
    flat = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(params)}
    if last not in flat:
        raise ValueError(f"the decoder's conv_out kernel {'/'.join(last)} must be trainable")
    state = VAETrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))
    disc_graphdef = None
    if discriminator is not None:
        disc_graphdef, dparams, drest = nnx.split(discriminator, nnx.Param, ...)
        state = dataclasses.replace(state, disc_params=dparams, disc_rest=drest, disc_opt_state=disc_tx.init(dparams))
    return graphdef, disc_graphdef, commit(state)


def commit(state: VAETrainState) -> VAETrainState:
    """The state placed (committed) on the first device. Fresh and checkpoint-restored states then have the
    same placement, so a resumed run reuses the compiled step instead of compiling it again."""
    return jax.device_put(state, jax.devices()[0])


@dataclasses.dataclass(frozen=True)
class VAEStepConfig:
    """Static settings of one step."""

    loss: VAELossConfig = VAELossConfig()
    micro_batch_size: int | None = None  # 2D VAE frames at a time (memory only)
    use_discriminator: bool = False
    discriminator_factor: float = 1.0
    discriminator_start: int = -1
    generator_factor: float = 0.5
    generator_loss_type: str = "hinge"
    discriminator_loss_type: str = "hinge"
    spatial_only: bool = False  # stage 0: the 2D VAE alone


def _leaf(tree: nnx.State, path: tuple[str, ...]) -> jax.Array:
    node = tree
    for p in path:
        node = node[int(p) if p.isdigit() else p]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def _frames(x):
    return x.reshape((-1,) + x.shape[2:])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
def vae_train_step(graphdef, disc_graphdef, tx, disc_tx, cfg: VAEStepConfig, state: VAETrainState,
                   video: jax.Array, lpips: LPIPS | None):
    """One generator update (and one discriminator update when `cfg.use_discriminator`).

    video: (B, T, H, W, 3) after mixing; lpips: the perceptual metric of the pixel loss, or None.
    Returns (new state, metrics of float32 scalars). Compiles once per (B, T, H, W).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    pixels = needs_pixels(cfg.loss, cfg.use_discriminator)

    def forward(params):
        vae = nnx.merge(graphdef, params, state.rest)
        if cfg.spatial_only:
            out = spatial_forward(vae, video, key)
        else:
            out = vae_forward(vae, video, key, micro_batch_size=cfg.micro_batch_size, decode_pixels=pixels)
        terms = vae_loss_terms(video, out, cfg.loss, lpips)
        aux = {"x_rec": out.get("x_rec")}
        if cfg.use_discriminator:
            disc = nnx.merge(disc_graphdef, state.disc_params, state.disc_rest, copy=True)
            terms["g"] = generator_loss(disc(_frames(out["x_rec"])), cfg.generator_loss_type)
            aux["disc_rest"] = nnx.state(disc, BatchStat)
        return terms, aux

    terms, pullback, aux = jax.vjp(forward, state.params, has_aux=True)
    weights = {k: jnp.float32(w) for k, w in term_weights(terms, cfg.loss).items()}
    metrics = {}
    if cfg.use_discriminator:
        # λ needs ∇_W of the pixel NLL and of g separately; the loss is linear in the term weights, so
        # all three gradients come from the one forward's pullback.
        def onehot(name):
            return {k: jnp.float32(k == name) for k in terms}

        (nll_grads,), (g_grads,) = pullback(onehot("nll")), pullback(onehot("g"))
        last = SPATIAL_LAST_LAYER if cfg.spatial_only else LAST_LAYER
        lam = adaptive_weight(_leaf(nll_grads, last), _leaf(g_grads, last), cfg.generator_factor)
        gate = gan_gate(state.step, cfg.discriminator_factor, cfg.discriminator_start)
        weights["g"] = lam * gate
        metrics.update(adaptive_weight=lam, gan_gate=gate)
    (grads,) = pullback(weights)
    loss = sum(weights[k] * terms[k] for k in terms)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics.update({"loss": loss, "grad_norm": optax.tree.norm(grads), **terms})

    if cfg.use_discriminator:
        real = _frames(video)
        fake = jax.lax.stop_gradient(_frames(aux["x_rec"]))
        gate = metrics["gan_gate"]

        def d_loss_fn(dparams):
            disc = nnx.merge(disc_graphdef, dparams, aux["disc_rest"], copy=True)
            real_logits = disc(real)  # two separate forwards: separate batch statistics, as the reference
            fake_logits = disc(fake)
            loss_d = gate * discriminator_loss(real_logits, fake_logits, cfg.discriminator_loss_type)
            return loss_d, nnx.state(disc, BatchStat)

        (d_loss, disc_rest), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
        d_updates, d_opt = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        new = dataclasses.replace(new, disc_params=optax.apply_updates(state.disc_params, d_updates),
                                  disc_rest=disc_rest, disc_opt_state=d_opt)
        metrics.update(disc_loss=d_loss, disc_grad_norm=optax.tree.norm(d_grads))
    return new, metrics


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _reconstruct(graphdef, params, rest, micro_batch_size, spatial_only, video):
    vae = nnx.merge(graphdef, params, rest)
    if spatial_only:
        return spatial_forward(vae, video, None)["x_rec"]
    return vae_forward(vae, video, None, micro_batch_size=micro_batch_size)["x_rec"]


def reconstruction_l1(graphdef, state: VAETrainState, video, *, micro_batch_size=None,
                      spatial_only: bool = False) -> float:
    """Mean |x − x_rec| per element of video (B, T, H, W, 3), through the cal_loss pipeline (the 2D VAE
    alone with `spatial_only`) with posterior means."""
    x = jnp.asarray(video, jnp.float32)
    x_rec = _reconstruct(graphdef, state.params, state.rest, micro_batch_size, spatial_only, x)
    return float(jnp.mean(jnp.abs(x_rec.astype(jnp.float32) - x)))


# ------------------------------------------------------------------------------------------- mixing


def mixed_num_frames(strategy: str | None, num_frames: int, *, seed: int, step: int, image_ratio: float = 0.0) -> int:
    """Frames kept of a T-frame clip at `step` (a function of (seed, step) only).

    mixed_video_image: 1 with probability `image_ratio`, else T; mixed_video_random: n ~ U{1..T}; none: T.
    """
    if strategy not in MIXED_STRATEGIES and strategy is not None:
        raise ValueError(f"mixed_strategy {strategy!r} unknown; choose one of {MIXED_STRATEGIES[1:]}")
    if not strategy or strategy == "none":
        return num_frames
    rng = np.random.default_rng([seed, step, 0x5EED])
    if strategy == "mixed_video_image":
        return 1 if rng.random() < image_ratio else num_frames
    return int(rng.integers(1, num_frames + 1))


# ------------------------------------------------------------------------------------------- model & data


def random_init_vae(cfg: OpenSoraVAEConfig, seed: int, *, dtype=jnp.float32) -> OpenSoraVAE:
    """A VAE with PyTorch's default init drawn in numpy (no per-shape init compiles): conv/linear kernels
    and biases uniform(±1/√fan_in), norm scales 1 and biases 0, `scale`/`shift` from the config.
    Parameters are float32; `dtype` is the compute dtype."""
    abstract = nnx.eval_shape(lambda: OpenSoraVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32))
    shapes = {tuple(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in shapes.items():
        name, kernel = "/".join(path), path[:-1] + ("kernel",)
        if path in (("scale",), ("shift",)):
            flat[name] = np.asarray(getattr(cfg, path[0]), np.float32)
        elif path[-1] == "kernel" or (path[-1] == "bias" and kernel in shapes):
            bound = 1.0 / np.sqrt(np.prod(shapes[kernel][:-1]))
            flat[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif path[-1] in ("scale", "bias"):  # GroupNorm affine
            flat[name] = np.full(shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
        else:
            raise ValueError(f"random_init_vae: no init rule for variable {name}")
    return materialize(abstract, flat)


def build_vae(config: ml_collections.ConfigDict, load: ModelLoader = load_model,
              load_spatial: SpatialLoader | None = None) -> OpenSoraVAE:
    """The VAE to train: architecture `config.model` (reference kwargs), computing in `config.dtype` with
    float32 parameters; weights from `from_pretrained` (whole pipeline, through `load`), else
    `vae_2d_pretrained` (2D part through `load_spatial`; temporal VAE random), else random (PyTorch-default
    init, `random_init_vae`)."""
    cfg = OpenSoraVAEConfig.from_dict(config.model.to_dict())
    vae = random_init_vae(cfg, config.seed, dtype=jnp.dtype(config.dtype))
    pickle = {"allow_pickle": True} if config.get("allow_pickle", False) else {}
    if config.get("from_pretrained"):
        loaded, _ = load("vae", config.from_pretrained, config=cfg.to_dict(), dtype=jnp.float32, **pickle)
        nnx.update(vae, nnx.state(loaded))
    elif config.get("vae_2d_pretrained"):
        if load_spatial is None:
            raise UserError("vae_2d_pretrained names reference 2D-VAE weights, which only train_vae.py converts "
                            "(it passes convert.vae_v1_2.load_spatial_weights)")
        load_spatial(vae, config.vae_2d_pretrained, **pickle)
    if config.get("temporal_logvar_init") is not None:
        set_posterior_logvar(vae.temporal.quant_conv.conv, float(config.temporal_logvar_init))
    return vae


def set_posterior_logvar(quant_conv, value: float) -> None:
    """Sets the log-variance half of a quant_conv's bias (moments are [mean | logvar] on channels).

    For a temporal VAE trained from scratch: with PyTorch's init the posterior std starts near 1, about
    the spread of the latent means, so the decoder trains on latents that are mostly noise and learns
    blurry averages; a start at e.g. −6 (std 0.05) lets reconstruction lead from the first step.
    """
    bias = quant_conv.bias.get_value()
    half = bias.shape[-1] // 2
    quant_conv.bias.set_value(bias.at[half:].set(value))


def build_discriminator(config: ml_collections.ConfigDict) -> NLayerDiscriminator | None:
    d = config.discriminator
    if not d.enabled:
        return None
    return NLayerDiscriminator(input_nc=3, ndf=d.ndf, n_layers=d.n_layers, rngs=nnx.Rngs(config.seed + 1),
                               dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)


def build_lpips(config: ml_collections.ConfigDict) -> LPIPS | None:
    """The LPIPS of the pixel loss when `lpips.enabled` (weights from `lpips.weights`), else None."""
    if not config.lpips.enabled or config.loss.perceptual_loss_weight <= 0:
        return None
    return load_lpips(config.lpips.weights, allow_pickle=config.lpips.get("allow_pickle", False),
                      dtype=jnp.dtype(config.dtype))


def make_vae_loader(config: ml_collections.ConfigDict, *, csv: str | None = None, num_epochs: int | None = None,
                    seed: int | None = None):
    """Clips of `data.num_frames` frames at `data.image_size` (bilinear resize-to-cover + centre crop, like
    the reference's VideoTextDataset "center" transform), `data.batch_size` per batch, from a CSV."""
    data = config.data
    csv = csv or data.csv
    if not csv:
        raise ValueError("no training data: set data.csv (a CSV of videos: path,text,num_frames,height,width,fps)")
    h, w = (int(s) for s in data.image_size)
    table = {"vae": (h * w, {"1.00": (h, w)})}
    buckets = Buckets({"vae": {int(data.num_frames): (1.0, int(data.batch_size))}},
                      frame_interval=data.frame_interval, resolutions=table)
    return VideoLoader(csv, buckets, seed=config.seed if seed is None else seed, num_epochs=num_epochs,
                       num_workers=data.num_workers)


@functools.lru_cache(maxsize=8)
def _cached_optimizer(items: tuple) -> optax.GradientTransformation:
    # One object per setting, so the jitted step (tx is a static argument) is reused across runs in a process.
    return make_optimizer(**dict(items))


def optimizer_from_config(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW + global-norm clipping from `config.optimizer` (the same object for equal settings)."""
    return _cached_optimizer(tuple(sorted(config.optimizer.to_dict().items())))


def step_config(config: ml_collections.ConfigDict) -> VAEStepConfig:
    loss = VAELossConfig(**config.loss.to_dict())
    d = config.discriminator
    return VAEStepConfig(loss=loss, micro_batch_size=config.get("micro_batch_size") or None,
                         use_discriminator=bool(d.enabled), discriminator_factor=float(d.factor),
                         discriminator_start=int(d.start), generator_factor=float(d.generator_factor),
                         generator_loss_type=d.generator_loss_type, discriminator_loss_type=d.discriminator_loss_type,
                         spatial_only=int(config.stage) == 0)


# ------------------------------------------------------------------------------------------- export


def export_vae(graphdef, state: VAETrainState, out_dir, *, config: dict) -> pathlib.Path:
    """Writes the trained VAE as a converted directory (`checkpoints.load_model("vae", out_dir)`)."""
    vae = nnx.merge(graphdef, state.params, state.rest)
    return save_module(out_dir, vae, config=config, model="vae", dtype=np.float32, overwrite=True,
                       extra_meta={"step": int(state.step), "trained_by": "train_vae.py"})


# ------------------------------------------------------------------------------------------- the run


def evaluate(graphdef, state, config, *, csv: str, num_batches: int) -> float:
    """Mean reconstruction L1 over the first `num_batches` batches of `csv` (fixed order, seed 0)."""
    loader = make_vae_loader(config, csv=csv, num_epochs=1, seed=0)
    total, count = 0.0, 0
    with iter(loader) as batches:
        for batch in batches:
            if count >= num_batches:
                break
            total += reconstruction_l1(graphdef, state, batch["video"],
                                       micro_batch_size=config.get("micro_batch_size") or None,
                                       spatial_only=int(config.stage) == 0)
            count += 1
    if not count:
        raise ValueError(f"evaluation CSV {csv} gave no batch of {config.data.num_frames} frames")
    return total / count


def _format(record: dict) -> str:
    parts = [f"step {record['step']:6d}", f"loss {record['loss']:.4g}"]
    for name in ("z_nll", "nll", "kl", "identity", "g", "adaptive_weight", "disc_loss"):
        if name in record:
            parts.append(f"{name} {record[name]:.4g}")
    parts.append(f"T {record['frames']}")
    parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)


def _place_video(batch: dict) -> dict:
    """The prefetcher's `place`: only the clips go to device (the step reads nothing else)."""
    return to_device({"video": np.asarray(batch["video"])})


def make_vae_step_fn(graphdef, disc_graphdef, tx, disc_tx, cfg: VAEStepConfig, lpips, config: ml_collections.ConfigDict):
    """The driver's step function: frame mixing of the (device) clips for this step, then one jitted update."""

    def step_fn(state, batch, step):
        video = batch["video"]
        n = mixed_num_frames(config.mixed_strategy, video.shape[1], seed=config.seed, step=step,
                             image_ratio=config.mixed_image_ratio)
        if n != video.shape[1]:
            video = video[:, :n]
        state, metrics = vae_train_step(graphdef, disc_graphdef, tx, disc_tx, cfg, state, video, lpips)
        return state, metrics, {"frames": n}

    return step_fn


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, before any model is built, on settings the run would reject later."""
    if int(config.stage) not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {config.stage!r}")
    if config.mixed_strategy not in MIXED_STRATEGIES:
        raise ValueError(f"mixed_strategy {config.mixed_strategy!r} unknown; choose one of {MIXED_STRATEGIES[1:]}")
    if not 0.0 <= float(config.mixed_image_ratio) <= 1.0:
        raise ValueError(f"mixed_image_ratio must lie in [0, 1], got {config.mixed_image_ratio}")
    if len(tuple(config.data.image_size)) != 2 or int(config.data.num_frames) < 1:
        raise ValueError(f"data.image_size must be (H, W) and data.num_frames ≥ 1, got "
                         f"{config.data.image_size!r}, {config.data.num_frames!r}")
    d = config.discriminator
    if d.enabled:
        if d.generator_loss_type not in GAN_LOSS_TYPES:
            raise ValueError(f"discriminator.generator_loss_type must be one of {GAN_LOSS_TYPES}, "
                             f"got {d.generator_loss_type!r}")
        if d.discriminator_loss_type not in GAN_LOSS_TYPES + ("vanilla",):
            raise ValueError(f"discriminator.discriminator_loss_type must be one of {GAN_LOSS_TYPES + ('vanilla',)}, "
                             f"got {d.discriminator_loss_type!r}")


def train_vae(config: ml_collections.ConfigDict, *, stop_after: int | None = None, load: ModelLoader = load_model,
              load_spatial: SpatialLoader | None = None) -> dict:
    """Runs (or resumes from out_dir/checkpoints) VAE training to `config.steps`; returns a summary.

    Writes out_dir/config.json, metrics.jsonl (one record per step), eval.jsonl, checkpoints/, and with
    `export` the trained VAE to out_dir/vae_model. `stop_after` ends early (tests). `load` and `load_spatial`
    read `from_pretrained` and `vae_2d_pretrained` (see `build_vae`)."""
    validate_config(config)
    out_dir = pathlib.Path(config.out_dir)
    run_dir.prepare(out_dir, config.to_dict(), has_checkpoint=run_dir.has_checkpoint(out_dir))

    vae = build_vae(config, load, load_spatial)
    vae_config = vae.config.to_dict()
    tx = optimizer_from_config(config)
    disc = build_discriminator(config)
    disc_tx = tx if disc is not None else None
    graphdef, disc_graphdef, state = init_vae_state(vae, tx, stage_trainable_filter(int(config.stage)),
                                                    config.seed, disc, disc_tx, last=last_layer(int(config.stage)))
    del vae, disc
    cfg = step_config(config)
    lpips = build_lpips(config)

    eval_cfg = config.get("eval") or ml_collections.ConfigDict(dict(csv="", every=0, num_batches=0))
    eval_l1 = None

    def run_eval(step, state):
        value = evaluate(graphdef, state, config, csv=eval_cfg.csv, num_batches=eval_cfg.num_batches)
        with open(out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "eval_l1": value}) + "\n")
        print(f"eval step {step}: reconstruction L1 {value:.5f} (held-out, posterior means)", flush=True)
        return value

    def eval_when_due(step, state):
        nonlocal eval_l1
        if eval_cfg.csv and eval_cfg.every and step % eval_cfg.every == 0:
            eval_l1 = run_eval(step, state)

    loader = make_vae_loader(config)
    checkpointer = RunCheckpointer(out_dir / "checkpoints", every=config.ckpt_every, keep=config.keep_checkpoints,
                                   async_save=config.async_checkpoint)
    iterator = iter(loader)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        state = commit(state)
        iterator.set_state(data_state["iterator"])
        run_dir.trim_metrics(out_dir, int(state.step))
        print(f"resumed from step {int(state.step)} ({checkpointer.directory})", flush=True)

    step_fn = make_vae_step_fn(graphdef, disc_graphdef, tx, disc_tx, cfg, lpips, config)
    result = run_loop(state, step_fn, iterator, checkpointer, metrics_path=out_dir / "metrics.jsonl",
                      start_step=int(state.step), total_steps=config.steps, log_every=config.log_every,
                      stop_after=stop_after, place=_place_video, prefetch=config.get("prefetch", 2),
                      log_line=_format, after_step=eval_when_due)
    state, step = result.state, result.step
    if eval_cfg.csv and (not eval_cfg.every or step % eval_cfg.every):
        eval_l1 = run_eval(step, state)
    exported = None
    if config.export:
        exported = export_vae(graphdef, state, out_dir / "vae_model", config=vae_config)
        print(f"exported the VAE to {exported}", flush=True)
    return {"step": step, "eval_l1": eval_l1, "exported": exported}
