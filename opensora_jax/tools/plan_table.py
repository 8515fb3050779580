"""The README's per-device memory table: which (mode, resolution, device count) entries it has, one
Markdown row per planner result, and the run that compiles them all (`python -m opensora_jax.tools.plan_cli --table`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opensora_jax import parallel
from opensora_jax.tools.plan import PlanResult, PlanSpec, plan

# The README table: one mesh per (mode, device count). Sampling a single video (CFG ⇒ model batch 2) splits the two
# CFG branches over fsdp=2 and heads over tensor (× sequence, Ulysses); more fsdp than 2 could only split weights.
# Training keeps one sample per data-parallel rank (batch = data × fsdp) and adds sequence parallelism at 64.
TABLE_RESOLUTIONS = ("240p", "480p", "720p")
TABLE_DEVICES = (1, 8, 64)
TABLE_MODES = ("sample", "train")
TABLE_REMATS = ("everything",)  # the README's training rows; more policies add a Remat column
TABLE_MESHES = {
    "sample": {1: "data=1", 8: "fsdp=2,tensor=4", 64: "data=2,fsdp=2,tensor=4,sequence=4"},
    "train": {1: "data=1", 8: "fsdp=8", 64: "fsdp=8,sequence=8"},
}


def table_specs(modes=TABLE_MODES, resolutions=TABLE_RESOLUTIONS, devices=TABLE_DEVICES,
                model: str = "STDiT3-XL/2", aspect_ratio: str = "9:16", num_frames: str = "4s",
                remats=TABLE_REMATS, attention: str | None = None) -> list[PlanSpec]:
    """The README table's entries: sampling with batch 1 (CFG ⇒ 2); training with one sample per
    data-parallel rank (data × fsdp), one row per remat policy of `remats`. `attention` None is the
    model's default."""
    if not remats:
        raise ValueError("give at least one remat policy for the table")
    specs = []
    for mode in modes:
        if mode not in TABLE_MESHES:
            raise ValueError(f"table mode {mode!r} unknown; choose from {TABLE_MODES}")
        for resolution in resolutions:
            for count in devices:
                if count not in TABLE_MESHES[mode]:
                    raise ValueError(f"no table mesh for {count} devices; choose from {sorted(TABLE_MESHES[mode])}")
                mesh = TABLE_MESHES[mode][count]
                sizes = parallel.MeshConfig.parse(mesh).sizes()
                batch = sizes["data"] * sizes["fsdp"] if mode == "train" else 1
                for remat in (remats if mode == "train" else TABLE_REMATS):  # sampling ignores remat: one row
                    specs.append(PlanSpec(model=model, resolution=resolution, aspect_ratio=aspect_ratio,
                                          num_frames=num_frames, mesh=mesh, train=mode == "train", batch=batch,
                                          remat=remat, attention=attention))
    return specs


def shows_remat(specs: Sequence[PlanSpec]) -> bool:
    """Whether the table needs a Remat column: some training row uses another policy than the README's."""
    return any(spec.train and spec.remat not in TABLE_REMATS for spec in specs)


def table_header(remat_column: bool = False) -> tuple[str, str]:
    """The Markdown header and alignment lines, with a Remat column after Batch if asked."""
    names = ["Mode", "Resolution", "Latent T×H×W", "Devices", "Mesh", "Batch", *(["Remat"] * remat_column),
             "Arguments", "Outputs", "Temporaries", "Peak / device"]
    aligns = ["---", "---", "---", "---:", "---", "---:", *(["---"] * remat_column), "---:", "---:", "---:", "---:"]
    return "| " + " | ".join(names) + " |", "|" + "|".join(aligns) + "|"


def table_row(result: PlanResult, remat_column: bool = False) -> str:
    """One Markdown row (GiB per device); the Remat cell is "—" for sampling, which has no backward pass."""
    g, (t, h, w, _) = result.memory.gib(), result.video.latent
    batch = f"{result.batch} (CFG {result.model_batch})" if result.mode == "sample" else f"{result.batch}"
    remat = (f" {result.remat if result.mode == 'train' else '—'} |") if remat_column else ""
    return (f"| {result.mode} | {result.resolution} {result.video.height}×{result.video.width} | {t}×{h}×{w} | "
            f"{result.devices} | {result.mesh_text} | {batch} |{remat} {g['arguments']:.2f} | {g['outputs']:.2f} | "
            f"{g['temporaries']:.2f} | {g['peak']:.2f} GiB |")


def run_table(specs: Sequence[PlanSpec], log=sys.stderr) -> tuple[str, list[PlanResult]]:
    """Compiles every spec (progress and timings to `log`) and returns the Markdown table and the results."""
    remat_column = shows_remat(specs)
    rows, results = list(table_header(remat_column)), []
    for i, spec in enumerate(specs, 1):
        result = plan(spec)
        results.append(result)
        rows.append(table_row(result, remat_column))
        remat = f" remat {result.remat}" if spec.train else ""
        print(f"[{i}/{len(specs)}] {spec.mode} {spec.resolution} {result.mesh_text}{remat} "
              f"attention {result.attention}: peak "
              f"{result.memory.gib()['peak']:.2f} GiB, lower {result.lower_s:.1f} s + compile {result.compile_s:.1f} s"
              + "".join(f"\n    note: {n}" for n in result.notes), file=log, flush=True)
    return "\n".join(rows), results
