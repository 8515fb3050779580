"""LoRA: low-rank adapters on chosen projections of STDiT3 (v1.2) and MMDiT (2.0), attached in place.

A projection is a kernel that its module lists in `LORA_KERNELS` (opensora_jax.models.layers): every `Dense`, the
MMDiT's `HeadProjection` (q/k/v), its attention output and single-block output kernels, STDiT3's fused qkv, its
cross-attention q / kv and the attention output kernels. Each is named by a *projection path*: the module's path,
plus the kernel attribute without its "_kernel" suffix unless the kernel is the module's `kernel`:

    MMDiT   double_blocks/img_attn/q_proj   double_blocks/txt_attn/proj   double_blocks/img_mlp/fc1
            single_blocks/k_proj            single_blocks/attn_out        single_blocks/mlp_out   final_layer/linear
    STDiT3  blocks/spatial/attn/qkv         blocks/temporal/attn/proj     blocks/spatial/cross_attn/kv
            blocks/temporal/mlp/fc2         t_block                       y_embedder/y_proj/fc1

`LoRAConfig.targets` are shell-style patterns (fnmatch, `*` also crosses "/") over those paths. `apply_lora` gives
every matched kernel W an adapter A (its input axes × rank, uniform ±1/sqrt(fan_in)) and B (rank × its output axes,
zeros) so the projection computes x·W + (alpha/rank)·(x·A)·B (`layers.project`); at init the model's output is
unchanged. Stacked blocks (a leading "layers" axis) get stacked adapters, sliced by the same layer scan; adapters
carry logical axis names, so `parallel.shard_params` places them like their kernels. `merge_lora` folds them into
the kernels. Saving and loading adapter files: `opensora_jax.lora_files`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from opensora_jax import parallel
from opensora_jax.errors import UserError
from opensora_jax.models.layers import LORA_SUFFIX, LoRA
from opensora_jax.models.mmdit import MMDiT
from opensora_jax.models.stdit3 import STDiT3

# Selects the adapters' variables: `nnx.split(model, lora_filter, ...)`, `nnx.Optimizer(model, tx, wrt=lora_filter)`.
# (`nnx.Param` selects them too: LoRAParam is a Param subclass. `base_filter` selects every other parameter.)
lora_filter = nnx.LoRAParam
base_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# The attention projections (q, k, v and output) of every block, as the LoRA recipe asks.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "mmdit": ("double_blocks/*_attn/[qkv]_proj", "double_blocks/*_attn/proj", "single_blocks/[qkv]_proj",
              "single_blocks/attn_out"),
    "stdit3": ("blocks/*/attn/qkv", "blocks/*/attn/proj", "blocks/*/cross_attn/q", "blocks/*/cross_attn/kv",
               "blocks/*/cross_attn/proj"),
}
_MODEL_NAMES = ((MMDiT, "mmdit"), (STDiT3, "stdit3"))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale = alpha / r), target patterns over projection paths (None: the model's
    `DEFAULT_TARGETS`), and the adapters' parameter dtype (float32 by default, whatever the base's)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"LoRA rank must be a whole number >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise UserError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
                raise UserError(f"LoRA targets must be non-empty patterns over projection paths, got {self.targets!r}")
            object.__setattr__(self, "targets", targets)
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise UserError(f"LoRA dtype {self.dtype!r} is not a dtype (float32, bfloat16)") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise UserError(f"LoRA dtype must be a float type, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype.name)

    @property
    def scale(self) -> float:
        """alpha / rank: the factor of the adapter's term."""
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "LoRAConfig":
        """From a dict (a config file's `lora` section, an adapter file's JSON); unknown keys raise, naming them."""
        config = dict(config.to_dict() if hasattr(config, "to_dict") else config)  # also an ml_collections section
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(f"unknown LoRA config keys: {unknown} (known: {sorted(known)})")
        if isinstance(config.get("targets"), list):
            config["targets"] = tuple(config["targets"])
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`from_dict` reads it back)."""
        out = dataclasses.asdict(self)
        out["targets"] = None if self.targets is None else list(self.targets)
        return out


@dataclasses.dataclass(frozen=True)
class _Site:
    """One adaptable kernel: where it is, and how its axes split into stacked / input / output axes."""

    path: str  # the projection path (what targets match)
    prefix: str  # '/'-joined variable path of its adapter module: A and B are `prefix/a`, `prefix/b`
    module: nnx.Module
    name: str  # the kernel attribute
    shape: tuple[int, ...]
    axes: tuple
    n_stack: int  # leading "layers" axes of stacked blocks
    n_in: int  # input axes after those

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.shape[: self.n_stack + self.n_in], rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.shape[: self.n_stack], rank, *self.shape[self.n_stack + self.n_in:])

    def a_axes(self) -> tuple:
        return (*self.axes[: self.n_stack + self.n_in], None)

    def b_axes(self) -> tuple:
        return (*self.axes[: self.n_stack], None, *self.axes[self.n_stack + self.n_in:])


def model_name(model: nnx.Module) -> str:
    """"mmdit" or "stdit3" (the families' model names); UserError for a model LoRA does not know."""
    for cls, name in _MODEL_NAMES:
        if isinstance(model, cls):
            return name
    raise UserError(f"LoRA supports MMDiT and STDiT3 models, not {type(model).__name__}")


def _sites(model: nnx.Module) -> Iterator[_Site]:
    """Every kernel of `model` that accepts an adapter, in module order."""
    for module_path, module in nnx.iter_modules(model):
        for name, n_in in getattr(type(module), "LORA_KERNELS", {}).items():
            kernel = getattr(module, name, None)
            if kernel is None:
                continue
            shape = tuple(kernel.get_value().shape)
            axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
            n_stack = 0
            while n_stack < len(axes) and axes[n_stack] == "layers":
                n_stack += 1
            parts = [str(p) for p in module_path]
            path = "/".join(parts + ([] if name == "kernel" else [name.removesuffix("_kernel")]))
            yield _Site(path, "/".join(parts + [name + LORA_SUFFIX]), module, name, shape, axes, n_stack, n_in)


def projection_paths(model: nnx.Module) -> list[str]:
    """Every projection path of `model` (what LoRA target patterns are matched against)."""
    return [site.path for site in _sites(model)]


def targets_of(model: nnx.Module, cfg: LoRAConfig) -> tuple[str, ...]:
    """The target patterns `cfg` means for `model`: its own, else the model's `DEFAULT_TARGETS`."""
    return cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[model_name(model)]


def _matched_sites(model: nnx.Module, cfg: LoRAConfig) -> list[_Site]:
    targets = targets_of(model, cfg)
    sites = list(_sites(model))
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(s.path, t) for s in sites)]
    if unmatched:
        examples = ", ".join(s.path for s in sites[:12]) + (", ..." if len(sites) > 12 else "")
        raise UserError(f"LoRA target {unmatched[0]!r} matches no projection of this {type(model).__name__} "
                        f"(projection paths: {examples})")
    return [s for s in sites if any(fnmatch.fnmatchcase(s.path, t) for t in targets)]


def adapter_layout(model: nnx.Module, cfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter variables `apply_lora(model, cfg)` attaches, by '/'-joined variable path (e.g.
    "double_blocks/img_attn/q_proj/kernel_lora/a"), without attaching anything."""
    out = {}
    for site in _matched_sites(model, cfg):
        out[f"{site.prefix}/a"] = site.a_shape(cfg.rank)
        out[f"{site.prefix}/b"] = site.b_shape(cfg.rank)
    return out


def has_lora(model: nnx.Module) -> bool:
    """Whether any adapter is attached to `model`."""
    return any(getattr(site.module, site.name + LORA_SUFFIX, None) is not None for site in _sites(model))


def _placed(value: np.ndarray, like: jax.Array, axes: tuple) -> jax.Array:
    """A host array on the device, per its logical `axes` on the mesh `like` (a kernel) lives on if it is sharded."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(value, parallel.logical_to_mesh_sharding(axes, sharding.mesh, shape=value.shape))
    return jnp.asarray(value)


def _lora_param(value: jax.Array, axes: tuple) -> nnx.LoRAParam:
    return nnx.LoRAParam(value, out_sharding=tuple(axes), eager_sharding=False)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs | int = 0, *,
               values: dict[str, Any] | None = None) -> nnx.Module:
    """Attaches an adapter to every projection `cfg.targets` match, in place, and returns `model`.

    A is drawn uniform in ±1/sqrt(fan_in) (fan_in: the kernel's input size) from `rngs` (nnx.Rngs or a seed), B is
    zeros, so the output is unchanged until B is trained. `values` ({variable path: array}, e.g. from an adapter
    file, already checked against `adapter_layout`) gives A and B instead. Adapters on a sharded model are placed
    per their logical axes on its mesh. UserError: a pattern that matches nothing, adapters already attached.
    """
    if has_lora(model):
        raise UserError("this model already has LoRA adapters (merge_lora or remove_lora first)")
    dtype = np.dtype(jnp.dtype(cfg.dtype))
    sites = _matched_sites(model, cfg)
    if values is None:
        rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
        sizes = [math.prod(site.a_shape(cfg.rank)) for site in sites]
        # One draw for every A (one small program, whatever the number of kernels), split on the host.
        draws = np.split(np.asarray(jax.random.uniform(rngs.params(), (sum(sizes),), jnp.float32, -1.0, 1.0)),
                         np.cumsum(sizes)[:-1])
        values = {}
        for site, draw in zip(sites, draws):
            fan_in = math.prod(site.shape[site.n_stack: site.n_stack + site.n_in])
            values[f"{site.prefix}/a"] = draw.reshape(site.a_shape(cfg.rank)) / math.sqrt(fan_in)
            values[f"{site.prefix}/b"] = np.zeros(site.b_shape(cfg.rank), np.float32)
    for site in sites:
        kernel = getattr(site.module, site.name).get_value()
        a, b = (_placed(np.asarray(values[f"{site.prefix}/{n}"]).astype(dtype), kernel, axes)
                for n, axes in (("a", site.a_axes()), ("b", site.b_axes())))
        adapter = LoRA(_lora_param(a, site.a_axes()), _lora_param(b, site.b_axes()), cfg.scale)
        setattr(site.module, site.name + LORA_SUFFIX, adapter)
    return model


def _attached(model: nnx.Module) -> list[tuple[_Site, LoRA]]:
    return [(site, lora) for site in _sites(model)
            if (lora := getattr(site.module, site.name + LORA_SUFFIX, None)) is not None]


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Detaches every adapter without changing the kernels (back to the base model); returns `model`."""
    for site, _ in _attached(model):
        delattr(site.module, site.name + LORA_SUFFIX)
    return model


def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_stack: int) -> jax.Array:
    """kernel + scale · A·B in float32, cast back to the kernel's dtype (stacked axes batched)."""
    stack = a.shape[:n_stack]
    a2 = a.reshape(*stack, -1, a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*stack, b.shape[n_stack], -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


_merge_jit = jax.jit(_merged_kernel, static_argnums=(3, 4))  # compiled once per kernel shape


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every attached adapter into its kernel (W ← W + scale·A·B, computed in float32, stored in the kernel's
    dtype and sharding) and detaches the adapters: `model` becomes a plain model again. Returns `model`.

    Kernels are merged one at a time, so the extra memory is one kernel's worth."""
    for site, lora in _attached(model):
        var = getattr(site.module, site.name)
        kernel = var.get_value()
        merged = _merge_jit(kernel, lora.a.get_value(), lora.b.get_value(), lora.scale, site.n_stack)
        sharding = getattr(kernel, "sharding", None)
        if isinstance(sharding, NamedSharding) and not merged.sharding.is_equivalent_to(sharding, kernel.ndim):
            merged = jax.device_put(merged, sharding)
        var.set_value(merged)
        delattr(site.module, site.name + LORA_SUFFIX)
    return model


def adapter_arrays(model: nnx.Module) -> dict[str, jax.Array]:
    """The attached adapters' arrays by '/'-joined variable path (what `lora_files.save_adapters` writes)."""
    out = {}
    for site, lora in _attached(model):
        out[f"{site.prefix}/a"] = lora.a.get_value()
        out[f"{site.prefix}/b"] = lora.b.get_value()
    return out
