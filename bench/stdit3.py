"""STDiT3 forward benchmark: compile time, forward time, memory, achieved vs matmul FLOP/s.

    python bench/stdit3.py [--configs tiny,medium] [--dtypes float32,bfloat16] [--batch 2]

Writes bench/results/stdit3_<backend>.json. `medium` is hidden 1152, 16 heads, depth 4 on a 5×32×32
latent (the XL/2 width at 256×256 px, 17 frames); `tiny` is the fixture architecture.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import environment, host_peak_rss_bytes, device_peak_bytes, matmul_flops_per_s, time_compiled, write_json  # noqa: E402
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config  # noqa: E402

CONFIGS = {
    "tiny": dict(arch=dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16), latent=(5, 8, 8)),
    "medium": dict(arch=dict(depth=4, hidden_size=1152, num_heads=16, caption_channels=4096, model_max_length=300), latent=(5, 32, 32)),
}


def forward_flops(cfg: STDiT3Config, batch: int, latent_thw) -> float:
    """Matmul FLOPs of one forward (2·m·n·k each), counted analytically.

    XLA's cost analysis counts a scan body once, not depth times, so it cannot be used for scanned stacks.
    """
    pt, ph, pw = cfg.patch_size
    t, h, w = (-(-latent_thw[0] // pt), -(-latent_thw[1] // ph), -(-latent_thw[2] // pw))
    n, s, d, m, length = t * h * w, h * w, cfg.hidden_size, cfg.mlp_hidden, cfg.model_max_length
    block = (
        2 * n * d * 3 * d  # qkv
        + 2 * n * d * d * 3  # self proj, cross q, cross proj
        + 2 * length * d * 2 * d  # cross kv
        + 4 * n * length * d  # cross attention scores + values
        + 2 * n * d * m * 2  # mlp
    )
    self_attn = 4 * t * s * s * d + 4 * s * t * t * d  # spatial + temporal scores + values
    per_sample = (
        cfg.depth * (2 * block + self_attn)
        + 2 * n * pt * ph * pw * cfg.in_channels * d
        + 2 * length * (cfg.caption_channels * d + d * d)
        + 2 * n * d * pt * ph * pw * cfg.out_channels
    )
    return float(batch * per_sample)


def bench_one(name: str, dtype: str, batch: int, attention: str) -> dict:
    spec = CONFIGS[name]
    cfg = STDiT3Config(**spec["arch"], dtype=dtype, param_dtype=dtype, attention=attention)
    model = STDiT3(cfg, rngs=nnx.Rngs(0))
    t, h, w = spec["latent"]
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, t, h, w, cfg.in_channels), jnp.float32)
    y = jax.random.normal(key, (batch, cfg.model_max_length, cfg.caption_channels), jnp.float32)
    mask = jnp.ones((batch, cfg.model_max_length), jnp.int32)
    scalars = jnp.full((batch,), 1.0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, y, mask, ts):
        m = nnx.merge(graphdef, state)
        return m(x, ts * 500.0, y, mask, fps=ts * 24.0, height=ts * h * 8.0, width=ts * w * 8.0)

    stats = time_compiled(forward, state, x, y, mask, scalars)
    n_params = sum(a.size for a in jax.tree.leaves(state))
    flops = forward_flops(cfg, batch, spec["latent"])
    return {
        "config": name, "dtype": dtype, "batch": batch, "latent_thw": [t, h, w], "attention": attention,
        "params": int(n_params), **stats, "model_flops": flops,
        "achieved_flops_per_s": flops / stats["run_s_median"] if flops else None,
        "device_peak_bytes": device_peak_bytes(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,medium", help="comma list of: " + ",".join(CONFIGS))
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32,bfloat16")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="attention implementation")
    parser.add_argument("--out", default=None, help="result name under bench/results (default stdit3_<backend>)")
    args = parser.parse_args(argv)

    results = []
    for dtype in args.dtypes.split(","):
        roof = matmul_flops_per_s(dtype=jnp.dtype(dtype))
        for name in args.configs.split(","):
            r = bench_one(name, dtype, args.batch, args.attention)
            r["matmul_flops_per_s"] = roof
            r["fraction_of_matmul"] = r["achieved_flops_per_s"] / roof if r["achieved_flops_per_s"] else None
            results.append(r)
            print(f"{name:7s} {dtype:9s} compile {r['compile_s']:.2f}s  forward {r['run_s_median'] * 1e3:.1f} ms  "
                  f"{(r['achieved_flops_per_s'] or 0) / 1e9:.1f} GFLOP/s ({(r['fraction_of_matmul'] or 0):.0%} of matmul "
                  f"{roof / 1e9:.1f})  XLA peak {r['xla_memory_bytes']['peak_estimate'] / 2**20:.1f} MiB", flush=True)
    payload = {"benchmark": "stdit3_forward", "environment": environment(), "host_peak_rss_bytes": host_peak_rss_bytes(), "results": results}
    path = write_json(args.out or f"stdit3_{jax.default_backend()}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
