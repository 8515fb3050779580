"""Lazy readers of tensor files (reference checkpoints, LPIPS weights): safetensors (single, sharded, directory)
and, opt-in, pickle.

Safetensors files are parsed here (8-byte little-endian header length, JSON header, raw data): opening
validates the file but reads no tensor data until `get` / `read`, which read one tensor (or one slice of it)
and nothing else, so a reader's memory stays at the tensor being read however large the file.
`SafetensorsWriter` writes the format the same way, tensor by tensor (or slice by slice) from a layout fixed
up front.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
import struct
from typing import Iterable, Mapping

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

    def read(self, key: str, index=None) -> np.ndarray:
        """Reads `tensor[index]` (a tuple of slices, as `jax.make_array_from_callback` passes; None: all) as a
        new array. Readers that can read a part without the whole tensor override this."""
        x = self.get(key)
        return x if index is None else np.array(x[index])

    def close(self) -> None:
        """Releases open files; the reader is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class SafetensorsFile(SourceReader):
    """One .safetensors file, validated on open and read lazily, one tensor (or slice) at a time.

    Large tensors (and leading-axis slices of them) are read straight from the disk into a fresh array with
    direct I/O where the file system allows it (bypassing the page cache, whose filling can cost more than
    the disk read itself), small ones with `pread`. Other slices (`read(key, index)`) are copied out of a
    read-only memory map whose pages are released right after. Either way the process keeps no file pages
    resident: its memory stays at what the caller holds, not at the file size.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        self._header_end, self._entries = _parse_header(self.path, size)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._direct: int | None | bool = None  # fd once opened, False when direct I/O is unavailable
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, (begin, end) = self._entry(key)
        return self._read_bytes(self._header_end + begin, end - begin).view(dtype).reshape(shape)

    def read(self, key: str, index=None) -> np.ndarray:
        dtype, shape, (begin, end) = self._entry(key)
        index = () if index is None else tuple(index)
        index += (slice(None),) * (len(shape) - len(index))
        if all(_is_full(i, n) for i, n in zip(index, shape)):
            return self.get(key)
        if all(_is_full(i, n) for i, n in zip(index[1:], shape[1:])) and isinstance(index[0], slice):
            start, stop, step = index[0].indices(shape[0])
            if step == 1:  # rows start..stop: one contiguous byte range
                row = math.prod(shape[1:]) * dtype.itemsize
                rows = max(stop - start, 0)
                raw = self._read_bytes(self._header_end + begin + start * row, rows * row)
                return raw.view(dtype).reshape((rows, *shape[1:]))
        if self._mmap is None:
            self._mmap = mmap.mmap(self._open_fd(), 0, access=mmap.ACCESS_READ)
        start = self._header_end + begin
        view = np.frombuffer(self._mmap, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
        out = np.array(view[index])
        del view
        _release(self._mmap, start, end - begin)
        return out

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        for fd in (self._fd, self._direct):
            if isinstance(fd, int) and not isinstance(fd, bool):
                os.close(fd)
        self._fd, self._direct = None, False

    def _read_bytes(self, offset: int, length: int) -> np.ndarray:
        """`length` bytes at `offset` as a new writable uint8 array."""
        fd = self._open_fd()
        if length >= DIRECT_MIN_BYTES and self._direct is not False:
            if self._direct is None:
                self._direct = _open_direct(self.path, os.O_RDONLY)
            if self._direct is not False:
                first = offset - offset % ALIGN
                buffer = _aligned_empty(-(-(offset + length - first) // ALIGN) * ALIGN)
                try:
                    _pread_into(self._direct, buffer, first, self.path, direct=True, need=offset + length - first)
                    return buffer[offset - first: offset - first + length]
                except OSError:  # the file system refused direct I/O after all: read through the page cache
                    os.close(self._direct)
                    self._direct = False
        out = aligned_empty(length)
        _pread_into(fd, out, offset, self.path)
        return out

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: reader is closed")
        return self._fd

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None


ALIGN = 4096  # direct I/O: buffer address, file offset and length in multiples of this
DIRECT_MIN_BYTES = 1 << 20  # smaller reads go through the page cache


ARRAY_ALIGN = 64  # what jax.device_put needs to use a host array in place on CPU instead of copying it


def aligned_empty(nbytes: int, align: int = ARRAY_ALIGN) -> np.ndarray:
    """`nbytes` uninitialised bytes (uint8) starting at an address that is a multiple of `align`.

    Large buffers are anonymous memory maps (page aligned, unmapped when the array goes): numpy asks the
    kernel for transparent huge pages on large arrays, whose compaction can make faulting the pages in
    several times slower than the read that fills them.
    """
    if nbytes >= DIRECT_MIN_BYTES and mmap.PAGESIZE % align == 0:
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
    raw = np.empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip: skip + nbytes]


def _aligned_empty(nbytes: int) -> np.ndarray:
    return aligned_empty(nbytes, ALIGN)


def _open_direct(path: pathlib.Path, flags: int) -> int | bool:
    """An O_DIRECT descriptor of `path`, or False where the platform or file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:
        return False


def _release(mapping: mmap.mmap, start: int, length: int) -> None:
    """Drops the pages of [start, start + length) from this process's memory (the page cache keeps them)."""
    if length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = start - start % page
    last = min(len(mapping), -(-(start + length) // page) * page)
    mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _is_full(index, length: int) -> bool:
    return isinstance(index, slice) and index.indices(length) == (0, length, 1)


def _pread_into(fd: int, buffer: np.ndarray, offset: int, path, *, direct: bool = False,
                need: int | None = None) -> None:
    """Fills the uint8 array `buffer` from `fd` at `offset` (pread may return fewer bytes than asked).

    With `direct`, the last aligned block may run past the end of the file: only `need` bytes must arrive.
    """
    view, done = memoryview(buffer), 0
    need = len(view) if need is None else need
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UserError(f"{path}: file ended while reading ({done} of {need} bytes at offset {offset})")
        done += n
        if direct and done % ALIGN and done < need:
            raise OSError(f"{path}: short direct read")


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


class ArraySource(SourceReader):
    """Arrays already in memory ({name: array}) seen as a reader."""

    def __init__(self, path: str | pathlib.Path, arrays: Mapping[str, np.ndarray]):
        self.path, self._arrays = pathlib.Path(path), dict(arrays)

    def keys(self) -> list[str]:
        return list(self._arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._array(key)))

    def dtype(self, key: str) -> np.dtype:
        return np.asarray(self._array(key)).dtype

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._array(key))

    def close(self) -> None:
        self._arrays = {}

    def _array(self, key: str):
        try:
            return self._arrays[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy / jax dtype; UserError if it has none."""
    dtype = np.dtype(dtype)
    name = SAFETENSORS_NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise UserError(f"dtype {dtype} cannot be stored in safetensors (supported: {sorted(SAFETENSORS_DTYPES)})")
    return name


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, holding nothing but the array being written.

    The layout ({name: (dtype, shape)}, in file order) is fixed up front, so the header is written first and
    every tensor goes straight to its place: whole (`write(name, array)`) or one leading-axis slice at a time
    (`write(name, array, index=i)`, `array` being `tensor[i]`), in any order. `close()` checks that every
    byte was written, so a file is never silently left with holes; `abort()` just closes it.
    """

    def __init__(self, path: str | pathlib.Path, layout: Mapping[str, tuple],
                 metadata: Mapping[str, str] | None = None):
        self.path = pathlib.Path(path)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        self._pending: dict[str, set[int] | None] = {}
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, (dtype, shape) in layout.items():
            dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": safetensors_dtype_name(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._entries[name] = (dtype, shape, offset)
            self._pending[name] = set(range(shape[0])) if shape else None
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        # The reference writer pads to 8; 64 lets a reader place tensors where jax can use them in place.
        text += b" " * (-(8 + len(text)) % ARRAY_ALIGN)
        self._data_start = 8 + len(text)
        self.nbytes = self._data_start + offset
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._stream = None
        try:
            os.ftruncate(self._fd, self.nbytes)
            if self.nbytes >= DIRECT_MIN_BYTES:
                self._stream = _DirectStream.open(self.path)
            self._write_at(struct.pack("<Q", len(text)) + text, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array, index: int | None = None) -> None:
        """Writes tensor `name` whole, or its slice `index` along axis 0; `array` is cast to the layout's dtype."""
        try:
            dtype, shape, offset = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: {name!r} is not in the file's layout") from None
        want = shape if index is None else shape[1:]
        if np.shape(array) != want or (index is not None and not (shape and 0 <= index < shape[0])):
            where = "" if index is None else f"[{index}]"
            raise ValueError(f"{self.path}: {name}{where} has shape {np.shape(array)}, layout says {want}"
                             + ("" if index is None else f" (of {shape})"))
        data = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        if index is not None:
            offset += index * data.nbytes
        self._write_at(data.reshape(-1).view(np.uint8), self._data_start + offset)
        pending = self._pending[name]
        if index is None or pending is None:
            self._pending[name] = set()
        else:
            pending.discard(index)

    def missing(self) -> list[str]:
        """Tensors (or slices) not written yet."""
        out = []
        for name, pending in self._pending.items():
            if pending is None:
                out.append(name)
            elif pending:
                out.append(name if len(pending) == self._entries[name][1][0] else f"{name}{sorted(pending)}")
        return out

    def close(self) -> None:
        """Finishes the file; raises (and leaves it incomplete) if some tensor was not written."""
        if self._fd is None:
            return
        missing = self.missing()
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: never written: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        try:
            self._end_stream()
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        """Closes the file without any check (the caller deletes it)."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_at(self, data, offset: int) -> None:
        """Bytes in file order extend the direct-I/O stream; anything else ends it and goes through the cache."""
        if self._stream is not None and offset == self._stream.end:
            if not self._stream.append(data, self._open_fd()):
                self._stream = None  # direct I/O refused: everything went through `_fd`, and will
            return
        self._end_stream()
        _pwrite_all(self._open_fd(), data, offset)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.finish(self._open_fd())
            self._stream = None

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        return self._fd

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _DirectStream:
    """The file's bytes from offset 0 on, as they are appended, written in whole aligned chunks with direct I/O
    (no page cache: on some hosts filling the cache costs more than the disk write itself). Two chunk buffers:
    one is written by a background thread while the other fills. `finish` writes the unaligned tail through
    an ordinary descriptor. If the file system refuses direct I/O, everything falls back to that descriptor."""

    CHUNK = 16 << 20

    def __init__(self, fd: int):
        from concurrent.futures import ThreadPoolExecutor

        self._fd: int | None = fd
        self._buffers = [_aligned_empty(self.CHUNK), _aligned_empty(self.CHUNK)]
        self._current = self._base = self._fill = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="safetensors-write")
        self._pending = None  # (future, buffer number, file offset) of the chunk being written

    @classmethod
    def open(cls, path: pathlib.Path) -> "_DirectStream | None":
        fd = _open_direct(path, os.O_WRONLY)
        return None if fd is False else cls(fd)

    @property
    def end(self) -> int:
        return self._base + self._fill

    def append(self, data, cached_fd: int) -> bool:
        """Adds `data`. If the file system refuses direct I/O, writes everything not yet on disk (the rest of
        `data` included) through `cached_fd` instead, closes the stream and returns False."""
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            buffer = self._buffers[self._current]
            n = min(len(view) - done, self.CHUNK - self._fill)
            buffer[self._fill: self._fill + n] = np.frombuffer(view[done: done + n], np.uint8)
            self._fill += n
            done += n
            if self._fill < self.CHUNK:
                continue
            if not self._wait(cached_fd):
                _pwrite_all(cached_fd, buffer, self._base)
                _pwrite_all(cached_fd, view[done:], self._base + self.CHUNK)
                self.abort()
                return False
            self._pending = (self._pool.submit(_pwrite_all, self._fd, buffer, self._base), self._current, self._base)
            self._current ^= 1
            self._base += self.CHUNK
            self._fill = 0
        return True

    def _wait(self, cached_fd: int) -> bool:
        """Waits for the chunk in flight; if direct I/O failed, rewrites it through `cached_fd`: False."""
        if self._pending is None:
            return True
        future, number, base = self._pending
        self._pending = None
        try:
            future.result()
            return True
        except OSError:
            _pwrite_all(cached_fd, self._buffers[number], base)
            return False

    def finish(self, cached_fd: int) -> None:
        """Writes what is buffered (the aligned part directly, the tail through `cached_fd`) and closes."""
        direct = self._wait(cached_fd)
        buffer = self._buffers[self._current][: self._fill]
        aligned = self._fill - self._fill % ALIGN if direct else 0
        try:
            if aligned:
                _pwrite_all(self._fd, buffer[:aligned], self._base)
        except OSError:
            aligned = 0
        _pwrite_all(cached_fd, buffer[aligned:], self._base + aligned)
        self.abort()

    def abort(self) -> None:
        """Stops (waiting for the chunk in flight, whatever its outcome) and closes the descriptor."""
        if self._pending is not None:
            self._pending[0].exception()
            self._pending = None
        self._pool.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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

    def read(self, key: str, index=None) -> np.ndarray:
        return self._reader(key).read(key, index)

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
