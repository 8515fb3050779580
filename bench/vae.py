"""Benchmark of the Open-Sora v1.2 VAE (random weights): time and peak memory of encode and decode.

    python -m bench.vae                                  # released architecture, 51 frames, 240x426, fp32+bf16
    python -m bench.vae --frames 17 --dtypes float32     # what fits a small CPU
    python -m bench.vae --memory-only --memory-frames 17,51,102

Memory figures:
* `xla_*`: the compiled program's buffer plan (`compiled.memory_analysis()`): arguments (weights +
  input), output, and temporaries. `xla_temp` is the peak working set beyond inputs/outputs; it
  is what must stay flat in the frame count. Needs only compilation, no execution.
* `device_peak_bytes`: the allocator's peak (`device.memory_stats()`), on GPU/TPU only.
* `process_peak_rss_bytes`: the process's peak resident set (CPU runs; includes weights, compiler,
  everything since start), for orientation.

Results go to `bench/results/vae_<arch>_<H>x<W>_<T>f_<dtypes>_<device>.json` (or `vae_memory_...json`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opensora_jax.models.vae.opensora_v1_2 import OPENSORA_VAE_V1_2_PRESET, OpenSoraVAE, OpenSoraVAEConfig  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# A tiny architecture of the same shape (the public fixtures' one), for quick runs.
TINY = {
    "micro_frame_size": 17,
    "micro_batch_size": 4,
    "vae_2d": {
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
    },
    "vae_temporal": {
        "filters": 16,
        "num_res_blocks": 1,
        "channel_multipliers": [1, 2, 2, 4],
        "temporal_downsample": [False, True, True],
        "num_groups": 8,
    },
}
ARCHS = {"released": OPENSORA_VAE_V1_2_PRESET, "tiny": TINY}


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    return {
        "xla_argument_mib": _mib(ma.argument_size_in_bytes),
        "xla_output_mib": _mib(ma.output_size_in_bytes),
        "xla_temp_mib": _mib(ma.temp_size_in_bytes),
        "xla_total_mib": _mib(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes),
    }


def _programs(graphdef, num_frames: int):
    def encode(state, video):
        return nnx.merge(graphdef, state).encode(video)

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z, num_frames)

    return {"encode": jax.jit(encode), "decode": jax.jit(decode)}


def _inputs(model: OpenSoraVAE, batch: int, frames: int, height: int, width: int, abstract: bool):
    lt, lh, lw = model.latent_size(frames, height, width)
    shapes = {
        "encode": (batch, frames, height, width, model.config.spatial.in_channels),
        "decode": (batch, lt, lh, lw, model.config.latent_channels),
    }
    # Inputs stay float32 (as preprocessing / the sampler produce them); the model casts per chunk.
    if abstract:
        return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.random(s, dtype=np.float32) * 2 - 1) for k, s in shapes.items()}


def memory_scaling(arch: str, config: dict, frames_list, height: int, width: int, dtype, batch: int) -> dict:
    """Compile-only buffer plans of encode and decode for several frame counts (nothing allocated)."""
    cfg = OpenSoraVAEConfig.from_dict(config)
    abstract = nnx.eval_shape(lambda: OpenSoraVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(abstract)
    rows = []
    for frames in frames_list:
        inputs = _inputs(abstract, batch, frames, height, width, abstract=True)
        row = {"frames": frames, "latent_shape": list(inputs["decode"].shape)}
        for mode, fn in _programs(graphdef, frames).items():
            t0 = time.perf_counter()
            compiled = fn.lower(state, inputs[mode]).compile()
            row[mode] = {**_memory(compiled), "compile_s": round(time.perf_counter() - t0, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "what": "compile-only XLA buffer plan; xla_temp_mib = working memory beyond arguments and output",
        "arch": arch,
        "dtype": jnp.dtype(dtype).name,
        "batch": batch,
        "height": height,
        "width": width,
        "rows": rows,
    }


def run_bench(config: dict, modes, frames: int, height: int, width: int, dtype, batch: int, repeats: int) -> dict:
    """Compiles, then times `repeats` runs of each mode on random weights and inputs."""
    cfg = OpenSoraVAEConfig.from_dict(config)
    t0 = time.perf_counter()
    model = OpenSoraVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    init_s = time.perf_counter() - t0
    inputs = _inputs(model, batch, frames, height, width, abstract=False)
    programs = _programs(graphdef, frames)
    out = {"init_s": round(init_s, 2), "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(state)))}
    for mode in modes:
        t0 = time.perf_counter()
        compiled = programs[mode].lower(state, inputs[mode]).compile()
        compile_s = time.perf_counter() - t0
        times = []
        result = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = jax.block_until_ready(compiled(state, inputs[mode]))
            times.append(time.perf_counter() - t0)
        finite = bool(jnp.all(jnp.isfinite(result.astype(jnp.float32))))
        out[mode] = {
            "input_shape": list(inputs[mode].shape),
            "output_shape": list(result.shape),
            "compile_s": round(compile_s, 2),
            "run_s": [round(t, 3) for t in times],
            "best_s": round(min(times), 3),
            "frames_per_s": round(batch * frames / min(times), 3),
            "output_finite": finite,
            **_memory(compiled),
            "device_peak_mib": _mib(p) if (p := _device_peak_bytes()) is not None else None,
            "process_peak_rss_mib": _mib(_rss_peak_bytes()),
        }
        print(json.dumps({mode: out[mode]}), flush=True)
        del result
    return out


def _environment() -> dict:
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{dev.device_kind}",
        "num_devices": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vae", description=__doc__.split("\n")[0])
    p.add_argument(
        "--arch", default="released", help="'released' (full width, random weights), 'tiny', or a JSON config file"
    )
    p.add_argument("--frames", type=int, default=51, help="pixel frames of the video (default 51)")
    p.add_argument("--height", type=int, default=240, help="pixel height (default 240: 240p 9:16)")
    p.add_argument("--width", type=int, default=426, help="pixel width (default 426: 240p 9:16)")
    p.add_argument("--batch", type=int, default=1, help="videos per call (default 1)")
    p.add_argument("--modes", default="decode,encode", help="comma list of decode, encode")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode after compilation")
    p.add_argument("--memory-frames", default="", help="comma list of frame counts for the compile-only memory scan")
    p.add_argument("--memory-only", action="store_true", help="only the compile-only memory scan")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. why the run was reduced)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)

    if args.arch in ARCHS:
        arch, config = args.arch, ARCHS[args.arch]
    else:
        arch, config = pathlib.Path(args.arch).stem, json.loads(pathlib.Path(args.arch).read_text())
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    tag = env["device"].split(":")[0]

    if args.memory_frames:
        frames_list = [int(f) for f in args.memory_frames.split(",")]
        for dtype in dtypes:
            scan = memory_scaling(arch, config, frames_list, args.height, args.width, dtype, args.batch)
            report = {**_environment(), "note": args.note, **scan}
            path = out_dir / f"vae_memory_{arch}_{args.height}x{args.width}_{dtype.name}_{tag}.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {path}")
    if args.memory_only:
        return 0

    modes = [m for m in args.modes.split(",") if m]
    report = {
        **env,
        "note": args.note,
        "arch": arch,
        "config": config,
        "batch": args.batch,
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "results": {},
    }
    for dtype in dtypes:
        report["results"][dtype.name] = run_bench(
            config, modes, args.frames, args.height, args.width, dtype, args.batch, args.repeats
        )
    dtag = "+".join(d.name for d in dtypes)
    path = out_dir / f"vae_{arch}_{args.height}x{args.width}_{args.frames}f_{dtag}_{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
