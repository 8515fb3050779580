"""Loading reference weights through a key table into module parameters.

Converted checkpoints themselves (format, writing, reading, variable paths) belong to the library:
`opensora_jax.checkpoints`. This module adds what needs the conversion engine: `load_params` accepts either a
converted directory or reference weights, converting the latter on the fly.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from convert.keymap import ConversionError, Table, convert
from opensora_jax.tensor_files import open_source
from opensora_jax.checkpoints import (  # noqa: F401 - re-exported: the converter CLI and tests use these names
    FORMAT,
    _variables,
    check_covers,
    is_converted_dir,
    load_converted,
    load_flat_into,
    save_converted,
    variable_paths,
)


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
    check_covers(flat, targets, f"loading {path} with table {table.name!r}")
    return {p: np.asarray(flat[p], dtype=dtype if dtype is not None else targets[p].dtype) for p in targets}
