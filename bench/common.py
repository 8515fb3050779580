"""Helpers shared by the benchmarks: timing, memory figures, matmul roofline, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import time

import jax
import jax.numpy as jnp

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def block(tree):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def time_compiled(fn, *args, repeats: int = 3) -> dict:
    """Compiles `fn` (a jax.jit'd function) for `args`, then times `repeats` calls; seconds and XLA figures."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    block(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(compiled(*args))
        times.append(time.perf_counter() - start)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "run_s_median": sorted(times)[len(times) // 2],
        "run_s_all": times,
        "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
        "xla_memory_bytes": None if mem is None else {
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "peak_estimate": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes,
        },
    }


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 5, random: bool = False) -> float:
    """FLOP/s of one n×n×n matmul on the default device: the roofline next to which model figures are read.

    `random` multiplies normal random matrices instead of ones (a GPU draws more power, and may clock lower,
    on random data)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype) if random else jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = time_compiled(f, a, a, repeats=repeats)
    return 2 * n**3 / t["run_s_median"]


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def write_json(name: str, payload: dict) -> pathlib.Path:
    """Writes bench/results/<name>.json atomically (temporary name, then rename)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return write_json_at(RESULTS_DIR / f"{name}.json", payload)


def write_json_at(path: str | os.PathLike, payload: dict) -> pathlib.Path:
    """Writes `payload` as JSON to `path` atomically (temporary name in the same folder, then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
