"""Train state (trainable params, frozen rest, optimizer state, EMA, step, RNG) and the jitted step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opensora_jax.training.loss import rflow_loss
from opensora_jax.training.masks import sample_masks
from opensora_jax.training.optim import ema_update


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates done
    params: nnx.State  # trainable parameters (float32 master weights)
    rest: nnx.State  # buffers and frozen parameters
    opt_state: optax.OptState
    ema: nnx.State  # float32 EMA of params
    rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step), so a resumed run draws the same


def init_state(model, tx: optax.GradientTransformation, trainable, seed: int):
    """Splits `model` into (graphdef, TrainState) with fresh optimizer state and EMA = params."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    ema = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)  # own buffers: the step donates state
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                       ema=ema, rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, state


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of one training step."""

    mask_ratios: tuple = ()  # ((name, ratio), ...); empty = no frame-conditioning masks
    timestep_method: str = "logit-normal"
    use_timestep_transform: bool = True
    ema_decay: float = 0.99


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(graphdef, tx, cfg: StepConfig, state: TrainState, batch: dict):
    """One update. batch: x0 (B, T, H, W, C) latents, y (B, L, C_cap), mask (B, L), height/width/num_frames/fps (B,)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_mask, k_loss = jax.random.split(key)
    x0 = batch["x0"]
    frame_mask = None
    if cfg.mask_ratios:
        frame_mask = sample_masks(k_mask, dict(cfg.mask_ratios), x0.shape[0], x0.shape[1])

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.rest)
        return rflow_loss(model, x0, batch["y"], batch["mask"], key=k_loss, height=batch["height"],
                          width=batch["width"], num_frames=batch["num_frames"], fps=batch["fps"],
                          frame_mask=frame_mask, timestep_method=cfg.timestep_method,
                          use_timestep_transform=cfg.use_timestep_transform)

    (loss, per_sample), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state,
                                    ema=ema_update(state.ema, params, cfg.ema_decay))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics
