"""Per-device memory plan for STDiT3 sampling and training, read from XLA's compiled memory analysis.

Nothing is allocated: the model is built with `nnx.eval_shape`, the optimizer state and EMA with
`jax.eval_shape`, and every input is a `jax.ShapeDtypeStruct` carrying its NamedSharding on a mesh of
(by default fake) CPU devices. The real code paths are lowered and compiled:

  sampling  `RFlowSampler.sample` as the pipeline calls it (text-to-video: a cond_mask of ones), i.e. the
            whole denoising loop — every step inside one `lax.scan` — with classifier-free guidance, so
            each model call sees a batch of 2·B. The loop body is traced once and draws its own noise, so
            the number of steps does not change the memory.
  training  one `opensora_jax.training.state.train_step` (float32 master params, AdamW moments and EMA,
            compute in the plan's dtype, the plan's remat policy, default StepConfig: no frame-conditioning
            masks), with the train state donated.

Both use the plan's attention implementation (default: the model's default; `xla` reproduces the figures
made before blockwise attention).

The mesh is made of fake CPU devices (the CLI asks XLA for enough of them before jax starts its backend), so
the numbers are XLA's CPU buffer assignment: fusion and scheduling differ per backend, so treat them as
estimates; CPU_COMPILER_OPTIONS below move the CPU build closer to a GPU one (see docs/memory_plan.md). With
JAX_PLATFORMS set to a real accelerator and enough devices, the same code plans on that backend instead.

CLI: `python -m opensora_jax.tools.plan_cli --help`; `python -m opensora_jax.tools.plan_cli --table` for the README table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

# jax only reads XLA_FLAGS when it first creates its backend, so importing it here is harmless: `main`
# sets the fake-device count before anything asks for a device.
import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax import parallel, presets
from opensora_jax.models.stdit3 import PRESETS, REMAT_POLICIES, STDiT3, STDiT3Config, preset, remat_policy_name
from opensora_jax.schedulers.rflow import RFlowSampler
from opensora_jax.training.optim import make_optimizer, trainable_filter
from opensora_jax.training.state import StepConfig, init_state, train_step

GIB = 2**30
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
DTYPES = ("bfloat16", "float16", "float32")
REMATS = tuple(REMAT_POLICIES)  # everything, dots, nothing
LATENT_CHANNELS = 4  # the v1.2 VAE
# Options for the CPU compile (all checked to leave memory_analysis unchanged or to move it toward a GPU build):
#   LLVM -O0, no new fusion emitters, no HLO constant folding: compile-time only (constant folding alone spent
#     over a minute evaluating a reduce-window of a broadcast in each XL/2 train step; the buffers are identical).
#   no YNNPACK library fusions: they fuse attention's q·k dot into its softmax consumers, so a single-device
#     build never materialises the (…, S, S) logits while a sharded one does, and devices appear to cost memory.
#     A GPU build with the `xla` attention materialises them, as the CPU build does without these fusions.
#   no while-loop-invariant code motion: the CPU runs bf16 dots in float32 and LICM hoists that upcast of every
#     stacked bf16 weight out of the layer scan (an f32 copy of the whole model, 2× the bf16 weights, that a GPU
#     build with native bf16 dots never makes).
CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_disable_hlo_passes": "constant_folding,while-loop-invariant-code-motion",
}

# ----------------------------------------------------------------------------------------------------------
# What to plan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One configuration to compile. `model` is a preset name or an STDiT3Config (its dtypes are overridden).

    `remat` (a REMAT_POLICIES name, or True / False) applies to training only: sampling has no backward pass
    and compiles without remat. `attention` None keeps the model's own (the preset default, or the given
    config's); a name overrides it.
    """

    model: str | STDiT3Config = "STDiT3-XL/2"
    resolution: str = "720p"
    aspect_ratio: str = "9:16"
    num_frames: str | int = "4s"
    mesh: str = "data=1"
    train: bool = False
    batch: int = 1
    dtype: str = "bfloat16"
    devices: int | None = None  # needed when the mesh has a -1 axis
    steps: int = 30  # sampling steps (the loop body is compiled once; see the module docstring)
    remat: str | bool = "everything"
    attention: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; choose one of {DTYPES}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.devices is not None and self.devices < 1:
            raise ValueError(f"devices must be at least 1, got {self.devices}")

    @property
    def mode(self) -> str:
        return "train" if self.train else "sample"


def model_config(spec: PlanSpec) -> STDiT3Config:
    """The architecture with the plan's execution settings: bf16 params for sampling (as the pipeline loads
    them), float32 master params and the plan's remat policy for training, the plan's attention if given."""
    execution = dict(dtype=spec.dtype, param_dtype="float32" if spec.train else spec.dtype,
                     remat=spec.remat if spec.train else "nothing")
    if spec.attention is not None:
        execution["attention"] = spec.attention
    if isinstance(spec.model, STDiT3Config):
        return dataclasses.replace(spec.model, **execution)
    if spec.model not in PRESETS:
        raise ValueError(f"unknown model {spec.model!r}; choose one of {sorted(PRESETS)}")
    return preset(spec.model, **execution)


def model_name(spec: PlanSpec) -> str:
    return spec.model if isinstance(spec.model, str) else "custom STDiT3"


@dataclasses.dataclass(frozen=True)
class VideoShape:
    """Pixel and latent sizes of the planned clip."""

    frames: int
    height: int
    width: int
    latent: tuple[int, int, int, int]  # (T, H, W, C) of the VAE latent
    tokens: tuple[int, int]  # (T', S) of the transformer after patching

    @classmethod
    def of(cls, spec: PlanSpec, cfg: STDiT3Config) -> "VideoShape":
        height, width = presets.image_size(spec.resolution, spec.aspect_ratio)
        frames = presets.num_frames(spec.num_frames)
        t, h, w = presets.latent_size(frames, height, width)
        pt, ph, pw = cfg.patch_size
        tokens = (math.ceil(t / pt), math.ceil(h / ph) * math.ceil(w / pw))
        return cls(frames, height, width, (t, h, w, LATENT_CHANNELS), tokens)


# ----------------------------------------------------------------------------------------------------------
# Devices and mesh
# ----------------------------------------------------------------------------------------------------------


def mesh_device_count(spec: PlanSpec) -> int:
    """Devices the plan's mesh spans: the product of its sizes, or `spec.devices` when one axis is -1."""
    sizes = parallel.MeshConfig.parse(spec.mesh).sizes()
    if -1 in sizes.values():
        if spec.devices is None:
            raise ValueError(f"mesh {spec.mesh!r} has an axis of size -1: give the device count (--devices N)")
        return spec.devices
    count = math.prod(sizes.values())
    if spec.devices is not None and spec.devices != count:
        raise ValueError(f"mesh {spec.mesh!r} spans {count} devices but --devices is {spec.devices}")
    return count


def request_cpu_devices(count: int, environ=os.environ) -> None:
    """Asks XLA for at least `count` fake CPU devices. Effective only before jax creates its CPU backend."""
    flags = environ.get("XLA_FLAGS", "")
    match = re.search(rf"{DEVICE_COUNT_FLAG}=(\d+)", flags)
    if match and int(match.group(1)) >= count:
        return
    flags = re.sub(rf"\s*{DEVICE_COUNT_FLAG}=\d+", "", flags)
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def build_mesh(spec: PlanSpec) -> jax.sharding.Mesh:
    """The plan's mesh on the first N devices of the default backend."""
    count = mesh_device_count(spec)
    devices = jax.devices()
    if len(devices) < count:
        raise ValueError(
            f"mesh {spec.mesh!r} needs {count} devices but jax has {len(devices)} ({devices[0].platform}); "
            f"jax was started before the planner could ask for more: set "
            f"XLA_FLAGS={DEVICE_COUNT_FLAG}={count} before importing jax (the CLI does this itself)"
        )
    return parallel.make_mesh(spec.mesh, devices=devices[:count])


def _mesh_text(mesh: jax.sharding.Mesh) -> str:
    sizes = {name: size for name, size in mesh.shape.items() if size > 1}
    return ",".join(f"{name}={size}" for name, size in sizes.items()) or "single device"


# ----------------------------------------------------------------------------------------------------------
# Abstract arrays
# ----------------------------------------------------------------------------------------------------------


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _with_sharding(tree, mesh: jax.sharding.Mesh):
    """ShapeDtypeStructs with shardings for every leaf of an abstract tree: nnx Variables are split per their
    logical-axis metadata (optimizer moments and EMA inherit it from the params), anything else replicated."""

    def attach(leaf):
        if _is_variable(leaf):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("out_sharding")
            sharding = (parallel.replicated(mesh) if axes is None
                        else parallel.logical_to_mesh_sharding(axes, mesh, shape=value.shape))
            return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=parallel.replicated(mesh))

    return jax.tree.map(attach, tree, is_leaf=_is_variable)


def _shardings(abstract_tree):
    return jax.tree.map(lambda leaf: leaf.sharding, abstract_tree)


def _batch_array(shape: Sequence[int], dtype, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=parallel.batch_sharding(shape, mesh))


def abstract_model(cfg: STDiT3Config) -> STDiT3:
    return nnx.eval_shape(lambda: STDiT3(cfg, rngs=nnx.Rngs(0)))


def _size_inputs(batch: int, dtype, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """height/width/num_frames/fps: (B,) in the model dtype, as the pipeline and BatchEncoder pass them."""
    return {name: _batch_array((batch,), dtype, mesh) for name in ("height", "width", "num_frames", "fps")}


# ----------------------------------------------------------------------------------------------------------
# Lowering the two programs
# ----------------------------------------------------------------------------------------------------------


def lower_sampling(spec: PlanSpec, cfg: STDiT3Config, video: VideoShape, mesh) -> jax.stages.Lowered:
    """RFlowSampler.sample (text-to-video, CFG) under jit with abstract bf16 weights and inputs."""
    model = abstract_model(cfg)
    graphdef = nnx.graphdef(model)
    state = parallel.abstract_state(model, mesh)
    b, dt = spec.batch, cfg.dtype
    z = _batch_array((b, *video.latent), dt, mesh)
    y = _batch_array((b, cfg.model_max_length, cfg.caption_channels), jnp.float32, mesh)  # T5 runs in float32
    mask = _batch_array((b, cfg.model_max_length), jnp.int32, mesh)
    cond_mask = _batch_array((b, video.latent[0]), jnp.float32, mesh)
    sizes = _size_inputs(b, dt, mesh)
    sampler = RFlowSampler(num_sampling_steps=spec.steps)

    def sample(state, z, y, mask, cond_mask, sizes):
        model = nnx.merge(graphdef, state)
        return sampler.sample(model, z, y, mask, cond_mask=cond_mask, key=jax.random.key(0), **sizes)

    jitted = jax.jit(sample, out_shardings=z.sharding)
    with parallel.sharding_context(mesh):
        return jitted.lower(state, z, y, mask, cond_mask, sizes)


def abstract_train_state(cfg: STDiT3Config, tx, mesh):
    """(graphdef, TrainState of sharded ShapeDtypeStructs) as `init_state` would build it."""
    model = abstract_model(cfg)
    model_graphdef, model_state = nnx.split(model)
    captured = {}

    def build(model_state):
        graphdef, state = init_state(nnx.merge(model_graphdef, model_state), tx, trainable_filter(), seed=0)
        captured["graphdef"] = graphdef  # static structure, safe to take out of the trace
        return state

    state = jax.eval_shape(build, model_state)
    return captured["graphdef"], _with_sharding(state, mesh)


def lower_training(spec: PlanSpec, cfg: STDiT3Config, video: VideoShape, mesh) -> jax.stages.Lowered:
    """One train_step with the TrainState donated and kept on its own shardings."""
    tx = make_optimizer()
    graphdef, state = abstract_train_state(cfg, tx, mesh)
    b, dt = spec.batch, cfg.dtype
    batch = dict(
        x0=_batch_array((b, *video.latent), dt, mesh),
        y=_batch_array((b, cfg.model_max_length, cfg.caption_channels), dt, mesh),
        mask=_batch_array((b, cfg.model_max_length), jnp.int32, mesh),
        **_size_inputs(b, dt, mesh),
    )
    step_cfg = StepConfig()

    def step(state, batch):
        return train_step(graphdef, tx, step_cfg, state, batch)

    jitted = jax.jit(step, out_shardings=(_shardings(state), parallel.replicated(mesh)), donate_argnums=0)
    with parallel.sharding_context(mesh):
        return jitted.lower(state, batch)


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes from `compiled.memory_analysis()`."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments (counted in both of the above)
    generated_code: int

    @property
    def peak(self) -> int:
        """arguments + outputs + temporaries, minus what donated arguments and outputs share."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    def gib(self) -> dict[str, float]:
        fields = dict(arguments=self.arguments, outputs=self.outputs, temporaries=self.temporaries,
                      aliased=self.aliased, peak=self.peak)
        return {name: value / GIB for name, value in fields.items()}


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """Everything the report prints."""

    model: str
    mode: str
    what: str
    resolution: str
    aspect_ratio: str
    video: VideoShape
    batch: int
    model_batch: int
    mesh: dict[str, int]
    mesh_text: str
    devices: int
    platform: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    params: int
    activation_shape: tuple[int, int, int, int]
    activation_spec: str
    notes: tuple[str, ...]
    memory: Memory
    lower_s: float
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory_gib"] = self.memory.gib()
        return out


def count_params(cfg: STDiT3Config) -> int:
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def activation_shape(cfg: STDiT3Config, video: VideoShape, model_batch: int) -> tuple[int, int, int, int]:
    """(B, T, S, C) of the transformer's activations."""
    return (model_batch, *video.tokens, cfg.hidden_size)


def activation_notes(cfg: STDiT3Config, video: VideoShape, model_batch: int, mesh) -> tuple[str, tuple[str, ...]]:
    """How the (B, T, S, C) activations split on `mesh`, and why an axis could not be split (if so)."""
    shape = activation_shape(cfg, video, model_batch)
    spec = parallel.logical_to_spec(("act_batch", "act_frames", "act_tokens", "act_embed"), mesh, shape=shape)
    sizes = dict(mesh.shape)
    notes = []
    batch_ways = sizes["data"] * sizes["fsdp"]
    if batch_ways > 1 and model_batch % batch_ways:
        split = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
        rest = [a for a in ("data", "fsdp") if sizes[a] > 1 and a not in split]
        where = f"split over {'×'.join(split)} only" if split else "not split"
        notes.append(f"model batch {model_batch} is not divisible by data×fsdp = {batch_ways}: the batch dim is "
                     f"{where}, activations are replicated over {'×'.join(rest)}"
                     + (" (fsdp still splits the weights)" if "fsdp" in rest else ""))
    seq = sizes["sequence"]
    if seq > 1 and video.tokens[1] % seq:
        notes.append(f"S = {video.tokens[1]} spatial tokens is not divisible by sequence = {seq}: token-split "
                     f"activations fall back to replicated (only spatial attention, split by heads, shrinks)")
    heads_ways = sizes["tensor"] * seq
    if heads_ways > 1 and cfg.num_heads % heads_ways:
        notes.append(f"{cfg.num_heads} heads are not divisible by tensor×sequence = {heads_ways}")
    return str(spec), tuple(notes)


def plan(spec: PlanSpec) -> PlanResult:
    """Lowers and compiles `spec` on abstract arrays and returns its per-device memory."""
    cfg = model_config(spec)
    video = VideoShape.of(spec, cfg)
    mesh = build_mesh(spec)
    platform = mesh.devices.flat[0].platform
    model_batch = spec.batch if spec.train else 2 * spec.batch
    activation_spec, notes = activation_notes(cfg, video, model_batch, mesh)
    start = time.perf_counter()
    lowered = (lower_training if spec.train else lower_sampling)(spec, cfg, video, mesh)
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if platform == "cpu" else None)
    compiled_at = time.perf_counter()
    stats = compiled.memory_analysis()
    memory = Memory(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes,
                    stats.alias_size_in_bytes, stats.generated_code_size_in_bytes)
    what = ("one train_step (AdamW + EMA, state donated)" if spec.train else
            f"RFlowSampler.sample: {spec.steps} Euler step{'s' * (spec.steps > 1)} in one jit, "
            f"CFG ⇒ model batch 2·{spec.batch}")
    return PlanResult(
        model=model_name(spec), mode=spec.mode, what=what, resolution=spec.resolution,
        aspect_ratio=spec.aspect_ratio, video=video, batch=spec.batch, model_batch=model_batch,
        mesh=dict(mesh.shape), mesh_text=_mesh_text(mesh), devices=mesh.size, platform=platform,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, attention=cfg.attention,
        params=count_params(cfg), activation_shape=activation_shape(cfg, video, model_batch),
        activation_spec=activation_spec, notes=notes, memory=memory,
        lower_s=lowered_at - start, compile_s=compiled_at - lowered_at,
    )


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def format_report(result: PlanResult) -> str:
    """A human-readable report of one plan."""
    v, g = result.video, result.memory.gib()
    lines = [
        f"{result.model} {result.mode}: {result.what}",
        f"  video        {v.frames} frames × {v.height}×{v.width} ({result.resolution}, {result.aspect_ratio})"
        f" → latent (T, H, W, C) = {v.latent} → {v.tokens[0]} × {v.tokens[1]} tokens",
        f"  batch        {result.batch} (model batch {result.model_batch})",
        f"  mesh         {result.mesh_text} on {result.devices} {result.platform} device(s)  {result.mesh}",
        f"  settings     compute {result.dtype}, params {result.param_dtype}, remat {result.remat},"
        f" attention {result.attention}",
        f"  parameters   {result.params:,}",
        f"  activations  (B, T, S, C) = {result.activation_shape} split as {result.activation_spec}",
        *[f"  note         {note}" for note in result.notes],
        "  per-device memory (XLA memory_analysis):",
        f"    arguments     {g['arguments']:9.3f} GiB",
        f"    outputs       {g['outputs']:9.3f} GiB",
        f"    temporaries   {g['temporaries']:9.3f} GiB",
        f"    aliased       {g['aliased']:9.3f} GiB  (outputs written into donated arguments)",
        f"    peak estimate {g['peak']:9.3f} GiB  (arguments + outputs + temporaries − aliased)",
        f"  lower {result.lower_s:.1f} s, compile {result.compile_s:.1f} s",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
