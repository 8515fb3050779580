"""Open-Sora 2.0's Video DC-AE (`dc_ae`, model name `dc-ae-f32t4c128`): a deep-compression video autoencoder.

Public layout (channels-last):
  video  (B, T, H, W, 3), values in [-1, 1]; T = 1 or a multiple of `time_compression_ratio` (4)
  z      (B, T/4, H/32, W/32, 128) for the released model: raw latents (no KL, no quant conv), divided by
         `scaling_factor` when the config sets one (decode multiplies it back)

Architecture (reference `opensora/models/dc_ae/models/dc_ae.py`, all 3D, zero "same" padding, non-causal):
  encoder  project_in (3×3×3 conv) → stages 0..n-1, each = `depth` blocks then (except the last stage) a
           downsample block → project_out (3×3×3 conv, plus a channel-averaging shortcut)
  decoder  project_in (3×3×3 conv, plus a channel-duplicating shortcut) → stages n-1..0 (stored by index,
           run in reverse), each = (except the last stage) an upsample block, then `depth` blocks →
           project_out (RMSNorm → ReLU → 3×3×3 conv)
  blocks   ResBlock: x + conv2(silu(conv1(x))) (conv2 without bias, followed by RMSNorm);
           EViTS5_GLU / EViT_GLU: x + LiteMLA(x), then x + GLUMBConv(x)
  LiteMLA  qkv 1×1×1 conv → [qkv, grouped-1×1×1(depthwise-5×5×5(qkv))] → per group of (q, k, v) (head dim 32)
           ReLU linear attention over all T·H·W tokens, in float32: out = (v kᵀ) q / ((Σ k)ᵀ q + 1e-15)
           → proj 1×1×1 conv + RMSNorm
  GLUMBConv 1×1×1 conv to 8C (+bias, SiLU) → depthwise 3×3×3 (+bias) → x·SiLU(gate) → 1×1×1 to C + RMSNorm
  down     3×3×3 conv, stride (1,2,2) or (2,2,2), + shortcut: pixel-unshuffle (per frame, or 3D when the
           stage is temporal and T ≠ 1) then the mean of each group of consecutive channels
  up       nearest ×2 (T too when temporal and T ≠ 1) then 3×3×3 conv, + shortcut: every channel repeated
           (repeat-interleave) then pixel-shuffle (2D or 3D)
  RMSNorm  over channels, statistics in float32, eps 1e-5, weight and bias
Pixel-(un)shuffle channel order: channel-major, then (rt, rh, rw) (`pixel_shuffle`, `pixel_unshuffle` below).

Tiling (as the reference's `encode`/`decode`): temporal tiles first (when on and T exceeds the temporal tile),
spatial tiles inside each temporal tile (when on and H or W exceeds the spatial tile), each tile run on its own
and blended linearly with its upper/left/previous neighbour (already blended), then cropped. Tile sizes in the
input's units and the blend widths / crop limits in the output's units; note the reference's quirk: the
*latent* tile sizes come from the config (`spatial_tile_latent_size`, `temporal_tile_latent_size`), the
pixel ones may have been overridden by `DC_AE(...)` kwargs; `DCAEConfig.from_reference` keeps both.

Work items (one video of the batch, or one tile of one video) are independent: each runs through a program
compiled once per item shape (whatever the video's size or batch), one item per device at a time, so peak memory
is one tile's working set (plus the tile outputs awaiting blending and the result). On a mesh (`mesh=` or an
active `sharding_context`) the items are spread over every device (`sharded_item_map`); results equal the
one-device ones. `encode`/`decode` may also be traced inside a caller's jit (the per-item programs are inlined).

Knobs: `DEPTHWISE_IMPL` (depthwise convolutions as shifted sums on CPU, grouped convolutions elsewhere) and
`COMPILER_OPTIONS` (XLA options of the per-item programs). `random_model` gives host-random weights without
compiling initialisers (tests, benchmarks); `build` follows the reference's init.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opensora_jax.errors import UserError
from opensora_jax.models.layers import param
from opensora_jax.models.vae.layers import item_devices, sharded_item_map

# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------

BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")
_BLOCK_SCALES = {"EViT_GLU": (), "EViTS5_GLU": (5,)}  # LiteMLA multi-scale aggregation kernels per block type
ACTIVATIONS = ("relu", "relu6", "hswish", "silu", "gelu")
NORMS = ("rms3d",)
HEAD_DIM = 32  # EfficientViT block: LiteMLA head dimension
EXPAND_RATIO = 4  # EfficientViT block: GLUMBConv expansion
RMS_EPS = 1e-5
ATTN_EPS = 1e-15

# The reference DCAEConfig / EncoderConfig / DecoderConfig defaults (OmegaConf.structured fills missing keys with
# them; encoder/decoder in_channels and latent_channels follow the top level).
_REFERENCE_ENCODER_DEFAULTS: dict[str, Any] = {
    "in_channels": None, "latent_channels": None,
    "width_list": [128, 256, 512, 512, 1024, 1024], "depth_list": [2, 2, 2, 2, 2, 2],
    "block_type": "ResBlock", "norm": "rms2d", "act": "silu",
    "downsample_block_type": "ConvPixelUnshuffle", "downsample_match_channel": True,
    "downsample_shortcut": "averaging", "out_norm": None, "out_act": None, "out_shortcut": "averaging",
    "double_latent": False, "is_video": False, "temporal_downsample": [],
}
_REFERENCE_DECODER_DEFAULTS: dict[str, Any] = {
    "in_channels": None, "latent_channels": None, "in_shortcut": "duplicating",
    "width_list": [128, 256, 512, 512, 1024, 1024], "depth_list": [2, 2, 2, 2, 2, 2],
    "block_type": "ResBlock", "norm": "rms2d", "act": "silu",
    "upsample_block_type": "ConvPixelShuffle", "upsample_match_channel": True, "upsample_shortcut": "duplicating",
    "out_norm": "rms2d", "out_act": "relu", "is_video": False, "temporal_upsample": [],
}
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "latent_channels": 32, "time_compression_ratio": 1, "spatial_compression_ratio": 32,
    "encoder": _REFERENCE_ENCODER_DEFAULTS, "decoder": _REFERENCE_DECODER_DEFAULTS,
    "use_quant_conv": False, "pretrained_path": None, "pretrained_source": "dc-ae", "scaling_factor": None,
    "is_image_model": False, "is_training": False, "use_spatial_tiling": False, "use_temporal_tiling": False,
    "spatial_tile_size": 256, "temporal_tile_size": 32, "tile_overlap_factor": 0.25,
}
# Ours, beside the reference fields: the latent tile sizes (default: pixel tile size // compression ratio).
_EXTRA_FIELDS = ("spatial_tile_latent_size", "temporal_tile_latent_size")

# `DC_AE(model_name, ...)` keyword arguments: these change the built model's behaviour ...
_DC_AE_KWARGS = ("use_spatial_tiling", "use_temporal_tiling", "spatial_tile_size", "temporal_tile_size",
                 "tile_overlap_factor", "scaling_factor", "is_training")
# ... and these only say where the weights are and how to place them.
_DC_AE_IGNORED = ("type", "model_name", "device_map", "torch_dtype", "from_scratch", "from_pretrained",
                  "disc_off_grad_ckpt")

# `dc_ae_f32("dc-ae-f32t4c128")` fully resolved, as DCAE_HF builds it (tiling off): the released architecture.
_F32T4C128_RESOLVED: dict[str, Any] = {
    "in_channels": 3, "latent_channels": 128, "time_compression_ratio": 4, "spatial_compression_ratio": 32,
    "encoder": {
        "in_channels": 3, "latent_channels": 128, "width_list": [128, 256, 512, 512, 1024, 1024],
        "depth_list": [2, 2, 2, 3, 3, 3], "block_type": ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3,
        "norm": "rms3d", "act": "silu", "downsample_block_type": "Conv", "downsample_match_channel": True,
        "downsample_shortcut": "averaging", "out_norm": None, "out_act": None, "out_shortcut": "averaging",
        "double_latent": False, "is_video": True, "temporal_downsample": [False, False, False, True, True, False],
    },
    "decoder": {
        "in_channels": 3, "latent_channels": 128, "in_shortcut": "duplicating",
        "width_list": [128, 256, 512, 512, 1024, 1024], "depth_list": [3, 3, 3, 3, 3, 3],
        "block_type": ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3, "norm": "rms3d", "act": "silu",
        "upsample_block_type": "InterpolateConv", "upsample_match_channel": True,
        "upsample_shortcut": "duplicating", "out_norm": "rms3d", "out_act": "relu", "is_video": True,
        "temporal_upsample": [False, False, False, True, True, False],
    },
    "use_quant_conv": False, "pretrained_path": None, "pretrained_source": "dc-ae", "scaling_factor": None,
    "is_image_model": False, "is_training": False, "use_spatial_tiling": False, "use_temporal_tiling": False,
    "spatial_tile_size": 256, "temporal_tile_size": 32, "tile_overlap_factor": 0.25,
}

# Released configurations with Open-Sora 2.0's inference settings (configs/vae/inference/video_dc_ae.py and
# configs/diffusion/inference/high_compression.py): spatial 256 px and temporal 32-frame tiles, overlap 0.25,
# both on; raw latents (no scaling_factor).
PRESETS: dict[str, dict[str, Any]] = {
    "dc-ae-f32t4c128": {**_F32T4C128_RESOLVED, "use_spatial_tiling": True, "use_temporal_tiling": True},
}


def _tuple(value, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise UserError(f"DC-AE config: {what} must be a list, got {value!r}")


def _str_or_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class DCAEEncoderConfig:
    """The reference `EncoderConfig` (resolved). Defaults: the released dc-ae-f32t4c128 encoder."""

    in_channels: int = 3
    latent_channels: int = 128
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    block_type: str | tuple[str, ...] = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    norm: str | None = "rms3d"
    act: str | None = "silu"
    downsample_block_type: str = "Conv"
    downsample_match_channel: bool = True
    downsample_shortcut: str | None = "averaging"
    out_norm: str | None = None
    out_act: str | None = None
    out_shortcut: str | None = "averaging"
    double_latent: bool = False
    is_video: bool = True
    temporal_downsample: tuple[bool, ...] = (False, False, False, True, True, False)

    def block_at(self, stage: int) -> str:
        return self.block_type[stage] if isinstance(self.block_type, tuple) else self.block_type

    def temporal_at(self, stage: int) -> bool:
        return bool(self.temporal_downsample[stage]) if self.temporal_downsample else False


@dataclasses.dataclass(frozen=True)
class DCAEDecoderConfig:
    """The reference `DecoderConfig` (resolved). `norm` and `act` may be per stage. Defaults: dc-ae-f32t4c128."""

    in_channels: int = 3
    latent_channels: int = 128
    in_shortcut: str | None = "duplicating"
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    block_type: str | tuple[str, ...] = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    norm: str | None | tuple[str | None, ...] = "rms3d"
    act: str | None | tuple[str | None, ...] = "silu"
    upsample_block_type: str = "InterpolateConv"
    upsample_match_channel: bool = True
    upsample_shortcut: str | None = "duplicating"
    out_norm: str | None = "rms3d"
    out_act: str | None = "relu"
    is_video: bool = True
    temporal_upsample: tuple[bool, ...] = (False, False, False, True, True, False)

    def block_at(self, stage: int) -> str:
        return self.block_type[stage] if isinstance(self.block_type, tuple) else self.block_type

    def norm_at(self, stage: int):
        return self.norm[stage] if isinstance(self.norm, tuple) else self.norm

    def act_at(self, stage: int):
        return self.act[stage] if isinstance(self.act, tuple) else self.act

    def temporal_at(self, stage: int) -> bool:
        return bool(self.temporal_upsample[stage]) if self.temporal_upsample else False


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """The reference `DCAEConfig`, resolved, with what `DC_AE(...)` applies on top (tiling, scaling_factor).

    Defaults: dc-ae-f32t4c128 with the inference settings (`PRESETS["dc-ae-f32t4c128"]`).
    Tile sizes: `spatial_tile_size` (px) and `temporal_tile_size` (frames) are the input-side tiles of `encode`;
    `spatial_tile_latent_size` / `temporal_tile_latent_size` (None: pixel size // compression ratio) are the
    input-side tiles of `decode` and set the encode's blend widths and crops (the reference's quirk, see the
    module doc). `tile_overlap_factor` sets strides (tile·(1−f)) and blend widths (tile·f). `scaling_factor`:
    None = raw latents. `is_training` (reference semantics): no scaling at all.
    """

    in_channels: int = 3
    latent_channels: int = 128
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 32
    encoder: DCAEEncoderConfig = DCAEEncoderConfig()
    decoder: DCAEDecoderConfig = DCAEDecoderConfig()
    use_quant_conv: bool = False
    pretrained_path: str | None = None
    pretrained_source: str = "dc-ae"
    scaling_factor: float | None = None
    is_image_model: bool = False
    is_training: bool = False
    use_spatial_tiling: bool = True
    use_temporal_tiling: bool = True
    spatial_tile_size: int = 256
    temporal_tile_size: int = 32
    tile_overlap_factor: float = 0.25
    spatial_tile_latent_size: int | None = None
    temporal_tile_latent_size: int | None = None

    # -------------------------------------------------------------------- parsing

    @classmethod
    def from_reference(cls, config: Mapping[str, Any] | "DCAEConfig") -> "DCAEConfig":
        """A config from any of the reference's spellings; unknown keys raise a `UserError` naming them.

        Accepted: a fixture case's `config` ({"resolved": <resolved DCAEConfig>, "dotlist": [...], "tiling":
        {DC_AE kwargs}}, the dotlist used only without "resolved", applied over the reference defaults); a flat
        resolved DCAEConfig dict (e.g. a manifest's, or `to_dict()`'s); or `DC_AE(...)` kwargs with a
        `model_name` (the preset, inference settings, with the kwargs applied). DC_AE kwargs override the pixel
        tile sizes only; the latent tile sizes stay the config's (the reference's quirk).
        """
        if isinstance(config, DCAEConfig):
            return config
        if not isinstance(config, Mapping):
            raise UserError(f"DC-AE config must be a mapping, got {type(config).__name__}")
        config = dict(config)
        case_keys = {"resolved", "dotlist", "tiling"}
        if case_keys & set(config):
            unknown = sorted(set(config) - case_keys)
            if unknown:
                raise UserError(f"unknown DC-AE config keys: {unknown} (a case config holds {sorted(case_keys)})")
            if config.get("resolved") is not None:
                base = _resolve(config["resolved"])
            elif config.get("dotlist") is not None:
                base = _resolve(_parse_dotlist(config["dotlist"]))
            else:
                raise UserError("DC-AE config: needs 'resolved' (a resolved DCAEConfig) or a 'dotlist'")
            kwargs = config.get("tiling") or {}
        elif "model_name" in config:
            name = config["model_name"]
            if name not in PRESETS:
                raise UserError(f"unknown DC-AE model_name {name!r}; choose one of {sorted(PRESETS)}")
            base = _resolve(PRESETS[name])
            kwargs = config
        else:
            base, kwargs = _resolve(config), {}
        if not isinstance(kwargs, Mapping):
            raise UserError(f"DC-AE config: 'tiling' must be a mapping of DC_AE kwargs, got {kwargs!r}")
        unknown = sorted(set(kwargs) - set(_DC_AE_KWARGS) - set(_DC_AE_IGNORED))
        if unknown:
            raise UserError(f"unknown DC-AE kwargs: {unknown} (known: {sorted(_DC_AE_KWARGS)})")
        cfg = _build_config(base, {k: v for k, v in kwargs.items() if k in _DC_AE_KWARGS})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A flat resolved dict (JSON-serialisable) that `from_reference` reads back into this config."""

        def plain(v):
            return [plain(x) for x in v] if isinstance(v, tuple) else v

        out = {k: plain(v) for k, v in dataclasses.asdict(self).items() if k not in ("encoder", "decoder")}
        out["encoder"] = {k: plain(v) for k, v in dataclasses.asdict(self.encoder).items()}
        out["decoder"] = {k: plain(v) for k, v in dataclasses.asdict(self.decoder).items()}
        out["spatial_tile_latent_size"] = self.spatial_latent_tile
        out["temporal_tile_latent_size"] = self.temporal_latent_tile
        return out

    # -------------------------------------------------------------------- derived sizes

    @property
    def spatial_latent_tile(self) -> int:
        if self.spatial_tile_latent_size is not None:
            return int(self.spatial_tile_latent_size)
        return self.spatial_tile_size // self.spatial_compression_ratio

    @property
    def temporal_latent_tile(self) -> int:
        if self.temporal_tile_latent_size is not None:
            return int(self.temporal_tile_latent_size)
        return self.temporal_tile_size // self.time_compression_ratio

    def encoder_factors(self) -> tuple[int, int]:
        """(temporal, spatial) downsampling of the encoder as built (2 per temporal / downsampling stage)."""
        e = self.encoder
        down = [s for s in range(len(e.width_list) - 1) if e.depth_list[s] > 0]
        return 2 ** sum(e.temporal_at(s) for s in down), 2 ** len(down)

    def decoder_factors(self) -> tuple[int, int]:
        """(temporal, spatial) upsampling of the decoder as built."""
        d = self.decoder
        up = [s for s in range(len(d.width_list) - 1) if d.depth_list[s] > 0]
        return 2 ** sum(d.temporal_at(s) for s in up), 2 ** len(up)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of an untiled encode (tiled: the same whenever the pixel and latent tile sizes agree)."""
        _, fs = self.encoder_factors()
        return _down_frames(num_frames, self.encoder), height // fs, width // fs

    # -------------------------------------------------------------------- checks

    def validate(self) -> None:
        """Raises `UserError` for anything the port (or the reference, for video) cannot build or run."""
        problems: list[str] = []
        e, d = self.encoder, self.decoder
        for name in ("in_channels", "latent_channels", "time_compression_ratio", "spatial_compression_ratio",
                     "spatial_tile_size", "temporal_tile_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= float(self.tile_overlap_factor) < 1.0:
            problems.append(f"tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor}")
        if self.spatial_latent_tile < 1 or self.temporal_latent_tile < 1:
            problems.append(
                f"latent tile sizes must be positive: spatial {self.spatial_latent_tile}, temporal "
                f"{self.temporal_latent_tile} (spatial_tile_size {self.spatial_tile_size} // "
                f"{self.spatial_compression_ratio}, temporal_tile_size {self.temporal_tile_size} // "
                f"{self.time_compression_ratio})")
        if self.scaling_factor is not None and float(self.scaling_factor) == 0.0:
            problems.append("scaling_factor must be non-zero (or None for raw latents)")
        for part, c in (("encoder", e), ("decoder", d)):
            n = len(c.width_list)
            if n < 1 or len(c.depth_list) != n:
                problems.append(f"{part}: width_list {list(c.width_list)} and depth_list {list(c.depth_list)} "
                                "must be non-empty and of equal length")
                continue
            if not c.is_video:
                problems.append(f"{part}.is_video must be True (only the video DC-AE is ported)")
            if c.depth_list[0] < 1:
                problems.append(f"{part}.depth_list[0] must be positive (a stride-2 project layer is not supported "
                                "for video)")
            if isinstance(c.block_type, tuple) and len(c.block_type) != n:
                problems.append(f"{part}.block_type has {len(c.block_type)} entries for {n} stages")
            else:
                for s in range(n):
                    if c.depth_list[s] > 0 and c.block_at(s) not in BLOCK_TYPES:
                        problems.append(f"{part}.block_type {c.block_at(s)!r} is not one of {BLOCK_TYPES}")
            temporal = c.temporal_downsample if part == "encoder" else c.temporal_upsample
            if temporal and len(temporal) < n - 1:
                problems.append(f"{part}: temporal flags {list(temporal)} must cover the first {n - 1} stages")
        if problems:
            raise UserError("invalid DC-AE config:\n" + "\n".join(f"  - {p}" for p in problems))

        if e.downsample_block_type != "Conv":
            problems.append(f"encoder.downsample_block_type {e.downsample_block_type!r}: only 'Conv' exists for video")
        if d.upsample_block_type != "InterpolateConv":
            problems.append(f"decoder.upsample_block_type {d.upsample_block_type!r}: only 'InterpolateConv' exists "
                            "for video")
        for name, value, allowed in (
            ("encoder.downsample_shortcut", e.downsample_shortcut, ("averaging", None)),
            ("encoder.out_shortcut", e.out_shortcut, ("averaging", None)),
            ("decoder.upsample_shortcut", d.upsample_shortcut, ("duplicating", None)),
            ("decoder.in_shortcut", d.in_shortcut, ("duplicating", None)),
        ):
            if value not in allowed:
                problems.append(f"{name} {value!r} is not one of {list(allowed)}")
        if e.out_norm is not None:
            problems.append(f"encoder.out_norm {e.out_norm!r}: the reference cannot build it (no width is passed); "
                            "use null")
        norms = [("encoder.norm", e.norm), ("decoder.out_norm", d.out_norm)]
        norms += [(f"decoder.norm[{s}]", d.norm_at(s)) for s in range(len(d.width_list))]
        for name, value in norms:
            if value is not None and value not in NORMS:
                problems.append(f"{name} {value!r}: only {list(NORMS)} (or null) is supported for video")
        acts = [("encoder.act", e.act), ("encoder.out_act", e.out_act), ("decoder.out_act", d.out_act)]
        acts += [(f"decoder.act[{s}]", d.act_at(s)) for s in range(len(d.width_list))]
        for name, value in acts:
            if value is not None and value not in ACTIVATIONS:
                problems.append(f"{name} {value!r} is not one of {list(ACTIVATIONS)} (or null)")
        if isinstance(d.norm, tuple) and len(d.norm) != len(d.width_list):
            problems.append(f"decoder.norm has {len(d.norm)} entries for {len(d.width_list)} stages")
        if isinstance(d.act, tuple) and len(d.act) != len(d.width_list):
            problems.append(f"decoder.act has {len(d.act)} entries for {len(d.width_list)} stages")
        problems += _channel_flow_problems(self)
        if problems:
            raise UserError("invalid DC-AE config:\n" + "\n".join(f"  - {p}" for p in problems))


def _down_frames(t: int, enc: DCAEEncoderConfig) -> int:
    for s in range(len(enc.width_list) - 1):
        if enc.depth_list[s] > 0 and enc.temporal_at(s) and t != 1:
            t //= 2
    return t


def _channel_flow_problems(cfg: DCAEConfig) -> list[str]:
    """Follows the channel count through both networks; every place the reference would fail is reported."""
    problems = []
    e, d = cfg.encoder, cfg.decoder
    n = len(e.width_list)
    w = e.width_list
    c = w[0]
    for s in range(n):
        for j in range(e.depth_list[s]):
            problems += _block_problems(f"encoder stage {s} block {j}", e.block_at(s), c, w[s])
            c = w[s]
        if s < n - 1 and e.depth_list[s] > 0:
            out = w[s + 1] if e.downsample_match_channel else w[s]
            r = 8 if e.temporal_at(s) else 4
            if e.downsample_shortcut and (c * r) % out:
                problems.append(f"encoder stage {s} downsample shortcut: {c}×{r} channels do not average into {out}")
            c = out
    out_c = 2 * e.latent_channels if e.double_latent else e.latent_channels
    if e.out_shortcut and c % out_c:
        problems.append(f"encoder project_out shortcut: {c} channels do not average into {out_c}")

    n = len(d.width_list)
    w = d.width_list
    c = w[-1]
    if d.in_shortcut and c % d.latent_channels:
        problems.append(f"decoder project_in shortcut: {d.latent_channels} channels do not duplicate into {c}")
    for s in reversed(range(n)):
        if s < n - 1 and d.depth_list[s] > 0:
            if c != w[s + 1]:
                problems.append(f"decoder stage {s} upsample expects {w[s + 1]} channels, gets {c}")
            out = w[s] if d.upsample_match_channel else w[s + 1]
            r = 8 if d.temporal_at(s) else 4
            if d.upsample_shortcut and any((out * k) % w[s + 1] for k in {r, 4}):
                problems.append(f"decoder stage {s} upsample shortcut: {w[s + 1]} channels do not duplicate into "
                                f"{out}×{r}")
            c = out
        for j in range(d.depth_list[s]):
            problems += _block_problems(f"decoder stage {s} block {j}", d.block_at(s), c, w[s])
            c = w[s]
    if c != w[0]:
        problems.append(f"decoder project_out expects {w[0]} channels, gets {c}")
    if cfg.encoder.latent_channels != cfg.latent_channels or cfg.decoder.latent_channels != cfg.latent_channels:
        problems.append(f"encoder/decoder latent_channels ({cfg.encoder.latent_channels}, "
                        f"{cfg.decoder.latent_channels}) must equal latent_channels {cfg.latent_channels}")
    return problems


def _block_problems(where: str, block: str, cin: int, width: int) -> list[str]:
    if cin != width:
        return [f"{where} ({block}) needs {width} input channels, gets {cin}"]
    if block in _BLOCK_SCALES and width // HEAD_DIM < 1:
        return [f"{where} ({block}) needs at least {HEAD_DIM} channels (one attention head), has {width}"]
    return []


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flat reference-style dict merged over the reference defaults; unknown keys raise, naming them."""
    if not isinstance(config, Mapping):
        raise UserError(f"DC-AE config: expected a mapping, got {config!r}")
    known = set(_REFERENCE_DEFAULTS) | set(_EXTRA_FIELDS)
    unknown = sorted(set(config) - known)
    problems = [f"unknown DC-AE config keys: {unknown}"] if unknown else []
    out = {**_REFERENCE_DEFAULTS, "spatial_tile_latent_size": None, "temporal_tile_latent_size": None}
    out.update({k: v for k, v in config.items() if k in known and k not in ("encoder", "decoder")})
    for part, defaults in (("encoder", _REFERENCE_ENCODER_DEFAULTS), ("decoder", _REFERENCE_DECODER_DEFAULTS)):
        sub = config.get(part) or {}
        if not isinstance(sub, Mapping):
            raise UserError(f"DC-AE config: {part} must be a mapping, got {sub!r}")
        bad = sorted(set(sub) - set(defaults))
        if bad:
            problems.append(f"unknown DC-AE {part} config keys: {bad}")
        merged = {**defaults, **sub}
        for key in ("in_channels", "latent_channels"):
            if merged[key] is None or (isinstance(merged[key], str) and merged[key].startswith("${")):
                merged[key] = out[key]
        out[part] = merged
    if problems:
        raise UserError("; ".join(problems))
    return out


def _build_config(base: Mapping[str, Any], kwargs: Mapping[str, Any]) -> DCAEConfig:
    """DCAEConfig from a resolved dict plus DC_AE kwargs (which set pixel tile sizes only: the quirk)."""
    try:
        e, d = base["encoder"], base["decoder"]
        enc = DCAEEncoderConfig(
            in_channels=int(e["in_channels"]), latent_channels=int(e["latent_channels"]),
            width_list=tuple(int(x) for x in _tuple(e["width_list"], "encoder.width_list")),
            depth_list=tuple(int(x) for x in _tuple(e["depth_list"], "encoder.depth_list")),
            block_type=_str_or_tuple(e["block_type"]), norm=e["norm"], act=e["act"],
            downsample_block_type=e["downsample_block_type"],
            downsample_match_channel=bool(e["downsample_match_channel"]),
            downsample_shortcut=e["downsample_shortcut"], out_norm=e["out_norm"], out_act=e["out_act"],
            out_shortcut=e["out_shortcut"], double_latent=bool(e["double_latent"]), is_video=bool(e["is_video"]),
            temporal_downsample=tuple(bool(x) for x in _tuple(e["temporal_downsample"] or [],
                                                              "encoder.temporal_downsample")),
        )
        dec = DCAEDecoderConfig(
            in_channels=int(d["in_channels"]), latent_channels=int(d["latent_channels"]),
            in_shortcut=d["in_shortcut"],
            width_list=tuple(int(x) for x in _tuple(d["width_list"], "decoder.width_list")),
            depth_list=tuple(int(x) for x in _tuple(d["depth_list"], "decoder.depth_list")),
            block_type=_str_or_tuple(d["block_type"]), norm=_str_or_tuple(d["norm"]), act=_str_or_tuple(d["act"]),
            upsample_block_type=d["upsample_block_type"], upsample_match_channel=bool(d["upsample_match_channel"]),
            upsample_shortcut=d["upsample_shortcut"], out_norm=d["out_norm"], out_act=d["out_act"],
            is_video=bool(d["is_video"]),
            temporal_upsample=tuple(bool(x) for x in _tuple(d["temporal_upsample"] or [],
                                                            "decoder.temporal_upsample")),
        )
        sc, tc = int(base["spatial_compression_ratio"]), int(base["time_compression_ratio"])
        if sc < 1 or tc < 1:
            raise UserError(f"DC-AE compression ratios must be positive, got spatial {sc}, time {tc}")
        # The latent tile sizes are fixed by the config, before any DC_AE kwarg changes the pixel ones.
        s_lat = base.get("spatial_tile_latent_size")
        t_lat = base.get("temporal_tile_latent_size")
        s_lat = int(base["spatial_tile_size"]) // sc if s_lat is None else int(s_lat)
        t_lat = int(base["temporal_tile_size"]) // tc if t_lat is None else int(t_lat)
        merged = {**base, **{k: v for k, v in kwargs.items() if not (k == "scaling_factor" and v is None)}}
        scaling = merged["scaling_factor"]
        return DCAEConfig(
            in_channels=int(base["in_channels"]), latent_channels=int(base["latent_channels"]),
            time_compression_ratio=tc, spatial_compression_ratio=sc, encoder=enc, decoder=dec,
            use_quant_conv=bool(base["use_quant_conv"]), pretrained_path=base["pretrained_path"],
            pretrained_source=str(base["pretrained_source"]),
            scaling_factor=None if scaling is None else float(scaling),
            is_image_model=bool(base["is_image_model"]), is_training=bool(merged["is_training"]),
            use_spatial_tiling=bool(merged["use_spatial_tiling"]),
            use_temporal_tiling=bool(merged["use_temporal_tiling"]),
            spatial_tile_size=int(merged["spatial_tile_size"]), temporal_tile_size=int(merged["temporal_tile_size"]),
            tile_overlap_factor=float(merged["tile_overlap_factor"]),
            spatial_tile_latent_size=s_lat, temporal_tile_latent_size=t_lat,
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"invalid DC-AE config value: {err}") from None


def _parse_scalar(text: str):
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def _parse_dotlist(dotlist: Sequence[str]) -> dict[str, Any]:
    """OmegaConf-style `a.b=value` items ([x,y] lists, true/false, null, numbers) over the reference defaults."""
    if isinstance(dotlist, str) or not isinstance(dotlist, Sequence):
        raise UserError(f"DC-AE dotlist must be a list of 'key=value' strings, got {dotlist!r}")
    out = json_copy(_REFERENCE_DEFAULTS)
    for item in dotlist:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"DC-AE dotlist item {item!r} is not of the form key=value")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            inner = value[1:-1].strip()
            parsed = [_parse_scalar(v) for v in inner.split(",")] if inner else []
        else:
            parsed = _parse_scalar(value)
        *parents, leaf = key.strip().split(".")
        target = out
        for p in parents:
            if not isinstance(target.get(p), dict):
                raise UserError(f"unknown DC-AE config key {key.strip()!r} in the dotlist")
            target = target[p]
        if leaf not in target:
            raise UserError(f"unknown DC-AE config key {key.strip()!r} in the dotlist")
        target[leaf] = parsed
    return out


def json_copy(value):
    """A deep copy of nested dicts/lists (the defaults tables are never mutated)."""
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def preset(name: str = "dc-ae-f32t4c128", **overrides) -> DCAEConfig:
    """A released configuration (inference settings) with top-level fields replaced by `overrides`."""
    if name not in PRESETS:
        raise UserError(f"unknown DC-AE preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = DCAEConfig.from_reference(PRESETS[name])
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------------------------
# Shuffles and shortcuts (channels-last, (N, T, H, W, C))
# ------------------------------------------------------------------------------------------------------------


def pixel_unshuffle(x: jax.Array, factor: int, temporal: bool) -> jax.Array:
    """(N, T, H, W, C) → (N, T/r, H/r, W/r, C·r³) (3D) or (N, T, H/r, W/r, C·r²) (per frame).

    Output channel = c·r³ + rt·r² + rh·r + rw (3D) or c·r² + rh·r + rw: channel-major, like
    `torch.nn.functional.pixel_unshuffle` and the reference's `pixel_unshuffle_3d`.
    """
    r = factor
    n, t, h, w, c = x.shape
    if r == 1:
        return x
    if temporal:
        x = x.reshape(n, t // r, r, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(n, t // r, h // r, w // r, c * r**3)
    x = x.reshape(n, t, h // r, r, w // r, r, c).transpose(0, 1, 2, 4, 6, 3, 5)
    return x.reshape(n, t, h // r, w // r, c * r**2)


def pixel_shuffle(x: jax.Array, factor: int, temporal: bool) -> jax.Array:
    """The inverse of `pixel_unshuffle`: (N, T, H, W, C·r³) → (N, T·r, H·r, W·r, C) (3D), or per frame."""
    r = factor
    n, t, h, w, cc = x.shape
    if r == 1:
        return x
    if temporal:
        c = cc // r**3
        x = x.reshape(n, t, h, w, c, r, r, r).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(n, t * r, h * r, w * r, c)
    c = cc // r**2
    x = x.reshape(n, t, h, w, c, r, r).transpose(0, 1, 2, 5, 3, 6, 4)
    return x.reshape(n, t, h * r, w * r, c)


def _activation(name: str | None):
    return {
        None: lambda x: x,
        "relu": jax.nn.relu,
        "relu6": jax.nn.relu6,
        "hswish": jax.nn.hard_swish,
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------

# The reference initialises every conv weight and norm weight with trunc_normal(std 0.02, bounds ±2: i.e. ±100 std,
# a plain normal), biases with zeros.
_weight_init = nnx.initializers.normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()


class Conv3d(nnx.Module):
    """Channels-last 3D convolution with zero "same" padding (k//2 on every side), optional stride and groups.

    Kernel (k, k, k, C_in/groups, C_out) (the converter transposes PyTorch's [C_out, C_in/groups, k, k, k]).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs,
                 stride: Sequence[int] = (1, 1, 1), groups: int = 1, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv3d: {in_channels}→{out_channels} channels do not split into {groups} groups")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.groups = int(kernel_size), int(groups)
        self.strides = tuple(int(s) for s in stride)
        self.dtype = dtype
        k = self.kernel_size
        self.kernel = param(rngs, _weight_init, (k, k, k, in_channels // groups, out_channels),
                            (None, None, None, "conv_in", "conv_out"), param_dtype)
        self.bias = param(rngs, _zeros, (out_channels,), ("conv_out",), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        k, g = self.kernel_size, self.groups
        if k == 1 and self.strides == (1, 1, 1):  # pointwise: a (grouped) matmul over channels
            if g == 1:
                y = jnp.einsum("...i,io->...o", x, w.reshape(w.shape[-2:]))
            else:
                cin, cout = self.in_channels // g, self.out_channels // g
                xg = x.reshape(-1, g, cin).transpose(1, 0, 2)  # (G, M, cin): a batched matmul per group
                wg = w.reshape(cin, g, cout).transpose(1, 0, 2)
                y = jnp.matmul(xg, wg).transpose(1, 0, 2).reshape(x.shape[:-1] + (self.out_channels,))
        elif self.strides == (1, 1, 1) and g == self.in_channels == self.out_channels and _depthwise_as_taps(x.size):
            y = depthwise_taps(x, w)
        else:
            p = k // 2
            y = jax.lax.conv_general_dilated(
                x, w, window_strides=self.strides, padding=((p, p),) * 3,
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=g)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _depthwise_as_taps(numel: int) -> bool:
    """Depthwise convolutions as sums of shifted products on CPU for large inputs, where XLA's grouped convolution
    is ~100× slower (small ones stay convolutions: they compile faster and run fast enough); as grouped
    convolutions (cuDNN) elsewhere. `DEPTHWISE_IMPL` overrides: "taps" or "conv"."""
    if DEPTHWISE_IMPL != "auto":
        return DEPTHWISE_IMPL == "taps"
    return jax.default_backend() == "cpu" and numel >= TAPS_MIN_ELEMENTS


# "auto" (see `_depthwise_as_taps`), "taps" or "conv": how stride-1 depthwise convolutions run. Read when a program
# is traced (compiled programs keep the choice they were traced with).
DEPTHWISE_IMPL = "auto"
TAPS_MIN_ELEMENTS = 1 << 15


def depthwise_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 depthwise 3D convolution with zero "same" padding as Σ_taps shift(x)·w, accumulated in float32.

    x (N, T, H, W, C), kernel (k, k, k, 1, C); returns x's dtype. A loop over the k temporal taps, each adding
    its k² spatial taps (small programs that compile fast, one pass over the input per temporal tap).
    """
    k = kernel.shape[0]
    p = k // 2
    n, t, h, w, ch = x.shape
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    wf = kernel.astype(jnp.float32)[:, :, :, 0, :]

    def temporal_tap(a, acc):
        xa = jax.lax.dynamic_slice_in_dim(xp, a, t, axis=1)
        wa = jax.lax.dynamic_index_in_dim(wf, a, axis=0, keepdims=False)
        for b in range(k):
            for c in range(k):
                acc = acc + jax.lax.slice(xa, (0, 0, b, c, 0), (n, t, b + h, c + w, ch)) * wa[b, c]
        return acc

    out = jax.lax.fori_loop(0, k, temporal_tap, jnp.zeros((n, t, h, w, ch), jnp.float32))
    return out.astype(x.dtype)


class RMSNorm3d(nnx.Module):
    """x / sqrt(mean_c(x²) + eps) · weight + bias over the channel axis; statistics in float32."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.channels = channels
        self.dtype = dtype
        self.scale = param(rngs, _weight_init, (channels,), ("channels",), param_dtype)
        self.bias = param(rngs, _zeros, (channels,), ("channels",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + RMS_EPS)).astype(self.dtype)
        return y * self.scale[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class Act(nnx.Module):
    """A parameterless activation (a slot of the reference's OpSequential)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x):
        return _activation(self.name)(x)


class ConvLayer(nnx.Module):
    """The reference's ConvLayer: conv → optional RMSNorm → optional activation (`conv`, `norm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, kw: dict,
                 stride: Sequence[int] = (1, 1, 1), groups: int = 1, use_bias: bool = False,
                 norm: str | None = None, act: str | None = None):
        self.conv = Conv3d(in_channels, out_channels, kernel_size, stride=stride, groups=groups, use_bias=use_bias,
                           **kw)
        self.norm = RMSNorm3d(out_channels, **kw) if norm is not None else None
        self.act = act

    def __call__(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return _activation(self.act)(x)


class Sequential(nnx.Module):
    """The reference's OpSequential: `op_list` applied in order."""

    def __init__(self, ops: Sequence[nnx.Module]):
        self.op_list = nnx.List(list(ops))

    def __call__(self, x):
        for op in self.op_list:
            x = op(x)
        return x


class Identity(nnx.Module):
    def __call__(self, x):
        return x


class Residual(nnx.Module):
    """The reference's ResidualBlock: main(x) + shortcut(x) (the shortcuts have no parameters)."""

    def __init__(self, main: nnx.Module, shortcut: nnx.Module):
        self.main = main
        self.shortcut = shortcut

    def __call__(self, x):
        y = self.main(x)
        return y + self.shortcut(x).astype(y.dtype)


class PixelUnshuffleAverage(nnx.Module):
    """Downsample shortcut: pixel-unshuffle by `factor` (3D when `temporal` and T ≠ 1), then the mean of each
    group of consecutive channels down to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool, dtype=jnp.float32):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.factor, self.temporal, self.dtype = factor, temporal, dtype

    def __call__(self, x):
        x = pixel_unshuffle(x, self.factor, self.temporal and x.shape[1] != 1)
        group = x.shape[-1] // self.out_channels
        x = x.reshape(x.shape[:-1] + (self.out_channels, group)).astype(jnp.float32)
        return jnp.mean(x, axis=-1).astype(self.dtype)


class DuplicatePixelShuffle(nnx.Module):
    """Upsample shortcut: every channel repeated (repeat-interleave) to `out_channels`·r^k, then pixel-shuffle by
    `factor` (3D when `temporal` and T ≠ 1)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.factor, self.temporal = factor, temporal

    def __call__(self, x):
        temporal = self.temporal and x.shape[1] != 1
        repeats = self.out_channels * self.factor ** (3 if temporal else 2) // self.in_channels
        return pixel_shuffle(jnp.repeat(x, repeats, axis=-1), self.factor, temporal)


class InterpolateConv(nnx.Module):
    """Nearest ×factor upsampling (T too when `temporal` and T ≠ 1), then a 3×3×3 ConvLayer (`conv`)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, *, kw: dict, factor: int = 2):
        self.factor, self.temporal = factor, temporal
        self.conv = ConvLayer(in_channels, out_channels, 3, use_bias=True, kw=kw)

    def __call__(self, x):
        f = self.factor
        if self.temporal and x.shape[1] != 1:
            x = jnp.repeat(x, f, axis=1)
        x = jnp.repeat(jnp.repeat(x, f, axis=2), f, axis=3)
        return self.conv(x)


class ResBlockMain(nnx.Module):
    """conv1 (3×3×3, bias, act) → conv2 (3×3×3, no bias, norm)."""

    def __init__(self, channels: int, norm, act, *, kw: dict):
        self.conv1 = ConvLayer(channels, channels, 3, use_bias=True, act=act, kw=kw)
        self.conv2 = ConvLayer(channels, channels, 3, use_bias=False, norm=norm, kw=kw)

    def __call__(self, x):
        return self.conv2(self.conv1(x))


def relu_linear_attention(qkv: jax.Array, head_dim: int) -> jax.Array:
    """ReLU linear attention on channels-last (N, T, H, W, G·3·d) = G groups of (q, k, v), each d wide.

    Per group, over all T·H·W tokens, in float32, as the reference: q, k = relu(q), relu(k); v gets an extra row of
    ones; o = (v kᵀ) q, and out = o[:d] / (o[d] + 1e-15). Returns (N, T, H, W, G·d) float32, channel = group·d + i.
    """
    n, t, h, w, c = qkv.shape
    d = head_dim
    g = c // (3 * d)
    x = qkv.astype(jnp.float32).reshape(n, t * h * w, g, 3 * d).transpose(0, 2, 1, 3)  # (N, G, L, 3d)
    q, k, v = jax.nn.relu(x[..., :d]), jax.nn.relu(x[..., d:2 * d]), x[..., 2 * d:]
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    hi = jax.lax.Precision.HIGHEST
    kv = jnp.matmul(k.swapaxes(-1, -2), v, precision=hi)  # (N, G, d, d + 1)
    o = jnp.matmul(q, kv, precision=hi)  # (N, G, L, d + 1)
    out = o[..., :d] / (o[..., d:] + ATTN_EPS)
    return out.transpose(0, 2, 1, 3).reshape(n, t, h, w, g * d)


class LiteMLA(nnx.Module):
    """Multi-scale ReLU linear attention (`qkv`, `aggreg`, `proj`); heads = C // 32 of dim 32."""

    def __init__(self, channels: int, norm, scales: Sequence[int], *, kw: dict):
        heads = channels // HEAD_DIM
        total = heads * HEAD_DIM
        self.dtype = kw["dtype"]
        self.qkv = ConvLayer(channels, 3 * total, 1, use_bias=False, kw=kw)
        self.aggreg = nnx.List([
            nnx.List([Conv3d(3 * total, 3 * total, s, groups=3 * total, use_bias=False, **kw),
                      Conv3d(3 * total, 3 * total, 1, groups=3 * heads, use_bias=False, **kw)])
            for s in scales
        ])
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, use_bias=False, norm=norm, kw=kw)

    def __call__(self, x):
        qkv = self.qkv(x)
        parts = [qkv] + [pointwise(depthwise(qkv)) for depthwise, pointwise in self.aggreg]
        qkv = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else qkv
        return self.proj(relu_linear_attention(qkv, HEAD_DIM).astype(self.dtype))


class GLUMBConv(nnx.Module):
    """inverted_conv (1×1×1 → 2·mid, bias, act) → depth_conv (depthwise 3×3×3, bias) → x·act(gate) →
    point_conv (1×1×1 → C, no bias, norm)."""

    def __init__(self, channels: int, norm, act, *, kw: dict):
        mid = round(channels * EXPAND_RATIO)
        self.act = act
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, use_bias=True, act=act, kw=kw)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, use_bias=True, kw=kw)
        self.point_conv = ConvLayer(mid, channels, 1, use_bias=False, norm=norm, kw=kw)

    def __call__(self, x):
        x = self.depth_conv(self.inverted_conv(x))
        x, gate = jnp.split(x, 2, axis=-1)
        return self.point_conv(x * _activation(self.act)(gate))


class EfficientViTBlock(nnx.Module):
    """x + LiteMLA(x) (`context_module`), then x + GLUMBConv(x) (`local_module`)."""

    def __init__(self, channels: int, norm, act, scales, *, kw: dict):
        self.context_module = Residual(LiteMLA(channels, norm, scales, kw=kw), Identity())
        self.local_module = Residual(GLUMBConv(channels, norm, act, kw=kw), Identity())

    def __call__(self, x):
        return self.local_module(self.context_module(x))


def _block(block_type: str, channels: int, norm, act, kw: dict) -> nnx.Module:
    if block_type == "ResBlock":
        return Residual(ResBlockMain(channels, norm, act, kw=kw), Identity())
    return EfficientViTBlock(channels, norm, act, _BLOCK_SCALES[block_type], kw=kw)


# ------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ------------------------------------------------------------------------------------------------------------


class Encoder(nnx.Module):
    """project_in → stages (blocks, then a downsample except in the last stage) → project_out."""

    def __init__(self, cfg: DCAEEncoderConfig, *, kw: dict):
        w, n = cfg.width_list, len(cfg.width_list)
        self.project_in = ConvLayer(cfg.in_channels, w[0], 3, use_bias=True, kw=kw)
        stages = []
        for s in range(n):
            ops = [_block(cfg.block_at(s), w[s], cfg.norm, cfg.act, kw) for _ in range(cfg.depth_list[s])]
            if s < n - 1 and cfg.depth_list[s] > 0:
                out = w[s + 1] if cfg.downsample_match_channel else w[s]
                temporal = cfg.temporal_at(s)
                conv = ConvLayer(w[s], out, 3, stride=(2 if temporal else 1, 2, 2), use_bias=True, kw=kw)
                if cfg.downsample_shortcut is not None:
                    conv = Residual(conv, PixelUnshuffleAverage(w[s], out, 2, temporal, kw["dtype"]))
                ops.append(conv)
            stages.append(Sequential(ops))
        self.stages = nnx.List(stages)
        out_c = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        ops = ([Act(cfg.out_act)] if cfg.out_act is not None else [])
        ops.append(ConvLayer(w[-1], out_c, 3, use_bias=True, kw=kw))
        head = Sequential(ops)
        if cfg.out_shortcut is not None:
            head = Residual(head, PixelUnshuffleAverage(w[-1], out_c, 1, False, kw["dtype"]))
        self.project_out = head

    def __call__(self, x):
        x = self.project_in(x)
        for stage in self.stages:
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


class Decoder(nnx.Module):
    """project_in → stages n-1..0 (an upsample except in the last stage, then blocks) → project_out."""

    def __init__(self, cfg: DCAEDecoderConfig, *, kw: dict):
        w, n = cfg.width_list, len(cfg.width_list)
        head = ConvLayer(cfg.latent_channels, w[-1], 3, use_bias=True, kw=kw)
        if cfg.in_shortcut is not None:
            head = Residual(head, DuplicatePixelShuffle(cfg.latent_channels, w[-1], 1, False))
        self.project_in = head
        stages: list = [None] * n
        for s in reversed(range(n)):
            ops = []
            if s < n - 1 and cfg.depth_list[s] > 0:
                out = w[s] if cfg.upsample_match_channel else w[s + 1]
                temporal = cfg.temporal_at(s)
                up = InterpolateConv(w[s + 1], out, temporal, kw=kw)
                if cfg.upsample_shortcut is not None:
                    up = Residual(up, DuplicatePixelShuffle(w[s + 1], out, 2, temporal))
                ops.append(up)
            ops += [_block(cfg.block_at(s), w[s], cfg.norm_at(s), cfg.act_at(s), kw) for _ in range(cfg.depth_list[s])]
            stages[s] = Sequential(ops)
        self.stages = nnx.List(stages)
        ops = [RMSNorm3d(w[0], **kw)] if cfg.out_norm is not None else []
        ops += [Act(cfg.out_act)] if cfg.out_act is not None else []
        ops.append(ConvLayer(w[0], cfg.in_channels, 3, use_bias=True, kw=kw))
        self.project_out = Sequential(ops)

    def __call__(self, z):
        x = self.project_in(z)
        for stage in reversed(list(self.stages)):
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


# ------------------------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------------------------


class DCAE(nnx.Module):
    """Video DC-AE. Variables `encoder/...`, `decoder/...` named after the reference's state_dict keys.

    `encode(video)` / `decode(z)` tile as the config says (`tiled=` forces tiling on or off) and run every work
    item (one video, or one tile of one video) through a program compiled once per item shape.
    """

    def __init__(self, config: DCAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        self.dtype = jnp.dtype(dtype)
        kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(param_dtype))
        self.encoder = Encoder(config.encoder, kw=kw)
        self.decoder = Decoder(config.decoder, kw=kw)

    # ---------------------------------------------------------------- sizes and checks

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of `encode`'s output for a (T, H, W) video (see `DCAEConfig.latent_size`)."""
        return self.config.latent_size(num_frames, height, width)

    def _check(self, x, what: str, channels: int) -> None:
        shape = tuple(x.shape)
        hint = ""
        if len(shape) == 5 and shape[1] == channels and shape[-1] != channels:
            hint = " (it looks channels-first (B, C, T, H, W); move the channel axis last)"
        if len(shape) != 5 or shape[-1] != channels:
            raise UserError(f"DC-AE {what} expects (B, T, H, W, C) channels-last with C={channels}, got shape "
                            f"{shape}{hint}")
        if min(shape[:4]) < 1:
            raise UserError(f"DC-AE {what} needs a non-empty (B, T, H, W, C) array, got shape {shape}")

    def _check_item(self, shape: tuple[int, ...], what: str) -> None:
        """The shapes the encoder can take: T = 1 or a multiple of the time compression, H and W multiples of the
        spatial downsampling (every stage's shortcut pixel-unshuffles by 2)."""
        t, h, w = shape[:3]
        cfg = self.config
        ft, fs = cfg.encoder_factors()
        frames_ok = t == 1 or (t % cfg.time_compression_ratio == 0 and t % ft == 0)
        if not frames_ok:
            raise UserError(f"DC-AE encode: {what} has T={t} frames; T must be 1 or a multiple of the time "
                            f"compression {max(cfg.time_compression_ratio, ft)} (in (B, T, H, W, C))")
        if h % fs or w % fs:
            raise UserError(f"DC-AE encode: {what} is {h}x{w} pixels; H and W must be multiples of the spatial "
                            f"compression {fs} (in (B, T, H, W, C))")

    def _tiling(self, tiled) -> tuple[bool, bool]:
        if tiled is None:
            return self.config.use_temporal_tiling, self.config.use_spatial_tiling
        return bool(tiled), bool(tiled)

    # ---------------------------------------------------------------- per item (no tiling)

    def encode_items(self, x: jax.Array) -> jax.Array:
        """Encoder on N independent items (N, T, H, W, C) → latents (divided by scaling_factor when set)."""
        z = self.encoder(x.astype(self.dtype))
        cfg = self.config
        if cfg.scaling_factor is not None and not cfg.is_training:
            z = z / jnp.asarray(cfg.scaling_factor, z.dtype)
        return z

    def decode_items(self, z: jax.Array) -> jax.Array:
        """Decoder on N independent latents (multiplied by scaling_factor first when set)."""
        z = z.astype(self.dtype)
        cfg = self.config
        if cfg.scaling_factor is not None and not cfg.is_training:
            z = z * jnp.asarray(cfg.scaling_factor, z.dtype)
        return self.decoder(z)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, video: jax.Array, *, tiled: bool | None = None, mesh: Mesh | None = None) -> jax.Array:
        """Video (B, T, H, W, 3) → latent (B, T/4, H/32, W/32, 128) for the released model.

        `tiled`: None = the config's `use_temporal_tiling`/`use_spatial_tiling`, True/False = both on/off.
        `mesh` (default: the mesh of an active `sharding_context`) spreads the work items over its devices.
        """
        cfg = self.config
        self._check(video, "encode", cfg.encoder.in_channels)
        use_t, use_s = self._tiling(tiled)
        of = cfg.tile_overlap_factor
        s_lat, t_lat = cfg.spatial_latent_tile, cfg.temporal_latent_tile
        plan = _TilePlan(
            t_tile=cfg.temporal_tile_size, s_tile=cfg.spatial_tile_size,
            t_stride=int(cfg.temporal_tile_size * (1 - of)), s_stride=int(cfg.spatial_tile_size * (1 - of)),
            t_blend=int(t_lat * of), s_blend=int(s_lat * of),
            t_limit=t_lat - int(t_lat * of), s_limit=s_lat - int(s_lat * of),
            use_temporal=use_t, use_spatial=use_s)
        return _run_tiled(self, "encode", video, plan, mesh)

    def decode(self, z: jax.Array, *, tiled: bool | None = None, mesh: Mesh | None = None) -> jax.Array:
        """Latent (B, T', H', W', 128) → video (B, 4·T', 32·H', 32·W', 3) for the released model (a single latent
        frame decodes to a single frame). `tiled` and `mesh` as in `encode`."""
        cfg = self.config
        self._check(z, "decode", cfg.decoder.latent_channels)
        use_t, use_s = self._tiling(tiled)
        of = cfg.tile_overlap_factor
        s_lat, t_lat = cfg.spatial_latent_tile, cfg.temporal_latent_tile
        plan = _TilePlan(
            t_tile=t_lat, s_tile=s_lat, t_stride=int(t_lat * (1 - of)), s_stride=int(s_lat * (1 - of)),
            t_blend=int(cfg.temporal_tile_size * of), s_blend=int(cfg.spatial_tile_size * of),
            t_limit=cfg.temporal_tile_size - int(cfg.temporal_tile_size * of),
            s_limit=cfg.spatial_tile_size - int(cfg.spatial_tile_size * of),
            use_temporal=use_t, use_spatial=use_s)
        return _run_tiled(self, "decode", z, plan, mesh)


# ------------------------------------------------------------------------------------------------------------
# Tiling and work items
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TilePlan:
    """Tile sizes / strides in the input's units; blend widths and crop limits in the output's."""

    t_tile: int
    s_tile: int
    t_stride: int
    s_stride: int
    t_blend: int
    s_blend: int
    t_limit: int
    s_limit: int
    use_temporal: bool
    use_spatial: bool


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """b with its first `extent` entries along `axis` replaced by a[-extent + y]·(1 − y/extent) + b[y]·(y/extent)
    (extent clipped to both lengths; the weights are the reference's float64 ratios rounded to float32)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    y = np.arange(extent, dtype=np.float64)
    shape = [1] * b.ndim
    shape[axis] = extent
    w_b = jnp.asarray((y / extent).astype(np.float32).reshape(shape))
    w_a = jnp.asarray((1.0 - y / extent).astype(np.float32).reshape(shape))
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = (tail * w_a + head * w_b).astype(b.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _starts(length: int, stride: int, what: str) -> list[int]:
    if stride < 1:
        raise UserError(f"DC-AE tiling: the {what} tile stride is {stride} (tile × (1 − tile_overlap_factor) < 1); "
                        "use larger tiles or a smaller overlap")
    return list(range(0, length, stride))


def _run_tiled(model: DCAE, kind: str, x: jax.Array, plan: _TilePlan, mesh: Mesh | None) -> jax.Array:
    """The reference's tiled encode/decode: temporal tiles (if on and needed), spatial tiles inside each (if on
    and needed), every tile of every video a work item; blended and cropped in the reference's order."""
    b, t, h, w, _ = x.shape

    # Per temporal tile: its frame range, the spatial row and column ranges, and whether it is spatially tiled.
    temporal = plan.use_temporal and t > plan.t_tile
    t_ranges = [(i, min(i + plan.t_tile, t)) for i in _starts(t, plan.t_stride, "temporal")] if temporal else [(0, t)]
    spatial = plan.use_spatial and (h > plan.s_tile or w > plan.s_tile)
    if spatial:
        rows = tuple((i, min(i + plan.s_tile, h)) for i in _starts(h, plan.s_stride, "spatial"))
        cols = tuple((j, min(j + plan.s_tile, w)) for j in _starts(w, plan.s_stride, "spatial"))
    else:
        rows, cols = ((0, h),), ((0, w),)

    if kind == "encode":
        whole = len(t_ranges) == len(rows) == len(cols) == 1
        for t0, t1 in t_ranges:
            for h0, h1 in rows:
                for w0, w1 in cols:
                    what = "the video" if whole else f"tile [{t0}:{t1}, {h0}:{h1}, {w0}:{w1}] of the video"
                    model._check_item((t1 - t0, h1 - h0, w1 - w0), what)

    runner = _ItemRunner(model, kind, mesh)
    # Temporal tiles go in groups large enough to keep every device busy; each group is blended into the output as
    # soon as it is back, so only one group's tile results (and the previous blended tile) are held at a time.
    group = max(1, math.ceil(runner.devices / (b * len(rows) * len(cols))))
    if isinstance(x, jax.core.Tracer):  # inside a caller's jit: every tile in one loop per shape (`_ItemRunner.run`)
        group = len(t_ranges)
    spec_tiles = (len(rows), len(cols), spatial)
    pieces, previous = [], None
    for g0 in range(0, len(t_ranges), group):
        boxes = [(i, t0, h0, w0, (t1 - t0, h1 - h0, w1 - w0))
                 for t0, t1 in t_ranges[g0:g0 + group] for h0, h1 in rows for w0, w1 in cols for i in range(b)]
        chunks, where = runner.run(x, boxes)
        spec = _GroupSpec(batch=b, tiles=(spec_tiles,) * len(t_ranges[g0:g0 + group]), where=tuple(where),
                          temporal=temporal)
        piece, previous = _assemble(tuple(chunks), previous, spec, plan)
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


@dataclasses.dataclass(frozen=True)
class _GroupSpec:
    """Where each (tile, video) result sits in a group's chunk outputs: `where[(tile·rows·cols + …)·batch + b]` =
    (chunk, row); `tiles` = (rows, cols, spatially tiled) per temporal tile of the group."""

    batch: int
    tiles: tuple[tuple[int, int, bool], ...]
    where: tuple[tuple[int, int], ...]
    temporal: bool


def _assemble(chunks, previous, spec: _GroupSpec, plan: _TilePlan):
    """`_assemble_fn`, compiled once per group layout."""
    return _program(_assemble_fn, (2, 3))(chunks, previous, spec, plan)


def _assemble_fn(chunks, previous, spec: _GroupSpec, plan: _TilePlan):
    """One group of temporal tiles from its items' results: spatial blend + crop per temporal tile, then (temporal
    tiling) the blend with the previous blended tile and the crop. Returns (frames, last blended temporal tile)."""
    k, pieces = 0, []
    for n_rows, n_cols, spatially_tiled in spec.tiles:
        grid = []
        for _ in range(n_rows):
            row = []
            for _ in range(n_cols):
                row.append(jnp.stack([chunks[c][r] for c, r in spec.where[k * spec.batch:(k + 1) * spec.batch]]))
                k += 1
            grid.append(row)
        tile = _merge_spatial(grid, plan) if spatially_tiled else grid[0][0]
        if spec.temporal:
            if previous is not None:
                tile = _blend(previous, tile, plan.t_blend, axis=1)
            previous = tile
            tile = tile[:, :plan.t_limit]
        pieces.append(tile)
    return (pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)), previous


def _merge_spatial(grid: list[list[jax.Array]], plan: _TilePlan) -> jax.Array:
    """Blends each tile with the (already blended) tile above, then the one to its left; crops; concatenates."""
    rows_out = []
    for i, row in enumerate(grid):
        out_row = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(grid[i - 1][j], tile, plan.s_blend, axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, plan.s_blend, axis=3)
            row[j] = tile
            out_row.append(tile[:, :, :plan.s_limit, :plan.s_limit])
        rows_out.append(jnp.concatenate(out_row, axis=3) if len(out_row) > 1 else out_row[0])
    return jnp.concatenate(rows_out, axis=2) if len(rows_out) > 1 else rows_out[0]


def _take(x: jax.Array, starts: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Items x[b, t0:t0+size[0], h0:h0+size[1], w0:w0+size[2]] for each row (b, t0, h0, w0) of `starts`."""
    return _program(_take_fn, (2,))(x, starts, size)


def _take_fn(x: jax.Array, starts: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    def one(row):
        return jax.lax.dynamic_slice(x, (row[0], row[1], row[2], row[3], 0), (1,) + size + (x.shape[-1],))[0]

    return jax.vmap(one)(starts)


class _ItemRunner:
    """Runs `encode_items`/`decode_items` over independent work items, compiled once per item shape.

    Items of one shape go `devices` at a time (one per device; a short last step is padded with copies of its
    first item) through one jitted program; on a mesh that program spreads them with `sharded_item_map`.
    """

    def __init__(self, model: DCAE, kind: str, mesh: Mesh | None):
        from opensora_jax import parallel

        self.kind = kind
        self.mesh = parallel.current_mesh() if mesh is None else mesh
        self.devices = 1
        if self.mesh is not None:
            self.devices = item_devices(self.mesh, parallel.active_rules())
            if self.devices <= 1:
                self.mesh = None
        self.graphdef, self.state = nnx.split(model)

    def run(self, x: jax.Array, boxes) -> tuple[list[jax.Array], list[tuple[int, int]]]:
        """boxes: (video, t0, h0, w0, (t, h, w)) → (chunk outputs, (chunk, row) of each box's result)."""
        by_size: dict[tuple, list[int]] = {}
        for index, box in enumerate(boxes):
            by_size.setdefault(box[4], []).append(index)
        chunks: list[jax.Array] = []
        where: list[tuple[int, int] | None] = [None] * len(boxes)
        d = self.devices
        traced = isinstance(x, jax.core.Tracer)
        for size, members in by_size.items():
            if traced:  # inside a caller's jit: one loop per item shape, so tiles reuse one working set
                steps = -(-len(members) // d)
                rows = [boxes[i][:4] for i in members]
                rows += [rows[0]] * (steps * d - len(rows))
                starts = jnp.asarray(np.asarray(rows, np.int32).reshape(steps, d, 4))
                out = jax.lax.map(lambda r, size=size: _items_fn(self.graphdef, self.state, _take_fn(x, r, size),
                                                                 self.kind, self.mesh), starts)
                for k, i in enumerate(members):
                    where[i] = (len(chunks) + k // d, k % d)
                chunks.extend(out[j] for j in range(steps))
                continue
            for start in range(0, len(members), d):
                part = members[start:start + d]
                rows = [boxes[i][:4] for i in part]
                rows += [rows[0]] * (d - len(rows))
                items = _take(x, jnp.asarray(np.asarray(rows, np.int32)), size)
                for r, i in enumerate(part):
                    where[i] = (len(chunks), r)
                chunks.append(_items_jit(self.graphdef, self.state, items, self.kind, self.mesh))
        return chunks, where


# XLA compiler options for the per-item programs (None: XLA's defaults), e.g. {"xla_backend_optimization_level": 0}
# to compile faster where compile time dominates (CPU tests).
COMPILER_OPTIONS: dict[str, Any] | None = None


def _program(fn, static_argnums: tuple[int, ...]):
    """`jax.jit(fn)` with the current `COMPILER_OPTIONS` (one jitted function, hence one cache, per options)."""
    options = tuple(sorted(COMPILER_OPTIONS.items())) if COMPILER_OPTIONS else None
    return _jitted(fn, static_argnums, options)


@functools.lru_cache(maxsize=None)
def _jitted(fn, static_argnums, options):
    return jax.jit(fn, static_argnums=static_argnums, compiler_options=dict(options) if options else None)


def _items_jit(graphdef, state, items, kind: str, mesh: Mesh | None):
    """`encode_items`/`decode_items` of the model (graphdef, state) on `items`: compiled once per item shape,
    whatever the size of the video they come from."""
    return _program(_items_fn, (0, 3, 4))(graphdef, state, items, kind, mesh)


def _items_fn(graphdef, state, items, kind: str, mesh: Mesh | None):
    model = nnx.merge(graphdef, state)
    if mesh is None:
        return model.encode_items(items) if kind == "encode" else model.decode_items(items)
    from opensora_jax import parallel

    # Work is split over items: every device needs every weight, gathered once here (see opensora_v1_2).
    state = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, parallel.replicated(mesh)), state)
    model = nnx.merge(graphdef, state)
    fn = model.encode_items if kind == "encode" else model.decode_items
    return sharded_item_map(fn, items, mesh=mesh, rules=parallel.active_rules(), micro=None)


# ------------------------------------------------------------------------------------------------------------
# Families hook
# ------------------------------------------------------------------------------------------------------------


def build(cfg: DCAEConfig | Mapping[str, Any], rngs: nnx.Rngs | None = None, param_dtype=None,
          compute_dtype=None) -> DCAE:
    """The model for `cfg` (a DCAEConfig or anything `DCAEConfig.from_reference` reads) with random weights.

    `param_dtype` None = float32; `compute_dtype` None = the parameter dtype (the house VAE convention).
    """
    cfg = DCAEConfig.from_reference(cfg)
    param = jnp.dtype(param_dtype) if param_dtype is not None else jnp.dtype(jnp.float32)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else param
    return DCAE(cfg, rngs=rngs or nnx.Rngs(0), dtype=compute, param_dtype=param)


def random_model(cfg: DCAEConfig | Mapping[str, Any], *, seed: int = 0, param_dtype=None,
                 compute_dtype=None) -> DCAE:
    """A DCAE with random weights drawn on the host (numpy): nothing to compile, so it is the quick way to get a
    model of any size for tests and benchmarks. Kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases
    N(0, 0.1²): activations stay of order one through the network (unlike the reference's training init, which
    `build` follows). dtypes as in `build`."""
    from opensora_jax.checkpoints import materialize, variable_paths

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0), param_dtype, compute_dtype))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, spec in variable_paths(abstract).items():
        shape = tuple(spec.shape)
        if path.endswith("kernel"):
            value = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(np.prod(shape[:-1])))
        elif path.endswith("scale"):
            value = 1 + np.float32(0.1) * rng.standard_normal(shape, np.float32)
        else:
            value = np.float32(0.1) * rng.standard_normal(shape, np.float32)
        flat[path] = value
    return materialize(abstract, flat)


__all__ = ["BLOCK_TYPES", "DCAE", "DCAEConfig", "DCAEDecoderConfig", "DCAEEncoderConfig", "PRESETS", "build",
           "pixel_shuffle", "pixel_unshuffle", "preset", "random_model", "relu_linear_attention"]
