"""Module variables as flat '/'-joined paths; converted checkpoints on disk; the one loader users call.

A converted checkpoint is a directory holding `params/` (an orbax checkpoint of the nested parameter
dict) and `config.json` ({"format", "model", "config", "conversion": {...}}).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import uuid
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from convert.keymap import ConversionError, Table, convert
from convert.sources import open_source

FORMAT = "opensora_jax.converted/1"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


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


def _check_covers(flat: Mapping[str, np.ndarray], targets: Mapping[str, jax.ShapeDtypeStruct], context: str) -> None:
    problems = [f"missing parameter: {p} (shape {tuple(t.shape)})" for p, t in targets.items() if p not in flat]
    problems += [f"unexpected parameter: {p} (shape {np.shape(v)})" for p, v in flat.items() if p not in targets]
    problems += [
        f"shape mismatch for {p}: got {np.shape(v)}, module has {tuple(targets[p].shape)}"
        for p, v in flat.items()
        if p in targets and np.shape(v) != tuple(targets[p].shape)
    ]
    if problems:
        raise ConversionError(problems, context)


def load_flat_into(module, flat: Mapping[str, np.ndarray]) -> None:
    """Sets every variable of `module` (RNG state aside) from `flat`, strictly.

    Every path must be present with the variable's shape, and nothing else; values are cast to the variable's
    dtype and keep its current sharding when it has one.
    """
    variables = _variables(module)
    _check_covers(flat, variable_paths(module), f"loading parameters into {type(module).__name__}")
    for path, var in variables.items():
        old = var.get_value()
        var.set_value(jax.device_put(np.asarray(flat[path], dtype=old.dtype), getattr(old, "sharding", None)))


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
    from opensora_jax import __version__

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    meta = {
        "format": FORMAT,
        "model": model,
        "config": config,
        "conversion": {"opensora_jax_version": __version__, **(extra_meta or {})},
    }
    meta_text = json.dumps(meta, indent=2)  # before writing anything: fails early if config is not JSON
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(staged.resolve() / PARAMS_DIR, args=ocp.args.StandardSave(_nest(flat)))
        (staged / CONFIG_FILE).write_text(meta_text)
        _move_into_place(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


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


def load_converted(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a converted checkpoint: (flat params by '/'-joined path, config.json contents)."""
    path = pathlib.Path(path)
    if not is_converted_dir(path):
        raise ValueError(
            f"{path} is not a converted checkpoint (expected {PARAMS_DIR}/ and a {CONFIG_FILE} "
            f"with format {FORMAT!r}, as written by save_converted)"
        )
    with _checkpointer() as checkpointer:
        tree = checkpointer.restore(path.resolve() / PARAMS_DIR)
    return _flatten(tree), _read_meta(path)


def _kept_module_values(table: Table, module, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Module values for targets whose optional source was absent from the checkpoint."""
    variables = _variables(module)
    kept, problems = {}, []
    for rule in table.rules:
        source = rule.source_key(0) if rule.stacked else rule.source
        if rule.target in flat or rule.target not in variables or not table.is_optional(source):
            continue
        value = variables[rule.target].get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            problems.append(
                f"{rule.target} keeps the module's value (optional source {rule.source} is absent), "
                "but the module is abstract: pass a concrete module"
            )
        else:
            kept[rule.target] = np.asarray(value)
    if problems:
        raise ConversionError(problems, f"loading with table {table.name!r}")
    return kept


def load_params(
    table: Table, path, abstract_module, *, dtype=None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Parameters for `abstract_module` from a converted directory or from reference weights.

    Reference weights (anything `open_source` accepts) are converted on the fly with `table`. The result
    covers exactly `variable_paths(abstract_module)`, each array of `dtype` (default: the variable's dtype).
    Targets whose optional source is absent take the module's value, so the module must then be concrete.
    """
    targets = variable_paths(abstract_module)
    if is_converted_dir(path):
        flat, _ = load_converted(path)
    else:
        with open_source(path, allow_pickle=allow_pickle) as source:
            flat = convert(table, source, targets, dtype)
    flat = {**flat, **_kept_module_values(table, abstract_module, flat)}
    _check_covers(flat, targets, f"loading {path} with table {table.name!r}")
    return {p: np.asarray(flat[p], dtype=dtype if dtype is not None else targets[p].dtype) for p in targets}
