"""The measurements of `bench/gpu.py`: one function per part, each run in its own process.

A part function takes a `Record` (the part's JSON file, rewritten after every phase so that a part killed by
its time limit still leaves what it measured) and the `Sizes` of the run (`FULL`: released architectures on a
GPU; `SMOKE`: tiny ones that run on a CPU in seconds, through the same code). Weights are random, initialised
on the device inside one jit; nothing is downloaded.

Published reference figures (copied from ../shared/spec/performance_claims.md) are kept in `REFERENCE` and
stored beside the measured ones, labelled as the reference's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from bench.common import write_json_at

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# max|bf16 − f32| / max|f32| allowed for one forward in bfloat16 (random weights, the models' own initialisation).
# bfloat16 keeps 8 significant bits (relative rounding 2⁻⁸ ≈ 4e-3); the STDiT3 forward (2 blocks at the released
# width) should stay within 5e-2, the VAE decode (about 30 convolutions and GroupNorms in a row) within 1e-1.
BF16_BOUNDS = {"stdit3": 5e-2, "vae_decode": 1e-1}
STDIT3_STEPS = 30  # Open-Sora v1.2 sampling steps (configs/opensora_v1_2/sample.py, the reference's tables)
MMDIT_STEPS = 50  # Open-Sora 2.0 sampling steps (its efficiency table)


# ------------------------------------------------------------------------------------------------ sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    name: str
    matmul_n: int
    matmul_repeats: int
    parity_cases: tuple[str, ...] | None  # fixture case paths relative to the fixtures root; None = every case
    bf16_stdit3: dict  # STDiT3Config overrides of the shallow released-width model, and its latent
    bf16_vae: dict | None  # VAE v1.2 config (None = released) and the latent decoded
    stdit3: dict  # STDiT3Config overrides (over preset STDiT3-XL/2), dtype, latents per resolution
    vae: dict
    t5: dict
    mmdit: dict
    hunyuan: dict
    repeats: int  # timed calls after the warm-up for the denoiser steps and the text encoder
    vae_repeats: int  # the same for the VAE decodes (a 720p decode takes seconds)


def _stdit3_latent(resolution: str, frames: int) -> tuple[int, int, int]:
    from opensora_jax import presets

    height, width = presets.image_size(resolution, "9:16")
    return presets.latent_size(frames, height, width)


def full_sizes() -> Sizes:
    """The released architectures at the issue's shapes: 4 s (102 frames) at 360p and 720p for v1.2, 256px
    129 frames for 2.0."""
    from bench.vae import OPENSORA_VAE_V1_2_PRESET

    return Sizes(
        name="full",
        matmul_n=8192,
        matmul_repeats=10,
        parity_cases=None,
        bf16_stdit3=dict(arch=dict(depth=2, hidden_size=1152, num_heads=16, caption_channels=4096,
                                   model_max_length=300), latent=(5, 16, 16), batch=2),
        bf16_vae=dict(config=OPENSORA_VAE_V1_2_PRESET, latent=(5, 16, 16), frames=17),
        stdit3=dict(arch={}, dtype="bfloat16", frames=102, text_tokens=300,
                    latents={"360p": _stdit3_latent("360p", 102), "720p": _stdit3_latent("720p", 102)}),
        vae=dict(config=OPENSORA_VAE_V1_2_PRESET, dtype="bfloat16", frames=102, latent=_stdit3_latent("720p", 102),
                 pixels=(102, 720, 1280)),
        t5=dict(config=None, dtype="float32", batch=2, length=300),
        mmdit=dict(arch={}, dtype="bfloat16", latent=(33, 32, 32), pixels=(129, 256, 256), text_tokens=512),
        hunyuan=dict(arch={}, dtype="bfloat16", pixels=(129, 256, 256)),
        repeats=3,
        vae_repeats=1,
    )


def smoke_sizes() -> Sizes:
    """Tiny architectures and shapes: the same code paths in seconds on a CPU."""
    from bench.vae import TINY

    tiny_stdit3 = dict(depth=1, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)
    return Sizes(
        name="smoke",
        matmul_n=128,
        matmul_repeats=3,
        parity_cases=("opensora_v1_2/stdit3_tiny",),
        bf16_stdit3=dict(arch=tiny_stdit3, latent=(3, 8, 8), batch=2),
        bf16_vae=dict(config=TINY, latent=(5, 4, 4), frames=17),
        stdit3=dict(arch=tiny_stdit3, dtype="float32", frames=17, text_tokens=16,
                    latents={"360p": (5, 6, 10), "720p": (5, 12, 20)}),
        vae=dict(config=TINY, dtype="float32", frames=17, latent=(5, 4, 6), pixels=(17, 32, 48)),
        t5=dict(config=dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4), dtype="float32",
                batch=2, length=16),
        mmdit=dict(arch=dict(vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=2, depth=1,
                             depth_single_blocks=1, axes_dim=(8, 12, 12)),
                   dtype="float32", latent=(3, 4, 4), pixels=(9, 32, 32), text_tokens=8),
        hunyuan=dict(arch=dict(block_out_channels=(4, 4, 4, 4), norm_num_groups=4, layers_per_block=1,
                               mid_block_add_attention=False), dtype="float32", pixels=(5, 16, 16)),
        repeats=1,
        vae_repeats=1,
    )


# ------------------------------------------------------------------------------------------------ reference figures

_V12_H100 = "opensora/v1.2:README.md (performance_claims.md §1.1): one 80 GB H100, 30 steps, whole generation"
_V13_H200 = "opensora/v1.3:README.md (performance_claims.md §2.1): one 140 GB H200, 30 steps, 97 frames, v1.3 model"
REFERENCE: dict[str, dict] = {
    "stdit3_360p": {"label": "reference's published figure", "source": _V12_H100, "gpu": "H100 80GB",
                    "case": "360p 4s (102 frames)",
                    "time_s": 31, "peak_memory_gb": 27,
                    "h200_v1_3_97_frames": {"source": _V13_H200, "time_s": 33, "peak_memory_gb": 25}},
    "stdit3_720p": {"label": "reference's published figure", "source": _V12_H100, "gpu": "H100 80GB",
                    "case": "720p 4s (102 frames)",
                    "time_s": 130, "peak_memory_gb": 39,
                    "h200_v1_3_97_frames": {"source": _V13_H200, "time_s": 130, "peak_memory_gb": 33}},
    "mmdit_step": {"label": "reference's published figure",
                   "source": "main:README.md (performance_claims.md §3.1): 1 GPU (H100/H800), 50 steps, "
                             "text-to-video, with offload; whole generation",
                   "gpu": "H100/H800", "case": "256×256 50 steps", "time_s": 60, "peak_memory_gb": 52.5},
}


# ------------------------------------------------------------------------------------------------ the record


class Record:
    """One part's JSON file (`<out>/<part>.json`), rewritten atomically on every `update`."""

    def __init__(self, path: pathlib.Path, part: str, **fields):
        self.path = pathlib.Path(path)
        self.data: dict[str, Any] = {"part": part, "status": "running", **fields, "results": {}}
        self.write()

    def update(self, **results) -> None:
        """Adds measured fields under `results` and rewrites the file."""
        self.data["results"].update(results)
        self.write()

    def set(self, **fields) -> None:
        """Sets top-level fields (status, error, ...) and rewrites the file."""
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        write_json_at(self.path, json_safe(self.data))


def json_safe(value):
    """Plain-JSON copy: numpy scalars and arrays become numbers and lists, non-finite floats strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------ helpers


def init_jit(builder: Callable):
    """(graphdef, state, seconds): the module `builder()` makes with its own initialisers, run as one compiled
    program (op by op is slower). Used where the weights' statistics matter (the bfloat16 error)."""
    import jax
    from flax import nnx

    graphdef, _ = nnx.split(nnx.eval_shape(builder))
    start = time.perf_counter()
    state = jax.block_until_ready(jax.jit(lambda: nnx.split(builder())[1])())
    return graphdef, state, time.perf_counter() - start


def random_state(builder: Callable, seed: int = 0, std: float = 0.02, pool: int = 1 << 20):
    """(graphdef, state, seconds): the module `builder()` describes, every float array filled with N(0, std²)
    values and integer arrays with zeros, for timing and memory only.

    The values are windows of one host-side pool of random numbers, tiled to each array's size and moved to the
    device array by array: no compilation, seconds for billions of parameters, and nothing beyond the weights
    left on the device. (Compiling the modules' own initialisers costs from seconds to minutes per model.)"""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(builder))
    start = time.perf_counter()
    leaves, treedef = jax.tree.flatten(abstract)
    base = np.random.default_rng(seed).standard_normal(2 * pool, dtype=np.float32) * std
    pools: dict = {}
    out = []
    for i, leaf in enumerate(leaves):
        dtype = np.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            out.append(jax.device_put(np.zeros(leaf.shape, dtype)))
            continue
        p = pools.setdefault(dtype, base.astype(dtype))
        offset = (i * 7919) % pool
        array = np.resize(p[offset:offset + pool], leaf.shape)
        out.append(jax.block_until_ready(jax.device_put(array)))
        del array
    return graphdef, jax.tree.unflatten(treedef, out), time.perf_counter() - start


def tree_bytes(tree) -> int:
    import jax

    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype")))


def timed(fn, *args, repeats: int) -> dict:
    """`bench.common.time_compiled` plus the device's peak memory (null where the backend keeps no
    statistics, e.g. a CPU: XLA's compiled memory plan is in `xla_memory_bytes` then)."""
    from bench.common import device_peak_bytes, time_compiled

    stats = time_compiled(fn, *args, repeats=repeats)
    stats["device_peak_bytes"] = device_peak_bytes()
    return stats


def _params(state) -> int:
    import jax

    return int(sum(a.size for a in jax.tree.leaves(state) if hasattr(a, "size")))


def _versions() -> dict:
    import jax

    out = {"python": platform.python_version(), "jax": jax.__version__}
    for dist in ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _nvidia_smi() -> dict | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = "name,memory.total,driver_version"
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return {"error": str(e)}
    rows = [dict(zip(("name", "memory_total_mib", "driver_version"), (c.strip() for c in line.split(","))))
            for line in out.strip().splitlines()]
    return {"gpus": rows}


# ------------------------------------------------------------------------------------------------ parts


def part_environment(rec: Record, sizes: Sizes, ctx: dict) -> str:
    import jax
    import jax.numpy as jnp

    from bench.common import matmul_flops_per_s

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    try:
        platform_version = dev.client.platform_version
    except Exception:  # noqa: BLE001 - informational only
        platform_version = None
    rec.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        backend=jax.default_backend(), device_kind=dev.device_kind, device_count=jax.device_count(),
        platform_version=platform_version, versions=_versions(), nvidia_smi=_nvidia_smi(),
        device_bytes_limit=None if not stats else stats.get("bytes_limit"),
        xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        host_cpus=os.cpu_count(), matmul_precision=str(jax.config.jax_default_matmul_precision),
    )
    if sizes.name == "full" and jax.default_backend() != "gpu":
        rec.set(error=f"no GPU: jax's backend is {jax.default_backend()!r}")
        return "failed"
    n = sizes.matmul_n
    for dtype in ("bfloat16", "float32"):
        flops = matmul_flops_per_s(n, jnp.dtype(dtype), repeats=sizes.matmul_repeats, random=True)
        rec.update(**{f"matmul_{dtype}_tflops": flops / 1e12})
    rec.update(matmul_n=n, matmul_note="random normal n×n operands; median of the timed calls after a warm-up; "
                                       "float32 at the default matmul precision (TF32 passes on NVIDIA GPUs)")
    return "ok"


def fixture_cases(root: pathlib.Path, sizes: Sizes) -> list[pathlib.Path]:
    """The public case directories the part runs: every opensora_v1_2/* and opensora_v2_0/* case, or the smoke
    subset."""
    if sizes.parity_cases is not None:
        return [root / c for c in sizes.parity_cases]
    return sorted(p.parent for fam in ("opensora_v1_2", "opensora_v2_0") for p in (root / fam).glob("*/case.json"))


def part_parity_f32(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """The project's parity checker over the fixture cases, as its CLI (float32, `highest` matmul precision)."""
    root = pathlib.Path(ctx["fixtures"])
    cases = fixture_cases(root, sizes)
    if not cases:
        raise FileNotFoundError(f"no fixture cases under {root}")
    with tempfile.TemporaryDirectory(prefix="gpu_parity_") as tmp:
        report = pathlib.Path(tmp) / "parity.json"
        cmd = [sys.executable, "-m", "opensora_jax.parity", *map(str, cases), "--json", str(report)]
        rec.update(command=" ".join(["python", *cmd[1:]]).replace(str(root), "FIXTURES").replace(str(tmp), "TMP"),
                   fixtures=str(root), num_cases=len(cases), lines=[])
        # Each result line is recorded as it comes, so that a run stopped by the time limit keeps them.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith(("PASS ", "FAIL ")):
                lines.append(line.strip())
                rec.update(lines=lines)
        returncode = proc.wait()
        parsed = json.loads(report.read_text()) if report.is_file() else None
    rec.update(exit_code=returncode)
    if parsed is None:
        rec.set(error=f"the checker wrote no report (exit {returncode}); see the log")
        return "error"
    rec.update(passed=parsed["passed"], failed=parsed["failed"],
               cases=[{k: c[k] for k in ("case", "handler", "passed", "worst", "tol", "detail")}
                      for c in parsed["cases"]])
    return "ok" if returncode == 0 and parsed["failed"] == 0 else "failed"


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@contextlib.contextmanager
def _highest():
    """Full-precision float32 matmuls and convolutions inside the block (traced there)."""
    import jax

    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


def _bf16_twin(abstract_bf16, state_f32):
    """The float32 weights cast to the dtypes the bfloat16 model declares (its own buffers may stay float32)."""
    import jax
    from flax import nnx

    _, target = nnx.split(abstract_bf16)
    return jax.tree.map(lambda a, t: a.astype(t.dtype), state_f32, target)


def part_parity_bf16(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """bfloat16 vs float32 (`highest`) of one forward: STDiT3 (shallow, released width) and the VAE v1.2 decode."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from opensora_jax.models.stdit3 import STDiT3, STDiT3Config
    from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAE, OpenSoraVAEConfig

    rec.set(bounds=BF16_BOUNDS, rule="max|bf16 − f32| / max|f32| over the output; float32 run at matmul precision "
                                   "'highest'; bfloat16 run with the float32 weights rounded to bfloat16; the "
                                   "models' own random initialisation; STDiT3 timesteps 1000 and 500")
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # compiles the initialisers several times faster
    spec = sizes.bf16_stdit3
    cfg32 = STDiT3Config(**spec["arch"])
    cfg16 = dc.replace(cfg32, dtype="bfloat16", param_dtype="bfloat16")
    graphdef, state32, init_s = init_jit(lambda: STDiT3(cfg32, rngs=nnx.Rngs(0)))
    abstract16 = nnx.eval_shape(lambda: STDiT3(cfg16, rngs=nnx.Rngs(0)))
    graphdef16, _ = nnx.split(abstract16)
    state16 = _bf16_twin(abstract16, state32)
    b, (t, h, w) = spec["batch"], spec["latent"]
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (b, t, h, w, cfg32.in_channels), jnp.float32)
    y = jax.random.normal(keys[1], (b, cfg32.model_max_length, cfg32.caption_channels), jnp.float32)
    # Timesteps that bfloat16 holds exactly: the model rounds t to its dtype (as the reference does), which
    # moves the sinusoidal embedding of most t; that is a property of bfloat16 inference, not arithmetic error.
    ts = jnp.asarray(np.resize(np.asarray([1000.0, 500.0], np.float32), b))
    extras = dict(fps=jnp.full((b,), 24.0), height=jnp.full((b,), h * 8.0), width=jnp.full((b,), w * 8.0))

    def forward(gd):
        return jax.jit(lambda s, x, y, ts: nnx.merge(gd, s)(x, ts, y, None, **extras))

    start = time.perf_counter()
    with _highest():
        ref = forward(graphdef)(state32, x, y, ts)
    middle = time.perf_counter()
    out = forward(graphdef16)(state16, x, y, ts)
    err = _rel_err(out, ref)
    seconds = {"init": init_s, "f32_compile_and_run": middle - start,
               "bf16_compile_and_run": time.perf_counter() - middle}
    rec.update(stdit3={"arch": {k: v for k, v in cfg32.to_dict().items() if k not in ("dtype", "param_dtype")},
                       "latent_thw": [t, h, w], "batch": b, "rel_err": err, "bound": BF16_BOUNDS["stdit3"],
                       "within_bound": err <= BF16_BOUNDS["stdit3"], "seconds": seconds})

    vspec = sizes.bf16_vae
    vcfg = OpenSoraVAEConfig.from_dict(vspec["config"])
    graphdef, state32, init_s = init_jit(lambda: OpenSoraVAE(vcfg, rngs=nnx.Rngs(0)))
    abstract16 = nnx.eval_shape(lambda: OpenSoraVAE(vcfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                    param_dtype=jnp.bfloat16))
    graphdef16, _ = nnx.split(abstract16)
    state16 = _bf16_twin(abstract16, state32)
    z = jax.random.normal(jax.random.key(2), (1, *vspec["latent"], vcfg.latent_channels), jnp.float32)
    frames = vspec["frames"]

    def decode(gd):
        return jax.jit(lambda s, z: nnx.merge(gd, s).decode(z, frames))

    start = time.perf_counter()
    with _highest():
        ref = decode(graphdef)(state32, z)
    middle = time.perf_counter()
    out = decode(graphdef16)(state16, z)
    verr = _rel_err(out, ref)
    seconds = {"init": init_s, "f32_compile_and_run": middle - start,
               "bf16_compile_and_run": time.perf_counter() - middle}
    rec.update(vae_decode={"latent_thw": list(vspec["latent"]), "frames": frames, "output_shape": list(out.shape),
                           "rel_err": verr, "bound": BF16_BOUNDS["vae_decode"],
                           "within_bound": verr <= BF16_BOUNDS["vae_decode"], "seconds": seconds})
    return "ok" if err <= BF16_BOUNDS["stdit3"] and verr <= BF16_BOUNDS["vae_decode"] else "failed"


def _stdit3_cfg_step(graphdef, cfg_scale: float):
    """One Euler step of the v1.2 sampler as `opensora_jax.schedulers.rflow` runs it for text-to-video: the
    conditional and null-caption branches in one batch of 2B, guidance, the update."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def step(state, z, y, mask, t, dt, height, width, fps):
        model = nnx.merge(graphdef, state)
        b, c = z.shape[0], z.shape[-1]
        y_both = jnp.concatenate([y.astype(jnp.float32), model.null_caption(b).astype(jnp.float32)])
        out = model(jnp.concatenate([z, z]), jnp.concatenate([t, t]), y_both, mask, None,
                    height=height, width=width, fps=fps)
        v_cond, v_uncond = out[:b, ..., :c], out[b:, ..., :c]
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return z + v * dt[:, None, None, None, None]

    return jax.jit(step)


def _part_stdit3(resolution: str):
    def part(rec: Record, sizes: Sizes, ctx: dict) -> str:
        """STDiT3-XL/2, one denoising step with classifier-free guidance (batch 2), default attention."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from bench.stdit3 import forward_flops
        from opensora_jax.models.attention import resolve_attention
        from opensora_jax.models.stdit3 import STDiT3, preset

        spec = sizes.stdit3
        cfg = preset("STDiT3-XL/2", **spec["arch"], dtype=spec["dtype"], param_dtype=spec["dtype"])
        latent = tuple(spec["latents"][resolution])
        t, h, w = latent
        n_spatial = -(-h // cfg.patch_size[1]) * -(-w // cfg.patch_size[2])
        rec.update(model="STDiT3-XL/2" + (" (smoke: tiny)" if spec["arch"] else ""), resolution=resolution,
                   pixel_frames=spec["frames"], latent_thw=list(latent), dtype=spec["dtype"], cfg_batch=2,
                   attention=cfg.attention,
                   attention_ran={"spatial": resolve_attention(cfg.attention, jnp.dtype(cfg.dtype), cfg.head_dim,
                                                               n_spatial),
                                  "temporal": resolve_attention(cfg.attention, jnp.dtype(cfg.dtype), cfg.head_dim, t)})
        graphdef, state, init_s = random_state(lambda: STDiT3(cfg, rngs=nnx.Rngs(0)))
        rec.update(params=_params(state), weights_bytes=tree_bytes(state), init_s=init_s)
        keys = jax.random.split(jax.random.key(1), 2)
        z = jax.random.normal(keys[0], (1, *latent, cfg.in_channels), jnp.float32)
        y = jax.random.normal(keys[1], (1, spec["text_tokens"], cfg.caption_channels), jnp.float32)
        mask = jnp.ones((1, spec["text_tokens"]), jnp.int32)
        one = lambda v: jnp.full((1,), v, jnp.float32)  # noqa: E731
        height, width = h * 8, w * 8
        step = _stdit3_cfg_step(graphdef, 7.0)
        stats = timed(step, state, z, y, mask, one(1000.0), one(1.0 / STDIT3_STEPS), one(height), one(width),
                      one(24.0), repeats=sizes.repeats)
        flops = forward_flops(cfg, 2, latent)
        rec.update(**stats, step_s=stats["run_s_median"], model_flops=flops,
                   achieved_tflops=flops / stats["run_s_median"] / 1e12,
                   steps=STDIT3_STEPS, projected_denoise_s=STDIT3_STEPS * stats["run_s_median"])
        return "ok"

    return part


def part_vae_decode(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """VAE v1.2 decode of a 4 s 720p latent (the whole clip in one call, as the pipeline does)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.vae import _programs
    from opensora_jax.models.vae.opensora_v1_2 import OpenSoraVAE, OpenSoraVAEConfig

    spec = sizes.vae
    cfg = OpenSoraVAEConfig.from_dict(spec["config"])
    dt = jnp.dtype(spec["dtype"])
    rec.update(model="OpenSoraVAE_V1_2" + ("" if sizes.name == "full" else " (smoke: tiny)"), dtype=spec["dtype"],
               pixels_thw=list(spec["pixels"]), latent_thw=list(spec["latent"]))
    graphdef, state, init_s = random_state(lambda: OpenSoraVAE(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    rec.update(params=_params(state), weights_bytes=tree_bytes(state), init_s=init_s)
    z = jax.random.normal(jax.random.key(1), (1, *spec["latent"], cfg.latent_channels), jnp.float32)
    decode = _programs(graphdef, spec["frames"])["decode"]
    rec.update(output_shape=list(jax.eval_shape(decode, state, z).shape))
    stats = timed(decode, state, z, repeats=sizes.vae_repeats)
    rec.update(**stats, decode_s=stats["run_s_median"])
    return "ok"


def part_t5_encode(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """T5-v1.1-XXL encoder, 2 prompts × 300 tokens (padded, masked), float32 as the v1.2 pipeline runs it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.t5 import encode_flops
    from opensora_jax.models.t5 import T5Config, T5Encoder, preset

    spec = sizes.t5
    cfg = preset("t5-v1_1-xxl") if spec["config"] is None else T5Config(**spec["config"])
    dt = jnp.dtype(spec["dtype"])
    batch, length = spec["batch"], spec["length"]
    rec.update(model="t5-v1_1-xxl" if spec["config"] is None else "tiny T5 (smoke)", dtype=spec["dtype"],
               batch=batch, length=length, layers=cfg.num_layers,
               matmul_precision=str(jax.config.jax_default_matmul_precision))
    graphdef, state, init_s = random_state(lambda: T5Encoder(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    rec.update(params=_params(state), weights_bytes=tree_bytes(state), init_s=init_s)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(batch, length)), jnp.int32)
    lengths = np.linspace(length, max(1, length // 4), batch).astype(int)
    mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
    encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    stats = timed(encode, state, ids, mask, repeats=sizes.repeats)
    flops = encode_flops(cfg, batch, length)
    rec.update(**stats, encode_s=stats["run_s_median"], model_flops=flops,
               achieved_tflops=flops / stats["run_s_median"] / 1e12)
    return "ok"


def part_mmdit_step(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """MMDiT (Open-Sora 2.0, preset OpenSora-v2-11B), one step of the 2.0 sampler with its 3-branch guidance batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.mmdit import forward_flops, make_inputs, token_counts
    from opensora_jax.models.attention import resolve_attention
    from opensora_jax.models.mmdit import MMDiT, preset
    from opensora_jax.schedulers import flow_v2

    spec = sizes.mmdit
    cfg = preset("OpenSora-v2-11B", **spec["arch"], dtype=spec["dtype"], param_dtype=spec["dtype"])
    latent = tuple(spec["latent"])
    n_img, n_txt, branches = token_counts(cfg, latent), spec["text_tokens"], 3
    rec.update(model="OpenSora-v2-11B" + (" (smoke: tiny)" if spec["arch"] else ""), dtype=spec["dtype"],
               pixels_thw=list(spec["pixels"]), latent_thw=list(latent), image_tokens=n_img, text_tokens=n_txt,
               cfg_batch=branches, attention=cfg.attention,
               attention_ran=resolve_attention(cfg.attention, jnp.dtype(cfg.dtype), cfg.head_dim, n_img + n_txt),
               note="batch 3 = the reference's guidance batch (cond, uncond, uncond without image); the JAX "
                    "pipeline runs 2 branches for plain text-to-video")
    graphdef, state, init_s = random_state(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
    rec.update(params=_params(state), weights_bytes=tree_bytes(state), init_s=init_s)
    inputs = make_inputs(cfg, branches, latent, n_txt, jax.random.key(1))
    dt = jnp.dtype(cfg.dtype)
    noise, img_ids = inputs["img"][:1].astype(dt), inputs["img_ids"][:1]
    txt, y_vec = inputs["txt"].astype(dt), inputs["y_vec"].astype(dt)
    ts = np.asarray([1.0, 1.0 - 1.0 / MMDIT_STEPS], np.float32)
    text_scales, image_scales = np.full((1,), 7.5, np.float32), np.full((1, latent[0]), 3.0, np.float32)
    tokens_per_frame = n_img // latent[0]

    @jax.jit
    def step(state, noise, txt, y_vec, img_ids):
        return flow_v2.sample(nnx.merge(graphdef, state), noise, None, txt, y_vec, img_ids, ts, text_scales,
                              image_scales, tokens_per_frame=tokens_per_frame, branches=branches)

    stats = timed(step, state, noise, txt, y_vec, img_ids, repeats=sizes.repeats)
    flops = forward_flops(cfg, branches, n_img, n_txt)
    rec.update(**stats, step_s=stats["run_s_median"], model_flops=flops,
               achieved_tflops=flops / stats["run_s_median"] / 1e12,
               steps=MMDIT_STEPS, projected_denoise_s=MMDIT_STEPS * stats["run_s_median"])
    return "ok"


def part_hunyuan_decode(rec: Record, sizes: Sizes, ctx: dict) -> str:
    """Hunyuan VAE (Open-Sora 2.0) decode of a 256px 129-frame latent, tiling as the released config sets it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.vae_v2 import latent_shape
    from opensora_jax.models.vae import hunyuan

    spec = sizes.hunyuan
    cfg = hunyuan.preset("OpenSora-v2", **spec["arch"])
    dt = jnp.dtype(spec["dtype"])
    shape = latent_shape("hunyuan_vae", *spec["pixels"])
    rec.update(model="OpenSora-v2 Hunyuan VAE" + (" (smoke: tiny)" if spec["arch"] else ""), dtype=spec["dtype"],
               pixels_thw=list(spec["pixels"]), latent=list(shape), spatial_tiling=cfg.use_spatial_tiling,
               temporal_tiling=cfg.use_temporal_tiling)
    graphdef, state, init_s = random_state(lambda: hunyuan.build(cfg, nnx.Rngs(0), param_dtype=dt))
    rec.update(params=_params(state), weights_bytes=tree_bytes(state), init_s=init_s)
    z = jax.random.normal(jax.random.key(1), shape, dt)
    decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))
    rec.update(output_shape=list(jax.eval_shape(decode, state, z).shape))
    stats = timed(decode, state, z, repeats=sizes.vae_repeats)
    rec.update(**stats, decode_s=stats["run_s_median"])
    return "ok"


# ------------------------------------------------------------------------------------------------ the part table


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Record, Sizes, dict], str]
    timeout_s: int  # on a GPU (full sizes)
    smoke_timeout_s: int
    what: str


PARTS: tuple[Part, ...] = (
    Part("environment", part_environment, 45, 300,
         "GPU name, memory, driver, jax/jaxlib versions; bf16 and f32 matmul TFLOP/s (8192³, random operands)"),
    Part("parity_f32", part_parity_f32, 150, 300,
         "every public fixture case (opensora_v1_2/*, opensora_v2_0/*) through `python -m opensora_jax.parity` "
         "(float32, matmul precision 'highest'); must PASS"),
    Part("parity_bf16", part_parity_bf16, 60, 300,
         f"bfloat16 vs float32 relative error of one STDiT3 forward (depth 2 at the released width) and one VAE "
         f"v1.2 decode (released architecture, 17 frames 128×128); bounds {BF16_BOUNDS['stdit3']:g} and "
         f"{BF16_BOUNDS['vae_decode']:g}"),
    Part("stdit3_360p", _part_stdit3("360p"), 75, 300,
         "STDiT3-XL/2 bf16, one CFG step (batch 2), 360p 4 s (102 frames, latent 30×45×80): compile, step, peak "
         f"memory, {STDIT3_STEPS}-step projection"),
    Part("stdit3_720p", _part_stdit3("720p"), 90, 300,
         "STDiT3-XL/2 bf16, one CFG step (batch 2), 720p 4 s (102 frames, latent 30×90×160): compile, step, peak "
         f"memory, {STDIT3_STEPS}-step projection"),
    Part("vae_decode_720p", part_vae_decode, 90, 300,
         "VAE v1.2 bf16 decode of a 4 s 720p latent (30×90×160 → 102×720×1280): compile, time, peak memory"),
    Part("t5_encode", part_t5_encode, 60, 300,
         "T5-v1.1-XXL encoder float32, 2 × 300 tokens: compile, time, peak memory"),
    Part("mmdit_step", part_mmdit_step, 120, 300,
         "MMDiT OpenSora-v2-11B bf16, one sampler step at 256px 129 frames (8448 image + 512 text tokens) with the "
         f"3-branch guidance batch: compile, step, peak memory, {MMDIT_STEPS}-step projection"),
    Part("hunyuan_decode", part_hunyuan_decode, 75, 300,
         "Hunyuan VAE bf16 decode of a 256px 129-frame latent (33×32×32×16): compile, time, peak memory"),
)
PART_BY_NAME = {p.name: p for p in PARTS}
