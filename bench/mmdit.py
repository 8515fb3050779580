"""MMDiT (Open-Sora 2.0) forward benchmark: compile time, forward time, memory, achieved vs matmul FLOP/s.

    python bench/mmdit.py [--configs medium] [--dtypes float32,bfloat16] [--batch 1] [--latent-frames 33]

Writes bench/results/mmdit_<backend>.json (or --out). `medium` is the 11B model's width (hidden 3072, 24 heads,
MLP 12288, T5 4096 / CLIP 768 inputs) with 2 double + 4 single blocks on Open-Sora 2.0's 256px 16:9 geometry:
a 33×24×42 latent (129 frames) packed 2×2 into 8316 image tokens, plus 512 text tokens = 8828 joint tokens, batch 1.
`tiny` is a test-sized model on a few tokens. `--latent-frames` shortens the clip (252 image tokens per latent
frame) where a full forward is too slow, e.g. on a CPU; the JSON records the token counts that ran.

The attention is the model's `auto` (cuDNN on an NVIDIA GPU, splash on a TPU, blockwise elsewhere); the JSON
records the implementation that ran. Memory figures: XLA's compiled memory analysis of the forward, the device's
peak bytes in use where the backend reports it (GPU, TPU), and the process's peak resident set size.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import (device_peak_bytes, environment, host_peak_rss_bytes, matmul_flops_per_s,  # noqa: E402
                          time_compiled, write_json)
from opensora_jax.models.attention import resolve_attention  # noqa: E402
from opensora_jax.models.mmdit import MMDiT, MMDiTConfig, image_position_ids, text_position_ids  # noqa: E402

TEXT_TOKENS = 512  # T5 tokens per prompt in Open-Sora 2.0 (padded, attended)
CONFIGS = {
    # The 11B widths (preset "OpenSora-v2-11B"), 2 + 4 blocks instead of 19 + 38, 256px 16:9 129 frames.
    "medium": dict(arch=dict(depth=2, depth_single_blocks=4), latent=(33, 24, 42), text_tokens=TEXT_TOKENS),
    "tiny": dict(arch=dict(in_channels=64, vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=2, depth=1,
                           depth_single_blocks=1, axes_dim=(8, 12, 12)), latent=(3, 8, 8), text_tokens=16),
}


def token_counts(cfg: MMDiTConfig, latent_thw) -> int:
    """Image tokens of a (T, H, W) latent packed p×p."""
    t, h, w = latent_thw
    p = cfg.patch_size
    return t * (h // p) * (w // p)


def forward_flops(cfg: MMDiTConfig, batch: int, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one forward (2·m·n·k each, attention's q·k and p·v included), counted analytically.

    XLA's cost analysis counts a scan body once, not depth times, so it cannot be used for the scanned stacks.
    """
    d, m, length = cfg.hidden_size, cfg.mlp_hidden, n_img + n_txt
    attention = 4 * length * length * d  # scores + weighted values over the joint sequence
    stream = lambda n: 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * m  # noqa: E731  qkv, proj, MLP
    double = stream(n_img) + stream(n_txt) + attention
    single = 2 * length * d * 3 * d + 2 * length * d * m + 2 * length * (d + m) * d + attention
    embed = (2 * n_img * d * (cfg.in_channels + (cfg.cond_channels if cfg.cond_embed else 0))
             + 2 * n_txt * cfg.context_in_dim * d + 2 * n_img * d * cfg.out_channels)
    return float(batch * (cfg.depth * double + cfg.depth_single_blocks * single + embed))


def make_inputs(cfg: MMDiTConfig, batch: int, latent_thw, n_txt: int, key) -> dict:
    n_img = token_counts(cfg, latent_thw)
    keys = jax.random.split(key, 4)
    inputs = dict(
        img=jax.random.normal(keys[0], (batch, n_img, cfg.in_channels), jnp.float32),
        img_ids=image_position_ids(batch, latent_thw, cfg.patch_size),
        txt=jax.random.normal(keys[1], (batch, n_txt, cfg.context_in_dim), jnp.float32),
        txt_ids=text_position_ids(batch, n_txt),
        timesteps=jax.random.uniform(keys[2], (batch,), jnp.float32),
        y_vec=jax.random.normal(keys[3], (batch, cfg.vec_in_dim), jnp.float32),
    )
    if cfg.cond_embed:
        inputs["cond"] = jnp.zeros((batch, n_img, cfg.cond_channels), jnp.float32)  # text-to-video: no image
    if cfg.guidance_embed:
        inputs["guidance"] = jnp.full((batch,), 4.0, jnp.float32)
    return inputs


def bench_one(name: str, dtype: str, batch: int, attention: str, latent_frames: int | None, repeats: int) -> dict:
    spec = CONFIGS[name]
    t, h, w = spec["latent"]
    latent = (latent_frames or t, h, w)
    cfg = MMDiTConfig(**spec["arch"], dtype=dtype, param_dtype=dtype, attention=attention)
    start = time.perf_counter()
    model = MMDiT(cfg, rngs=nnx.Rngs(0))
    init_s = time.perf_counter() - start
    graphdef, state = nnx.split(model)
    del model
    n_txt = spec["text_tokens"]
    inputs = make_inputs(cfg, batch, latent, n_txt, jax.random.key(1))
    n_img = inputs["img"].shape[1]

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    stats = time_compiled(forward, state, inputs, repeats=repeats)
    n_params = sum(a.size for a in jax.tree.leaves(state))
    flops = forward_flops(cfg, batch, n_img, n_txt)
    return {
        "config": name, "dtype": dtype, "batch": batch, "latent_thw": list(latent), "image_tokens": n_img,
        "text_tokens": n_txt, "joint_tokens": n_img + n_txt,
        "arch": {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype")},
        "attention": attention,
        "attention_ran": resolve_attention(attention, jnp.dtype(dtype), cfg.head_dim, n_img + n_txt),
        "params": int(n_params), "init_s": init_s, **stats, "model_flops": flops,
        "achieved_flops_per_s": flops / stats["run_s_median"] if flops else None,
        "device_peak_bytes": device_peak_bytes(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="medium", help="comma list of: " + ",".join(CONFIGS) + " (default medium)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--attention", default="auto", choices=("auto", "blockwise", "xla", "cudnn", "splash"),
                        help="attention implementation (default auto: the model's default)")
    parser.add_argument("--latent-frames", type=int, default=None,
                        help="latent frames instead of the config's (medium: 33, 252 image tokens each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after the warm-up (default 3)")
    parser.add_argument("--out", default=None, help="result name under bench/results (default mmdit_<backend>)")
    args = parser.parse_args(argv)
    if args.latent_frames is not None and args.latent_frames < 1:
        parser.error(f"--latent-frames must be at least 1, got {args.latent_frames}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    results = []
    for dtype in args.dtypes.split(","):
        roof = matmul_flops_per_s(dtype=jnp.dtype(dtype))
        for name in args.configs.split(","):
            r = bench_one(name, dtype, args.batch, args.attention, args.latent_frames, args.repeats)
            r["matmul_flops_per_s"] = roof
            r["fraction_of_matmul"] = r["achieved_flops_per_s"] / roof if r["achieved_flops_per_s"] else None
            results.append(r)
            mem = r["xla_memory_bytes"]
            print(f"{name:7s} {dtype:9s} {r['image_tokens']}+{r['text_tokens']} tokens, "
                  f"attention {r['attention_ran']}: "
                  f"compile {r['compile_s']:.1f}s  forward {r['run_s_median']:.2f} s  "
                  f"{(r['achieved_flops_per_s'] or 0) / 1e9:.1f} GFLOP/s ({(r['fraction_of_matmul'] or 0):.0%} of "
                  f"matmul {roof / 1e9:.1f})  XLA peak {mem['peak_estimate'] / 2**30:.2f} GiB"
                  + (f"  device peak {r['device_peak_bytes'] / 2**30:.2f} GiB" if r["device_peak_bytes"] else ""),
                  flush=True)
    payload = {"benchmark": "mmdit_forward", "environment": environment(), "host_peak_rss_bytes": host_peak_rss_bytes(),
               "results": results}
    path = write_json(args.out or f"mmdit_{jax.default_backend()}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
