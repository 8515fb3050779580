"""MMDiT (Open-Sora 2.0's 11B denoiser, Flux.1-dev's architecture) in Flax NNX.

Public layouts:
  latents        (B, T, H, W, C) channels-last; `pack` turns them into image tokens (B, T·H/p·W/p, C·p·p) with the
                 reference's feature order (c, ph, pw), `unpack` is its inverse.
  img            (B, L_img, in_channels) image tokens; img_ids (B, L_img, 3) their (t, h, w) positions on the
                 packed grid (`image_position_ids`).
  txt            (B, L_txt, context_in_dim) T5 states; txt_ids (B, L_txt, 3) (zeros: `text_position_ids`).
  y_vec          (B, vec_in_dim) CLIP pooled vector; timesteps (B,) flow time in [0, 1] (1 = noise).
  cond           (B, L_img, in_channels + p²) packed [mask, masked reference latent] (`cond_embed` models).
  output         (B, L_img, in_channels): the predicted velocity, float32.

Double-stream blocks keep separate image and text weights and attend jointly over [text, image]; single-stream
blocks run one weight set on the concatenation. Each stack is stored stacked (a leading `layers` axis) and runs
as one `lax.scan`, so an 11B model traces one block of each kind.

RoPE: the head dimension is split into per-axis frequency slots (axes_dim over t, h, w). Open-Sora 2.0 pairs
dimension j with j + D/2 ("rotate-half", `use_liger_rope=True`); Flux.1-dev pairs 2j with 2j + 1
("interleaved"). Both run here; the converter turns an interleaved checkpoint into the rotate-half layout by
permuting q/k rows, so released weights of either kind run the same forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opensora_jax.errors import UserError
from opensora_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from opensora_jax.models.layers import Dense, gelu_tanh, layer_norm, param, project, rms_norm, sinusoidal_embedding
from opensora_jax.models.remat import remat, remat_policy_name
from opensora_jax.models.sequence_parallel import ring_attention
from opensora_jax import parallel
from opensora_jax.parallel import constrain

# Reference MMDiTConfig fields that do not change the maths (where weights come from, checkpointing choice).
_IGNORED_FIELDS = ("from_pretrained", "cache_dir", "model_type", "grad_ckpt_settings", "type", "strict_load")

_ACT = ("act_batch", "act_tokens", "act_embed")
_HEADS = ("act_batch", "act_tokens", "act_heads", None)
_VEC = ("act_batch", "act_embed")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture (the reference's MMDiTConfig fields) plus JAX execution settings."""

    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False
    cond_embed: bool = True
    fused_qkv: bool = False  # the checkpoint's layout; parameters here are always unfused
    use_liger_rope: bool = True  # True: rotate-half pairing (Open-Sora 2.0); False: interleaved (Flux.1-dev)
    patch_size: int = 2
    # JAX execution settings (not part of the reference config).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"  # opensora_jax.models.attention.ATTENTION_IMPLEMENTATIONS
    remat: str = "nothing"  # opensora_jax.models.remat.REMAT_POLICIES
    # The reference's selective checkpointing `(double, single)`: only the first `double` double-stream and the
    # first `single` single-stream blocks use `remat`, the rest keep their activations. None = every block.
    remat_blocks: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        if self.remat_blocks is not None:
            counts = tuple(self.remat_blocks)
            if len(counts) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
                raise UserError(f"remat_blocks must be (double, single) block counts >= 0, got {self.remat_blocks!r}")
            object.__setattr__(self, "remat_blocks", counts)
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise UserError(f"axes_dim {list(self.axes_dim)} sums to {sum(self.axes_dim)}, "
                            f"but the head dimension is {self.head_dim}")
        if any(a % 2 for a in self.axes_dim):
            raise UserError(f"every axes_dim entry must be even (rotary pairs), got {list(self.axes_dim)}")
        if self.patch_size < 1:
            raise UserError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention {self.attention!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def cond_channels(self) -> int:
        """Width of the `cond` input: the packed [mask (1 channel), masked latent] tokens."""
        return self.in_channels + self.patch_size**2

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent (in_channels / p²)."""
        return self.in_channels // self.patch_size**2

    @classmethod
    def from_reference(cls, config: dict[str, Any], **overrides) -> "MMDiTConfig":
        """A config from the reference's MMDiTConfig kwargs (e.g. case.json's `config`, a converted directory's
        config.json). Weight-location and gradient-checkpointing fields are accepted and ignored; unknown keys
        raise, naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in {**config, **overrides}.items():
            if key in _IGNORED_FIELDS:
                continue
            if key not in known:
                unknown.append(key)
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        if unknown:
            raise UserError(f"unknown MMDiT config keys: {sorted(unknown)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["axes_dim"] = list(self.axes_dim)
        if self.remat_blocks is not None:
            out["remat_blocks"] = list(self.remat_blocks)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # configs/diffusion/inference/256px.py (768px.py uses the same model).
    "OpenSora-v2-11B": dict(in_channels=64, patch_size=2, cond_embed=True, guidance_embed=False, fused_qkv=False,
                            use_liger_rope=True),
    # configs/diffusion/inference/high_compression.py: Video DC-AE latents (128 channels), patch 1.
    "OpenSora-v2-11B-DC-AE": dict(in_channels=128, patch_size=1, cond_embed=True, guidance_embed=False,
                                  fused_qkv=False, use_liger_rope=True),
    # The t2i2v helper: Flux.1-dev with guidance distillation, fused qkv, interleaved RoPE.
    "Flux.1-dev": dict(in_channels=64, patch_size=2, cond_embed=False, guidance_embed=True, fused_qkv=True,
                       use_liger_rope=False),
}


def preset(name: str, **overrides) -> MMDiTConfig:
    """A released configuration (`OpenSora-v2-11B`, `OpenSora-v2-11B-DC-AE`, `Flux.1-dev`) with overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown MMDiT preset {name!r}; choose one of {sorted(PRESETS)}")
    return MMDiTConfig(**{**PRESETS[name], **overrides})


def build(cfg: MMDiTConfig, rngs: nnx.Rngs, param_dtype=None, compute_dtype=None) -> "MMDiT":
    """The model for `cfg`, with the parameter / compute dtypes overridden where given (the families hook)."""
    changes = {}
    if param_dtype is not None:
        changes["param_dtype"] = jnp.dtype(param_dtype).name
    if compute_dtype is not None:
        changes["dtype"] = jnp.dtype(compute_dtype).name
    return MMDiT(dataclasses.replace(cfg, **changes) if changes else cfg, rngs=rngs)


# ------------------------------------------------------------------------------------------------------------
# Packing and positions (library functions the samplers and trainers use)
# ------------------------------------------------------------------------------------------------------------


def pack(x: jax.Array, patch_size: int) -> jax.Array:
    """Latents (B, T, H, W, C) → tokens (B, T·(H/p)·(W/p), C·p·p); tokens in (t, h, w) order, features (c, ph, pw).

    The reference's `b c t (h ph) (w pw) -> b (t h w) (c ph pw)` on the channels-last layout. H and W must be
    multiples of p.
    """
    b, t, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {h}x{w}")
    x = x.reshape(b, t, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 2, 4, 6, 3, 5).reshape(b, t * (h // p) * (w // p), c * p * p)


def unpack(tokens: jax.Array, size: tuple[int, int, int], patch_size: int) -> jax.Array:
    """The inverse of `pack`: tokens (B, T·(H/p)·(W/p), C·p·p) → latents (B, T, H, W, C); `size` = (T, H, W)."""
    t, h, w = size
    p = patch_size
    b, length, feats = tokens.shape
    if length != t * (h // p) * (w // p) or feats % (p * p):
        raise ValueError(f"tokens {tokens.shape} do not unpack to {size} with patch size {p}")
    c = feats // (p * p)
    x = tokens.reshape(b, t, h // p, w // p, c, p, p)
    return x.transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, t, h, w, c)


def image_position_ids(batch: int, size: tuple[int, int, int], patch_size: int) -> jax.Array:
    """(B, T·(H/p)·(W/p), 3) float32 (t, h, w) integer positions of the packed tokens of a (T, H, W) latent."""
    t, h, w = size
    grid = jnp.stack(jnp.meshgrid(jnp.arange(t), jnp.arange(h // patch_size), jnp.arange(w // patch_size),
                                  indexing="ij"), axis=-1)
    return jnp.broadcast_to(grid.reshape(1, -1, 3).astype(jnp.float32), (batch, grid[..., 0].size, 3))


def text_position_ids(batch: int, length: int) -> jax.Array:
    """(B, L_txt, 3) zeros: text tokens get the identity rotation."""
    return jnp.zeros((batch, length, 3), jnp.float32)


def rope_tables(ids: jax.Array, axes_dim: tuple[int, ...], theta: float, rotate_half: bool = True):
    """cos and sin tables (B, L, head_dim) float32 for positions `ids` (B, L, n_axes), aligned with the head dims.

    Axis a contributes axes_dim[a]/2 frequency slots with angle pos_a · theta^(-2j/axes_dim[a]); the slots of all
    axes concatenated (t, h, w order) are laid out as [slots, slots] for rotate-half pairing (the reference's
    LigerEmbedND tables) or each slot twice in a row for interleaved pairing.
    """
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles.append(ids[..., a].astype(jnp.float32)[..., None] * omega)
    angle = jnp.concatenate(angles, axis=-1)
    if rotate_half:
        angle = jnp.concatenate([angle, angle], axis=-1)
    else:
        angle = jnp.repeat(angle, 2, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotate_half: bool = True) -> jax.Array:
    """Rotates x (B, L, heads, head_dim) by tables (B, L, head_dim), in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    if rotate_half:
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    else:
        pairs = xf.reshape(*x.shape[:-1], -1, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def timestep_embedding(t: jax.Array, dtype, dim: int = 256, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """[cos, sin] features of time_factor·t (B,) → (B, dim) in `dtype`.

    time_factor·t is formed in `dtype` (as the reference multiplies its bf16 input), the angles in float32.
    """
    t = (jnp.asarray(t).astype(dtype) * jnp.asarray(time_factor, dtype)).astype(dtype)
    return sinusoidal_embedding(t, dim, max_period).astype(dtype)


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------


def _xavier():
    return nnx.initializers.xavier_uniform()


def _zeros():
    return nnx.initializers.zeros_init()


def _dense(cfg: MMDiTConfig, d_in: int, d_out: int, axes, rngs, *, use_bias=True, kernel_init=None) -> Dense:
    return Dense(d_in, d_out, axes=axes, rngs=rngs, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=kernel_init or _xavier())


class MLPEmbedder(nnx.Module):
    """out_layer(SiLU(in_layer(x))): the time, vector and guidance embedders."""

    def __init__(self, cfg: MMDiTConfig, d_in: int, *, rngs: nnx.Rngs):
        self.in_layer = _dense(cfg, d_in, cfg.hidden_size, (None, "embed"), rngs)
        self.out_layer = _dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class HeadProjection(nnx.Module):
    """x (B, L, hidden) → (B, L, heads, head_dim): kernel (hidden, heads, head_dim), optional bias."""

    LORA_KERNELS = {"kernel": 1}

    def __init__(self, cfg: MMDiTConfig, *, use_bias: bool, rngs: nnx.Rngs):
        pd, h, hd = jnp.dtype(cfg.param_dtype), cfg.num_heads, cfg.head_dim
        self.kernel = param(rngs, _xavier(), (cfg.hidden_size, h, hd), ("embed", "heads", "head_dim"), pd)
        self.bias = param(rngs, _zeros(), (h, hd), ("heads", "head_dim"), pd) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(self, "kernel", "bld,dhk->blhk", x)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return constrain(y, _HEADS)


class QKNorm(nnx.Module):
    """Per-head RMSNorm of q and k (float32 statistics, learnable scale): the reference's `norm.{query,key}_norm`."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.query_norm = param(rngs, nnx.initializers.ones_init(), (cfg.head_dim,), ("head_dim",), pd)
        self.key_norm = param(rngs, nnx.initializers.ones_init(), (cfg.head_dim,), ("head_dim",), pd)

    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rms_norm(q, self.query_norm[...]), rms_norm(k, self.key_norm[...])


class Attention(nnx.Module):
    """One stream's attention weights in a double block: q/k/v projections, q/k norm, output projection."""

    LORA_KERNELS = {"proj_kernel": 2}

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        pd, h, hd, d = jnp.dtype(cfg.param_dtype), cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = HeadProjection(cfg, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = HeadProjection(cfg, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = HeadProjection(cfg, use_bias=cfg.qkv_bias, rngs=rngs)
        self.norm = QKNorm(cfg, rngs=rngs)
        self.proj_kernel = param(rngs, _xavier(), (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.proj_bias = param(rngs, _zeros(), (d,), ("embed",), pd)

    def qkv(self, x: jax.Array):
        q, k = self.norm(self.q_proj(x), self.k_proj(x))
        return q, k, self.v_proj(x)

    def out(self, o: jax.Array) -> jax.Array:
        return project(self, "proj_kernel", "blhk,hkd->bld", o) + self.proj_bias[...].astype(o.dtype)


class Mlp(nnx.Module):
    """Linear → GELU(tanh) → Linear (the reference's `{img,txt}_mlp.0` / `.2`)."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        self.fc1 = _dense(cfg, cfg.hidden_size, cfg.mlp_hidden, ("embed", "mlp"), rngs)
        self.fc2 = _dense(cfg, cfg.mlp_hidden, cfg.hidden_size, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(gelu_tanh(self.fc1(x)), ("act_batch", "act_tokens", "act_mlp")))


class Modulation(nnx.Module):
    """lin(SiLU(vec)) split into `n` chunks of hidden: shift, scale, gate (, shift, scale, gate)."""

    def __init__(self, cfg: MMDiTConfig, n: int, *, rngs: nnx.Rngs):
        self.n = n
        self.lin = _dense(cfg, cfg.hidden_size, n * cfg.hidden_size, ("embed", "mlp"), rngs)

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]  # (B, 1, n·hidden): broadcast over tokens
        return jnp.split(out, self.n, axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x) + shift


def joint_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Full bidirectional attention over (B, L, heads, head_dim), no mask (text pads are attended).

    Under a mesh whose "sequence" axis is split, ring attention runs the joint sequence without gathering it;
    otherwise the one attention function (blockwise by default: L × L never materialises).
    """
    mesh = parallel.current_mesh()
    if parallel.mesh_axis_size(mesh, "sequence") > 1:
        return ring_attention(q, k, v, mesh=mesh)
    return dot_product_attention(q, k, v, implementation=implementation)


class DoubleStreamBlock(nnx.Module):
    """Separate image and text weights; one joint attention over [text, image]."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.img_mod = Modulation(cfg, 6, rngs=rngs)
        self.img_attn = Attention(cfg, rngs=rngs)
        self.img_mlp = Mlp(cfg, rngs=rngs)
        self.txt_mod = Modulation(cfg, 6, rngs=rngs)
        self.txt_attn = Attention(cfg, rngs=rngs)
        self.txt_mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, img, txt, vec, cos, sin):
        rotate_half = self.cfg.use_liger_rope
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv(_modulate(img, img_shift1, img_scale1))
        tq, tk, tv = self.txt_attn.qkv(_modulate(txt, txt_shift1, txt_scale1))
        q = apply_rope(jnp.concatenate([tq, iq], axis=1), cos, sin, rotate_half)
        k = apply_rope(jnp.concatenate([tk, ik], axis=1), cos, sin, rotate_half)
        v = jnp.concatenate([tv, iv], axis=1)
        o = constrain(joint_attention(q, k, v, self.cfg.attention), _HEADS)
        n_txt = txt.shape[1]
        img = img + img_gate1 * self.img_attn.out(o[:, n_txt:])
        img = img + img_gate2 * self.img_mlp(_modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.out(o[:, :n_txt])
        txt = txt + txt_gate2 * self.txt_mlp(_modulate(txt, txt_shift2, txt_scale2))
        return constrain(img, _ACT), constrain(txt, _ACT)


class SingleStreamBlock(nnx.Module):
    """One weight set on [text, image]: attention and MLP in parallel from one modulated input.

    The reference's fused `v_mlp` (rows: v, then MLP-in) and `linear2` (columns: attention, then MLP) are held
    as their parts (`v_proj` + `mlp_in`, `attn_out_kernel` + `mlp_out_kernel`), so each keeps its own logical axes.
    """

    LORA_KERNELS = {"attn_out_kernel": 2, "mlp_out_kernel": 1}

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        pd, h, hd, d = jnp.dtype(cfg.param_dtype), cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.cfg = cfg
        self.modulation = Modulation(cfg, 3, rngs=rngs)
        self.q_proj = HeadProjection(cfg, use_bias=True, rngs=rngs)
        self.k_proj = HeadProjection(cfg, use_bias=True, rngs=rngs)
        self.v_proj = HeadProjection(cfg, use_bias=True, rngs=rngs)
        self.mlp_in = _dense(cfg, d, cfg.mlp_hidden, ("embed", "mlp"), rngs)
        self.norm = QKNorm(cfg, rngs=rngs)
        self.attn_out_kernel = param(rngs, _xavier(), (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.mlp_out_kernel = param(rngs, _xavier(), (cfg.mlp_hidden, d), ("mlp", "embed"), pd)
        self.out_bias = param(rngs, _zeros(), (d,), ("embed",), pd)

    def __call__(self, x, vec, cos, sin):
        rotate_half = self.cfg.use_liger_rope
        shift, scale, gate = self.modulation(vec)
        h = _modulate(x, shift, scale)
        q, k = self.norm(self.q_proj(h), self.k_proj(h))
        q, k = apply_rope(q, cos, sin, rotate_half), apply_rope(k, cos, sin, rotate_half)
        o = constrain(joint_attention(q, k, self.v_proj(h), self.cfg.attention), _HEADS)
        m = constrain(gelu_tanh(self.mlp_in(h)), ("act_batch", "act_tokens", "act_mlp"))
        dt = x.dtype
        y = (project(self, "attn_out_kernel", "blhk,hkd->bld", o)
             + project(self, "mlp_out_kernel", "blm,md->bld", m) + self.out_bias[...].astype(dt))
        return constrain(x + gate * y, _ACT)


class LastLayer(nnx.Module):
    """shift, scale = adaLN(vec) (shift first); linear((1 + scale)·LN(x) + shift)."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        self.adaLN_modulation = _dense(cfg, cfg.hidden_size, 2 * cfg.hidden_size, ("embed", "mlp"), rngs)
        self.linear = _dense(cfg, cfg.hidden_size, cfg.out_channels, ("embed", None), rngs)

    def __call__(self, x, vec):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        return self.linear(_modulate(x, shift, scale))


def _stack(cls, cfg: MMDiTConfig, n: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return cls(cfg, rngs=r)

    return make(rngs)


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------


class MMDiT(nnx.Module):
    """Open-Sora 2.0's MMDiTModel (and Flux.1-dev's). See the module docstring for layouts."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.img_in = _dense(cfg, cfg.in_channels, d, (None, "embed"), rngs)
        self.time_in = MLPEmbedder(cfg, 256, rngs=rngs)
        self.vector_in = MLPEmbedder(cfg, cfg.vec_in_dim, rngs=rngs)
        self.guidance_in = MLPEmbedder(cfg, 256, rngs=rngs) if cfg.guidance_embed else None
        # The reference zero-initialises cond_in so that a model without image conditioning starts unchanged.
        self.cond_in = (_dense(cfg, cfg.cond_channels, d, (None, "embed"), rngs, kernel_init=_zeros())
                        if cfg.cond_embed else None)
        self.txt_in = _dense(cfg, cfg.context_in_dim, d, ("caption", "embed"), rngs)
        self.double_blocks = _stack(DoubleStreamBlock, cfg, cfg.depth, rngs)
        self.single_blocks = _stack(SingleStreamBlock, cfg, cfg.depth_single_blocks, rngs)
        self.final_layer = LastLayer(cfg, rngs=rngs)

    def embed(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        """The block inputs: img, txt tokens (B, L, hidden), vec (B, hidden), RoPE tables, and the embedder
        outputs by the reference's intermediate names."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (B, L_img, {cfg.in_channels}), got shape {img.shape}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(f"txt must be (B, L_txt, {cfg.context_in_dim}), got shape {txt.shape}")
        inter = {}
        img_h = inter["img_in_out"] = self.img_in(img.astype(dt))
        if self.cond_in is not None:
            if cond is None:
                raise ValueError("this MMDiT has cond_embed=True: pass cond (zeros for no image conditioning)")
            if cond.shape != (*img.shape[:2], cfg.cond_channels):
                raise ValueError(f"cond must be {(*img.shape[:2], cfg.cond_channels)}, got {cond.shape}")
            inter["cond_in_out"] = self.cond_in(cond.astype(dt))
            img_h = img_h + inter["cond_in_out"]
        vec = inter["time_in_out"] = self.time_in(timestep_embedding(timesteps, dt))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this MMDiT has guidance_embed=True (guidance-distilled): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, dt))
        inter["vector_in_out"] = self.vector_in(y_vec.astype(dt))
        vec = constrain(vec + inter["vector_in_out"], _VEC)
        txt_h = inter["txt_in_out"] = self.txt_in(txt.astype(dt))
        ids = jnp.concatenate([txt_ids, img_ids], axis=1)
        cos, sin = rope_tables(ids, cfg.axes_dim, cfg.theta, cfg.use_liger_rope)
        inter["pe_cos"], inter["pe_sin"] = cos, sin
        return constrain(img_h, _ACT), constrain(txt_h, _ACT), vec, (cos, sin), inter

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y_vec: jax.Array,
        cond: jax.Array | None = None,
        guidance: jax.Array | None = None,
        *,
        return_intermediates: bool = False,
    ):
        """Predicts the flow velocity of the image tokens.

        Args (layouts in the module docstring): img, img_ids, txt, txt_ids, timesteps, y_vec; `cond` is required
        when cfg.cond_embed (zeros = no image conditioning); `guidance` (B,) only when cfg.guidance_embed (it is
        ignored otherwise, as in the reference).
          return_intermediates: also return a dict of the reference's named intermediates (rope tables, embedder
            outputs, every block's output).

        Returns:
          (B, L_img, in_channels) float32 (and the intermediates dict if requested).
        """
        img_h, txt_h, vec, (cos, sin), inter = self.embed(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)
        n_txt = txt_h.shape[1]
        img_h, txt_h, double_outs = self._run_double(img_h, txt_h, vec, cos, sin, return_intermediates)
        x = constrain(jnp.concatenate([txt_h, img_h], axis=1), _ACT)
        x, single_outs = self._run_single(x, vec, cos, sin, return_intermediates)
        out = self.final_layer(x[:, n_txt:], vec).astype(jnp.float32)
        if not return_intermediates:
            return out
        for i in range(self.cfg.depth):
            inter[f"double_block_{i}_img"], inter[f"double_block_{i}_txt"] = double_outs[0][i], double_outs[1][i]
        for i in range(self.cfg.depth_single_blocks):
            inter[f"single_block_{i}_out"] = single_outs[i]
        return out, inter

    def _remat_count(self, stack: int, depth: int) -> int:
        """How many leading blocks of stack 0 (double) / 1 (single) are rematerialised."""
        if self.cfg.remat == "nothing":
            return 0
        return depth if self.cfg.remat_blocks is None else min(self.cfg.remat_blocks[stack], depth)

    def _scan_blocks(self, blocks, body, carry, n_remat: int):
        """`lax.scan` of `body` over the stacked `blocks`: the first `n_remat` under the remat policy (one scan),
        the rest without (a second scan); per-block outputs are concatenated in block order."""
        graphdef, state = nnx.split(blocks)
        depth = jax.tree.leaves(state)[0].shape[0]

        def step(carry, layer_state):
            return body(graphdef, carry, layer_state)

        if n_remat in (0, depth):
            return jax.lax.scan(remat(step, self.cfg.remat) if n_remat else step, carry, state)
        head = jax.tree.map(lambda a: a[:n_remat], state)
        tail = jax.tree.map(lambda a: a[n_remat:], state)
        carry, outs_head = jax.lax.scan(remat(step, self.cfg.remat), carry, head)
        carry, outs_tail = jax.lax.scan(step, carry, tail)
        return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs_head, outs_tail)

    def _run_double(self, img, txt, vec, cos, sin, collect: bool):
        def body(graphdef, carry, layer_state):
            img, txt = nnx.merge(graphdef, layer_state)(*carry, vec, cos, sin)
            return (img, txt), ((img, txt) if collect else None)

        n = self._remat_count(0, self.cfg.depth)
        (img, txt), outs = self._scan_blocks(self.double_blocks, body, (img, txt), n)
        return img, txt, outs

    def _run_single(self, x, vec, cos, sin, collect: bool):
        def body(graphdef, x, layer_state):
            x = nnx.merge(graphdef, layer_state)(x, vec, cos, sin)
            return x, (x if collect else None)

        n = self._remat_count(1, self.cfg.depth_single_blocks)
        return self._scan_blocks(self.single_blocks, body, x, n)
