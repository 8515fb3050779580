"""The reference's training CSV (spec §8.1): one row per video or image.

Columns: `path` and `text` are required; `num_frames`, `height`, `width` (what bucketing needs) and `fps`
are read when present; every other column (aes, flow, aspect_ratio, resolution, ...) is kept as a raw
string in `Sample.extra`. A relative `path` resolves against the CSV's directory.

A row's id is its 0-based position among the CSV's data rows (the reference's `id` column), also for rows
that are skipped, so the per-sample bucket RNG of every other row does not depend on which rows are bad.

Rows that cannot be used are skipped, never raised: a missing file, an unsupported extension, a
metadata value that is not a number, or (when metadata columns are absent and the file must be probed)
a file that cannot be decoded. Each is counted in `skipped` (reason → number of distinct files) and
logged once per file.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import math
import os
from collections.abc import Mapping

from opensora_jax import video_io
from opensora_jax.data.video import probe
from opensora_jax.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "text")
KNOWN_COLUMNS = ("path", "text", "num_frames", "height", "width", "fps")

# Reasons a sample is skipped or substituted (keys of the `skipped` counters).
MISSING = "missing"  # the file does not exist
UNSUPPORTED = "unsupported"  # neither a video nor an image extension
BAD_METADATA = "bad_metadata"  # num_frames / height / width / fps is not a valid number
DECODE_ERROR = "decode_error"  # the file exists but cannot be decoded
TOO_SHORT = "too_short"  # decoded fewer frames than its bucket needs (the CSV's num_frames was wrong)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One usable CSV row. `path` is absolute; num_frames is 1 for an image; fps None when unknown."""

    index: int
    path: str
    text: str
    num_frames: int
    height: int
    width: int
    fps: float | None = None
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def is_image(self) -> bool:
        return video_io.is_image_path(self.path)


class BadDataLog:
    """Counts bad files by reason (each file once per reason) and logs each file the first time it is seen."""

    def __init__(self):
        self._seen: dict[str, set[str]] = collections.defaultdict(set)
        self.events = 0  # every report, repeats included (e.g. a bad file met again in a later epoch)

    def report(self, reason: str, path: str, message: str) -> None:
        self.events += 1
        if path in self._seen[reason]:
            return
        self._seen[reason].add(path)
        log.warning("skipping %s (%s): %s", path, reason, message)

    @property
    def skipped(self) -> dict[str, int]:
        """reason → number of distinct files."""
        return {reason: len(paths) for reason, paths in sorted(self._seen.items()) if paths}

    def state(self) -> dict[str, list[str]]:
        return {reason: sorted(paths) for reason, paths in self._seen.items() if paths}

    def load_state(self, state: Mapping[str, list[str]], events: int = 0) -> None:
        self._seen = collections.defaultdict(set, {r: set(p) for r, p in state.items()})
        self.events = events


class CsvDataset:
    """The usable rows of a training CSV, in file order.

    check_files: drop rows whose file is missing (one `isfile` per row).
    probe: when a row lacks num_frames / height / width, read them from the file (decodes a video
        once to count its frames); with probe=False such rows are skipped as bad_metadata.
    """

    def __init__(self, csv_path, *, check_files: bool = True, probe: bool = True):
        self.csv_path = os.path.abspath(os.fspath(csv_path))
        self.root = os.path.dirname(self.csv_path)
        self.bad = BadDataLog()
        self.samples: list[Sample] = []
        self.num_rows = 0
        self._check_files = check_files
        self._probe = probe
        if not self.csv_path.endswith(".csv"):
            raise UserError(f"unsupported dataset file {self.csv_path!r}: only .csv is supported")
        if not os.path.isfile(self.csv_path):
            raise FileNotFoundError(f"no such dataset CSV: {self.csv_path!r}")
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise UserError(
                    f"{self.csv_path!r} lacks the required column(s) {', '.join(missing)}; "
                    f"its header is {', '.join(columns) or '(empty)'}"
                )
            for row_id, row in enumerate(reader):
                self.num_rows += 1
                sample = self._parse_row(row_id, row)
                if sample is not None:
                    self.samples.append(sample)
        self._by_index = {s.index: s for s in self.samples}

    @property
    def skipped(self) -> dict[str, int]:
        """reason → number of distinct files skipped while reading the CSV."""
        return self.bad.skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> Sample:
        return self.samples[position]

    def by_index(self, index: int) -> Sample:
        """The sample whose row id is `index`."""
        return self._by_index[index]

    def resolve(self, path: str) -> str:
        return os.path.normpath(path if os.path.isabs(path) else os.path.join(self.root, path))

    def _parse_row(self, row_id: int, row: dict) -> Sample | None:
        where = f"{self.csv_path} row {row_id + 2}"  # +1 for the header, +1 for 1-based line numbers
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            self.bad.report(BAD_METADATA, f"<{where}>", f"{where}: empty path")
            return None
        path = self.resolve(raw_path)
        if not (video_io.is_video_path(path) or video_io.is_image_path(path)):
            self.bad.report(UNSUPPORTED, path, f"{where}: unsupported extension {os.path.splitext(path)[1]!r}")
            return None
        if self._check_files and not os.path.isfile(path):
            self.bad.report(MISSING, path, f"{where}: file not found")
            return None
        try:
            t = _optional_int(row, "num_frames")
            h = _optional_int(row, "height")
            w = _optional_int(row, "width")
            fps = _optional_float(row, "fps")
        except ValueError as e:
            self.bad.report(BAD_METADATA, path, f"{where}: {e}")
            return None
        if None in (t, h, w):
            if not self._probe:
                self.bad.report(BAD_METADATA, path, f"{where}: num_frames, height and width are required")
                return None
            try:
                info = probe(path)
            except FileNotFoundError as e:
                self.bad.report(MISSING, path, f"{where}: {e}")
                return None
            except Exception as e:  # noqa: BLE001 - any decoder failure means "bad file"
                self.bad.report(DECODE_ERROR, path, f"{where}: {type(e).__name__}: {e}")
                return None
            t, h, w = t or info.num_frames, h or info.height, w or info.width
            fps = fps if fps is not None else info.fps
        if video_io.is_image_path(path):
            t = 1
        extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS and k is not None}
        return Sample(row_id, path, row.get("text") or "", t, h, w, fps, extra)


def _optional_float(row: dict, column: str) -> float | None:
    value = (row.get(column) or "").strip()
    if not value or value.lower() == "nan":
        return None
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"column {column!r} = {value!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"column {column!r} = {value!r} must be a positive number")
    return x


def _optional_int(row: dict, column: str) -> int | None:
    # pandas writes integer columns holding a NaN as floats ("51.0"): accept integral floats.
    x = _optional_float(row, column)
    if x is None:
        return None
    if x != int(x):
        raise ValueError(f"column {column!r} = {row[column]!r} is not an integer")
    return int(x)
