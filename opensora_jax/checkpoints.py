"""Converted checkpoints on disk: write them, read them, and load models from them onto a mesh.

A converted checkpoint is a directory holding `params/` (an orbax checkpoint of the nested parameter dict)
and `config.json` ({"format", "model", "config", "conversion": {...}}), as written by `save_converted` (used
by `python -m convert`, the trainers' exports and the demo tools). Reference PyTorch weights are turned into
such directories by the `convert` package, which sits above this library: `load_model` here reads converted
directories only, and the CLIs hand a converting loader in where users may pass reference weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from opensora_jax import __version__
from opensora_jax.errors import CheckpointError, UserError
from opensora_jax.families import model_spec
from opensora_jax.parallel import variable_sharding

FORMAT = "opensora_jax.converted/1"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"

# (name, path, *, config=None, dtype=None, mesh=None, **kw) → (module, config dict): what pipelines and trainers
# call to get a model. `load_model` below is the default; convert.load_model also accepts reference weights.
ModelLoader = Callable[..., tuple[nnx.Module, dict]]


# ------------------------------------------------------------------------------------ module variables


def _variables(module) -> dict[str, nnx.Variable]:
    state = nnx.state(module, nnx.Not(nnx.RngState))
    return {"/".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def variable_paths(module) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every variable of an nnx module except RNG state, by '/'-joined path.

    Works on abstract modules (`nnx.eval_shape(lambda: Model(...))`), so nothing needs allocating.
    """
    out = {}
    for path, var in _variables(module).items():
        value = var.get_value()
        out[path] = jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    return out


def flat_params(module, dtype=None) -> dict[str, np.ndarray]:
    """Every variable of `module` (RNG state aside) as a host array by '/'-joined path, optionally cast."""
    return {path: np.asarray(var.get_value(), dtype) for path, var in _variables(module).items()}


def check_covers(flat: Mapping[str, np.ndarray], targets: Mapping[str, jax.ShapeDtypeStruct], context: str) -> None:
    """Raises CheckpointError listing every missing, unexpected or mis-shaped array of `flat` against `targets`."""
    problems = [f"missing parameter: {p} (shape {tuple(t.shape)})" for p, t in targets.items() if p not in flat]
    problems += [f"unexpected parameter: {p} (shape {np.shape(v)})" for p, v in flat.items() if p not in targets]
    problems += [
        f"shape mismatch for {p}: got {np.shape(v)}, module has {tuple(targets[p].shape)}"
        for p, v in flat.items()
        if p in targets and np.shape(v) != tuple(targets[p].shape)
    ]
    if problems:
        raise CheckpointError(problems, context)


def load_flat_into(module, flat: Mapping[str, np.ndarray]) -> None:
    """Sets every variable of `module` (RNG state aside) from `flat`, strictly.

    Every path must be present with the variable's shape, and nothing else; values are cast to the variable's
    dtype and keep its current sharding when it has one.
    """
    variables = _variables(module)
    check_covers(flat, variable_paths(module), f"loading parameters into {type(module).__name__}")
    for path, var in variables.items():
        old = var.get_value()
        var.set_value(jax.device_put(np.asarray(flat[path], dtype=old.dtype), getattr(old, "sharding", None)))


def materialize(abstract_module, flat: Mapping[str, np.ndarray], mesh=None):
    """Fills an abstract (nnx.eval_shape) module with arrays, without ever running its random init.

    With a `mesh`, each array goes straight to its sharded placement (from the variable's logical axes),
    tensor by tensor, so no device ever holds a whole unsharded model.
    """
    graphdef, state = nnx.split(abstract_module)
    for path, var in nnx.to_flat_state(state):
        key = "/".join(str(p) for p in path)
        if key not in flat:
            raise CheckpointError([f"no value for variable {key}"], f"filling {type(abstract_module).__name__}")
        value = np.asarray(flat[key], dtype=var.get_value().dtype)
        var.set_value(jnp.asarray(value) if mesh is None else jax.device_put(value, variable_sharding(var, mesh)))
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ files on disk


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{path}/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous, unlike StandardCheckpointer


def _move_into_place(staged: pathlib.Path, out_dir: pathlib.Path) -> None:
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old)
    staged.rename(out_dir)
    shutil.rmtree(old)


def save_converted(
    out_dir: str | pathlib.Path,
    flat: Mapping[str, np.ndarray],
    *,
    config: dict,
    model: str,
    extra_meta: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a converted checkpoint to `out_dir` and returns its path.

    Everything is written into a hidden sibling directory first and renamed to `out_dir` only once complete,
    so `out_dir` never holds a partial checkpoint. An existing non-empty `out_dir` is replaced only when
    `overwrite`. `extra_meta` (e.g. source path, dtype) is recorded under config.json's "conversion".
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (--overwrite, or overwrite=True, replaces it)")
    meta = {
        "format": FORMAT,
        "model": model,
        "config": config,
        "conversion": {"opensora_jax_version": __version__, **(extra_meta or {})},
    }
    meta_text = json.dumps(meta, indent=2)  # before writing anything: fails early if config is not JSON
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    staged = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(staged.resolve() / PARAMS_DIR, args=ocp.args.StandardSave(_nest(flat)))
        (staged / CONFIG_FILE).write_text(meta_text)
        _move_into_place(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_partials(out_dir) -> list[pathlib.Path]:
    """Deletes `.NAME.partial-PID-*` siblings of `out_dir` left by writers that were killed (their PID is gone)
    and returns them; partial directories of live writers stay."""
    out_dir = pathlib.Path(out_dir)
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = path.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_module(out_dir, module, *, config: dict, model: str, dtype=None, **kwargs) -> pathlib.Path:
    """`save_converted` of every variable of `module` (cast to `dtype` when given)."""
    return save_converted(out_dir, flat_params(module, dtype), config=config, model=model, **kwargs)


def _read_meta(path: pathlib.Path) -> dict | None:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_converted_dir(path: str | pathlib.Path) -> bool:
    """True when `path` is a directory written by `save_converted`."""
    path = pathlib.Path(path)
    return (path / PARAMS_DIR).is_dir() and _read_meta(path) is not None


def _require_converted(path: pathlib.Path) -> dict:
    meta = _read_meta(path) if (path / PARAMS_DIR).is_dir() else None
    if meta is None:
        raise UserError(
            f"{path} is not a converted checkpoint (expected {PARAMS_DIR}/ and a {CONFIG_FILE} with format "
            f"{FORMAT!r}); convert reference weights first with `python -m convert MODEL SRC OUT_DIR`")
    return meta


def load_converted(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a converted checkpoint: (flat params by '/'-joined path, config.json contents)."""
    path = pathlib.Path(path)
    meta = _require_converted(path)
    with _checkpointer() as checkpointer:
        tree = checkpointer.restore(path.resolve() / PARAMS_DIR)
    return _flatten(tree), meta


def read_config(path: str | pathlib.Path) -> dict:
    """The model config stored in a converted directory."""
    return _require_converted(pathlib.Path(path))["config"]


# ------------------------------------------------------------------------------------ finding checkpoints


def cached_snapshot(repo_id: str, what: str = "checkpoint", cache_dir=None) -> pathlib.Path:
    """The local snapshot directory of a Hugging Face hub repo already in the local cache; nothing is
    downloaded. FileNotFoundError names the repo when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - hub errors vary by version; all mean "not available offline"
        raise FileNotFoundError(
            f"{what} {repo_id!r} is not a local path and not in the local Hugging Face cache (nothing is "
            f"downloaded; fetch it on a connected machine): {type(e).__name__}") from None


def resolve_checkpoint(path_or_repo, what: str = "checkpoint") -> pathlib.Path:
    """A local path as is; otherwise a hub id ("org/name") resolved to its snapshot in the local cache."""
    path = pathlib.Path(path_or_repo)
    if path.exists():
        return path
    text = str(path_or_repo)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return cached_snapshot(text, what)
    raise FileNotFoundError(f"{what} {path} does not exist")


# ------------------------------------------------------------------------------------ loading models


def load_model(name: str, path, *, config: dict | None = None, overrides: dict | None = None, dtype=None,
               compute_dtype=None, mesh=None, **unused) -> tuple[nnx.Module, dict]:
    """Loads model `name` (a `families.MODELS` key) from a converted directory.

    The architecture comes from `config` if given, else from the directory's config.json; `overrides` are
    merged into it (run settings such as STDiT3's compute dtype or attention kernel). `dtype` sets the
    parameter dtype (default: each model's, float32), `compute_dtype` the activations' where the model has
    one apart from its config. With a `mesh`, parameters are placed sharded per their logical axes as they
    load. Returns (module, config dict). Reference weights need `convert.load_model`, which accepts both.
    """
    if unused.get("allow_pickle"):
        raise UserError(f"{path}: allow_pickle applies to reference weights, which this loader does not read")
    spec = model_spec(name)
    path = resolve_checkpoint(path, f"{name} checkpoint")
    flat, meta = load_converted(path)
    config = {**(meta["config"] if config is None else config), **(overrides or {})}
    abstract = spec.abstract(config, param_dtype=dtype, compute_dtype=compute_dtype)
    targets = variable_paths(abstract)
    check_covers(flat, targets, f"loading {path} as {name}")
    return materialize(abstract, flat, mesh), config
