"""Parity handler for the Hunyuan causal 3D VAE (component "AutoencoderKLCausal3D ...", Open-Sora 2.0).

The recorded call is `z, posterior = encode(video, sample_posterior=False, return_posterior=True)` and
`decode(z_dec_in)`, once per tiling mode of the case's `tiling_modes` ({name: [spatial, temporal]}); the
"untiled" mode's arrays carry no suffix, another mode's the suffix `_<name>` (`z_tiled`, `decoded_tiled`,
`intermediate/posterior_mean_tiled`, ...). Without `tiling_modes` the config's own flags apply. Arrays come back
in the reference layout (B, C, T, H, W). `encode`/`decode` run eagerly around one compiled step per work-item
shape (a video or a tile), so the untiled and tiled runs share what they can.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from opensora_jax.tools.parity.core import to_channels_first, to_channels_last


def run(case) -> dict[str, np.ndarray]:
    from convert.registry import load_model

    model, _ = load_model("hunyuan_vae", case.weights_path, config=case.config)
    modes = case.meta.get("tiling_modes") or {"untiled": None}
    results: dict[str, np.ndarray] = {}
    for name, flags in modes.items():
        tiled = None if flags is None else (bool(flags[0]), bool(flags[1]))
        suffix = "" if name == "untiled" else f"_{name}"
        if "video" in case.arrays:
            video = jnp.asarray(to_channels_last(case["video"]))
            z, posterior = model.encode(video, tiled=tiled, return_posterior=True)
            results[f"z{suffix}"] = to_channels_first(z)
            results[f"intermediate/posterior_mean{suffix}"] = to_channels_first(posterior.mean)
            results[f"intermediate/posterior_logvar{suffix}"] = to_channels_first(posterior.logvar)
        if "z_dec_in" in case.arrays:
            z = jnp.asarray(to_channels_last(case["z_dec_in"]))
            results[f"decoded{suffix}"] = to_channels_first(model.decode(z, tiled=tiled))
    return results
