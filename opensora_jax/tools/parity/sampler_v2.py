"""Parity handler for Open-Sora 2.0 sampler cases (component "Open-Sora 2.0 sampling ...").

Drives the case's MMDiT weights (those of the case named by `model_weights_from_case`, i.e. this case's
weights.safetensors) with the recorded noise, the fixed text tables (rows: the B prompts, then the empty negative
prompt) and, for image conditions, the recorded reference latents; returns the timesteps, x_final after the
paste-back, and the per-step model inputs and outputs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from opensora_jax.conditioning.latent_conditions import inference_condition, paste_references
from opensora_jax.models.mmdit import image_position_ids, pack, unpack
from opensora_jax.schedulers import flow_v2
from opensora_jax.tools.parity.core import to_channels_first, to_channels_last


def run(case) -> dict[str, np.ndarray]:
    from convert.registry import load_model

    opt = case.meta["sampling_option"]
    if opt.get("method", "i2v") != "i2v":
        raise ValueError(f"sampling method {opt['method']!r} not supported by this handler")
    config = {**case.config, "patch_size": case.config.get("patch_size", 2)}
    model, _ = load_model("mmdit", case.weights_path, config=config)
    p = model.cfg.patch_size
    noise = to_channels_last(case["noise"])  # (B, T, H, W, C)
    b, t, h, w, _ = noise.shape
    cond_type = case.meta.get("cond_type", "t2v")
    references = [None] * b
    if cond_type != "t2v" and "ref_latents" in case.arrays:
        present = case.arrays.get("ref_present", np.ones(b, bool))
        refs = to_channels_last(case["ref_latents"])
        references = [[refs[i]] if present[i] else None for i in range(b)]
    mask, masked = inference_condition(noise.shape, cond_type, references, causal=opt.get("is_causal_vae", True))

    tokens_per_frame = (h // p) * (w // p)
    ts = flow_v2.timesteps(opt["num_steps"], tokens_per_frame, t, shift=opt.get("shift", True),
                           alpha=opt.get("flow_shift"))
    guidance = flow_v2.GuidanceV2(guidance=opt["guidance"], guidance_img=opt["guidance_img"],
                                  text_osci=opt.get("text_osci", False), image_osci=opt.get("image_osci", False),
                                  scale_temporal_osci=opt.get("scale_temporal_osci", False))
    text_scales, image_scales = guidance.schedules(opt["num_steps"], t, image_condition="i2v" in cond_type)

    txt_table, vec_table = case["txt_table"], case["vec_table"]
    rows = list(range(b)) + [len(txt_table) - 1] * (2 * b)  # prompts + negatives + negatives
    cond = pack(jnp.concatenate([jnp.asarray(mask), jnp.asarray(masked)], -1), p)
    x, trace = flow_v2.sample_jit(
        model, pack(jnp.asarray(noise), p), cond, jnp.asarray(txt_table[rows]), jnp.asarray(vec_table[rows]),
        image_position_ids(b, (t, h, w), p), ts, text_scales, image_scales,
        tokens_per_frame=tokens_per_frame, branches=3, record=True)
    x = paste_references(np.asarray(unpack(x, (t, h, w), p)), cond_type, references)
    return {
        "timesteps": ts,
        "x_final": to_channels_first(x),
        "intermediate/model_in_img": np.asarray(trace["model_in_img"]),
        "intermediate/model_in_timesteps": np.asarray(trace["model_in_timesteps"]),
        "intermediate/model_in_cond": np.asarray(trace["model_in_cond"]),
        "intermediate/model_in_txt": txt_table[rows],
        "intermediate/model_in_y_vec": vec_table[rows],
        "intermediate/model_in_img_ids": np.asarray(trace["model_in_img_ids"]),
        "intermediate/model_out": np.asarray(trace["model_out"]),
    }
