"""Lazy readers of tensor files (reference checkpoints, LPIPS weights): safetensors (single, sharded, directory)
and, opt-in, pickle.

Safetensors files are parsed here (8-byte little-endian header length, JSON header, raw data) and
memory-mapped, so opening validates the file but reads no tensor data until `get`.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from opensora_jax.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"


class SourceReader:
    """Read-only access to a checkpoint's named tensors; use as a context manager."""

    path: pathlib.Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor as a numpy array."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases open files; the reader is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class SafetensorsFile(SourceReader):
    """One .safetensors file, validated on open, memory-mapped and read lazily."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        self._header_end, self._entries = _parse_header(self.path, size)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, (begin, end) = self._entry(key)
        raw = self._mmap[self._header_end + begin : self._header_end + end]
        return np.array(raw).view(dtype).reshape(shape)

    def close(self) -> None:
        self._mmap = None

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None


def _parse_header(path: pathlib.Path, size: int) -> tuple[int, dict]:
    """Returns (offset of the data section, {key: (dtype, shape, (begin, end))}), checking every entry."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise UserError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries = {key: _parse_entry(path, key, info) for key, info in header.items()}
    by_offset = sorted(entries.items(), key=lambda kv: kv[1][2][0])
    for key, (_, _, (_, end)) in by_offset:
        if end > data_size:
            raise UserError(
                f"{path}: file is truncated: tensor {key!r} lies past the end of the file "
                f"(needs {8 + length + end} bytes, file has {size})"
            )
    return 8 + length, entries


def _parse_entry(path: pathlib.Path, key: str, info: dict):
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad header entry for tensor {key!r} ({info!r}): {e!r}") from None
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise UserError(f"{path}: tensor {key!r} has offsets {begin}..{end} inconsistent with {info['dtype']}{shape}")
    return dtype, shape, (begin, end)


class MultiSource(SourceReader):
    """Several readers seen as one; a key present in two of them is an error."""

    def __init__(self, path: pathlib.Path, readers: Iterable[SourceReader]):
        self.path = path
        self._readers = list(readers)
        self._owner: dict[str, SourceReader] = {}
        for reader in self._readers:
            for key in reader.keys():
                if key in self._owner:
                    self.close()
                    raise UserError(
                        f"{path}: tensor {key!r} is present in both {self._owner[key].path} and {reader.path}"
                    )
                self._owner[key] = reader

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._reader(key).dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._reader(key).get(key)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def owner(self, key: str) -> SourceReader:
        return self._reader(key)

    def _reader(self, key: str) -> SourceReader:
        try:
            return self._owner[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None


def _open_index(path: pathlib.Path) -> MultiSource:
    """A sharded checkpoint: its index's weight_map must describe the shards exactly."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a safetensors index (no weight_map): {e!r}") from None
    shards = sorted(set(weight_map.values()))
    source = MultiSource(path, (SafetensorsFile(path.parent / shard) for shard in shards))
    stored_in = {key: source.owner(key).path for key in source.keys()}
    problems = []
    for key, shard in weight_map.items():
        if key not in stored_in:
            problems.append(f"{key} is mapped to {shard} but missing there")
        elif stored_in[key] != path.parent / shard:
            problems.append(f"{key} is mapped to {shard} but stored in {stored_in[key].name}")
    problems += [
        f"{key} is stored in {file.name} but absent from the index"
        for key, file in stored_in.items()
        if key not in weight_map
    ]
    if problems:
        source.close()
        raise UserError(f"{path}: index does not match its shards:\n  " + "\n  ".join(problems))
    return source


class TorchPickle(SourceReader):
    """A torch.save checkpoint (a flat state dict, or {"state_dict": state dict}); only for trusted files."""

    def __init__(self, path: pathlib.Path):
        import torch

        self.path = path
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a state dict, found {type(loaded).__name__}")
        bad = [k for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if bad:
            raise UserError(
                f"{path}: expected a flat str → tensor state dict (or one under 'state_dict'); "
                f"non-tensor entries: {bad[:10]}"
            )
        self._tensors = loaded

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return _torch_to_numpy(self._tensor(key).reshape(-1)[:0]).dtype

    def get(self, key: str) -> np.ndarray:
        return _torch_to_numpy(self._tensor(key)).copy()

    def close(self) -> None:
        self._tensors = {}

    def _tensor(self, key: str):
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    bit_views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in bit_views:
        as_int, np_dtype = bit_views[t.dtype]
        return t.view(as_int).numpy().view(np_dtype)
    return t.numpy()


def _open_pickle(path: pathlib.Path, allow_pickle: bool) -> TorchPickle:
    if not allow_pickle:
        raise UserError(
            f"{path}: refusing to load a pickle checkpoint: pickle files can execute arbitrary code when loaded. "
            "If you trust this file, pass --allow-pickle (CLI) or allow_pickle=True; "
            "or convert it to .safetensors first."
        )
    return TorchPickle(path)


def _open_directory(path: pathlib.Path, allow_pickle: bool) -> SourceReader:
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise UserError(f"{path}: several safetensors indexes: {[p.name for p in indexes]}; pass one of them")
    if indexes:
        return _open_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return SafetensorsFile(files[0])
    if files:
        return MultiSource(path, (SafetensorsFile(f) for f in files))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return _open_pickle(pickles[0], allow_pickle)
    raise UserError(
        f"{path}: no checkpoint found (expected *{INDEX_SUFFIX}, *.safetensors or a single "
        f"{'/'.join(PICKLE_SUFFIXES)} file); found {sorted(p.name for p in path.iterdir())}"
    )


def open_source(path: str | pathlib.Path, *, allow_pickle: bool = False) -> SourceReader:
    """Opens a reference checkpoint for lazy reading.

    Accepts a .safetensors file, a sharded set by its *.safetensors.index.json, a directory holding either
    (an index is preferred; several .safetensors without one are read together), and — only with
    `allow_pickle=True`, since unpickling can run code — a torch .pt/.pth/.bin/.ckpt file.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _open_directory(path, allow_pickle)
    if path.name.endswith(INDEX_SUFFIX):
        return _open_index(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_pickle)
    raise UserError(
        f"{path}: unsupported checkpoint format (expected .safetensors, *{INDEX_SUFFIX}, "
        f"a directory, or with allow_pickle {'/'.join(PICKLE_SUFFIXES)})"
    )
