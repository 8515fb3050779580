"""One Open-Sora 2.0 training update of the MMDiT (spec §4): the rectified-flow objective with σmin, logit-normal
timesteps under the resolution/length shift, independent T5 / CLIP dropout to the encodings of "", the per-sample
image/video condition mix, AdamW on float32 master weights, optional EMA.

    t  = α·s / (1 + (α − 1)·s),  s = sigmoid(N(0, 1)),  α = shift_alpha(H'·W'/p², T')   (t = 1 is noise)
    x_t = (1 − t)·x0 + (σmin + (1 − σmin)·t)·ε,   target v = (1 − σmin)·ε − x0,   loss = mean((v̂ − v)²) in float32

The batch (`StepBatch` fields) holds unpacked latents (B, T, H, W, C) channels-last; packing into tokens happens
here. Where the reference rounds t to bfloat16, t stays float32 here (the model's timestep embedding computes in
its dtype anyway).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opensora_jax.conditioning.training_conditions import draw_types, training_condition
from opensora_jax.models import mmdit
from opensora_jax.schedulers.flow_v2 import shift_alpha
from opensora_jax.training.optim import ema_update

SIGMA_MIN = 1e-5
TEXT_DROPOUT = 0.31622777  # each of T5 and CLIP; both dropped ≈ 0.1 of the time


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MMDiTTrainState:
    step: jax.Array  # int32 scalar: updates done
    params: nnx.State  # trainable parameters (float32 master weights; LoRA: the adapters only)
    rest: nnx.State  # everything else (frozen parameters, buffers)
    opt_state: optax.OptState
    ema: dict | nnx.State  # float32 EMA of params, or {} without EMA
    rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step), so a resumed run draws the same


def init_state(model, tx: optax.GradientTransformation, trainable, seed: int, *, ema: bool = False):
    """(graphdef, MMDiTTrainState) of `model`: `trainable` params get optimizer state (and an EMA if asked)."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    ema_state = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params) if ema else {}
    state = MMDiTTrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                            ema=ema_state, rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, state


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of one update (hashable: part of the jit cache key)."""

    cond_weights: tuple[tuple[str, float], ...] = (("t2v", 1.0),)  # the per-sample condition mix
    t5_dropout: float = TEXT_DROPOUT
    clip_dropout: float = TEXT_DROPOUT
    sigma_min: float = SIGMA_MIN
    shift: bool = True
    causal: bool = True  # the autoencoder's time causality (v2v windows are one latent frame longer)
    ema_decay: float | None = None
    no_ref_loss: bool = False  # i2v: leave the conditioned latent frames out of the loss


def shifted_timesteps(key: jax.Array, batch: int, alpha: float) -> jax.Array:
    """(B,) float32 noise levels: sigmoid of a standard normal, shifted by α (α = 1: unshifted)."""
    t = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    return alpha * t / (1 + (alpha - 1) * t)


def drop_text(key: jax.Array, txt: jax.Array, vec: jax.Array, null_txt: jax.Array, null_vec: jax.Array,
              p_txt: float, p_vec: float) -> tuple[jax.Array, jax.Array]:
    """T5 states (B, L, D) and CLIP vectors (B, D') each replaced, independently per sample, by the encodings of ""
    with probabilities p_txt and p_vec."""
    k_txt, k_vec = jax.random.split(key)
    b = txt.shape[0]
    drop_t = jax.random.uniform(k_txt, (b,)) < p_txt
    drop_v = jax.random.uniform(k_vec, (b,)) < p_vec
    txt = jnp.where(drop_t[:, None, None], null_txt.astype(txt.dtype), txt)
    vec = jnp.where(drop_v[:, None], null_vec.astype(vec.dtype), vec)
    return txt, vec


def flow_loss(model, batch: dict, key: jax.Array, cfg: StepConfig) -> tuple[jax.Array, dict]:
    """(loss, aux) of one batch: x0 (B, T, H, W, C) latents, txt (B, L, D), y_vec (B, D'), null_txt (1, L, D),
    null_vec (1, D'), and the reference latents the condition mix needs (`training_conditions`)."""
    k_t, k_noise, k_text, k_cond = jax.random.split(key, 4)
    x0 = batch["x0"].astype(jnp.float32)
    b, t_lat, h, w, c = x0.shape
    p = model.cfg.patch_size
    alpha = shift_alpha(h * w // 4, t_lat) if cfg.shift else 1.0
    t = shifted_timesteps(k_t, b, alpha)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    tt = t[:, None, None, None, None]
    x_t = (1 - tt) * x0 + (cfg.sigma_min + (1 - cfg.sigma_min) * tt) * noise
    target = (1 - cfg.sigma_min) * noise - x0
    txt, vec = drop_text(k_text, batch["txt"], batch["y_vec"], batch["null_txt"], batch["null_vec"],
                         cfg.t5_dropout, cfg.clip_dropout)
    dt = jnp.dtype(model.cfg.dtype)
    cond, frame_mask = None, None
    if model.cfg.cond_embed:
        choice = draw_types(k_cond, b, cfg.cond_weights)
        refs = {k[len("ref_"):]: v for k, v in batch.items() if k.startswith("ref_")}
        mask, masked = training_condition(x0.shape, cfg.cond_weights, choice, refs, causal=cfg.causal)
        cond = mmdit.pack(jnp.concatenate([mask, masked], axis=-1), p).astype(dt)
        frame_mask = mask[:, :, 0, 0, 0]
    img_ids = mmdit.image_position_ids(b, (t_lat, h, w), p)
    txt_ids = mmdit.text_position_ids(b, txt.shape[1])
    guidance = jnp.full((b,), 4.0, dt) if model.cfg.guidance_embed else None
    v = model(mmdit.pack(x_t, p).astype(dt), img_ids, txt, txt_ids, t.astype(dt), vec, cond, guidance)
    err = jnp.square(v.astype(jnp.float32) - mmdit.pack(target, p))
    if cfg.no_ref_loss and frame_mask is not None:
        keep = 1.0 - mmdit.pack(jnp.broadcast_to(frame_mask[:, :, None, None, None], (b, t_lat, h, w, 1)), p)[..., :1]
        loss = (err * keep).sum() / jnp.maximum(keep.sum() * err.shape[-1], 1.0)
    else:
        loss = err.mean()
    return loss, {"t_mean": t.mean()}


def update(graphdef, tx, cfg: StepConfig, state: MMDiTTrainState, batch: dict):
    """One update (traceable; `train_step` is its jit); returns (new state, metrics {loss, grad_norm})."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        return flow_loss(nnx.merge(graphdef, params, state.rest), batch, key, cfg)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, cfg.ema_decay) if cfg.ema_decay is not None else state.ema
    new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


# The jitted update: graphdef, optimizer and StepConfig static, the state donated.
train_step = jax.jit(update, static_argnums=(0, 1, 2), donate_argnums=(3,))
