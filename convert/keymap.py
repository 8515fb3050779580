"""The strict conversion engine: a table of rules maps checkpoint tensors onto module variables.

A `Table` lists one `Rule` per target variable. `plan` checks a table against the checkpoint's and
the module's shapes without touching any data and reports every problem at once; `convert` then reads
the checkpoint tensor by tensor into preallocated outputs.

Source keys are matched after `Table.strip_prefixes` are removed. A source may feed several rules
(e.g. a fused qkv weight sliced into q, k and v); every target is filled by exactly one rule.

Optional sources: a rule whose source key matches a `Table.optional_sources` regex and is absent from
the checkpoint is planned with no sources; `convert` leaves its target out of the result, meaning
"keep the module's value" (`convert.checkpoint.load_params` takes it from the module).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import jax
import numpy as np

from opensora_jax.errors import CheckpointError

if TYPE_CHECKING:
    from opensora_jax.tensor_files import SourceReader

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


def _read(reader: SourceReader, key: str, rule: Rule, shape: Shape) -> np.ndarray:
    x = reader.get(key)
    if rule.transform is not None:
        x = np.asarray(rule.transform(x))
    if rule.resize_rows and x.shape[0] != shape[0]:
        x = _resize_rows(x, shape[0])
    return x


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not sys.stderr.isatty())


def convert(table: Table, source: SourceReader, target_shapes: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Converts the checkpoint read by `source` into a flat {variable path: array} dict.

    Everything is checked by `plan` before any tensor is read. Each target is a preallocated array of
    `dtype` (default: the target's dtype; float32 for targets given as bare shapes), filled tensor by tensor,
    so peak memory is about the output plus one tensor. Targets whose optional source is absent are left out.
    """
    steps = plan(table, {k: source.shape(k) for k in source.keys()}, target_shapes)
    out: dict[str, np.ndarray] = {}
    with _progress(sum(len(s.sources) for s in steps), f"converting {table.name}") as bar:
        for step in steps:
            if not step.sources:
                continue
            target_dtype = dtype if dtype is not None else getattr(target_shapes[step.target], "dtype", np.float32)
            array = np.empty(step.shape, dtype=np.dtype(target_dtype))
            if step.rule.stacked:
                for i, key in enumerate(step.sources):
                    array[i] = _read(source, key, step.rule, step.shape[1:])
                    bar.update()
            else:
                array[...] = _read(source, step.sources[0], step.rule, step.shape)
                bar.update()
            out[step.target] = array
    return out
