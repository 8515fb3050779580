"""T5 encoder benchmark at T5-v1.1-XXL width with reduced depth: compile time, encode time, memory.

    python bench/t5.py [--layers 2] [--dtypes float32,bfloat16] [--batch 1] [--length 300] [--no-convert]

Every measurement runs in its own subprocess so that its peak host RSS is its own. `encode` builds a
random encoder (d_model 4096, 64 heads × 64, d_ff 10240, vocab 32128, `--layers` layers), compiles the
forward for (batch, length) tokens with padding, then times it. `convert` (default on) writes a
transformers-named float32 checkpoint of that architecture and measures loading it with
`convert.t5.load_params` (tensor by tensor from the memory-mapped file) into float32 and bfloat16.
Writes bench/results/t5_<backend>_xxlwidth_<layers>l.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import device_peak_bytes, environment, host_peak_rss_bytes, matmul_flops_per_s, time_compiled, write_json  # noqa: E402


def xxl_width(layers: int):
    import dataclasses

    from opensora_jax.models.t5 import preset

    return dataclasses.replace(preset("t5-v1_1-xxl"), num_layers=layers)


def encode_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward (2·m·n·k each); XLA's cost analysis counts a scan body only once."""
    proj = 2 * length * cfg.d_model * cfg.inner_dim * 4  # q, k, v, o
    attn = 4 * length * length * cfg.inner_dim  # scores and weighted values
    ff = 2 * length * cfg.d_model * cfg.d_ff * (3 if cfg.is_gated_act else 2)
    return float(batch * cfg.num_layers * (proj + attn + ff))


def run_encode(layers: int, dtype: str, batch: int, length: int, repeats: int) -> dict:
    from flax import nnx

    from opensora_jax.models.t5 import T5Encoder

    cfg = xxl_width(layers)
    dt = jnp.dtype(dtype)
    start = time.perf_counter()
    # Initialise inside one jit: eager init of half a billion parameters op by op is slow on CPU.
    model = nnx.jit(lambda: T5Encoder(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))()
    init_s = time.perf_counter() - start
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, size=(batch, length)).astype(np.int32)
    lengths = np.linspace(length, max(1, length // 4), batch).astype(int)  # some padding when batch > 1
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)

    @jax.jit
    def encode(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    stats = time_compiled(encode, state, jnp.asarray(ids), jnp.asarray(mask), repeats=repeats)
    flops = encode_flops(cfg, batch, length)
    return {
        "mode": "encode", "dtype": dtype, "layers": layers, "batch": batch, "length": length,
        "params": int(sum(a.size for a in jax.tree.leaves(state))), "init_s": init_s, **stats,
        "model_flops": flops, "achieved_flops_per_s": flops / stats["run_s_median"],
        "matmul_flops_per_s": matmul_flops_per_s(dtype=dt),
        "device_peak_bytes": device_peak_bytes(), "host_peak_rss_bytes": host_peak_rss_bytes(),
    }


def write_checkpoint(layers: int, path: pathlib.Path) -> int:
    """A float32 T5EncoderModel-named safetensors file of the XXL-width architecture; returns its size."""
    from safetensors.numpy import save_file

    cfg = xxl_width(layers)
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
    tensors = {"shared.weight": r(cfg.vocab_size, d), "encoder.final_layer_norm.weight": 1 + r(d),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": r(32, cfg.num_heads)}
    for i in range(layers):
        p = f"encoder.block.{i}.layer"
        tensors.update({
            f"{p}.0.SelfAttention.q.weight": r(inner, d), f"{p}.0.SelfAttention.k.weight": r(inner, d),
            f"{p}.0.SelfAttention.v.weight": r(inner, d), f"{p}.0.SelfAttention.o.weight": r(d, inner),
            f"{p}.0.layer_norm.weight": 1 + r(d), f"{p}.1.layer_norm.weight": 1 + r(d),
            f"{p}.1.DenseReluDense.wi_0.weight": r(ff, d), f"{p}.1.DenseReluDense.wi_1.weight": r(ff, d),
            f"{p}.1.DenseReluDense.wo.weight": r(d, ff),
        })
    save_file(tensors, str(path))
    (path.parent / "config.json").write_text(json.dumps(cfg.to_dict()))
    return path.stat().st_size


def _rss_anon_bytes() -> int:
    """Resident anonymous memory (Linux): RSS without the file-backed pages of memory-mapped checkpoints."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return -1


def run_convert(path: str, dtype: str) -> dict:
    import threading

    from convert.t5 import load_params

    peak, done = [_rss_anon_bytes()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    baseline = peak[0]
    sampler.start()
    start = time.perf_counter()
    flat = load_params(path, dtype=jnp.dtype(dtype))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    out_bytes = sum(a.nbytes for a in flat.values())
    largest = max(np.prod(a.shape) for a in flat.values()) * 4  # largest source tensor (float32)
    return {
        "mode": "convert", "dtype": dtype, "seconds": seconds, "output_bytes": int(out_bytes),
        "largest_source_tensor_bytes": int(largest), "checkpoint_bytes": os.path.getsize(path),
        "host_peak_rss_bytes": host_peak_rss_bytes(),
        "anon_rss_baseline_bytes": baseline, "anon_rss_peak_bytes": max(peak[0], _rss_anon_bytes()),
    }


def _child(args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-convert", action="store_true", help="skip the checkpoint loading measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    if args.child:
        job = json.loads(args.child)
        result = run_encode(**job["encode"]) if "encode" in job else run_convert(**job["convert"])
        print(json.dumps(result))
        return

    results = []
    for dtype in args.dtypes.split(","):
        r = _child({"encode": dict(layers=args.layers, dtype=dtype, batch=args.batch, length=args.length, repeats=args.repeats)})
        results.append(r)
        print(f"encode  {dtype:9s} compile {r['compile_s']:.2f}s  encode {r['run_s_median'] * 1e3:.0f} ms  "
              f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s (matmul {r['matmul_flops_per_s'] / 1e9:.1f})  "
              f"XLA peak {r['xla_memory_bytes']['peak_estimate'] / 2**30:.2f} GiB  "
              f"host RSS {r['host_peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if not args.no_convert:
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "model.safetensors"
            write_checkpoint(args.layers, path)
            for dtype in args.dtypes.split(","):
                r = _child({"convert": dict(path=str(path), dtype=dtype)})
                results.append(r)
                print(f"convert {dtype:9s} {r['seconds']:.1f}s  checkpoint {r['checkpoint_bytes'] / 2**30:.2f} GiB  "
                      f"output {r['output_bytes'] / 2**30:.2f} GiB  host RSS {r['host_peak_rss_bytes'] / 2**30:.2f} GiB  "
                      f"anonymous RSS peak {r['anon_rss_peak_bytes'] / 2**30:.2f} GiB "
                      f"(baseline {r['anon_rss_baseline_bytes'] / 2**30:.2f})",
                      flush=True)
    payload = {
        "benchmark": "t5_encoder", "architecture": xxl_width(args.layers).to_dict(),
        "note": "T5-v1.1-XXL width with reduced depth; single device, no sharding. Host RSS includes the "
                "memory-mapped checkpoint pages a conversion has touched (reclaimable); anon_rss_* excludes them. "
                "On CPU, XLA converts bfloat16 matmul operands to float32, hence bfloat16's larger temporaries.",
        "environment": environment(), "results": results,
    }
    path = write_json(f"t5_{jax.default_backend()}_xxlwidth_{args.layers}l", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
