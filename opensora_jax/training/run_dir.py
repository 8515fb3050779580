"""A training run's directory: refuse to mix two different runs in it, start over only when asked, and keep
metrics.jsonl consistent with the checkpoint a run resumes from.

OUT_DIR/config.json records the config a run started with. Re-running with the same config resumes; a config
that differs in a field that changes what is trained is refused before anything is written, naming the fields
(settings that only steer the run — its length, logging, checkpoint cadence, workers — may change).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from opensora_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Fields a resumed run may change: they steer the run, not what it trains.
RUN_CONTROL_FIELDS = frozenset({
    "steps", "log_every", "ckpt_every", "keep_checkpoints", "async_checkpoint", "export", "export_ema",
    "out_dir", "resume", "prefetch", "data.num_workers", "eval.every", "eval.num_batches",
})


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _normalised(config: dict) -> dict:
    # A JSON round trip makes tuples lists and int keys strings, as in the saved file.
    return _flat(json.loads(json.dumps(config, default=str)))


def differing_fields(saved: dict, new: dict) -> list[str]:
    """Dotted names of the fields that differ between two configs, run-control fields aside."""
    a, b = _normalised(saved), _normalised(new)
    return sorted(k for k in set(a) | set(b) if k not in RUN_CONTROL_FIELDS and a.get(k) != b.get(k))


def prepare(out_dir, config: dict, *, has_checkpoint: bool) -> None:
    """Checks OUT_DIR against `config` before anything is written, then records `config` there.

    A directory holding a checkpoint of a run with another config is refused (UserError naming the differing
    fields) unless `config["resume"]` is False, which starts over: that run's checkpoints and metrics are
    removed first.
    """
    out_dir = pathlib.Path(out_dir)
    saved_file = out_dir / CONFIG_FILE
    if has_checkpoint and saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        fields = differing_fields(saved, config)
        if fields and config.get("resume", True):
            shown = ", ".join(f"{f} ({_flat_get(saved, f)!r} → {_flat_get(config, f)!r})" for f in fields[:6])
            more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
            raise UserError(f"{out_dir} holds a run with another config ({shown}{more}); use a new --out-dir, "
                            "or --config.resume=False to start over there (its checkpoints and metrics go)")
    if has_checkpoint and not config.get("resume", True):
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
    os.replace(tmp, saved_file)


def has_checkpoint(out_dir) -> bool:
    """True when OUT_DIR/checkpoints holds a saved step."""
    directory = pathlib.Path(out_dir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _flat_get(config: dict, dotted: str):
    return _normalised(config).get(dotted, "<absent>")


def trim_metrics(out_dir, step: int) -> int:
    """Drops metrics.jsonl records after `step` (the step a run resumes from), so a resumed run's records follow
    on without repeats. Returns how many were dropped."""
    path = pathlib.Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)
