"""Attention benchmark: naive (xla) against blockwise (and cudnn / splash where the backend has them).

    python bench/attention.py [--lengths 1024,4096,16384,65536] [--head-dims 64,72,128] [--heads 4]
                              [--naive-cap-gib 2] [--grad-lengths 4096] [--repeats 3]

Self-attention, batch 1, `--heads` heads, float32 (cudnn runs in bfloat16, the only dtypes it takes). Every
measurement runs in its own subprocess so that its peak host RSS is its own; XLA's temporaries come from the
compiled program's memory_analysis. Naive is skipped where its float32 logits (heads × L² × 4 bytes) would
exceed `--naive-cap-gib`, and the record says how much it would need. Lengths of 16k tokens and more are timed
with one call (no warm-up), lengths beyond 16k only at the first head dim, to keep a 2-core CPU run to minutes.
`--grad-lengths` also times forward + backward (jax.grad of a sum) at those lengths for the first head dim.
Writes bench/results/attention_<backend>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import block, environment, host_peak_rss_bytes, write_json  # noqa: E402

LONG = 16384  # from here on: one timed call, first head dim only beyond this length


def implementations() -> list[str]:
    """naive and blockwise everywhere, plus the kernel `auto` would pick on this backend."""
    from opensora_jax.models import attention

    extra = {"gpu": ["cudnn"] if attention._on_cuda_gpu() else [], "tpu": ["splash"]}.get(jax.default_backend(), [])
    return ["naive", "blockwise", *extra]


def measure(impl: str, length: int, head_dim: int, heads: int, repeats: int, grad: bool) -> dict:
    """Compile and time one (impl, length, head_dim) in this process."""
    from opensora_jax.models import attention

    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    name = "xla" if impl == "naive" else impl
    shape = (1, length, heads, head_dim)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, dtype) for i in range(3))

    def forward(q, k, v):
        return attention.dot_product_attention(q, k, v, implementation=name)

    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)), (0, 1, 2)) if grad
                 else forward)
    start = time.perf_counter()
    compiled = fn.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    if repeats > 1:
        block(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    mem = compiled.memory_analysis()
    return {
        "impl": impl, "ran": attention.resolve_attention(name, dtype, head_dim, length), "pass": "fwd+bwd" if grad else "fwd",
        "length": length, "head_dim": head_dim, "heads": heads, "batch": 1, "dtype": jnp.dtype(dtype).name,
        "compile_s": compile_s, "run_s_median": sorted(times)[len(times) // 2], "run_s_all": times,
        "xla_temp_bytes": None if mem is None else mem.temp_size_in_bytes,
        "host_peak_rss_bytes": host_peak_rss_bytes(),
    }


def _child(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _jobs(args) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    grad_lengths = {int(x) for x in args.grad_lengths.split(",") if x}
    jobs = []
    for length in lengths:
        for i, head_dim in enumerate(head_dims):
            if length > LONG and i:
                continue
            repeats = 1 if length >= LONG else args.repeats
            for grad in (False, True) if (length in grad_lengths and not i) else (False,):
                for impl in implementations():
                    jobs.append(dict(impl=impl, length=length, head_dim=head_dim, heads=args.heads,
                                     repeats=repeats, grad=grad))
    return jobs


def _naive_need(job: dict) -> int:
    return job["heads"] * job["length"] ** 2 * 4


def _row(r: dict) -> str:
    what = f"{r['length']:6d} × {r['head_dim']:3d}  {r['impl']:9s} {r['pass']:7s}"
    if "skipped" in r:
        return f"{what}  {r['skipped']}"
    temp = r["xla_temp_bytes"] / 2**20 if r["xla_temp_bytes"] is not None else float("nan")
    return (f"{what}  {r['run_s_median'] * 1e3:10.1f} ms  XLA temp {temp:9.1f} MiB  "
            f"peak RSS {r['host_peak_rss_bytes'] / 2**20:8.0f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384,65536")
    parser.add_argument("--head-dims", default="64,72,128")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--naive-cap-gib", type=float, default=2.0, help="skip naive above this much float32 logits")
    parser.add_argument("--grad-lengths", default="4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    from opensora_jax.models import attention

    results = []
    for job in _jobs(args):
        if job["impl"] == "naive" and _naive_need(job) > args.naive_cap_gib * 2**30:
            need = _naive_need(job) / 2**30
            r = {**{k: job[k] for k in ("impl", "length", "head_dim", "heads")}, "pass": "fwd+bwd" if job["grad"] else "fwd",
                 "skipped": f"skipped: would need {need:.1f} GiB of float32 logits (cap {args.naive_cap_gib:g} GiB)"}
        else:
            r = _child(job)
        results.append(r)
        print(_row(r), flush=True)

    payload = {
        "benchmark": "attention",
        "config": {"batch": 1, "heads": args.heads, "dtype": "float32 (cudnn: bfloat16)", "lengths": args.lengths,
                   "head_dims": args.head_dims, "naive_cap_gib": args.naive_cap_gib, "repeats": args.repeats,
                   "block_q": attention.BLOCK_Q, "block_k": attention.BLOCK_K},
        "note": "Self-attention, no mask. One subprocess per row (its own peak RSS, which includes jax itself and "
                "the inputs). Lengths >= 16384 are one timed call without warm-up; lengths above 16384 only at the "
                "first head dim. "
                "CPU timings on a shared machine are noisy: compare rows of one run.",
        "environment": environment(), "results": results,
    }
    path = write_json(args.out or f"attention_{jax.default_backend()}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
