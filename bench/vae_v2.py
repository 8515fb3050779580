"""Benchmark of Open-Sora 2.0's autoencoders (random weights, released sizes): decode memory with tiling on.

    python bench/vae_v2.py                               # memory plan: Hunyuan + DC-AE, 256px/768px, short vs long
    python bench/vae_v2.py --run --models hunyuan_vae --cases 256px_33f   # also time the decode (a GPU's job)

Each case compiles the whole decode of one video (`decode(z, tiled=True)`: spatial and temporal tiling, as the
reference's inference config for long videos) on abstract weights and reads XLA's buffer plan
(`compiled.memory_analysis()`): `temporaries` is the working set beyond weights, input and output, the figure
that must stay flat as frames grow (33, 129 and 257 pixel frames). Nothing is allocated unless `--run`, which
materialises random weights, runs the decode once to warm up and times a second call.

Results: `bench/results/vae_v2_<backend>.json`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import environment, host_peak_rss_bytes, write_json  # noqa: E402
from opensora_jax.families import MODELS  # noqa: E402
from opensora_jax.models.vae import dc_ae, hunyuan  # noqa: E402

# name → (pixel frames, H, W): 256px 1:1 and 768px 16:9, a short and a long clip.
CASES = {
    "256px_33f": (33, 256, 256),
    "256px_129f": (129, 256, 256),
    "256px_257f": (257, 256, 256),
    "768px_33f": (33, 576, 1024),
    "768px_129f": (129, 576, 1024),
}
PRESETS = {"hunyuan_vae": lambda: hunyuan.preset("OpenSora-v2").to_dict(),
           "dc_ae": lambda: dc_ae.preset("dc-ae-f32t4c128").to_dict()}


def latent_shape(model: str, frames: int, height: int, width: int) -> tuple[int, ...]:
    if model == "hunyuan_vae":
        return (1, (frames - 1) // 4 + 1, height // 8, width // 8, 16)
    frames = frames - 1 if frames % 4 else frames  # the DC-AE takes multiples of 4 (128 for "129 frames")
    return (1, frames // 4, height // 32, width // 32, 128)


def decode_program(model: str, dtype):
    """(jitted decode(state, z), abstract state): the whole tiled decode as one program."""
    abstract = MODELS[model].abstract(PRESETS[model](), param_dtype=dtype, compute_dtype=dtype)
    graphdef, state = nnx.split(abstract)

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z, tiled=True)

    return jax.jit(decode), state


def memory_case(model: str, case: str, dtype) -> dict:
    frames, height, width = CASES[case]
    shape = latent_shape(model, frames, height, width)
    fn, state = decode_program(model, dtype)
    t0 = time.perf_counter()
    compiled = fn.lower(state, jax.ShapeDtypeStruct(shape, dtype)).compile()
    mem = compiled.memory_analysis()
    return {"model": model, "case": case, "dtype": jnp.dtype(dtype).name, "latent": list(shape),
            "pixels": [frames, height, width], "compile_s": time.perf_counter() - t0,
            "xla_memory_bytes": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                                 "temporaries": mem.temp_size_in_bytes}}


def run_case(model: str, case: str, dtype) -> dict:
    frames, height, width = CASES[case]
    shape = latent_shape(model, frames, height, width)
    vae = MODELS[model].init(PRESETS[model](), param_dtype=dtype, compute_dtype=dtype)
    z = jax.random.normal(jax.random.key(0), shape, dtype)
    t0 = time.perf_counter()
    out = jax.block_until_ready(vae.decode(z, tiled=True))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(vae.decode(z, tiled=True))
    stats = jax.devices()[0].memory_stats() or {}
    return {"first_call_s": first, "decode_s": time.perf_counter() - t0, "output": list(out.shape),
            "device_peak_bytes": stats.get("peak_bytes_in_use")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="hunyuan_vae,dc_ae", help="comma-separated: hunyuan_vae, dc_ae")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated of {', '.join(CASES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--run", action="store_true", help="also run and time each decode (random weights)")
    parser.add_argument("--name", default=None, help="result name (default vae_v2_<backend>): bench/results/NAME.json")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rows = []
    for model in args.models.split(","):
        for case in args.cases.split(","):
            row = memory_case(model, case, dtype)
            if args.run:
                row.update(run_case(model, case, dtype))
            gib = {k: round(v / 2**30, 2) for k, v in row["xla_memory_bytes"].items()}
            print(f"{model:12s} {case:11s} latent {tuple(row['latent'])}: {gib}", flush=True)
            rows.append(row)
    env = environment()
    out = write_json(args.name or f"vae_v2_{env['backend']}", {
        "benchmark": "vae_v2_decode_tiled", "environment": env, "host_peak_rss_bytes": host_peak_rss_bytes(),
        "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
