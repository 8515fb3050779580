"""Which converter module serves which model name, and the loader that accepts reference weights too.

A converter module provides `DESCRIPTION`, `table(config)`, `abstract_model(config, dtype)` and
`config_from_source(path)`. The models themselves are named in `opensora_jax.families`; a converted
directory is read by `opensora_jax.checkpoints`, which `load_model` here defers to.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from convert.checkpoint import is_converted_dir, load_params, open_params, streams, variable_paths
from opensora_jax import checkpoints
from opensora_jax.checkpoints import materialize, read_config, resolve_checkpoint  # noqa: F401 - re-exported
from opensora_jax.errors import UserError

CONVERTERS: dict[str, str] = {
    "stdit3": "convert.stdit3",
    "t5": "convert.t5",
    "vae": "convert.vae_v1_2",
    "mmdit": "convert.mmdit",
    "clip": "convert.clip",
    "hunyuan_vae": "convert.hunyuan_vae",
    "dc_ae": "convert.dc_ae",
}


def converter(name: str) -> ModuleType:
    """The converter module for a model name ("stdit3", "t5", "vae")."""
    if name not in CONVERTERS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[name])


def load_model(name: str, path, *, config: dict | None = None, overrides: dict | None = None, dtype=None,
               compute_dtype=None, allow_pickle: bool = False, mesh=None):
    """Loads model `name` from a converted directory or from the reference's own weight files.

    A `checkpoints.ModelLoader`: the CLIs hand it to pipelines and trainers so users may pass either.
    The architecture comes from `config` if given, else from the converted directory's config.json or the
    converter's `config_from_source(path)`, with `overrides` merged in. `dtype` sets the parameter dtype (default float32).
    With a `mesh`, parameters are placed sharded per their logical axes as they load.
    Returns (module, config dict).
    """
    path = resolve_checkpoint(path, f"{name} checkpoint")
    if is_converted_dir(path):
        return checkpoints.load_model(name, path, config=config, overrides=overrides, dtype=dtype,
                                      compute_dtype=compute_dtype, mesh=mesh)
    module = converter(name)
    config = {**(module.config_from_source(path) if config is None else config), **(overrides or {})}
    abstract = module.abstract_model(config, dtype, compute_dtype)
    # The loaded model's architecture, where conversion changes it (MMDiT: fused → unfused, interleaved → half).
    loaded_config = module.converted_config(config) if hasattr(module, "converted_config") else config
    if not streams(module):
        flat = load_flat(module, path, config, abstract, dtype=dtype, allow_pickle=allow_pickle)
        missing = set(variable_paths(abstract)) - set(flat)
        if missing:
            raise UserError(f"{path}: no values for {sorted(missing)}")
        return materialize(abstract, flat, mesh), loaded_config
    # Converted one target at a time as it is placed: host memory holds one (stacked) tensor, not the model.
    with open_params(module.table(config), path, abstract, dtype=dtype, allow_pickle=allow_pickle,
                     opener=getattr(module, "open_reference", None)) as params:
        return materialize(abstract, params, mesh), loaded_config


def load_flat(module: ModuleType, path, config: dict, abstract, *, dtype=None, allow_pickle: bool = False):
    """Flat {variable path: array} (the whole model in memory): through the converter's own
    `load_params(path, config, ...)` when it has one (to adapt a source first, e.g. T5's tied embedding
    aliases), else through the shared engine."""
    if hasattr(module, "load_params"):
        return module.load_params(path, config, dtype=dtype, allow_pickle=allow_pickle)
    return load_params(module.table(config), path, abstract, dtype=dtype, allow_pickle=allow_pickle)


def resolve_config(name: str, path) -> dict:
    """The architecture stored with a checkpoint: a converted directory's config, else the converter's guess."""
    return read_config(path) if is_converted_dir(path) else converter(name).config_from_source(path)


load_converted_config = read_config
