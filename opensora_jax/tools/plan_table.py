"""The README's per-device memory tables: which (mode, resolution, mesh) entries each has, one Markdown row per
planner result, the run that compiles them all (`python -m opensora_jax.tools.plan_cli --table`, and
`--model mmdit --table` for the Open-Sora 2.0 MMDiT), and the README markers a table is written between."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence

from opensora_jax import parallel
from opensora_jax.tools.plan import FAMILY_DEFAULTS, PlanResult, PlanSpec, model_family, plan

# The STDiT3 table: one mesh per (mode, device count). Sampling a single video (CFG ⇒ model batch 2) splits the
# two CFG branches over fsdp=2 and heads over tensor (× sequence, Ulysses); more fsdp than 2 could only split
# weights. Training keeps one sample per data-parallel rank (batch = data × fsdp) and adds sequence parallelism
# at 64.
TABLE_RESOLUTIONS = ("240p", "480p", "720p")
TABLE_DEVICES = (1, 8, 64)
TABLE_MODES = ("sample", "train")
TABLE_REMATS = ("everything",)  # the README's training rows; more policies add a Remat column
TABLE_MESHES = {
    "sample": {1: "data=1", 8: "fsdp=2,tensor=4", 64: "data=2,fsdp=2,tensor=4,sequence=4"},
    "train": {1: "data=1", 8: "fsdp=8", 64: "fsdp=8,sequence=8"},
}

# The MMDiT table (Open-Sora 2.0, 11B): several meshes per device count, because which axis helps depends on the
# resolution. Sampling one video is a model batch of 3 (the guidance triple), which no power-of-two data/fsdp
# splits: fsdp can only split the weights there. tensor=8 is the reference's 256px plugin (TP 8), sequence=8 its
# 768px one (ring attention, SP 8). Training (the 2.0 trainer's update) keeps one sample per data-parallel rank
# (batch = data × fsdp), at 256px (stage 1) and 768px (stage 2), up to a 256-device pod slice.
MMDIT_TABLE_RESOLUTIONS = {"sample": ("256px", "768px"), "train": ("256px", "768px")}
MMDIT_TABLE_MESHES = {
    "sample": {1: ("data=1",), 8: ("fsdp=8", "tensor=8", "sequence=8", "fsdp=2,sequence=4"),
               64: ("fsdp=8,sequence=8", "tensor=8,sequence=8")},
    "train": {1: ("data=1",), 8: ("fsdp=8", "tensor=8", "fsdp=2,sequence=4"),
              64: ("fsdp=8,sequence=8", "fsdp=8,tensor=8"), 256: ("fsdp=32,sequence=8", "fsdp=64,tensor=4")},
}

# README markers each family's table is written between (`plan_cli --table --readme README.md`).
TABLE_MARKERS = {family: (f"<!-- {family}-memory-table:start -->", f"<!-- {family}-memory-table:end -->")
                 for family in ("stdit3", "mmdit")}


def table_meshes(family: str) -> dict[str, dict[int, tuple[str, ...]]]:
    """{mode: {device count: meshes}} of a family's table."""
    if family == "mmdit":
        return MMDIT_TABLE_MESHES
    return {mode: {count: (mesh,) for count, mesh in meshes.items()} for mode, meshes in TABLE_MESHES.items()}


def table_resolutions(family: str, mode: str) -> tuple[str, ...]:
    return MMDIT_TABLE_RESOLUTIONS[mode] if family == "mmdit" else TABLE_RESOLUTIONS


def table_specs(modes=TABLE_MODES, resolutions=None, devices=None,
                model: str = "STDiT3-XL/2", aspect_ratio: str | None = None, num_frames: str | int | None = None,
                remats=TABLE_REMATS, attention: str | None = None) -> list[PlanSpec]:
    """A README table's entries: sampling with batch 1 (CFG ⇒ 2 for STDiT3, the guidance triple ⇒ 3 for the
    MMDiT); training with one sample per data-parallel rank (data × fsdp), one row per remat policy of `remats`.
    `resolutions`, `aspect_ratio`, `num_frames` None are the family's table defaults; `devices` None is every
    device count the family's table has for each mode; `attention` None is the model's default."""
    if not remats:
        raise ValueError("give at least one remat policy for the table")
    family = model_family(model)
    defaults = FAMILY_DEFAULTS[family]
    aspect_ratio = defaults["aspect_ratio"] if aspect_ratio is None else aspect_ratio
    num_frames = defaults["num_frames"] if num_frames is None else num_frames
    meshes = table_meshes(family)
    specs = []
    for mode in modes:
        if mode not in meshes:
            raise ValueError(f"table mode {mode!r} unknown; choose from {TABLE_MODES}")
        for resolution in (table_resolutions(family, mode) if resolutions is None else resolutions):
            for count in (sorted(meshes[mode]) if devices is None else devices):
                if count not in meshes[mode]:
                    raise ValueError(f"no table mesh for {count} devices; choose from {sorted(meshes[mode])}")
                for mesh in meshes[mode][count]:
                    sizes = parallel.MeshConfig.parse(mesh).sizes()
                    batch = sizes["data"] * sizes["fsdp"] if mode == "train" else 1
                    for remat in (remats if mode == "train" else TABLE_REMATS):  # sampling ignores remat: one row
                        specs.append(PlanSpec(model=model, resolution=resolution, aspect_ratio=aspect_ratio,
                                              num_frames=num_frames, mesh=mesh, train=mode == "train",
                                              batch=batch, remat=remat, attention=attention))
    return specs


def shows_remat(specs: Sequence[PlanSpec]) -> bool:
    """Whether the table needs a Remat column: some training row uses another policy than the README's."""
    return any(spec.train and spec.remat not in TABLE_REMATS for spec in specs)


def shows_tokens(specs: Sequence[PlanSpec]) -> bool:
    """Whether the table needs a Tokens column (image + text tokens of the MMDiT's joint sequence)."""
    return any(spec.family == "mmdit" for spec in specs)


def table_header(remat_column: bool = False, tokens_column: bool = False) -> tuple[str, str]:
    """The Markdown header and alignment lines, with a Tokens column after the latent size and a Remat column
    after Batch if asked."""
    names = ["Mode", "Resolution", "Latent T×H×W", *(["Tokens"] * tokens_column), "Devices", "Mesh", "Batch",
             *(["Remat"] * remat_column), "Arguments", "Outputs", "Temporaries", "Peak / device"]
    aligns = ["---", "---", "---", *(["---:"] * tokens_column), "---:", "---", "---:", *(["---"] * remat_column),
              "---:", "---:", "---:", "---:"]
    return "| " + " | ".join(names) + " |", "|" + "|".join(aligns) + "|"


def table_row(result: PlanResult, remat_column: bool = False, tokens_column: bool | None = None) -> str:
    """One Markdown row (GiB per device); the Remat cell is "—" for sampling, which has no backward pass. The
    Tokens cell (image + text tokens; default: for MMDiT results) is shown only with the column."""
    g, v = result.memory.gib(), result.video
    t, h, w, _ = v.latent
    tokens_column = result.family == "mmdit" if tokens_column is None else tokens_column
    batch = f"{result.batch} (CFG {result.model_batch})" if result.mode == "sample" else f"{result.batch}"
    remat = (f" {result.remat if result.mode == 'train' else '—'} |") if remat_column else ""
    tokens = f" {v.image_tokens} + {v.text_tokens} |" if tokens_column else ""
    return (f"| {result.mode} | {result.resolution} {v.height}×{v.width} | {t}×{h}×{w} |{tokens} "
            f"{result.devices} | {result.mesh_text} | {batch} |{remat} {g['arguments']:.2f} | {g['outputs']:.2f} | "
            f"{g['temporaries']:.2f} | {g['peak']:.2f} GiB |")


def run_table(specs: Sequence[PlanSpec], log=sys.stderr) -> tuple[str, list[PlanResult]]:
    """Compiles every spec (progress and timings to `log`) and returns the Markdown table and the results."""
    remat_column, tokens_column = shows_remat(specs), shows_tokens(specs)
    rows, results = list(table_header(remat_column, tokens_column)), []
    for i, spec in enumerate(specs, 1):
        result = plan(spec)
        results.append(result)
        rows.append(table_row(result, remat_column, tokens_column))
        remat = f" remat {result.remat}" if spec.train else ""
        print(f"[{i}/{len(specs)}] {spec.mode} {spec.resolution} {result.mesh_text}{remat} "
              f"attention {result.attention}: peak "
              f"{result.memory.gib()['peak']:.2f} GiB, lower {result.lower_s:.1f} s + compile {result.compile_s:.1f} s"
              + "".join(f"\n    note: {n}" for n in result.notes), file=log, flush=True)
    return "\n".join(rows), results


def replace_table(text: str, family: str, table: str, where: str = "README") -> str:
    """`text` with everything between `family`'s TABLE_MARKERS replaced by `table` (on its own lines)."""
    start_marker, end_marker = TABLE_MARKERS[family]
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{where} has no '{start_marker}' ... '{end_marker}' markers (in that order) to put the "
                         f"{family} memory table between")
    return f"{text[:start + len(start_marker)]}\n{table}\n{text[end:]}"


def update_readme(readme: str | os.PathLike, family: str, table: str) -> None:
    """Writes `table` between `family`'s markers of `readme` (under a temporary name, then renamed)."""
    path = pathlib.Path(readme)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    text = replace_table(path.read_text(), family, table, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
