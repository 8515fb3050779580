"""Parity handler for the Open-Sora v1.2 VAE (component "OpenSoraVAE_V1_2 ...").

The fixtures encode with the posterior MEAN of both VAEs (no sampling) and decode `z_dec_in` with
`num_frames = T` of the input video. Arrays come back in the reference layout (B, C, T, H, W).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from opensora_jax.tools.parity.core import to_channels_first, to_channels_last

from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAEConfig, decode_jit, encode_jit


def load_vae(config: dict, weights_path):
    """Builds the VAE from the case's reference kwargs and loads weights through the user-facing loader."""
    from convert.registry import load_model

    model, _ = load_model("vae", weights_path, config=OpenSoraVAEConfig.from_dict(config).to_dict())
    return model


def run(case) -> dict[str, np.ndarray]:
    model = load_vae(case.config, case.weights_path)
    results: dict[str, np.ndarray] = {}

    if "video" in case.arrays:
        video = jnp.asarray(to_channels_last(case["video"]))
        z, inter = encode_jit(model, video, None, return_intermediates=True)
        results["z"] = to_channels_first(z)
        for name in ("x_z", "temporal_mean", "temporal_logvar"):
            results[f"intermediate/{name}"] = to_channels_first(inter[name])

    if "z_dec_in" in case.arrays:
        # The recorded call is decode(z_dec_in, num_frames=T), T = frames of the input video.
        num_frames = int(case.config["num_frames"]) if "num_frames" in case.config else int(case["video"].shape[2])
        z = jnp.asarray(to_channels_last(case["z_dec_in"]))
        x, inter = decode_jit(model, z, num_frames, return_intermediates=True)
        results["decoded"] = to_channels_first(x)
        results["intermediate/x_z_dec"] = to_channels_first(inter["x_z_dec"])
    return results
