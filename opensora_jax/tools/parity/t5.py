"""Parity handler for transformers `T5EncoderModel` fixture cases (component "T5EncoderModel ...").

Builds the encoder from the case's T5Config dict, loads weights.safetensors through the T5 converter and
runs `input_ids`/`attention_mask` (B, L). Returns `last_hidden_state` (B, L, d_model) and, when the case
records them, `intermediate/hidden_state_<n>` numbered as transformers' `hidden_states` tuple: n = 0 is the
embedding output, n = i + 1 < num_layers the output of block i, and n = num_layers the final (normed) output.
"""

from __future__ import annotations

import re

import numpy as np

_STATE = re.compile(r"intermediate/hidden_state_(\d+)")


def run(case) -> dict[str, np.ndarray]:
    from convert.t5 import load_model
    from opensora_jax.models.t5 import T5Config

    config = T5Config.from_dict(case.config)
    model = load_model(case.weights_path, config)
    ids = np.asarray(case["input_ids"]).astype(np.int32)
    mask = np.asarray(case["attention_mask"]) if "attention_mask" in case.arrays else None
    hidden, states = model.encode_with_states(ids, mask)
    out = {"last_hidden_state": np.asarray(hidden, dtype=np.float32)}
    for name in case.roles("intermediate"):
        match = _STATE.fullmatch(name)
        n = int(match.group(1)) if match else -1
        if 0 <= n < config.num_layers:
            out[name] = np.asarray(states[n], dtype=np.float32)
        elif n == config.num_layers:
            out[name] = out["last_hidden_state"]
    return out
