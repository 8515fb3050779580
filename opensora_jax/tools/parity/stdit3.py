"""Parity handler for STDiT3 forward cases (component "STDiT3")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opensora_jax.tools.parity.core import to_channels_first, to_channels_last
from flax import nnx

from opensora_jax.models.stdit3 import STDiT3Config


def load_stdit3(config: dict, weights_path):
    """Builds STDiT3 from reference config kwargs and loads weights through the user-facing loader."""
    from convert.registry import load_model

    model, _ = load_model("stdit3", weights_path, config=STDiT3Config.from_reference(config).to_dict())
    return model


def run(case) -> dict[str, np.ndarray]:
    model = load_stdit3(case.config, case.weights_path)
    inputs = dict(
        x=jnp.asarray(to_channels_last(case["x"])),
        timestep=jnp.asarray(case["timestep"]),
        y=jnp.asarray(case["y"]),
        mask=jnp.asarray(case["mask"]),
        fps=jnp.asarray(case["fps"]),
        height=jnp.asarray(case["height"]),
        width=jnp.asarray(case["width"]),
    )

    @nnx.jit
    def forward(m, x_mask, inputs):
        return m(**inputs, x_mask=x_mask, return_intermediates=True)

    results = {}
    for prefix, out_name, x_mask in (("", "out", None), ("x_mask/", "out_x_mask", case.arrays.get("x_mask"))):
        if out_name not in case.arrays:
            continue
        out, inter = forward(model, None if x_mask is None else jnp.asarray(x_mask), inputs)
        results[out_name] = to_channels_first(out)
        if x_mask is not None:
            # The reference records a submodule's last call; with x_mask that is the timestep-0 branch.
            inter["t_embedder_out"], inter["t_block_out"] = inter["t0_embedder_out"], inter["t0_block_out"]
        for name, value in inter.items():
            value = np.asarray(value)
            if name == "y_embedder_out":
                value = value[:, None]  # reference keeps the (B, 1, L, C) layout here
            results[f"intermediate/{prefix}{name}"] = value
    return results
