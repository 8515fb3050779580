"""End-to-end sampling benchmark: text encoding, denoising (per step), VAE decode and compile times.

    python bench/sample.py [--steps 4] [--resolution 144p] [--aspect-ratio 1:1] [--num-frames 17]

Uses tiny random checkpoints (the test suite's architectures) unless --stdit3/--vae/--t5 are given, and
writes bench/results/sample_<backend>.json. The first generate() call includes compilation; the second
is timed warm, so compile time = first − second per stage.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bench.common import environment, host_peak_rss_bytes, write_json  # noqa: E402
from opensora_jax import presets  # noqa: E402
from opensora_jax.pipelines.opensora_v1_2 import Pipeline  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--resolution", default="144p", help="resolution name (default 144p)")
    parser.add_argument("--aspect-ratio", default="1:1", help="H:W aspect ratio (default 1:1)")
    parser.add_argument("--num-frames", default="17", help="pixel frames or a name like 2s (default 17)")
    parser.add_argument("--dtype", default="float32", help="STDiT3/VAE dtype (default float32)")
    parser.add_argument("--stdit3", default="", help="STDiT3 checkpoint (default: tiny random)")
    parser.add_argument("--vae", default="", help="VAE checkpoint (default: tiny random)")
    parser.add_argument("--t5", default="", help="T5 checkpoint (default: tiny random)")
    args = parser.parse_args(argv)

    ckpts = {"stdit3": args.stdit3, "vae": args.vae, "t5": args.t5}
    tiny = not all(ckpts.values())
    if tiny:
        from tests.tiny import write_tiny_checkpoints

        ckpts = write_tiny_checkpoints(pathlib.Path(tempfile.mkdtemp()))
    pipe = Pipeline.from_checkpoints(**ckpts, dtype=args.dtype, scheduler=dict(num_sampling_steps=args.steps))
    h, w = presets.image_size(args.resolution, args.aspect_ratio)
    frames = presets.num_frames(args.num_frames)
    kw = dict(height=h, width=w, num_frames=frames, seed=0, progress=False)
    cold = pipe.generate(["a red circle moving left"], **kw).timings
    warm = pipe.generate(["a red circle moving left"], **kw).timings
    result = {
        "benchmark": "sample_pipeline", "environment": environment(), "tiny_random_models": tiny,
        "config": {"resolution": args.resolution, "aspect_ratio": args.aspect_ratio, "height": h, "width": w,
                   "num_frames": frames, "steps": args.steps, "dtype": args.dtype},
        "cold_s": cold, "warm_s": warm,
        "per_step_denoise_s": warm["denoise_s"] / args.steps,
        "compile_s": {k: cold[k] - warm[k] for k in warm if k in cold},
        "host_peak_rss_bytes": host_peak_rss_bytes(),
    }
    for k in ("text_s", "denoise_s", "decode_s", "total_s"):
        print(f"{k:10s} cold {cold[k]:8.2f}s  warm {warm[k]:8.2f}s")
    print(f"per denoising step (warm): {result['per_step_denoise_s'] * 1e3:.1f} ms")
    print(f"wrote {write_json(f'sample_{jax.default_backend()}', result)}")


if __name__ == "__main__":
    main()
