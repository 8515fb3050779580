"""Conversion table: reference Video DC-AE state_dict (Open-Sora 2.0 `DC_AE`, e.g. F32T4C128_AE.safetensors) → `DCAE`.

The port's module tree mirrors the reference's (`encoder.stages.<s>.op_list.<i>.main.conv1.conv.weight` is
`encoder/stages/<s>/op_list/<i>/main/conv1/conv/kernel`), so the table is one rule per variable of the model built
for the config: conv weights [out, in/groups, kT, kH, kW] → kernels (kT, kH, kW, in/groups, out); RMSNorm
`weight` → `scale`; biases unchanged. Every checkpoint tensor must be consumed and every variable filled.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from convert.keymap import Rule, Table
from opensora_jax.checkpoints import is_converted_dir, read_config, variable_paths
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.models.vae.dc_ae import PRESETS, DCAE, DCAEConfig

DESCRIPTION = "Video DC-AE (Open-Sora 2.0 high compression, dc-ae-f32t4c128: 128 channels, 4x32x32)"

DEFAULT_PRESET = "dc-ae-f32t4c128"


def _conv3d(w):
    """Conv3d.weight [out, in/groups, kT, kH, kW] → kernel (kT, kH, kW, in/groups, out)."""
    return w.transpose(2, 3, 4, 1, 0)


def _as_config(config) -> DCAEConfig:
    return config if isinstance(config, DCAEConfig) else DCAEConfig.from_reference(config)


def table(config: dict | DCAEConfig) -> Table:
    """The key map for a given DC-AE architecture (any config `DCAEConfig.from_reference` reads)."""
    rules = []
    for path in variable_paths(abstract_model(config)):
        *module, leaf = path.split("/")
        source = ".".join(module)
        if leaf == "kernel":
            rules.append(Rule(path, f"{source}.weight", _conv3d))
        elif leaf == "scale":
            rules.append(Rule(path, f"{source}.weight"))
        elif leaf == "bias":
            rules.append(Rule(path, f"{source}.bias"))
        else:  # pragma: no cover - every DCAE variable is a kernel, a scale or a bias
            raise AssertionError(f"DC-AE variable {path} has no reference counterpart")
    # A `module.` prefix is what DDP/ColossalAI wrappers leave on training checkpoints.
    return Table(name="dc_ae", rules=rules, strip_prefixes=("module.",))


def abstract_model(config: dict | DCAEConfig, dtype=None, compute_dtype=None) -> DCAE:
    """The DC-AE with abstract (shape-only) variables; nothing is allocated. `dtype` sets the parameters (and
    the compute dtype, unless `compute_dtype` is given); None = float32."""
    return MODELS["dc_ae"].abstract(_as_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


def preset(name: str = DEFAULT_PRESET) -> dict[str, Any]:
    """A released architecture with Open-Sora 2.0's inference settings, as a flat resolved dict."""
    if name not in PRESETS:
        raise UserError(f"unknown DC-AE preset {name!r}; choose one of {sorted(PRESETS)}")
    return DCAEConfig.from_reference(PRESETS[name]).to_dict()


def config_from_source(path) -> dict[str, Any]:
    """The architecture for a checkpoint at `path`: a converted directory's stored config; else a `config.json`
    beside the weights (a resolved DCAEConfig, a fixture case's config, our `to_dict()`, or DC_AE kwargs with a
    `model_name`, possibly nested under "config"); else the released dc-ae-f32t4c128 with inference settings."""
    path = pathlib.Path(path)
    if is_converted_dir(path):
        return read_config(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}: not valid JSON: {e}") from None
        raw = raw.get("config", raw) if isinstance(raw, dict) else raw
        return DCAEConfig.from_reference(raw).to_dict()
    return preset()


__all__ = ["DESCRIPTION", "abstract_model", "config_from_source", "preset", "table"]
