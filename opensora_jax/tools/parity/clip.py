"""Parity handler for transformers `CLIPTextModel` fixture cases (component "CLIPTextModel ...").

Builds the text tower from the case's CLIPTextConfig dict, loads weights.safetensors through the CLIP converter
(`convert.registry.load_model("clip", ...)`) and runs `input_ids` (B, L), with `attention_mask` when the case
records one (Open-Sora 2.0 passes none). Returns `pooler_output` (B, hidden), `last_hidden_state` (B, L, hidden)
and every `intermediate/hidden_state_<n>` the case lists: n = 0 the embeddings, n = i + 1 the output of layer i
(before the final LayerNorm), as transformers' `hidden_states` tuple.
"""

from __future__ import annotations

import re

import numpy as np

_STATE = re.compile(r"intermediate/hidden_state_(\d+)")


def run(case) -> dict[str, np.ndarray]:
    from convert.registry import load_model
    from opensora_jax.models.clip import CLIPTextConfig

    config = CLIPTextConfig.from_dict(case.config)
    model, _ = load_model("clip", case.weights_path, config=config.to_dict())
    ids = np.asarray(case["input_ids"]).astype(np.int32)
    mask = np.asarray(case["attention_mask"]) if "attention_mask" in case.arrays else None
    result = model(ids, mask, return_hidden_states=True)
    out = {name: np.asarray(result[name], dtype=np.float32) for name in ("pooler_output", "last_hidden_state")}
    states = result["hidden_states"]
    for name in case.roles("intermediate"):
        match = _STATE.fullmatch(name)
        n = int(match.group(1)) if match else -1
        if 0 <= n < len(states):
            out[name] = np.asarray(states[n], dtype=np.float32)
    return out
