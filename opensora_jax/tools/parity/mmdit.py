"""Parity handler for MMDiT forward cases (component "MMDiTModel ...").

Loads weights.safetensors through the user-facing converter (`convert.load_model("mmdit", ...)`), runs the recorded
`model(img=, img_ids=, txt=, txt_ids=, timesteps=, y_vec=, cond=, guidance=)` call and returns `out`, `out_unpacked`
(when recorded) and every intermediate by the case's names: the RoPE tables, the embedder outputs, each double
block's image and text streams and each single block's output.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.models.mmdit import unpack
from opensora_jax.tools.parity.core import to_channels_first


def run(case) -> dict[str, np.ndarray]:
    from convert.registry import load_model

    model, _ = load_model("mmdit", case.weights_path, config=case.config)
    names = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond", "guidance")
    inputs = {n: jnp.asarray(case[n], jnp.float32) for n in names if n in case.arrays}

    @nnx.jit
    def forward(m, inputs):
        return m(**inputs, return_intermediates=True)

    out, inter = forward(model, inputs)
    results = {"out": np.asarray(out)}
    if "out_unpacked" in case.arrays:
        b, c, t, h, w = case["out_unpacked"].shape
        results["out_unpacked"] = to_channels_first(unpack(out, (t, h, w), model.cfg.patch_size))
    for name, value in inter.items():
        results[f"intermediate/{name}"] = np.asarray(value)
    return results
