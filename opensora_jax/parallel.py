"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Modules only name logical axes: parameters carry them in their `out_sharding` metadata (see
`opensora_jax.models.layers.param`), activations name them through `constrain(x, axes)`. This file owns
every mapping from those names onto the mesh axes ("data", "fsdp", "tensor", "sequence").

Mesh axes
  data      pure data parallelism: batch split, parameters replicated.
  fsdp      data parallelism with parameters (and optimizer state) split along their `embed` dimension and
            gathered layer by layer (ZeRO-3 style).
  tensor    Megatron-style model parallelism: attention heads and MLP hidden units split.
  sequence  Ulysses-style sequence parallelism for STDiT3: the spatial tokens S of the (B, T, S, C) activations
            are split; temporal attention then runs locally (each device owns whole frame columns) and spatial
            self-attention runs under `shard_map` (`opensora_jax.models.sequence_parallel.ulysses_attention`):
            an all-to-all turns q/k/v's S split into a heads split, attention runs on whole S for 1/n of the
            heads, an all-to-all turns the output back. Where S or the heads per device (heads / tensor) do
            not divide by the sequence size, the model keeps GSPMD constraints instead (`act_attn_heads`) and
            lets XLA place the exchange. For a joint sequence whose heads do not divide (Open-Sora 2.0's
            MMDiT) the same module has ring attention.

Activation names (used by `constrain`; parameter names come from the models):
  act_batch       batch                           → ("data", "fsdp")
  act_frames      latent frames T                 → replicated (temporal attention needs every frame)
  act_tokens      spatial tokens S = H'·W'        → "sequence"
  act_embed       hidden channels of activations  → replicated
  act_heads       heads outside spatial attention → "tensor"
  act_attn_heads  heads inside spatial attention  → ("tensor", "sequence") (the GSPMD fallback of the Ulysses
                  exchange, used only where the shard_map path does not fit)
  act_mlp         MLP hidden units                → "tensor"
  act_text        caption tokens L                → replicated
  act_vae_items   VAE work items (whole videos, temporal chunks, single frames) → every axis: the VAE has no
                  heads or tokens for tensor/sequence to split, and its items are independent (see
                  `opensora_jax.models.vae.layers.sharded_item_map`)

Resolution rules (`logical_to_mesh_sharding`): an entry of a logical spec may be None, one name, or a tuple of
names (their mesh axes are concatenated, e.g. (B·S) after a reshape). Mesh axes missing from the mesh or of
size 1 are dropped; a mesh axis already used by an earlier dimension is dropped; when a shape is known and a
dimension is not divisible by the product of its mesh axes, the longest prefix of those axes that divides it
is kept (possibly none: replicated). Each fallback is logged once.

Measured (compiled HLO of jax.grad of an MSE loss, STDiT3-XL/2 widths with depth 2 (the scanned block is the
same), 720p, 15 latent frames, batch 2, sequence=8, 8 fake CPU devices): inside the layer scan the shard_map
path communicates only its 8 all-to-alls of (B, T, S/8, heads, head_dim) blocks (q, k, v, o forward and their
cotangents backward) and one all-reduce of (B, T, C) modulation gradients. The GSPMD constraint path (the
fallback above) additionally all-gathers the full (B, T, S, C) qkv input and a full (B, T, S, heads,
head_dim) tensor, all-reduces a full (B, T, S, C) activation, and all-to-alls attention-probability-sized
(S/8 × S per head) tensors in the backward pass. (An earlier note here recorded all-gathers caused by
merging (T, S) and (B, S) before attention; the model no longer merges them, and the shard_map path shows
no all-gather of activations at all.) Timings on GPUs were not re-measured.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from opensora_jax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")

MeshAxes = str | tuple[str, ...] | None
LogicalEntry = str | tuple[str, ...] | None

# The one table: logical axis name → mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    # --- parameters (names used by STDiT3, T5 and the VAE) ---
    "layers": None,  # stacked-layer axis of scanned blocks: every device holds every layer's slice
    "embed": "fsdp",  # model width: the FSDP split of nearly every weight
    "embed_out": None,  # second width axis of square (embed, embed) kernels; "fsdp" is taken by the first
    "heads": "tensor",
    "head_dim": None,
    "kv": None,  # T5's per-head dimension
    "mlp": "tensor",
    "caption": "fsdp",  # T5 feature width (4096) at STDiT3's caption projection
    "vocab": "tensor",
    "conv_in": None,
    "conv_out": "fsdp",  # VAE convolutions: output channels split like `embed`
    "channels": None,  # VAE norm scales and latent scale/shift
    # --- activations ---
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    "frames": None,
    "act_batch": ("data", "fsdp"),
    "act_frames": None,
    "act_tokens": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_attn_heads": ("tensor", "sequence"),
    "act_mlp": "tensor",
    "act_text": None,
    "act_vae_items": ("data", "fsdp", "tensor", "sequence"),
}


# ----------------------------------------------------------------------------------------------------------
# Mesh construction
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Size of each mesh axis; at most one may be -1, meaning "all devices not used by the others"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
        if bad:
            raise UserError(f"mesh axis sizes must be positive or -1, got {bad}")
        fill = [name for name, size in sizes.items() if size == -1]
        if len(fill) > 1:
            raise UserError(f"only one mesh axis may be -1 (fill the rest), got {fill}")

    @classmethod
    def parse(cls, spec: str) -> "MeshConfig":
        """Parses "fsdp=8,sequence=8", "data=-1", or "" (all data parallel). Unnamed axes get size 1.

        Whenever `spec` names any axis, `data` defaults to 1 like the rest, so "fsdp=8" means exactly 8 devices.
        """
        spec = spec.strip()
        if not spec:
            return cls()
        sizes: dict[str, int] = {}
        for item in spec.split(","):
            name, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not name or not value:
                raise UserError(f"mesh spec {spec!r}: entry {item.strip()!r} is not of the form axis=size")
            if name not in MESH_AXES:
                raise UserError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
            if name in sizes:
                raise UserError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise UserError(f"mesh spec {spec!r}: size {value!r} of axis {name!r} is not an integer") from None
        return cls(**{name: sizes.get(name, 1) for name in MESH_AXES})

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, device_count: int) -> dict[str, int]:
        """Concrete axis sizes for `device_count` devices; raises if they cannot multiply to it."""
        sizes = self.sizes()
        known = math.prod(size for size in sizes.values() if size != -1)
        fill = [name for name, size in sizes.items() if size == -1]
        if fill:
            if device_count % known:
                raise UserError(
                    f"mesh {self._text()}: the fixed axes use {known} devices, which does not divide the "
                    f"{device_count} available, so {fill[0]}=-1 cannot fill the rest"
                )
            sizes[fill[0]] = device_count // known
        elif known != device_count:
            raise UserError(
                f"mesh {self._text()} needs {known} devices but {device_count} are available; "
                f"change the sizes or set one axis to -1"
            )
        return sizes

    def _text(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.sizes().items())


def _as_mesh_config(spec: str | MeshConfig | Mapping[str, int] | None) -> MeshConfig:
    if spec is None:
        return MeshConfig()
    if isinstance(spec, MeshConfig):
        return spec
    if isinstance(spec, str):
        return MeshConfig.parse(spec)
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise UserError(f"unknown mesh axes {unknown}; axes are {MESH_AXES}")
    return MeshConfig(**{name: int(spec.get(name, 1)) for name in MESH_AXES})


def make_mesh(spec: str | MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ("data", "fsdp", "tensor", "sequence") mesh with Auto (GSPMD-style) axes.

    `spec`: a MeshConfig, a mapping of axis sizes, or a string for `MeshConfig.parse`; None = all data parallel.
    `devices`: defaults to every device of every process.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _as_mesh_config(spec).resolve(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ----------------------------------------------------------------------------------------------------------
# Logical names → shardings
# ----------------------------------------------------------------------------------------------------------

_logged_fallbacks: set[tuple] = set()


def _log_once(key: tuple, message: str) -> None:
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        log.info(message)


def _mesh_axes_of(entry: LogicalEntry, rules: Mapping[str, MeshAxes]) -> list[str]:
    """The mesh axes one logical entry (None, a name, or a tuple of names) maps to, in order."""
    if entry is None:
        return []
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    axes: list[str] = []
    for name in names:
        if name is None:
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; add it to opensora_jax.parallel.LOGICAL_AXIS_RULES")
        target = rules[name]
        axes.extend([] if target is None else [target] if isinstance(target, str) else list(target))
    return axes


def _divisible_prefix(axes: list[str], dim: int, mesh_shape: Mapping[str, int]) -> list[str]:
    """The longest prefix of `axes` whose size product divides `dim`."""
    kept: list[str] = []
    for axis in axes:
        if dim % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]):
            break
        kept.append(axis)
    return kept


def logical_to_spec(
    axes: Sequence[LogicalEntry],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Resolves logical axis names to a PartitionSpec on `mesh` (see the module docstring for the rules)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
    mesh_shape = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for i, entry in enumerate(axes):
        wanted = [a for a in _mesh_axes_of(entry, rules) if mesh_shape.get(a, 1) > 1]
        kept = [a for a in wanted if a not in used]
        if kept != wanted:
            _log_once(
                ("reused", str(axes), i),
                f"logical axes {tuple(axes)}: dim {i} drops mesh axes {[a for a in wanted if a in used]} "
                f"already used by an earlier dim",
            )
        if shape is not None:
            divisible = _divisible_prefix(kept, shape[i], mesh_shape)
            if divisible != kept:
                _log_once(
                    ("indivisible", str(entry), shape[i], tuple(kept)),
                    f"logical axis {entry!r} of size {shape[i]} is not divisible by mesh axes {kept} "
                    f"(sizes {[mesh_shape[a] for a in kept]}); sharding it over {divisible or 'nothing (replicated)'}",
                )
            kept = divisible
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_to_mesh_sharding(
    axes: Sequence[LogicalEntry],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on `mesh` for an array whose dimensions have logical names `axes`.

    With `shape`, dimensions not divisible by their mesh axes fall back (see the module docstring).
    """
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------------------
# Activation constraints inside models
# ----------------------------------------------------------------------------------------------------------

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Mapping[str, MeshAxes]] | None] = contextvars.ContextVar(
    "opensora_sharding_context", default=None
)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Iterator[Mesh]:
    """Makes `constrain` active for code traced inside the block, and sets `mesh` as JAX's current mesh.

    Enter it outside jit and trace (call) the jitted step inside it: constraints are recorded at trace time.
    Setting JAX's mesh too makes the mesh part of jit's cache key, so a function traced without the context is
    retraced within it. (Changing only `rules` for the same mesh does not retrace.)
    """
    token = _CONTEXT.set((mesh, LOGICAL_AXIS_RULES if rules is None else rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the active `sharding_context`, or None."""
    active = _CONTEXT.get()
    return None if active is None else active[0]


def active_rules() -> Mapping[str, MeshAxes]:
    """The rules of the active `sharding_context`, else `LOGICAL_AXIS_RULES`."""
    active = _CONTEXT.get()
    return LOGICAL_AXIS_RULES if active is None else active[1]


def logical_axis_size(entry: LogicalEntry, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> int:
    """How many devices one logical entry splits over on `mesh`: the product of its mesh axes' sizes."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    mesh_shape = dict(mesh.shape)
    return math.prod(mesh_shape.get(axis, 1) for axis in dict.fromkeys(_mesh_axes_of(entry, rules)))


def mesh_axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of mesh axis `axis` (1 when `mesh` is None or has no such axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def shard_map(f, *, mesh: Mesh, in_specs, out_specs, check_vma: bool = True):
    """`jax.shard_map` where this jax has it, else `jax.experimental.shard_map.shard_map`.

    Every mesh axis is manual inside `f`; `check_vma` is passed under whichever name the installed jax uses
    (`check_vma`, formerly `check_rep`).
    """
    impl = getattr(jax, "shard_map", None)
    if impl is None:
        from jax.experimental.shard_map import shard_map as impl
    check = "check_vma" if "check_vma" in inspect.signature(impl).parameters else "check_rep"
    return impl(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{check: check_vma})


def constrain_on(
    x: jax.Array, logical_axes: Sequence[LogicalEntry], mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
) -> jax.Array:
    """`with_sharding_constraint` by logical names on an explicit `mesh` (no `sharding_context` needed)."""
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain_on: logical axes {tuple(logical_axes)} given for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_sharding(logical_axes, mesh, rules, x.shape))


def constrain(x: jax.Array, logical_axes: Sequence[LogicalEntry]) -> jax.Array:
    """`with_sharding_constraint` by logical names when a `sharding_context` is active; the identity otherwise."""
    active = _CONTEXT.get()
    if active is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: logical axes {tuple(logical_axes)} given for an array of shape {x.shape}")
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_sharding(logical_axes, mesh, rules, x.shape))


# ----------------------------------------------------------------------------------------------------------
# Placing parameters, optimizer state and batches
# ----------------------------------------------------------------------------------------------------------


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> NamedSharding:
    """Sharding of one variable from its `out_sharding` metadata; replicated when it has none."""
    axes = var.get_metadata().get("out_sharding")
    shape = np.shape(var.get_value())
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return logical_to_mesh_sharding(axes, mesh, rules, shape)


def state_shardings(tree, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> nnx.State:
    """An nnx.State of NamedShardings mirroring `nnx.state(tree)` (tree: a module, optimizer or state).

    Works on abstract trees (nnx.eval_shape) too: use it for jit out_shardings or orbax restore targets.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return jax.tree.map(
        lambda var: var.replace(variable_sharding(var, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_state(tree, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> nnx.State:
    """`nnx.state(tree)` as ShapeDtypeStructs carrying their target shardings (no memory allocated).

    Use it as an orbax restore target (`nnx.to_pure_dict` of it) or to lower/compile a step for memory planning.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def abstract(var: nnx.Variable) -> nnx.Variable:
        value, sharding = var.get_value(), variable_sharding(var, mesh, rules)
        return var.replace(jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding))

    return jax.tree.map(abstract, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _place_variables(obj, mesh: Mesh, rules: Mapping[str, MeshAxes] | None) -> None:
    """device_put every variable of an nnx object per its metadata, in place."""
    for _, var in nnx.to_flat_state(nnx.state(obj)):
        var.set_value(jax.device_put(var.get_value(), variable_sharding(var, mesh, rules)))


def shard_params(module: nnx.Module, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> nnx.Module:
    """Places every variable of `module` on `mesh` per its logical `out_sharding` metadata (in place).

    Variables without metadata (e.g. RNG state) are replicated. The module must hold arrays; for an abstract
    (nnx.eval_shape) module use `abstract_state`. Returns `module` for chaining.
    """
    _place_variables(module, mesh, rules)
    return module


def shard_optimizer_state(optimizer: nnx.Optimizer, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None):
    """Places an nnx.Optimizer's state on `mesh` (in place): moments like their parameters, counters replicated.

    nnx copies each parameter's `out_sharding` metadata onto its optimizer moments, so they follow the same rules.
    """
    if not isinstance(optimizer, nnx.Pytree):
        raise TypeError(
            f"shard_optimizer_state expects an nnx.Optimizer (whose moments carry logical axis metadata), "
            f"got {type(optimizer).__name__}"
        )
    _place_variables(optimizer, mesh, rules)
    return optimizer


def batch_sharding(
    shape: Sequence[int], mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
) -> NamedSharding:
    """Sharding of a batch array: leading dim on the batch axes (with fallback), the rest replicated."""
    if len(shape) == 0:
        return NamedSharding(mesh, PartitionSpec())
    return logical_to_mesh_sharding(("act_batch",) + (None,) * (len(shape) - 1), mesh, rules, shape)


def shard_batch(tree, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None):
    """Places every array of a batch pytree with its leading (batch) dim split over ("data", "fsdp").

    Under multiple processes, numpy leaves are each process's LOCAL slice of the global batch (as a
    per-host data loader yields) and are assembled into global arrays; jax.Array leaves are resharded.
    """

    def place(leaf):
        if isinstance(leaf, jax.Array):
            return jax.device_put(leaf, batch_sharding(leaf.shape, mesh, rules))
        local = np.asarray(leaf)
        if jax.process_count() == 1:
            return jax.device_put(local, batch_sharding(local.shape, mesh, rules))
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:] if local.ndim else ()
        sharding = batch_sharding(global_shape, mesh, rules)
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(place, tree)


# ----------------------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------------------


def detect_launcher(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for `jax.distributed.initialize` when a multi-process launcher started us, else None.

    Recognised: JAX's own JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES / JAX_PROCESS_ID), SLURM with more
    than one task (JAX detects the rest itself), and torchrun-style MASTER_ADDR + WORLD_SIZE + RANK
    (MASTER_PORT or JAX_COORDINATOR_PORT; one GPU per process when LOCAL_WORLD_SIZE > 1).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs: dict[str, Any] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
        return kwargs
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}
    if env.get("MASTER_ADDR") and env.get("WORLD_SIZE") and env.get("RANK"):
        if int(env["WORLD_SIZE"]) <= 1:
            return None
        port = env.get("JAX_COORDINATOR_PORT") or env.get("MASTER_PORT") or "29500"
        kwargs = {
            "coordinator_address": f"{env['MASTER_ADDR']}:{port}",
            "num_processes": int(env["WORLD_SIZE"]),
            "process_id": int(env["RANK"]),
        }
        if int(env.get("LOCAL_WORLD_SIZE", "1")) > 1 and env.get("LOCAL_RANK"):
            kwargs["local_device_ids"] = [int(env["LOCAL_RANK"])]
        return kwargs
    return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when launched by a multi-process launcher; a no-op otherwise.

    Must run before anything touches a device. Returns True when this process is (now) part of a
    multi-process job.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = detect_launcher(env)
    if kwargs is None:
        return False
    log.info("initialising jax.distributed with %s", kwargs or "cluster auto-detection")
    jax.distributed.initialize(**kwargs)
    return True
