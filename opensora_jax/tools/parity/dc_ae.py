"""Parity handler for the Video DC-AE (component "DCAE ...").

The case's model is built from its `config` (resolved DCAEConfig plus the DC_AE tiling kwargs) and loaded from
weights.safetensors through the user-facing converter. Recorded calls: `z = encode(video)` and
`decoded = decode(z_dec_in)` with the model's own tiling setting; `*_big_tiled` with tiling forced on and
`intermediate/*_big_untiled` with it off. Arrays come back in the reference layout (B, C, T, H, W).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from opensora_jax.tools.parity.core import to_channels_first, to_channels_last


def run(case) -> dict[str, np.ndarray]:
    from convert.registry import load_model

    model, _ = load_model("dc_ae", case.weights_path, config=case.config)
    arrays = case.arrays
    wanted = set(case.roles("output")) | set(case.roles("intermediate"))
    results: dict[str, np.ndarray] = {}

    def put(name, fn, source, tiled):
        if name in wanted and source in arrays:
            results[name] = to_channels_first(fn(jnp.asarray(to_channels_last(arrays[source])), tiled=tiled))

    put("z", model.encode, "video", None)
    put("decoded", model.decode, "z_dec_in", None)
    put("z_big_tiled", model.encode, "video_big", True)
    put("decoded_big_tiled", model.decode, "z_dec_in_big", True)
    put("intermediate/z_big_untiled", model.encode, "video_big", False)
    put("intermediate/decoded_big_untiled", model.decode, "z_dec_in_big", False)
    return results
