"""The one place that names each model and each model family the library knows.

A *model* is one trainable network with its config schema (`stdit3`, `vae`, `t5`): `MODELS[name]` builds it
from a config dict, abstractly (nothing allocated) or for real. A *family* is a released system that wires
models together (Open-Sora v1.2: T5 → STDiT3 → VAE v1.2): `FAMILIES[name]` names its models by role, its
default sampling config and its pipeline. Adding a family means adding entries here plus its own files
(models, a converter table per model, a pipeline, configs), not branches elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from opensora_jax.errors import UserError
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config
from opensora_jax.models.t5 import T5Config, T5Encoder
from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAE, OpenSoraVAEConfig

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one model from its config dict.

    `schema(config)` parses and validates the dict into the model's config dataclass; `build(cfg, rngs,
    param_dtype, compute_dtype)` constructs the module (dtypes None = the model's defaults).
    """

    name: str
    description: str
    schema: Callable[[dict], Any]
    build: Callable[..., nnx.Module]

    def config(self, config: dict | Any) -> Any:
        """The config dataclass of `config` (a dict of reference kwargs or already the dataclass)."""
        return config if not isinstance(config, dict) else self.schema(config)

    def abstract(self, config, *, param_dtype=None, compute_dtype=None) -> nnx.Module:
        """The model with shape-only variables (`nnx.eval_shape`): nothing is allocated."""
        cfg = self.config(config)
        return nnx.eval_shape(lambda: self.build(cfg, nnx.Rngs(0), param_dtype, compute_dtype))

    def init(self, config, *, seed: int = 0, param_dtype=None, compute_dtype=None) -> nnx.Module:
        """The model with its own random initialisation."""
        return self.build(self.config(config), nnx.Rngs(seed), param_dtype, compute_dtype)


def _dtype(value, default):
    return jnp.dtype(value) if value is not None else jnp.dtype(default)


def _build_stdit3(cfg: STDiT3Config, rngs, param_dtype, compute_dtype) -> STDiT3:
    changes = {}
    if param_dtype is not None:
        changes["param_dtype"] = jnp.dtype(param_dtype).name
    if compute_dtype is not None:
        changes["dtype"] = jnp.dtype(compute_dtype).name
    return STDiT3(dataclasses.replace(cfg, **changes) if changes else cfg, rngs=rngs)


def _build_vae(cfg: OpenSoraVAEConfig, rngs, param_dtype, compute_dtype) -> OpenSoraVAE:
    param = _dtype(param_dtype, jnp.float32)
    return OpenSoraVAE(cfg, rngs=rngs, dtype=_dtype(compute_dtype, param), param_dtype=param)


def _build_t5(cfg: T5Config, rngs, param_dtype, compute_dtype) -> T5Encoder:
    return T5Encoder(cfg, dtype=_dtype(compute_dtype, jnp.float32), param_dtype=_dtype(param_dtype, jnp.float32),
                     rngs=rngs)


def _deferred(module: str, attr: str) -> Callable:
    """`module.attr` (attr may be dotted), imported at first call: models not used cost nothing to import."""

    def call(*args, **kwargs):
        target = importlib.import_module(module)
        for name in attr.split("."):
            target = getattr(target, name)
        return target(*args, **kwargs)

    return call


MODELS: dict[str, ModelSpec] = {
    "stdit3": ModelSpec("stdit3", "STDiT3 diffusion transformer (Open-Sora v1.2)",
                        STDiT3Config.from_reference, _build_stdit3),
    "vae": ModelSpec("vae", "Open-Sora v1.2 video VAE (2D KL autoencoder + causal temporal VAE)",
                     OpenSoraVAEConfig.from_dict, _build_vae),
    "t5": ModelSpec("t5", "T5 v1.1 text encoder", T5Config.from_dict, _build_t5),
    "mmdit": ModelSpec("mmdit", "MMDiT diffusion transformer (Open-Sora 2.0, Flux.1-dev layout too)",
                       _deferred("opensora_jax.models.mmdit", "MMDiTConfig.from_reference"),
                       _deferred("opensora_jax.models.mmdit", "build")),
    "clip": ModelSpec("clip", "CLIP text tower (pooled output, no projection)",
                      _deferred("opensora_jax.models.clip", "CLIPTextConfig.from_dict"),
                      _deferred("opensora_jax.models.clip", "build")),
    "hunyuan_vae": ModelSpec("hunyuan_vae", "HunyuanVideo causal 3D VAE (Open-Sora 2.0, 16 channels, 4x8x8)",
                             _deferred("opensora_jax.models.vae.hunyuan", "HunyuanVAEConfig.from_reference"),
                             _deferred("opensora_jax.models.vae.hunyuan", "build")),
    "dc_ae": ModelSpec("dc_ae", "Video DC-AE (Open-Sora 2.0 high compression, 128 channels, 4x32x32)",
                       _deferred("opensora_jax.models.vae.dc_ae", "DCAEConfig.from_reference"),
                       _deferred("opensora_jax.models.vae.dc_ae", "build")),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A released system: its models by role, its default sampling config and its pipeline class."""

    name: str
    models: dict[str, str]  # role → MODELS key
    sample_config: pathlib.Path
    pipeline: str  # "module:Class", imported by `pipeline_class` (pipelines sit above this layer)


FAMILIES: dict[str, Family] = {
    "opensora_v1_2": Family(
        name="opensora_v1_2",
        models={"denoiser": "stdit3", "vae": "vae", "text": "t5"},
        sample_config=CONFIGS_DIR / "opensora_v1_2" / "sample.py",
        pipeline="opensora_jax.pipelines.opensora_v1_2:Pipeline",
    ),
    "opensora_v2_0": Family(
        name="opensora_v2_0",
        models={"denoiser": "mmdit", "vae": "hunyuan_vae", "text": "t5", "pooled_text": "clip"},
        sample_config=CONFIGS_DIR / "opensora_v2_0" / "sample_256px.py",
        pipeline="opensora_jax.pipelines.opensora_v2_0:Pipeline",
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The spec of model `name`; a UserError lists the known names."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def family(name: str) -> Family:
    """The family `name`; a UserError lists the known names."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def pipeline_class(name: str):
    """The pipeline class of family `name` (imported on first use)."""
    import importlib

    module, _, cls = family(name).pipeline.partition(":")
    return getattr(importlib.import_module(module), cls)
