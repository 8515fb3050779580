"""The strict conversion engine: a table of rules maps checkpoint tensors onto module variables.

A `Table` lists one `Rule` per target variable. `plan` checks a table against the checkpoint's and
the module's shapes without touching any data and reports every problem at once. Then, tensor by tensor:
`convert_into` streams the checkpoint into a writer (`opensora_jax.checkpoints.ConvertedWriter`), holding
one source tensor at a time; `ConvertingReader` converts on demand, one target (a stacked target: all its
slices) per read; `convert` collects everything into a dict (the whole model in memory).

Source keys are matched after `Table.strip_prefixes` are removed. A source may feed several rules
(e.g. a fused qkv weight sliced into q, k and v); every target is filled by exactly one rule.

Optional sources: a rule whose source key matches a `Table.optional_sources` regex and is absent from
the checkpoint is planned with no sources; `convert` leaves its target out of the result, meaning
"keep the module's value" (`convert.checkpoint.load_params` takes it from the module).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from opensora_jax.errors import CheckpointError
from opensora_jax.tensor_files import SourceReader, aligned_empty

Shape = tuple[int, ...]
STACK = "{i}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Fills the module variable `target` from the checkpoint tensor `source`.

    `source` may contain "{i}": the target's leading axis then stacks the tensors i = 0..n-1, with n the
    target's leading length. `transform` is applied to each source tensor before stacking; it must work on
    numpy arrays and under `jax.eval_shape` (layout ops: .T, .transpose, .reshape, slicing, jnp ops).
    `resize_rows` tolerates an axis-0 length mismatch after the transform: the last row is repeated to pad,
    or rows are dropped to truncate.
    """

    target: str
    source: str
    transform: Callable | None = None
    resize_rows: bool = False

    @property
    def stacked(self) -> bool:
        return STACK in self.source

    def source_key(self, i: int | None = None) -> str:
        return self.source if i is None else self.source.replace(STACK, str(i))


@dataclasses.dataclass(frozen=True)
class Table:
    """A model's conversion table.

    `strip_prefixes` are removed from the start of source keys, in order, each at most once.
    `ignore` holds regexes (full match, on stripped keys) of source keys consumed silently.
    `optional_sources` holds regexes (full match) of source keys that may be absent; see the module doc.
    """

    name: str
    rules: Sequence[Rule]
    strip_prefixes: Sequence[str] = ()
    ignore: Sequence[str] = ()
    optional_sources: Sequence[str] = ()

    def strip(self, key: str) -> str:
        for prefix in self.strip_prefixes:
            key = key.removeprefix(prefix)
        return key

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignore)

    def is_optional(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.optional_sources)


class ConversionError(CheckpointError):
    """Every problem found while matching a checkpoint to a module, one per line (`.problems`)."""

    def __init__(self, problems: Sequence[str], context: str = "conversion"):
        super().__init__(problems, context)


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned target: the checkpoint keys (as stored, before prefix stripping) that fill it.

    `sources` has one key per slice when `rule.stacked`, and is empty when the rule's optional source
    is absent (the target keeps the module's value).
    """

    rule: Rule
    sources: tuple[str, ...]
    shape: Shape

    @property
    def target(self) -> str:
        return self.rule.target


def _shape(spec) -> Shape:
    return tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)


def _transformed_shape(rule: Rule, shape: Shape) -> Shape:
    if rule.transform is None:
        return shape
    out = jax.eval_shape(rule.transform, jax.ShapeDtypeStruct(shape, np.float32))
    return tuple(out.shape)


def _fits(rule: Rule, got: Shape, want: Shape) -> bool:
    if got == want:
        return True
    return rule.resize_rows and len(got) == len(want) >= 1 and got[1:] == want[1:]


def _stripped_keys(table: Table, source_shapes: Mapping[str, Shape], problems: list[str]) -> dict[str, str]:
    """Maps stripped key → stored key, reporting keys that collide after stripping."""
    stored: dict[str, str] = {}
    for key in source_shapes:
        name = table.strip(key)
        if name in stored:
            problems.append(f"duplicate source key after prefix strip: {name} (from {stored[name]} and {key})")
        stored[name] = key
    return stored


def _check_source(rule: Rule, key: str, shape: Shape, want: Shape, problems: list[str]) -> None:
    try:
        got = _transformed_shape(rule, shape)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not raised
        problems.append(f"transform failed for source {key} (shape {shape}) → parameter {rule.target}: {e}")
        return
    if not _fits(rule, got, want):
        after = f" → {got} after transform" if rule.transform is not None else ""
        slice_note = " per stacked slice" if rule.stacked else ""
        problems.append(
            f"shape mismatch: source {key} (shape {shape}{after}) vs parameter {rule.target} (shape {want}{slice_note})"
        )


def _plan_rule(
    table: Table, rule: Rule, want: Shape, source_shapes: Mapping[str, Shape], stored: Mapping[str, str],
    problems: list[str],
) -> Step | None:
    if rule.stacked and not want:
        problems.append(f"stacked rule needs a leading axis: parameter {rule.target} (shape {want}) from {rule.source}")
        return None
    names = [rule.source_key(i) for i in range(want[0])] if rule.stacked else [rule.source]
    absent = [n for n in names if n not in stored]
    if absent:
        if len(absent) == len(names) and all(table.is_optional(n) for n in names):
            return Step(rule, (), want)
        problems.extend(f"missing source key for {rule.target}: {name}" for name in absent)
        return None
    slice_shape = want[1:] if rule.stacked else want
    for name in names:
        _check_source(rule, stored[name], tuple(source_shapes[stored[name]]), slice_shape, problems)
    return Step(rule, tuple(stored[n] for n in names), want)


def plan(table: Table, source_shapes: Mapping[str, Shape], target_shapes: Mapping) -> list[Step]:
    """Checks `table` against shapes only and returns one `Step` per target, in table order.

    `source_shapes` maps stored checkpoint keys to shapes; `target_shapes` maps '/'-joined variable paths to
    shapes or `jax.ShapeDtypeStruct`s. Raises a single `ConversionError` listing every problem: unused source
    keys, unfilled or doubly filled parameters, rules for unknown parameters, missing source keys, shape
    mismatches and failing transforms.
    """
    problems: list[str] = []
    stored = _stripped_keys(table, source_shapes, problems)
    targets = {path: _shape(spec) for path, spec in target_shapes.items()}
    steps: list[Step] = []
    filled: dict[str, str] = {}
    for rule in table.rules:
        if rule.target not in targets:
            problems.append(f"unknown parameter in rule: {rule.target} (source {rule.source})")
            continue
        if rule.target in filled:
            problems.append(f"parameter {rule.target} filled by several rules: {filled[rule.target]} and {rule.source}")
            continue
        filled[rule.target] = rule.source
        step = _plan_rule(table, rule, targets[rule.target], source_shapes, stored, problems)
        if step is not None:
            steps.append(step)
    for path, shape in targets.items():
        if path not in filled:
            problems.append(f"unfilled parameter: {path} (shape {shape})")
    used = {stored[n] for rule in table.rules for n in _referenced(rule, targets) if n in stored}
    for name, key in stored.items():
        if key not in used and not table.is_ignored(name):
            problems.append(f"unused source key: {key} (shape {tuple(source_shapes[key])})")
    if problems:
        raise ConversionError(problems, f"checkpoint does not match table {table.name!r}")
    return steps


def _referenced(rule: Rule, targets: Mapping[str, Shape]) -> list[str]:
    """Stripped source names a rule consumes, whether or not the rule planned cleanly.

    A stacked rule consumes i = 0..n-1 only, so extra layers in the checkpoint are reported as unused.
    """
    if not rule.stacked:
        return [rule.source]
    shape = targets.get(rule.target)
    return [rule.source_key(i) for i in range(shape[0])] if shape else []


def _resize_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] >= rows:
        return x[:rows]
    pad = np.repeat(x[-1:], rows - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)


def transposed(x: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """`np.transpose(x, axes)` as a new C-contiguous array, copied in blocks along the output's last axis.

    numpy copies a transposed matrix element by element with the source stride (a cache and TLB miss per
    element once rows exceed a page); blocks of rows keep the working set small: about 4× faster for
    (4608, 1152) float32 on a 2-core host.
    """
    x = np.asarray(x)
    axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(a % x.ndim for a in axes)
    view = x.transpose(axes)
    out = np.empty(view.shape, x.dtype)
    if x.ndim < 2 or axes[-1] == x.ndim - 1 or x.size < (1 << 16):  # the last axis stays last: rows copy well
        out[...] = view
        return out
    block = 64
    for start in range(0, view.shape[-1], block):
        out[..., start: start + block] = view[..., start: start + block]
    return out


class _Source(np.ndarray):
    """A source tensor as a rule's transform sees it: `.T` and `.transpose()` return blocked contiguous copies
    (`transposed`) instead of views, so that the copy a following reshape or the writer makes is fast.
    Values are those of plain numpy; everything else behaves as a numpy array."""

    @property
    def T(self) -> np.ndarray:
        return transposed(self)

    def transpose(self, *axes) -> np.ndarray:
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = axes[0]
        return transposed(self, axes or None)


def _read(reader: SourceReader, key: str, rule: Rule, shape: Shape) -> np.ndarray:
    return _apply(reader.get(key), rule, shape)


def _apply(x: np.ndarray, rule: Rule, shape: Shape) -> np.ndarray:
    if rule.transform is not None:
        x = np.asarray(rule.transform(x.view(_Source)))
    if rule.resize_rows and x.shape[0] != shape[0]:
        x = _resize_rows(x, shape[0])
    return x


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not sys.stderr.isatty())


def _target_dtype(step: Step, target_shapes: Mapping, dtype) -> np.dtype:
    return np.dtype(dtype if dtype is not None else getattr(target_shapes[step.target], "dtype", np.float32))


def _plan_source(table: Table, source: SourceReader, target_shapes: Mapping) -> list[Step]:
    return plan(table, {k: source.shape(k) for k in source.keys()}, target_shapes)


def _pieces(step: Step, source: SourceReader, dtype: np.dtype):
    """(slice index or None, array of `dtype`) for each source tensor of a step, read one at a time."""
    if step.rule.stacked:
        for i, key in enumerate(step.sources):
            yield i, np.asarray(_read(source, key, step.rule, step.shape[1:]), dtype=dtype)
    elif step.sources:
        yield None, np.asarray(_read(source, step.sources[0], step.rule, step.shape), dtype=dtype)


def _read_ahead(source: SourceReader, keys: Sequence[str]):
    """`source.get(key)` for each key in order; a background thread reads the next tensor while the caller
    works on the current one (the readers release the GIL in I/O), so at most two are held at once."""
    from concurrent.futures import ThreadPoolExecutor

    if not keys:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="convert-read") as pool:
        future = pool.submit(source.get, keys[0])
        for key in [*keys[1:], None]:
            tensor = future.result()
            future = None if key is None else pool.submit(source.get, key)
            yield tensor
            del tensor


def output_layout(steps: Sequence[Step], target_shapes: Mapping, dtype=None) -> dict[str, tuple[np.dtype, Shape]]:
    """{target: (dtype, shape)} of the targets that `steps` fill, in step order: a `ConvertedWriter` layout."""
    return {s.target: (_target_dtype(s, target_shapes, dtype), s.shape) for s in steps if s.sources}


def convert_into(table: Table, source: SourceReader, target_shapes: Mapping, writer, dtype=None,
                 steps: Sequence[Step] | None = None) -> list[Step]:
    """Streams the checkpoint read by `source` into `writer` (`write(target, array, index=None)`).

    Checks everything with `plan` first (or takes its `steps`), so nothing is written for a checkpoint that
    does not match. Then each source tensor is read, transformed, cast to `dtype` (default: the target's
    dtype) and handed to the writer on its own: a stacked target is written slice by slice, so memory
    holds one source tensor (and its transformed copy) at a time, whatever the model's size. Targets whose
    optional source is absent are not written. Returns the steps.
    """
    steps = _plan_source(table, source, target_shapes) if steps is None else steps
    jobs = [(step, i if step.rule.stacked else None, key) for step in steps for i, key in enumerate(step.sources)]
    tensors = _read_ahead(source, [key for _, _, key in jobs])
    try:
        with _progress(len(jobs), f"converting {table.name}") as bar:
            for (step, index, _), tensor in zip(jobs, tensors):
                shape = step.shape if index is None else step.shape[1:]
                piece = np.asarray(_apply(tensor, step.rule, shape), dtype=_target_dtype(step, target_shapes, dtype))
                del tensor
                writer.write(step.target, piece, index)
                del piece
                bar.update()
    finally:
        tensors.close()  # on an error, waits for the read in flight before the source is closed
    return steps


class ConvertingReader(SourceReader):
    """The converted parameters of a checkpoint, computed on demand: `get(target)` reads, transforms and casts
    that target's source tensor(s), so a consumer such as `opensora_jax.checkpoints.materialize` (through
    `StoredParams`) holds one target at a time. Planned (all problems at once) on construction; targets whose
    optional source is absent are not among the keys."""

    def __init__(self, table: Table, source: SourceReader, target_shapes: Mapping, dtype=None):
        self.path, self.source = source.path, source
        self._steps = {s.target: s for s in _plan_source(table, source, target_shapes) if s.sources}
        self._dtypes = {t: _target_dtype(s, target_shapes, dtype) for t, s in self._steps.items()}

    def keys(self) -> list[str]:
        return list(self._steps)

    def shape(self, key: str) -> Shape:
        return self._step(key).shape

    def dtype(self, key: str) -> np.dtype:
        self._step(key)
        return self._dtypes[key]

    def get(self, key: str) -> np.ndarray:
        return self.read(key)

    def read(self, key: str, index=None) -> np.ndarray:
        """Converts target `key`, or `key[index]`: of a stacked target, only the layers `index` selects."""
        step, dtype = self._step(key), self._dtypes[key]
        if not step.rule.stacked:
            x = next(_pieces(step, self.source, dtype))[1]
            return x if index is None else np.array(x[tuple(index)])
        index = (slice(None),) if index is None or not tuple(index) else tuple(index)
        if not isinstance(index[0], slice):  # an integer: that one layer
            return self.read(key, (slice(index[0], index[0] + 1), *index[1:]))[0]
        layers = range(*index[0].indices(step.shape[0]))
        out = aligned_empty(len(layers) * math.prod(step.shape[1:]) * dtype.itemsize).view(dtype)
        out = out.reshape((len(layers), *step.shape[1:]))
        for j, layer in enumerate(layers):
            out[j] = np.asarray(_read(self.source, step.sources[layer], step.rule, step.shape[1:]), dtype=dtype)
        return out if len(index) == 1 else np.array(out[(slice(None), *index[1:])])

    def close(self) -> None:
        self.source.close()

    def _step(self, key: str) -> Step:
        try:
            return self._steps[key]
        except KeyError:
            raise KeyError(f"{self.path}: no converted parameter {key!r}") from None


class _Collect:
    """A writer into preallocated arrays (what `convert` returns)."""

    def __init__(self, layout: Mapping[str, tuple[np.dtype, Shape]]):
        self.arrays = {target: np.empty(shape, dtype) for target, (dtype, shape) in layout.items()}

    def write(self, target: str, array: np.ndarray, index: int | None = None) -> None:
        if index is None:
            self.arrays[target][...] = array
        else:
            self.arrays[target][index] = array


def convert(table: Table, source: SourceReader, target_shapes: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Converts the checkpoint read by `source` into a flat {variable path: array} dict.

    Everything is checked by `plan` before any tensor is read. Each target is a preallocated array of
    `dtype` (default: the target's dtype; float32 for targets given as bare shapes), filled tensor by tensor,
    so peak memory is about the output plus one tensor. Targets whose optional source is absent are left out.
    To avoid holding the whole output, stream with `convert_into` or `ConvertingReader` instead.
    """
    steps = _plan_source(table, source, target_shapes)
    collect = _Collect(output_layout(steps, target_shapes, dtype))
    convert_into(table, source, target_shapes, collect, dtype, steps=steps)
    return collect.arrays
