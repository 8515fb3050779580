"""`opensora-plan` / `python -m opensora_jax.tools.plan_cli`: the memory planner's command line.

One plan (`opensora_jax.tools.plan`) or, with --table, a README per-device memory table
(`opensora_jax.tools.plan_table`): STDiT3's by default, the Open-Sora 2.0 MMDiT's with `--model mmdit`;
`--readme README.md` writes it between that family's markers. Invalid names, numbers, meshes and output paths
are one-line errors (exit 2), found before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from opensora_jax import parallel, presets
from opensora_jax.checks import check_writable_dir, one_line_errors
from opensora_jax.models import mmdit
from opensora_jax.models.stdit3 import PRESETS, STDiT3Config
from opensora_jax.tools.plan import (DTYPES, FAMILY_DEFAULTS, MODEL_ALIASES, REMATS, PlanSpec, VideoShape,
                                     format_report, mesh_device_count, model_config, model_family, plan,
                                     request_cpu_devices)
from opensora_jax.tools.plan_table import (MMDIT_TABLE_RESOLUTIONS, TABLE_DEVICES, TABLE_MARKERS, TABLE_MODES,
                                           TABLE_REMATS, TABLE_RESOLUTIONS, replace_table, run_table, table_specs,
                                           update_readme)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _int_csv(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _default_attention() -> str:
    return {f.name: f.default for f in dataclasses.fields(STDiT3Config)}["attention"]


def build_parser() -> argparse.ArgumentParser:
    s3, mm = FAMILY_DEFAULTS["stdit3"], FAMILY_DEFAULTS["mmdit"]
    parser = argparse.ArgumentParser(
        prog="opensora-plan",
        description="Per-device memory of STDiT3 (Open-Sora v1.2) or MMDiT (Open-Sora 2.0) sampling or training "
                    "on a device mesh, from XLA's memory analysis of the compiled program. Nothing is allocated: "
                    "weights, optimizer state and inputs are abstract arrays, and the mesh is made of fake CPU "
                    "devices.",
        epilog="STDiT3 sampling compiles RFlowSampler.sample as the pipeline calls it (all steps in one jit, CFG "
               "doubles the model batch); --train compiles one train_step (float32 master params + AdamW + EMA, "
               "compute in --dtype, remat per --remat, state donated). MMDiT sampling compiles the Open-Sora 2.0 "
               "Euler loop (all steps in one jit, the guidance triple makes the model batch 3×); --train one "
               "rectified-flow step (float32 master params + AdamW, no EMA). "
               "Peak estimate = arguments + outputs + temporaries − aliased.",
    )
    parser.add_argument("--model", default="STDiT3-XL/2",
                        help=f"STDiT3 preset ({', '.join(sorted(PRESETS))}), MMDiT preset "
                             f"({', '.join(sorted(mmdit.PRESETS))}) or an alias: "
                             + ", ".join(f"{a} = {n}" for a, n in MODEL_ALIASES.items()) + " (default %(default)s)")
    parser.add_argument("--resolution", default=None,
                        help=f"resolution name: STDiT3 {', '.join(presets.resolution_names())} (default "
                             f"{s3['resolution']}); MMDiT '<S>px' for a pixel budget of S², e.g. 256px, 768px "
                             f"(default {mm['resolution']})")
    parser.add_argument("--aspect-ratio", default=None,
                        help=f"aspect-ratio name: STDiT3 H:W in the v1.2 convention, e.g. 9:16 (landscape), 1:1 "
                             f"(default {s3['aspect_ratio']}); MMDiT W:H in the 2.0 convention, e.g. 16:9 "
                             f"(landscape), 9:16, 2.39:1 (default {mm['aspect_ratio']})")
    parser.add_argument("--num-frames", default=None,
                        help=f"pixel frames: an integer or a name such as 2s (51), 4s (102), 8s (204) (default "
                             f"STDiT3 {s3['num_frames']}, MMDiT {mm['num_frames']})")
    parser.add_argument("--mesh", default="data=1",
                        help="mesh sizes, e.g. 'fsdp=8,sequence=8'; axes data, fsdp, tensor, sequence; unnamed "
                             "axes are 1, one axis may be -1 with --devices (default %(default)s)")
    parser.add_argument("--train", action="store_true", help="plan one training step instead of sampling")
    parser.add_argument("--batch", type=int, default=1,
                        help="global batch: videos per sampling call (the model sees 2× with CFG) or per "
                             "training step (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="compute dtype (and the weights' dtype when sampling; training keeps float32 "
                             "master weights) (default %(default)s)")
    parser.add_argument("--devices", type=int, default=None,
                        help="device count; defaults to the mesh size (needed when an axis is -1)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (compiled as one loop body, so memory hardly depends on it) "
                             f"(default STDiT3 {s3['steps']}, MMDiT {mm['steps']})")
    parser.add_argument("--remat", default="everything", choices=REMATS,
                        help="training's per-block remat policy: everything (recompute each block), dots (keep "
                             "the projection/MLP matmul outputs), nothing (no remat); sampling ignores it "
                             "(default %(default)s)")
    parser.add_argument("--attention", default=None,
                        help=f"attention implementation, e.g. xla (materialises the f32 logits; the figures "
                             f"made before blockwise attention) (default: the model's, {_default_attention()})")
    parser.add_argument("--json", metavar="OUT", help="also write the result(s) as JSON to OUT")
    parser.add_argument("--table", action="store_true",
                        help="print a Markdown table instead of one plan: sampling (batch 1) and training (one "
                             "sample per data-parallel rank) of --model at --aspect-ratio and --num-frames, for "
                             "each of --table-resolutions and --table-devices on preset meshes (the README's "
                             "STDiT3 table; with --model mmdit the README's MMDiT table)")
    parser.add_argument("--table-modes", type=_csv, default=TABLE_MODES, metavar="MODES",
                        help=f"with --table: a subset of {','.join(TABLE_MODES)}")
    parser.add_argument("--table-resolutions", type=_csv, default=None, metavar="RESOLUTIONS",
                        help=f"with --table: resolutions (default STDiT3 {','.join(TABLE_RESOLUTIONS)}; MMDiT "
                             f"sampling {','.join(MMDIT_TABLE_RESOLUTIONS['sample'])}, training "
                             f"{','.join(MMDIT_TABLE_RESOLUTIONS['train'])})")
    parser.add_argument("--table-devices", type=_int_csv, default=None, metavar="COUNTS",
                        help=f"with --table: device counts (default: all of the table's; STDiT3 "
                             f"{','.join(map(str, TABLE_DEVICES))}, MMDiT training also 256)")
    parser.add_argument("--table-remat", type=_csv, default=TABLE_REMATS, metavar="POLICIES",
                        help=f"with --table: training rows for each of these remat policies ({','.join(REMATS)}); "
                             f"any other than the default {','.join(TABLE_REMATS)} adds a Remat column")
    parser.add_argument("--readme", metavar="PATH",
                        help="with --table: also write the table into PATH between the model family's markers "
                             f"({TABLE_MARKERS['mmdit'][0]} ... {TABLE_MARKERS['mmdit'][1]} for the MMDiT, "
                             f"{TABLE_MARKERS['stdit3'][0]} ... for STDiT3)")
    return one_line_errors(parser)


def _check_numbers(args: argparse.Namespace) -> None:
    """Counts and the --json output, before jax starts (ValueError → a one-line usage error)."""
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--devices", args.devices)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a whole number ≥ 1, got {value}")
    if args.json:
        if not pathlib.Path(args.json).absolute().parent.is_dir():
            raise ValueError(f"--json {args.json!r}: its directory does not exist")
        check_writable_dir(pathlib.Path(args.json).absolute().parent, "--json")
        if pathlib.Path(args.json).is_dir():
            raise ValueError(f"--json {args.json!r} is a directory; give a file name")


def _spec_from_args(args: argparse.Namespace) -> PlanSpec:
    return PlanSpec(model=args.model, resolution=args.resolution, aspect_ratio=args.aspect_ratio,
                    num_frames=args.num_frames, mesh=args.mesh, train=args.train, batch=args.batch,
                    dtype=args.dtype, devices=args.devices, steps=args.steps, remat=args.remat,
                    attention=args.attention)


def _validate(specs: Sequence[PlanSpec]) -> int:
    """Checks every spec's names and mesh before jax starts; returns the device count needed."""
    for spec in specs:
        cfg = model_config(spec)
        VideoShape.of(spec, cfg)
        parallel.MeshConfig.parse(spec.mesh).resolve(mesh_device_count(spec))
    return max(mesh_device_count(spec) for spec in specs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_numbers(args)
        specs = (table_specs(args.table_modes, args.table_resolutions, args.table_devices, model=args.model,
                             aspect_ratio=args.aspect_ratio, num_frames=args.num_frames, remats=args.table_remat,
                             attention=args.attention) if args.table
                 else [_spec_from_args(args)])
        if args.readme:  # before compiling: a README without the markers fails now, not after the table
            if not args.table:
                raise ValueError("--readme needs --table")
            if not os.path.isfile(args.readme):
                raise ValueError(f"{args.readme} not found")
            replace_table(pathlib.Path(args.readme).read_text(), model_family(args.model), "", args.readme)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        request_cpu_devices(_validate(specs))
        if args.table:
            markdown, results = run_table(specs)
            print(markdown)
            if args.readme:
                update_readme(args.readme, model_family(args.model), markdown)
                print(f"updated the {model_family(args.model)} memory table in {args.readme}", file=sys.stderr)
        else:
            results = [plan(specs[0])]
            print(format_report(results[0]))
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        payload = [r.to_json() for r in results]
        with open(args.json, "w") as f:
            json.dump(payload if args.table else payload[0], f, indent=2, default=str)
            f.write("\n")
    return 0


def cli() -> None:
    """The `opensora-plan` console command."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
