"""Per-device memory plan for sampling and training of the two denoisers, STDiT3 (Open-Sora v1.2) and the
MMDiT (Open-Sora 2.0), read from XLA's compiled memory analysis.

Nothing is allocated: the model is built with `nnx.eval_shape`, the optimizer state and EMA with
`jax.eval_shape`, and every input is a `jax.ShapeDtypeStruct` carrying its NamedSharding on a mesh of
(by default fake) CPU devices. The real code paths are lowered and compiled:

  STDiT3 sampling  `RFlowSampler.sample` as the pipeline calls it (text-to-video: a cond_mask of ones), i.e.
            the whole denoising loop — every step inside one `lax.scan` — with classifier-free guidance, so
            each model call sees a batch of 2·B. The loop body is traced once and draws its own noise, so
            the number of steps does not change the memory.
  STDiT3 training  one `opensora_jax.training.state.train_step` (float32 master params, AdamW moments and
            EMA, compute in the plan's dtype, the plan's remat policy, default StepConfig: no
            frame-conditioning masks), with the train state donated.
  MMDiT sampling  `opensora_jax.schedulers.flow_v2.sample` (the Open-Sora 2.0 sampler), text-to-video with the
            reference's batch of 3·B ([prompt, neg, neg without image condition]) and its default guidance
            schedules: every step inside one `lax.scan`, so the number of steps does not change the memory.
  MMDiT training  one update of the Open-Sora 2.0 trainer (`opensora_jax.training.mmdit_step.update`, spec §4):
            logit-normal timesteps under the shift, text dropout, x_t, velocity target, float32 MSE, gradients
            of float32 master params, AdamW (eps 1e-15, clip 1.0) and no EMA (the reference trains without),
            state donated; text-to-video (a zero image condition where the model takes one).

All use the plan's attention implementation (default: the model's default; `xla` reproduces the STDiT3 figures
made before blockwise attention). Under a mesh with sequence > 1 the MMDiT's joint attention is ring attention.

The mesh is made of fake CPU devices (the CLI asks XLA for enough of them before jax starts its backend), so
the numbers are XLA's CPU buffer assignment: fusion and scheduling differ per backend, so treat them as
estimates; CPU_COMPILER_OPTIONS below move the CPU build closer to a GPU one (see docs/memory_plan.md). With
JAX_PLATFORMS set to a real accelerator and enough devices, the same code plans on that backend instead.

CLI: `python -m opensora_jax.tools.plan_cli --help`; `python -m opensora_jax.tools.plan_cli --table` for the README
table (`--model mmdit --table` for the MMDiT one).
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
from opensora_jax.models import mmdit
from opensora_jax.models.mmdit import MMDiT, MMDiTConfig
from opensora_jax import presets_v2_0
from opensora_jax.models.stdit3 import PRESETS, REMAT_POLICIES, STDiT3, STDiT3Config, preset, remat_policy_name
from opensora_jax.schedulers import flow_v2
from opensora_jax.schedulers.rflow import RFlowSampler
from opensora_jax.training.optim import make_optimizer, trainable_filter
from opensora_jax.training import mmdit_step
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


# The model families the planner knows, what `--model` aliases stand for, and each family's default video.
MODEL_ALIASES = {"stdit3": "STDiT3-XL/2", "mmdit": "OpenSora-v2-11B"}
FAMILY_DEFAULTS = {
    # Open-Sora v1.2: 720p, "9:16" in its H:W naming (a landscape 720×1280 frame), 4 s = 102 frames, 30 steps.
    "stdit3": dict(resolution="720p", aspect_ratio="9:16", num_frames="4s", steps=30),
    # Open-Sora 2.0: 256px, "16:9" in its W:H naming (also landscape, 192×336), 129 frames, 50 steps.
    "mmdit": dict(resolution="256px", aspect_ratio="16:9", num_frames=129, steps=50),
}
CFG_BRANCHES = {"stdit3": 2, "mmdit": 3}  # model batch per prompt: [cond, uncond] / [cond, neg, neg-no-image]

# Open-Sora 2.0 geometry (spec §1.4-1.6, §4).
MMDIT_TEXT_TOKENS = 512  # T5 tokens per prompt (padded, no mask): the joint sequence is 512 + image tokens
MMDIT_IMAGE_DIVISOR = 16  # AE_SPATIAL_COMPRESSION of get_image_size: pixel sizes are multiples of it
# Latent channels → (autoencoder, spatial compression, temporal compression, causal).
MMDIT_AUTOENCODERS = {16: ("Hunyuan VAE", 8, 4, True), 128: ("Video DC-AE", 32, 4, False)}


def model_family(model: str | STDiT3Config | MMDiTConfig) -> str:
    """"stdit3" or "mmdit" for a config, a preset name of either model, or an alias of MODEL_ALIASES."""
    if isinstance(model, MMDiTConfig):
        return "mmdit"
    if isinstance(model, STDiT3Config):
        return "stdit3"
    name = MODEL_ALIASES.get(model, model)
    if name in mmdit.PRESETS:
        return "mmdit"
    if name in PRESETS:
        return "stdit3"
    known = sorted(PRESETS) + sorted(mmdit.PRESETS) + sorted(MODEL_ALIASES)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(known)}")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One configuration to compile. `model` is a preset name of STDiT3 or the MMDiT, an alias ("stdit3",
    "mmdit"), or an STDiT3Config / MMDiTConfig (its dtypes are overridden).

    `resolution`, `aspect_ratio`, `num_frames` and `steps` left None take the model family's defaults
    (FAMILY_DEFAULTS); names follow each family's conventions ("720p" and H:W "9:16" for STDiT3, "256px" and
    W:H "16:9" for the MMDiT). `remat` (a REMAT_POLICIES name, or True / False) applies to training only:
    sampling has no backward pass and compiles without remat. `attention` None keeps the model's own (the
    preset default, or the given config's); a name overrides it.
    """

    model: str | STDiT3Config | MMDiTConfig = "STDiT3-XL/2"
    resolution: str | None = None
    aspect_ratio: str | None = None
    num_frames: str | int | None = None
    mesh: str = "data=1"
    train: bool = False
    batch: int = 1
    dtype: str = "bfloat16"
    devices: int | None = None  # needed when the mesh has a -1 axis
    steps: int | None = None  # sampling steps (the loop body is compiled once; see the module docstring)
    remat: str | bool = "everything"
    attention: str | None = None

    def __post_init__(self):
        family = model_family(self.model)
        if isinstance(self.model, str):
            object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        for name, default in FAMILY_DEFAULTS[family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
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

    @property
    def family(self) -> str:
        return model_family(self.model)


def model_config(spec: PlanSpec) -> STDiT3Config | MMDiTConfig:
    """The architecture with the plan's execution settings: bf16 params for sampling (as the pipeline loads
    them), float32 master params and the plan's remat policy for training, the plan's attention if given."""
    execution = dict(dtype=spec.dtype, param_dtype="float32" if spec.train else spec.dtype,
                     remat=spec.remat if spec.train else "nothing")
    if spec.attention is not None:
        execution["attention"] = spec.attention
    if isinstance(spec.model, (STDiT3Config, MMDiTConfig)):
        cfg = dataclasses.replace(spec.model, **execution)
    elif spec.family == "mmdit":
        cfg = mmdit.preset(spec.model, **execution)
    else:
        cfg = None
    if cfg is not None:
        if isinstance(cfg, MMDiTConfig) and cfg.guidance_embed and not spec.train:
            raise ValueError("the Open-Sora 2.0 sampler (flow_v2) runs classifier-free guidance, not a "
                             "guidance-distilled model such as Flux.1-dev: plan its training (--train) instead")
        return cfg
    if spec.model not in PRESETS:
        raise ValueError(f"unknown model {spec.model!r}; choose one of {sorted(PRESETS)}")
    return preset(spec.model, **execution)


def model_name(spec: PlanSpec) -> str:
    if isinstance(spec.model, str):
        return spec.model
    return "custom MMDiT" if isinstance(spec.model, MMDiTConfig) else "custom STDiT3"


def cfg_branches(cfg: STDiT3Config | MMDiTConfig) -> int:
    """Model batch per sampled video: 2 (STDiT3's CFG pair) or 3 (Open-Sora 2.0's guidance triple)."""
    return CFG_BRANCHES["mmdit" if isinstance(cfg, MMDiTConfig) else "stdit3"]


def mmdit_image_size(resolution: str, aspect_ratio: str, divisor: int = MMDIT_IMAGE_DIVISOR) -> tuple[int, int]:
    """(H, W) pixels of Open-Sora 2.0's inference size table (`opensora_jax.presets_v2_0.image_size`): ("256px",
    "16:9") → (192, 336). `divisor` is the autoencoder's compression × patch (16; 32 for the DC-AE)."""
    return presets_v2_0.image_size(resolution, aspect_ratio, divisor)


def mmdit_pixel_divisor(cfg: MMDiTConfig) -> int:
    """Pixels per packed token side, AE_SPATIAL_COMPRESSION: the autoencoder's compression × the patch size."""
    if cfg.latent_channels not in MMDIT_AUTOENCODERS:
        raise ValueError(f"no Open-Sora 2.0 autoencoder has {cfg.latent_channels} latent channels; known: "
                         f"{sorted(MMDIT_AUTOENCODERS)}")
    return MMDIT_AUTOENCODERS[cfg.latent_channels][1] * cfg.patch_size


def mmdit_latent_size(cfg: MMDiTConfig, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(T, H, W, C) of the Open-Sora 2.0 latent: the Hunyuan VAE (16 channels, causal: (T−1)//4 + 1 frames)
    or the Video DC-AE (128 channels, T//4 frames); H, W = p·⌈H_px/(compression·p)⌉ (spec §1.4)."""
    d, p, c = mmdit_pixel_divisor(cfg), cfg.patch_size, cfg.latent_channels
    _, _, temporal, causal = MMDIT_AUTOENCODERS[c]
    t = (1 if frames == 1 else (frames - 1) // temporal + 1) if causal else max(1, frames // temporal)
    return t, p * -(-height // d), p * -(-width // d), c


@dataclasses.dataclass(frozen=True)
class VideoShape:
    """Pixel and latent sizes of the planned clip."""

    frames: int
    height: int
    width: int
    latent: tuple[int, int, int, int]  # (T, H, W, C) of the VAE latent
    tokens: tuple[int, int]  # (T', S) of the transformer after patching
    text_tokens: int = 0  # text tokens in the MMDiT's joint sequence (0: STDiT3 attends to text by cross-attention)

    @property
    def image_tokens(self) -> int:
        return self.tokens[0] * self.tokens[1]

    @property
    def sequence(self) -> int:
        """Tokens of the MMDiT's joint [text, image] sequence (the image tokens for STDiT3)."""
        return self.text_tokens + self.image_tokens

    @classmethod
    def of(cls, spec: PlanSpec, cfg: STDiT3Config | MMDiTConfig) -> "VideoShape":
        frames = presets.num_frames(spec.num_frames)
        if isinstance(cfg, MMDiTConfig):
            height, width = mmdit_image_size(spec.resolution, spec.aspect_ratio, mmdit_pixel_divisor(cfg))
            latent = mmdit_latent_size(cfg, frames, height, width)
            p = cfg.patch_size
            tokens = (latent[0], (latent[1] // p) * (latent[2] // p))
            return cls(frames, height, width, latent, tokens, MMDIT_TEXT_TOKENS)
        height, width = presets.image_size(spec.resolution, spec.aspect_ratio)
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


def abstract_model(cfg: STDiT3Config | MMDiTConfig) -> STDiT3 | MMDiT:
    cls = MMDiT if isinstance(cfg, MMDiTConfig) else STDiT3
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


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


def _mmdit_conditioning(cfg: MMDiTConfig, video: VideoShape, batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """T5 states and the CLIP vector (in the model dtype, as the reference's bf16 encoders give them)."""
    dt = cfg.dtype
    return dict(txt=_batch_array((batch, video.text_tokens, cfg.context_in_dim), dt, mesh),
                y_vec=_batch_array((batch, cfg.vec_in_dim), dt, mesh))


def lower_mmdit_sampling(spec: PlanSpec, cfg: MMDiTConfig, video: VideoShape, mesh) -> jax.stages.Lowered:
    """`flow_v2.sample` (text-to-video, the 3-branch batch, default guidance) under jit with abstract weights
    (in the model dtype) and inputs: packed noise, position ids, T5 and CLIP states for [prompts, negs, negs]."""
    model = abstract_model(cfg)
    graphdef = nnx.graphdef(model)
    state = parallel.abstract_state(model, mesh)
    b, n = spec.batch, cfg_branches(cfg)
    z = _batch_array((b, video.image_tokens, cfg.in_channels), cfg.dtype, mesh)
    img_ids = _batch_array((b, video.image_tokens, 3), jnp.float32, mesh)
    text = _mmdit_conditioning(cfg, video, n * b, mesh)
    frames, tokens_per_frame = video.tokens
    ts = flow_v2.timesteps(spec.steps, tokens_per_frame, frames)
    text_scales, image_scales = flow_v2.GuidanceV2().schedules(spec.steps, frames, image_condition=False)

    def sample(state, z, img_ids, text):
        model = nnx.merge(graphdef, state)
        return flow_v2.sample(model, z, None, text["txt"], text["y_vec"], img_ids, ts, text_scales, image_scales,
                              tokens_per_frame=tokens_per_frame, branches=n)

    jitted = jax.jit(sample, out_shardings=z.sharding)
    with parallel.sharding_context(mesh):
        return jitted.lower(state, z, img_ids, text)


def abstract_mmdit_train_state(cfg: MMDiTConfig, tx, mesh):
    """(graphdef, MMDiTTrainState of sharded ShapeDtypeStructs): float32 params, the rest, AdamW state, no EMA."""
    captured = {}

    def build(model_state):
        model = nnx.merge(graphdef, model_state)
        g, state = mmdit_step.init_state(model, tx, nnx.Param, 0)
        captured["graphdef"] = g  # static structure, safe to take out of the trace
        return state

    graphdef, model_state = nnx.split(abstract_model(cfg))
    state = jax.eval_shape(build, model_state)
    return captured["graphdef"], _with_sharding(state, mesh)


def lower_mmdit_training(spec: PlanSpec, cfg: MMDiTConfig, video: VideoShape, mesh) -> jax.stages.Lowered:
    """One update of the Open-Sora 2.0 trainer (`training.mmdit_step.update`: t2v, text dropout, no EMA) with the
    state donated and kept on its own shardings."""
    tx = make_optimizer()
    graphdef, state = abstract_mmdit_train_state(cfg, tx, mesh)
    b, dt = spec.batch, cfg.dtype
    t, h, w, c = video.latent
    text = _mmdit_conditioning(cfg, video, b, mesh)
    batch = dict(x0=_batch_array((b, t, h, w, c), dt, mesh), txt=text["txt"], y_vec=text["y_vec"],
                 null_txt=jax.ShapeDtypeStruct((1, *text["txt"].shape[1:]), dt, sharding=parallel.replicated(mesh)),
                 null_vec=jax.ShapeDtypeStruct((1, text["y_vec"].shape[1]), dt, sharding=parallel.replicated(mesh)))

    def step(state, batch):
        return mmdit_step.update(graphdef, tx, mmdit_step.StepConfig(), state, batch)

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
    family: str  # "stdit3" or "mmdit"
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
    activation_shape: tuple[int, ...]  # STDiT3 (B, T, S, C), MMDiT (B, L, C)
    activation_spec: str
    notes: tuple[str, ...]
    memory: Memory
    lower_s: float
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory_gib"] = self.memory.gib()
        return out


def count_params(cfg: STDiT3Config | MMDiTConfig) -> int:
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def activation_shape(cfg: STDiT3Config | MMDiTConfig, video: VideoShape, model_batch: int) -> tuple[int, ...]:
    """(B, T, S, C) of STDiT3's activations, (B, L, C) of the MMDiT's joint [text, image] sequence."""
    if isinstance(cfg, MMDiTConfig):
        return (model_batch, video.sequence, cfg.hidden_size)
    return (model_batch, *video.tokens, cfg.hidden_size)


def _batch_note(spec, model_batch: int, sizes: dict[str, int]) -> list[str]:
    batch_ways = sizes["data"] * sizes["fsdp"]
    if batch_ways > 1 and model_batch % batch_ways:
        split = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
        rest = [a for a in ("data", "fsdp") if sizes[a] > 1 and a not in split]
        where = f"split over {'×'.join(split)} only" if split else "not split"
        return [f"model batch {model_batch} is not divisible by data×fsdp = {batch_ways}: the batch dim is "
                f"{where}, activations are replicated over {'×'.join(rest)}"
                + (" (fsdp still splits the weights)" if "fsdp" in rest else "")]
    return []


def _mmdit_activation_notes(cfg: MMDiTConfig, video: VideoShape, model_batch: int, mesh) -> tuple[str, tuple[str, ...]]:
    shape = activation_shape(cfg, video, model_batch)
    spec = parallel.logical_to_spec(("act_batch", "act_tokens", "act_embed"), mesh, shape=shape)
    sizes = dict(mesh.shape)
    notes = _batch_note(spec, model_batch, sizes)
    seq = sizes["sequence"]
    if seq > 1 and video.sequence % seq:
        notes.append(f"L = {video.text_tokens} + {video.image_tokens} = {video.sequence} joint tokens is not "
                     f"divisible by sequence = {seq}: the activations outside attention are replicated over "
                     f"sequence (only ring attention, which pads L to a multiple of {seq}, splits)")
    tensor = sizes["tensor"]
    if tensor > 1 and cfg.num_heads % tensor:
        notes.append(f"{cfg.num_heads} heads are not divisible by tensor = {tensor}")
    if tensor > 1 and cfg.mlp_hidden % tensor:
        notes.append(f"MLP width {cfg.mlp_hidden} is not divisible by tensor = {tensor}")
    return str(spec), tuple(notes)


def activation_notes(cfg: STDiT3Config | MMDiTConfig, video: VideoShape, model_batch: int,
                     mesh) -> tuple[str, tuple[str, ...]]:
    """How the activations split on `mesh`, and why an axis could not be split (if so)."""
    if isinstance(cfg, MMDiTConfig):
        return _mmdit_activation_notes(cfg, video, model_batch, mesh)
    shape = activation_shape(cfg, video, model_batch)
    spec = parallel.logical_to_spec(("act_batch", "act_frames", "act_tokens", "act_embed"), mesh, shape=shape)
    sizes = dict(mesh.shape)
    notes = _batch_note(spec, model_batch, sizes)
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
    branches = cfg_branches(cfg)
    model_batch = spec.batch if spec.train else branches * spec.batch
    activation_spec, notes = activation_notes(cfg, video, model_batch, mesh)
    lower = {("stdit3", False): lower_sampling, ("stdit3", True): lower_training,
             ("mmdit", False): lower_mmdit_sampling, ("mmdit", True): lower_mmdit_training}[spec.family, spec.train]
    start = time.perf_counter()
    lowered = lower(spec, cfg, video, mesh)
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if platform == "cpu" else None)
    compiled_at = time.perf_counter()
    stats = compiled.memory_analysis()
    memory = Memory(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes,
                    stats.alias_size_in_bytes, stats.generated_code_size_in_bytes)
    steps = f"{spec.steps} Euler step{'s' * (spec.steps > 1)} in one jit"
    if spec.family == "mmdit":
        what = ("one rectified-flow train step (AdamW, no EMA, state donated)" if spec.train else
                f"flow_v2.sample (text-to-video): {steps}, guidance ⇒ model batch {branches}·{spec.batch}")
    else:
        what = ("one train_step (AdamW + EMA, state donated)" if spec.train else
                f"RFlowSampler.sample: {steps}, CFG ⇒ model batch 2·{spec.batch}")
    return PlanResult(
        model=model_name(spec), family=spec.family, mode=spec.mode, what=what, resolution=spec.resolution,
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
    if result.family == "mmdit":
        tokens = (f"{v.image_tokens} image tokens ({v.tokens[0]} × {v.tokens[1]}) + {v.text_tokens} text tokens"
                  f" = {v.sequence}")
        aspect, axes = f"{result.aspect_ratio} W:H", "(B, L, C)"
    else:
        tokens, aspect, axes = f"{v.tokens[0]} × {v.tokens[1]} tokens", result.aspect_ratio, "(B, T, S, C)"
    lines = [
        f"{result.model} {result.mode}: {result.what}",
        f"  video        {v.frames} frames × {v.height}×{v.width} ({result.resolution}, {aspect})"
        f" → latent (T, H, W, C) = {v.latent} → {tokens}",
        f"  batch        {result.batch} (model batch {result.model_batch})",
        f"  mesh         {result.mesh_text} on {result.devices} {result.platform} device(s)  {result.mesh}",
        f"  settings     compute {result.dtype}, params {result.param_dtype}, remat {result.remat},"
        f" attention {result.attention}",
        f"  parameters   {result.params:,}",
        f"  activations  {axes} = {result.activation_shape} split as {result.activation_spec}",
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
