"""Converted checkpoints on disk: write them, read them, and load models from them onto a mesh.

A converted checkpoint is a directory holding `params/` and `config.json` ({"format", "model", "config",
"conversion": {...}}), as written by `save_converted` / `ConvertedWriter` (used by `python -m convert`, the
trainers' exports and the demo tools). Reference PyTorch weights are turned into such directories by the
`convert` package, which sits above this library: `load_model` here reads converted directories only, and the
CLIs hand a converting loader in where users may pass reference weights.

Formats (config.json's "format"):
- "opensora_jax.converted/2" (written now): `params/` is a sharded safetensors set, tensors named by their
  '/'-joined variable path, with its `params.safetensors.index.json` (a Hugging Face style weight_map), so it
  is written and read tensor by tensor: neither side ever holds the whole model in host memory.
- "opensora_jax.converted/1" (read only): `params/` is an orbax checkpoint of the nested parameter dict; it is
  restored whole, which is fine for the small directories (e.g. assets/demo) written in that format.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import uuid
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from opensora_jax import __version__
from opensora_jax.errors import CheckpointError, UserError
from opensora_jax.families import model_spec
from opensora_jax.parallel import variable_sharding
from opensora_jax.tensor_files import ARRAY_ALIGN, ArraySource, SafetensorsWriter, SourceReader, aligned_empty, open_source

FORMAT = "opensora_jax.converted/2"
FORMAT_ORBAX = "opensora_jax.converted/1"
READABLE_FORMATS = (FORMAT, FORMAT_ORBAX)
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
INDEX_FILE = "params.safetensors.index.json"
SHARD_BYTES = 2 << 30  # target size of one params/*.safetensors file; a larger tensor gets a file of its own

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


def _shapes(flat: Mapping) -> dict[str, tuple[int, ...]]:
    """Shape of every entry of `flat`, read from the file's header for a lazy `StoredParams`."""
    if isinstance(flat, StoredParams):
        return {p: flat.shape(p) for p in flat}
    return {p: tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v)) for p, v in flat.items()}


def check_covers(flat: Mapping[str, np.ndarray], targets: Mapping[str, jax.ShapeDtypeStruct], context: str) -> None:
    """Raises CheckpointError listing every missing, unexpected or mis-shaped array of `flat` against `targets`.

    Only shapes are looked at: a lazy `StoredParams` (or a dict of `jax.ShapeDtypeStruct`) is checked without
    reading a tensor.
    """
    shapes = _shapes(flat)
    problems = [f"missing parameter: {p} (shape {tuple(t.shape)})" for p, t in targets.items() if p not in shapes]
    problems += [f"unexpected parameter: {p} (shape {v})" for p, v in shapes.items() if p not in targets]
    problems += [
        f"shape mismatch for {p}: got {v}, module has {tuple(targets[p].shape)}"
        for p, v in shapes.items()
        if p in targets and v != tuple(targets[p].shape)
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

    `flat` maps '/'-joined variable paths to arrays, or is a lazy mapping (`StoredParams`, e.g. from
    `open_converted`, or anything with a `read(key, index)` method) read one tensor at a time here, so host
    memory holds one tensor beyond what the devices keep. With a `mesh`, each array goes straight to its
    sharded placement (from the variable's logical axes), tensor by tensor, so no device ever holds a whole
    unsharded model; from a lazy mapping, shards split along axis 0 are read from the file on their own.
    """
    graphdef, state = nnx.split(abstract_module)
    variables = [("/".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]
    missing = [f"no value for variable {key}" for key, _ in variables if key not in flat]
    if missing:
        raise CheckpointError(missing, f"filling {type(abstract_module).__name__}")
    lazy = hasattr(flat, "read")
    total = sum(math.prod(var.get_value().shape) * np.dtype(var.get_value().dtype).itemsize for _, var in variables)
    with _progress(total if lazy else 0, f"loading {type(abstract_module).__name__}") as bar:
        for key, var in variables:
            abstract = var.get_value()
            if not lazy:
                value = np.asarray(flat[key], dtype=abstract.dtype)
                placed = jnp.asarray(value) if mesh is None else jax.device_put(value, variable_sharding(var, mesh))
                var.set_value(placed)
            elif mesh is None:
                # Our own fresh, aligned buffer: on CPU the device array uses it in place (no second copy).
                var.set_value(jax.device_put(_host_array(flat.read(key), abstract.dtype)))
            else:
                sharding = variable_sharding(var, mesh)
                var.set_value(_read_sharded(flat, key, tuple(abstract.shape), abstract.dtype, sharding))
            bar.update(math.prod(abstract.shape) * np.dtype(abstract.dtype).itemsize)
    return nnx.merge(graphdef, state)


def _progress(total_bytes: int, desc: str):
    """A byte progress bar on stderr when it is a terminal and the work is large (else a silent stand-in)."""
    from tqdm.auto import tqdm

    quiet = total_bytes < (256 << 20) or not sys.stderr.isatty()
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=quiet)


def _host_array(x: np.ndarray, dtype) -> np.ndarray:
    """`x` as a C-contiguous, 64-byte aligned array of `dtype`: `x` itself when it already is one, else a copy
    (jax.device_put uses such arrays in place on CPU)."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % ARRAY_ALIGN == 0:
        return x
    out = _empty_host(x.shape, dtype)
    out[...] = x
    return out


READ_CHUNK_BYTES = 64 << 20  # rows read at once when a tensor's shards are not row ranges


def _leading_rows(index: tuple, shape) -> bool:
    """Whether `index` (a tuple of slices) selects whole rows along axis 0 only: one contiguous byte range."""
    rest_full = all(i.indices(n) == (0, n, 1) for i, n in zip(index[1:], shape[1:]))
    return rest_full and (not index or index[0].indices(shape[0])[2] == 1)


def _read_sharded(flat, key: str, shape: tuple, dtype, sharding) -> jax.Array:
    """One variable placed shard by shard from a lazy mapping.

    Shards that are row ranges (split along axis 0, or whole) are read from the file on their own, each
    distinct one once. Other splits (e.g. a stacked kernel split along its width) are filled from chunks of
    rows read in turn, so the host holds the shards plus one chunk, never a second copy of the tensor.
    """
    dtype = np.dtype(dtype)
    indices = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        indices[tuple(i.indices(n) for i, n in zip(index, shape))] = index
    if all(_leading_rows(index, shape) for index in indices.values()):
        shards = {token: _host_array(flat.read(key, index), dtype) for token, index in indices.items()}
    else:
        shards = {token: _empty_host(tuple(len(range(*t)) for t in token), dtype) for token in indices}
        rows = shape[0]
        step = max(1, READ_CHUNK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = flat.read(key, (slice(r0, r1),))
            for token, index in indices.items():
                start, stop, stride = token[0]
                if stride != 1:  # not produced by NamedSharding; kept correct all the same
                    shards[token][...] = flat.read(key)[index]
                    continue
                lo, hi = max(start, r0), min(stop, r1)
                if lo < hi:
                    shards[token][lo - start: hi - start] = chunk[(slice(lo - r0, hi - r0), *index[1:])]
            del chunk

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        return shards[tuple(i.indices(n) for i, n in zip(index, shape))]

    return jax.make_array_from_callback(shape, sharding, read)


def _empty_host(shape: tuple, dtype: np.dtype) -> np.ndarray:
    return aligned_empty(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------ files on disk


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


def _layout_of(flat: Mapping) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {path: (np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype,
                   tuple(np.shape(value))) for path, value in flat.items()}


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _file_order(layout: Mapping[str, tuple]) -> list[str]:
    """Paths in the order their tensors are stored: those whose size is a multiple of 64 bytes first (stable),
    so that every one of them starts 64-byte aligned in its file (the data section starts aligned)."""
    return sorted(layout, key=lambda path: _nbytes(*layout[path]) % ARRAY_ALIGN != 0)


def _shard_names(layout: Mapping[str, tuple], shard_bytes: int) -> dict[str, str]:
    """Assigns tensors, in order, to params files of about `shard_bytes` each."""
    groups: list[list[str]] = []
    size = 0
    for path, (dtype, shape) in layout.items():
        nbytes = _nbytes(dtype, shape)
        if not groups or (size + nbytes > shard_bytes and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    n = len(groups)
    return {path: f"params-{i + 1:05d}-of-{n:05d}.safetensors" for i, group in enumerate(groups) for path in group}


class ConvertedWriter:
    """Writes a converted checkpoint to `out_dir` tensor by tensor; use as a context manager.

    `layout` fixes, up front, every parameter's '/'-joined path, dtype and shape ({path: (dtype, shape)} or
    {path: jax.ShapeDtypeStruct}), in the order they are best written. `write(path, array)` stores a whole
    tensor, `write(path, array, index=i)` its slice i along axis 0 (e.g. one layer of a stacked kernel), so
    the writer never needs more than the array it is handed. Everything goes into a hidden sibling directory
    (`.NAME.partial-PID-*`) that is renamed to `out_dir` only on `commit()` (a clean exit of the `with` block),
    after checking every tensor was written in full; an error, or an incomplete tensor, deletes it instead,
    so `out_dir` never holds a partial checkpoint. An existing non-empty `out_dir` is replaced only when
    `overwrite`. `extra_meta` (e.g. source path, dtype) is recorded under config.json's "conversion".
    Tensors may be written in any order; writing them in `order` (the order they are stored in) is fastest.
    """

    def __init__(self, out_dir: str | pathlib.Path, layout: Mapping, *, config: dict, model: str,
                 extra_meta: dict | None = None, overwrite: bool = False, shard_bytes: int | None = None):
        out_dir = pathlib.Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (--overwrite, or overwrite=True, replaces it)")
        layout = {path: (spec.dtype, tuple(spec.shape)) if hasattr(spec, "shape") else (spec[0], tuple(spec[1]))
                  for path, spec in layout.items()}
        self.order = _file_order(layout)  # writing in this order streams each file from start to end
        layout = {path: layout[path] for path in self.order}
        meta = {
            "format": FORMAT,
            "model": model,
            "config": config,
            "conversion": {"opensora_jax_version": __version__, **(extra_meta or {})},
        }
        self._meta_text = json.dumps(meta, indent=2)  # before writing anything: fails early if config is not JSON
        self.out_dir = out_dir
        self._weight_map = _shard_names(layout, SHARD_BYTES if shard_bytes is None else shard_bytes)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
        self._staged = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._staged.mkdir()
        self._writers: dict[str, SafetensorsWriter] = {}
        try:
            (self._staged / PARAMS_DIR).mkdir()
            for name in dict.fromkeys(self._weight_map.values()):
                part = {p: layout[p] for p, shard in self._weight_map.items() if shard == name}
                writer = SafetensorsWriter(self._staged / PARAMS_DIR / name, part, metadata={"format": "np"})
                self._writers[name] = writer
        except BaseException:
            self.abort()
            raise

    @property
    def nbytes(self) -> int:
        """Size of the params files being written."""
        return sum(w.nbytes for w in self._writers.values())

    def write(self, path: str, array, index: int | None = None) -> None:
        """Stores `array` as parameter `path` (cast to its layout dtype), or as its slice `index` along axis 0."""
        if path not in self._weight_map:
            raise KeyError(f"{path!r} is not a parameter of the checkpoint being written")
        self._writers[self._weight_map[path]].write(path, array, index)

    def commit(self) -> pathlib.Path:
        """Checks every tensor is complete, writes the index and config.json, moves the directory into place."""
        try:
            for writer in self._writers.values():
                writer.close()
            total = sum(w.nbytes for w in self._writers.values())
            index = {"metadata": {"format": FORMAT, "total_size": total}, "weight_map": self._weight_map}
            (self._staged / PARAMS_DIR / INDEX_FILE).write_text(json.dumps(index, indent=1))
            (self._staged / CONFIG_FILE).write_text(self._meta_text)
            _move_into_place(self._staged, self.out_dir)
        finally:
            self.abort()
        return self.out_dir

    def abort(self) -> None:
        """Deletes whatever was written (nothing, after a commit)."""
        for writer in self._writers.values():
            writer.abort()
        shutil.rmtree(self._staged, ignore_errors=True)

    def __enter__(self) -> "ConvertedWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_converted(
    out_dir: str | pathlib.Path,
    flat: Mapping[str, np.ndarray],
    *,
    config: dict,
    model: str,
    extra_meta: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a converted checkpoint to `out_dir` and returns its path (see `ConvertedWriter`).

    Everything is written into a hidden sibling directory first and renamed to `out_dir` only once complete,
    so `out_dir` never holds a partial checkpoint. An existing non-empty `out_dir` is replaced only when
    `overwrite`. `extra_meta` (e.g. source path, dtype) is recorded under config.json's "conversion".
    Arrays are written one at a time; to write a model without holding it whole, use `ConvertedWriter`.
    """
    with ConvertedWriter(out_dir, _layout_of(flat), config=config, model=model, extra_meta=extra_meta,
                         overwrite=overwrite) as writer:
        for path in writer.order:
            writer.write(path, np.asarray(flat[path]))
    return pathlib.Path(out_dir)


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
    return meta if isinstance(meta, dict) and meta.get("format") in READABLE_FORMATS else None


def is_converted_dir(path: str | pathlib.Path) -> bool:
    """True when `path` is a directory written by `save_converted` (this format or an older readable one)."""
    path = pathlib.Path(path)
    return (path / PARAMS_DIR).is_dir() and _read_meta(path) is not None


def _require_converted(path: pathlib.Path) -> dict:
    meta = _read_meta(path) if (path / PARAMS_DIR).is_dir() else None
    if meta is None:
        raise UserError(
            f"{path} is not a converted checkpoint (expected {PARAMS_DIR}/ and a {CONFIG_FILE} with format "
            f"{' or '.join(map(repr, READABLE_FORMATS))}); convert reference weights first with "
            "`python -m convert MODEL SRC OUT_DIR`")
    return meta


class StoredParams(Mapping):
    """A converted checkpoint's parameters, read lazily: `params[path]` (or `read(path, index)` for a slice)
    reads one tensor from disk; shapes and dtypes come from the header. Close it (or use `with`) when done.

    `materialize` and `check_covers` take it in place of a dict and read one tensor at a time.
    """

    def __init__(self, source: SourceReader):
        self.source = source
        self._keys = source.keys()
        self._keyset = frozenset(self._keys)

    def __getitem__(self, path: str) -> np.ndarray:
        if path not in self:
            raise KeyError(path)
        return self.source.get(path)

    def __contains__(self, path) -> bool:
        return path in self._keyset

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.source.shape(path))

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self.source.dtype(path))

    def read(self, path: str, index=None) -> np.ndarray:
        return self.source.read(path, index)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "StoredParams":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _restore_orbax(path: pathlib.Path) -> dict[str, np.ndarray]:
    with _checkpointer() as checkpointer:
        tree = checkpointer.restore(path.resolve() / PARAMS_DIR)
    return _flatten(tree)


def open_converted(path: str | pathlib.Path) -> tuple[StoredParams, dict]:
    """Opens a converted checkpoint for lazy reading: (StoredParams, config.json contents).

    Format-1 (orbax) directories are restored whole into memory and served from there.
    """
    path = pathlib.Path(path)
    meta = _require_converted(path)
    if meta["format"] == FORMAT_ORBAX:
        return StoredParams(ArraySource(path, _restore_orbax(path))), meta
    index = path / PARAMS_DIR / INDEX_FILE
    if not index.is_file():
        raise UserError(f"{path}: {PARAMS_DIR}/{INDEX_FILE} is missing; the checkpoint is incomplete")
    return StoredParams(open_source(index)), meta


def load_converted(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a converted checkpoint whole: (flat params by '/'-joined path, config.json contents).

    This holds the whole model in memory; `open_converted` reads it tensor by tensor instead.
    """
    params, meta = open_converted(path)
    with params:
        return {p: params[p] for p in params}, meta


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
    params, meta = open_converted(path)
    with params:
        config = {**(meta["config"] if config is None else config), **(overrides or {})}
        abstract = spec.abstract(config, param_dtype=dtype, compute_dtype=compute_dtype)
        targets = variable_paths(abstract)
        check_covers(params, targets, f"loading {path} as {name}")
        return materialize(abstract, params, mesh), config
