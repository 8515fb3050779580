"""Parity handler for the RFlow sampler cases (component "RFLOW.sample + STDiT3")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from opensora_jax.tools.parity.core import to_channels_first, to_channels_last
from opensora_jax.tools.parity.stdit3 import load_stdit3
from opensora_jax.schedulers.rflow import RFlowSampler

_SCHEDULER_KEYS = ("num_sampling_steps", "num_timesteps", "cfg_scale", "use_discrete_timesteps", "use_timestep_transform")


def run(case) -> dict[str, np.ndarray]:
    unknown = set(case.meta["scheduler"]) - set(_SCHEDULER_KEYS)
    if unknown:
        raise ValueError(f"scheduler kwargs not supported: {sorted(unknown)}")
    sampler = RFlowSampler(**case.meta["scheduler"])
    model = load_stdit3(case.config, case.weights_path)
    arg = lambda name: jnp.asarray(case[f"additional_args/{name}"])  # noqa: E731
    cond_mask = case.arrays.get("cond_mask")
    noise = case.arrays.get("randn_like_noise")
    z, trace = sampler.sample(
        model,
        jnp.asarray(to_channels_last(case["z"])),
        jnp.asarray(case["y"][:, 0]),
        jnp.asarray(case["mask"]),
        height=arg("height"), width=arg("width"), num_frames=arg("num_frames"), fps=arg("fps"),
        cond_mask=None if cond_mask is None else jnp.asarray(cond_mask),
        noise=None if noise is None else jnp.asarray(np.moveaxis(noise, 2, -1)),
        return_trace=True,
    )
    steps_first = lambda a: np.moveaxis(np.asarray(a), -1, 2)  # (S, B, T, H, W, C) → (S, B, C, T, H, W)  # noqa: E731
    out = {
        "z_final": to_channels_first(z),
        "timesteps": np.asarray(trace["timesteps"]),
        "intermediate/model_in_x": steps_first(trace["model_in_x"]),
        "intermediate/model_in_t": np.asarray(trace["model_in_t"]),
        "intermediate/model_out": steps_first(trace["model_out"]),
    }
    if "model_in_x_mask" in trace:
        out["intermediate/model_in_x_mask"] = np.asarray(trace["model_in_x_mask"])
    return out
