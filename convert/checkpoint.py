"""Loading reference weights through a key table into module parameters.

Converted checkpoints themselves (format, writing, reading, variable paths) belong to the library:
`opensora_jax.checkpoints`. This module adds what needs the conversion engine: `convert_to_dir` streams
reference weights into a converted directory tensor by tensor; `open_params` gives lazy parameters (a
converted directory, or reference weights converted on demand) for `materialize`; `load_params` returns them
all as a dict.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import jax
import numpy as np

from convert.keymap import ConversionError, ConvertingReader, Table, convert, convert_into, output_layout, plan
from opensora_jax.tensor_files import ArraySource, MultiSource, SourceReader, open_source
from opensora_jax.checkpoints import (  # noqa: F401 - re-exported: the converter CLI and tests use these names
    FORMAT,
    ConvertedWriter,
    StoredParams,
    _variables,
    check_covers,
    is_converted_dir,
    load_converted,
    load_flat_into,
    open_converted,
    save_converted,
    variable_paths,
)

# (path, *, allow_pickle) → SourceReader: how a converter opens reference weights (default: `open_source`;
# a converter module may provide its own as `open_reference`, e.g. T5's, which aliases a tied embedding).
Opener = Callable[..., SourceReader]


def streams(module) -> bool:
    """Whether a converter module's reference weights can be read tensor by tensor through the shared engine:
    it has no `load_params` of its own, or it says how to open its sources (`open_reference`)."""
    return hasattr(module, "open_reference") or not hasattr(module, "load_params")


def _kept_module_values(table: Table, module, filled) -> dict[str, np.ndarray]:
    """Module values for targets whose optional source was absent from the checkpoint (`filled`: the others)."""
    variables = _variables(module)
    kept, problems = {}, []
    for rule in table.rules:
        source = rule.source_key(0) if rule.stacked else rule.source
        if rule.target in filled or rule.target not in variables or not table.is_optional(source):
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
    table: Table, path, abstract_module, *, dtype=None, allow_pickle: bool = False, opener: Opener | None = None
) -> dict[str, np.ndarray]:
    """Parameters for `abstract_module` from a converted directory or from reference weights, as one dict.

    Reference weights (anything `opener`, default `open_source`, accepts) are converted on the fly with
    `table`. The result covers exactly `variable_paths(abstract_module)`, each array of `dtype` (default: the
    variable's dtype). Targets whose optional source is absent take the module's value, so the module must
    then be concrete. This holds the whole model; `open_params` reads it tensor by tensor.
    """
    targets = variable_paths(abstract_module)
    if is_converted_dir(path):
        flat, _ = load_converted(path)
    else:
        with (opener or open_source)(path, allow_pickle=allow_pickle) as source:
            flat = convert(table, source, targets, dtype)
    flat = {**flat, **_kept_module_values(table, abstract_module, flat)}
    check_covers(flat, targets, f"loading {path} with table {table.name!r}")
    return {p: np.asarray(flat[p], dtype=dtype if dtype is not None else targets[p].dtype) for p in targets}


def open_params(
    table: Table, path, abstract_module, *, dtype=None, allow_pickle: bool = False, opener: Opener | None = None
) -> StoredParams:
    """Lazy parameters for `abstract_module` (close them, or use `with`): a converted directory read tensor
    by tensor, or reference weights planned with `table` at once (every problem reported before anything is
    read) and converted one target at a time as `materialize` asks for them. Casting to the variables' dtypes
    is left to `materialize`; `dtype` sets the dtype reference weights are converted to (default: the
    variable's). Coverage is checked on shapes here.
    """
    targets = variable_paths(abstract_module)
    if is_converted_dir(path):
        params, _ = open_converted(path)
    else:
        source = (opener or open_source)(path, allow_pickle=allow_pickle)
        try:
            reader = ConvertingReader(table, source, targets, dtype)
            kept = _kept_module_values(table, abstract_module, set(reader.keys()))
        except BaseException:
            source.close()
            raise
        params = StoredParams(MultiSource(reader.path, [reader, ArraySource(reader.path, kept)]) if kept else reader)
    try:
        check_covers(params, targets, f"loading {path} with table {table.name!r}")
    except BaseException:
        params.close()
        raise
    return params


def convert_to_dir(
    table: Table, source: SourceReader, abstract_module, out_dir, *, config: dict, model: str, dtype=None,
    extra_meta: dict | None = None, overwrite: bool = False,
) -> tuple[pathlib.Path, dict[str, tuple]]:
    """Streams reference weights from `source` into the converted directory `out_dir`.

    The whole checkpoint is planned first (every problem at once, before anything is written); then each
    source tensor is read, transformed, cast to `dtype` (default: the variable's) and written on its own, so
    memory holds about one source tensor whatever the model's size. Output goes to a temporary directory
    renamed into place only once complete (see `ConvertedWriter`). Returns (out_dir, {path: (dtype, shape)}).
    """
    targets = variable_paths(abstract_module)
    steps = plan(table, {k: source.shape(k) for k in source.keys()}, targets)
    layout = output_layout(steps, targets, dtype)
    kept = _kept_module_values(table, abstract_module, set(layout))
    layout.update({p: (np.dtype(dtype if dtype is not None else targets[p].dtype), v.shape) for p, v in kept.items()})
    planned = {p: jax.ShapeDtypeStruct(shape, dt) for p, (dt, shape) in layout.items()}
    check_covers(planned, targets, f"converting {source.path} with table {table.name!r}")
    with ConvertedWriter(out_dir, layout, config=config, model=model, extra_meta=extra_meta,
                         overwrite=overwrite) as writer:
        position = {path: i for i, path in enumerate(writer.order)}
        steps = sorted((s for s in steps if s.sources), key=lambda s: position[s.target])
        convert_into(table, source, targets, writer, dtype, steps=steps)
        for path, value in kept.items():
            writer.write(path, value)
    return pathlib.Path(out_dir), layout



def copy_tokenizer_files(src, out_dir, names) -> list[str]:
    """Copies the files of `names` found beside the source weights `src` into OUT_DIR/tokenizer/ (staged under a
    temporary name, then renamed), so a converted text-encoder directory is self-contained. Returns their names."""
    import pathlib
    import shutil

    src = pathlib.Path(src)
    directory = src if src.is_dir() else src.parent
    found = [directory / name for name in names if (directory / name).is_file()]
    if not found:
        return []
    staging = pathlib.Path(out_dir) / ".tokenizer.partial"
    staging.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copy2(path, staging / path.name)
    staging.rename(pathlib.Path(out_dir) / "tokenizer")
    return [p.name for p in found]
