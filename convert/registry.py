"""Which converter module serves which model name, and the one loader every CLI uses.

A converter module provides `DESCRIPTION`, `table(config)`, `abstract_model(config, dtype)` and
`config_from_source(path)`.
"""

from __future__ import annotations

import importlib
import pathlib
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.checkpoint import is_converted_dir, load_converted, load_params, variable_paths

CONVERTERS: dict[str, str] = {
    "stdit3": "convert.stdit3",
    "t5": "convert.t5",
    "vae": "convert.vae_v1_2",
}


def converter(name: str) -> ModuleType:
    """The converter module for a model name ("stdit3", "t5", "vae")."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[name])


def materialize(abstract_module, flat: dict[str, np.ndarray], mesh=None):
    """Fills an abstract (nnx.eval_shape) module with arrays, without ever running its random init.

    With a `mesh`, each array goes straight to its sharded placement (from the variable's logical axes),
    tensor by tensor, so no device ever holds a whole unsharded model.
    """
    from opensora_jax.parallel import variable_sharding

    graphdef, state = nnx.split(abstract_module)
    for path, var in nnx.to_flat_state(state):
        key = "/".join(str(p) for p in path)
        if key not in flat:
            raise KeyError(f"no value for variable {key}")
        value = np.asarray(flat[key], dtype=var.get_value().dtype)
        var.set_value(jnp.asarray(value) if mesh is None else jax.device_put(value, variable_sharding(var, mesh)))
    return nnx.merge(graphdef, state)


def resolve_checkpoint(path_or_repo, what: str = "checkpoint") -> pathlib.Path:
    """A local path as is; otherwise a hub id ("org/name") resolved to its snapshot in the local Hugging
    Face cache. Nothing is downloaded: a repo absent from the cache raises an error naming it."""
    path = pathlib.Path(path_or_repo)
    if path.exists():
        return path
    text = str(path_or_repo)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return pathlib.Path(snapshot_download(text, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - hub errors vary by version; all mean "not available offline"
            raise FileNotFoundError(
                f"{what} {text!r} is not a local path and not in the local Hugging Face cache (nothing is "
                f"downloaded; fetch it on a connected machine): {type(e).__name__}") from None
    raise FileNotFoundError(f"{what} {path} does not exist")


def load_model(name: str, path, *, config: dict | None = None, dtype=None, allow_pickle: bool = False, mesh=None):
    """Loads model `name` from a converted directory or from the reference's own weight files.

    The architecture comes from `config` if given, else from the converted directory's config.json or
    the converter's `config_from_source(path)`. `dtype` sets the parameter dtype (default float32).
    With a `mesh`, parameters are placed sharded per their logical axes as they load.
    Returns (module, config dict).
    """
    module = converter(name)
    path = resolve_checkpoint(path, f"{name} checkpoint")
    if config is None:
        config = resolve_config(name, path)
    abstract = module.abstract_model(config, dtype)
    flat = load_flat(module, path, config, abstract, dtype=dtype, allow_pickle=allow_pickle)
    missing = set(variable_paths(abstract)) - set(flat)
    if missing:
        raise KeyError(f"{path}: no values for {sorted(missing)}")
    return materialize(abstract, flat, mesh), config


def load_flat(module: ModuleType, path, config: dict, abstract, *, dtype=None, allow_pickle: bool = False):
    """Flat {variable path: array}: through the converter's own `load_params(path, config, ...)` when it
    has one (to adapt a source first, e.g. T5's tied embedding aliases), else through the shared engine."""
    if hasattr(module, "load_params"):
        return module.load_params(path, config, dtype=dtype, allow_pickle=allow_pickle)
    return load_params(module.table(config), path, abstract, dtype=dtype, allow_pickle=allow_pickle)


def resolve_config(name: str, path) -> dict:
    """The architecture stored with a checkpoint: a converted directory's config, else the converter's guess."""
    return load_converted_config(path) if is_converted_dir(path) else converter(name).config_from_source(path)


def load_converted_config(path) -> dict:
    """The model config stored by `python -m convert` in a converted directory."""
    import json

    meta = json.loads((pathlib.Path(path) / "config.json").read_text())
    return meta["config"]
