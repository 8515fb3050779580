"""LoRA adapter files: only the adapters of a model (opensora_jax.models.lora), written and read strictly.

An adapter directory holds
  lora.json              {"format", "model" ("stdit3" | "mmdit"), "architecture" (the base model's architecture
                         fields), "lora" (rank, alpha, targets, dtype), "base" (what it was trained on, free text),
                         "opensora_jax_version"}
  adapters.safetensors   A and B of every adapted projection, named by variable path
                         (e.g. "blocks/spatial/attn/qkv_kernel_lora/a"), stacked blocks with their leading layer axis.
It is written into a hidden sibling directory and renamed into place when complete, so a reader never sees half of
one. `load_adapters` checks the file's model, every key and every shape against the model before touching it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import numpy as np
from flax import nnx

from opensora_jax import __version__
from opensora_jax.checkpoints import remove_stale_partials
from opensora_jax.errors import UserError
from opensora_jax.models.lora import LoRAConfig, adapter_arrays, adapter_layout, apply_lora, model_name, targets_of
from opensora_jax.tensor_files import SafetensorsFile, SafetensorsWriter

FORMAT = "opensora_jax.lora/1"
META_FILE = "lora.json"
TENSORS_FILE = "adapters.safetensors"
# Config fields that only choose how a model runs, not its shapes: left out of the recorded architecture.
_EXECUTION_FIELDS = ("dtype", "param_dtype", "attention", "remat", "remat_blocks")


def _architecture(model: nnx.Module) -> dict[str, Any]:
    """The model's architecture fields as JSON would give them back (tuples as lists)."""
    config = json.loads(json.dumps(model.cfg.to_dict()))
    return {k: v for k, v in config.items() if k not in _EXECUTION_FIELDS}


def adapter_dir(path: str | os.PathLike) -> pathlib.Path:
    """The adapter directory `path` names (the directory, or either file in it)."""
    path = pathlib.Path(path)
    return path.parent if path.name in (META_FILE, TENSORS_FILE) and path.is_file() else path


def save_adapters(path: str | os.PathLike, model: nnx.Module, cfg: LoRAConfig, *, base: str | None = None,
                  overwrite: bool = True) -> pathlib.Path:
    """Writes the adapters attached to `model` (and nothing of the base) to the directory `path`, atomically.

    `cfg` is the LoRAConfig they were attached with (its targets are recorded resolved, so the file does not depend
    on future defaults); `base` notes what base checkpoint they belong to. An existing adapter directory is replaced
    (`overwrite=False` refuses instead); any other non-empty directory is refused. Returns `path`.
    """
    out = pathlib.Path(path)
    arrays = adapter_arrays(model)
    if not arrays:
        raise UserError("the model has no LoRA adapters to save (apply_lora or load_adapters first)")
    expected = adapter_layout(model, cfg)
    if {k: tuple(v.shape) for k, v in arrays.items()} != expected:
        raise UserError(f"the adapters attached to the model do not match the LoRA config {cfg.to_dict()}")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (overwrite and (out / META_FILE).is_file()):
            raise UserError(f"{out} exists and is not empty" + (
                "" if not (out / META_FILE).is_file() else " (an adapter directory; pass overwrite=True to replace)"))
    config = {**cfg.to_dict(), "targets": list(targets_of(model, cfg))}
    meta = {"format": FORMAT, "model": model_name(model), "architecture": _architecture(model), "lora": config,
            "base": base, "opensora_jax_version": __version__}
    meta_text = json.dumps(meta, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staged = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        host = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
        with SafetensorsWriter(staged / TENSORS_FILE, {k: (v.dtype, v.shape) for k, v in host.items()},
                               metadata={"format": "np"}) as writer:
            for key, value in host.items():
                writer.write(key, value)
        (staged / META_FILE).write_text(meta_text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            staged.rename(out)
            shutil.rmtree(old)
        else:
            staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked lora.json of an adapter directory, reading no tensor (what sampling validates before any model
    loads). UserError naming the file for a missing directory, a missing or unreadable file, another format."""
    root = adapter_dir(path)
    if not root.exists():
        raise UserError(f"LoRA adapter {str(root)!r}: no such directory")
    meta_path, tensors_path = root / META_FILE, root / TENSORS_FILE
    for needed in (meta_path, tensors_path):
        if not needed.is_file():
            raise UserError(f"LoRA adapter {str(root)!r} has no {needed.name} (expected a directory written by "
                            "save_adapters, holding lora.json and adapters.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: unreadable LoRA metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path}: not a LoRA adapter file of this format (format {found!r}, expected {FORMAT!r})")
    for key in ("model", "lora"):
        if key not in meta:
            raise UserError(f"{meta_path}: no {key!r} entry")
    try:
        LoRAConfig.from_dict(meta["lora"])
    except (UserError, TypeError) as e:
        raise UserError(f"{meta_path}: bad LoRA config: {e}") from None
    SafetensorsFile(tensors_path).close()  # validates the header (UserError naming the file when corrupt)
    return meta


def check_adapters_for(path: str | os.PathLike, model: str) -> dict[str, Any]:
    """`read_adapter_meta`, also checking the adapters are for `model` ("stdit3" / "mmdit")."""
    meta = read_adapter_meta(path)
    if meta["model"] != model:
        raise UserError(f"LoRA adapter {str(adapter_dir(path))!r} is for a {meta['model']} model, "
                        f"this one is {model}")
    return meta


def _architecture_note(meta: dict, model: nnx.Module) -> str:
    recorded, have = meta.get("architecture") or {}, _architecture(model)
    diffs = [f"{k}={recorded[k]!r} (model: {have[k]!r})" for k in sorted(recorded)
             if k in have and recorded[k] != have[k]]
    return f"; the adapters were trained for {', '.join(diffs)}" if diffs else ""


def load_adapters(path: str | os.PathLike, model: nnx.Module) -> LoRAConfig:
    """Attaches the adapters saved at `path` to `model` (in place) with the file's LoRA config; returns that config.

    Every key and shape is checked against what the config attaches to this model before anything changes; a file
    for another model or architecture, a missing, extra or mis-shaped tensor, or a corrupt file is a UserError
    naming the file and the tensor. Follow with `merge_lora(model)` to sample at no extra cost.
    """
    root = adapter_dir(path)
    meta = check_adapters_for(root, model_name(model))
    cfg = LoRAConfig.from_dict(meta["lora"])
    tensors_path = root / TENSORS_FILE
    try:
        expected = adapter_layout(model, cfg)
    except UserError as e:
        raise UserError(f"{tensors_path}: {e}{_architecture_note(meta, model)}") from None
    reader = SafetensorsFile(tensors_path)
    try:
        found = {key: reader.shape(key) for key in reader.keys()}
        missing = [k for k in expected if k not in found]
        extra = [k for k in found if k not in expected]
        wrong = [k for k in expected if k in found and found[k] != expected[k]]
        if missing or extra or wrong:
            if wrong:
                k = wrong[0]
                what = f"tensor {k!r} has shape {found[k]}, this model needs {expected[k]}"
            elif missing:
                what = f"no tensor {missing[0]!r} (shape {expected[missing[0]]})"
            else:
                what = f"unexpected tensor {extra[0]!r} (shape {found[extra[0]]})"
            count = len(missing) + len(extra) + len(wrong)
            raise UserError(f"{tensors_path}: {what}" + (f" ({count - 1} more problems)" if count > 1 else "")
                            + _architecture_note(meta, model))
        values = {key: reader.get(key) for key in expected}
    finally:
        reader.close()
    apply_lora(model, cfg, values=values)
    return cfg
