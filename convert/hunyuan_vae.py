"""Conversion table: reference `AutoencoderKLCausal3D` state_dict (Open-Sora 2.0's hunyuan_vae.safetensors) →
opensora_jax `HunyuanVAE`.

Reference keys: `encoder.*`, `decoder.*` (causal convolutions wrap their Conv3d as `<name>.conv`), the
mid-block attention as diffusers names it (`attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`), and the
plain top-level Conv3d `quant_conv` / `post_quant_conv`. Layouts: Conv3d [out, in, kt, kh, kw] →
(kt, kh, kw, in, out); Linear [out, in] → (in, out); GroupNorm weight → scale. Loading is strict like the
reference's (`strict=True`): every key used, every parameter filled, all problems reported at once.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from convert.keymap import Rule, Table
from convert.vae_v1_2 import mid_block_rules, resnet_rules
from opensora_jax.checkpoints import is_converted_dir, read_config
from opensora_jax.families import MODELS
from opensora_jax.models.vae.hunyuan import HunyuanVAE, HunyuanVAEConfig, block_layout, preset

DESCRIPTION = "HunyuanVideo causal 3D VAE of Open-Sora 2.0 (hunyuan_vae.safetensors, AutoencoderKLCausal3D)"


def _conv3d(w):
    return w.transpose(2, 3, 4, 1, 0)


def _linear(w):
    return w.T


def _as_config(config) -> HunyuanVAEConfig:
    return config if isinstance(config, HunyuanVAEConfig) else HunyuanVAEConfig.from_reference(config)


def _conv(dst: str, src: str, transform=_conv3d) -> list[Rule]:
    return [Rule(f"{dst}/kernel", f"{src}.weight", transform), Rule(f"{dst}/bias", f"{src}.bias")]


def _causal(dst: str, src: str) -> list[Rule]:
    """CausalConv3d: the Conv3d sits at `<name>.conv` in both trees."""
    return _conv(f"{dst}/conv", f"{src}.conv")


def _norm(dst: str, src: str) -> list[Rule]:
    return [Rule(f"{dst}/scale", f"{src}.weight"), Rule(f"{dst}/bias", f"{src}.bias")]


def _resnet(dst: str, src: str, cin: int, cout: int) -> list[Rule]:
    return resnet_rules(dst, src, cin, cout, _causal)


def _mid(dst: str, src: str, channels: int, attention: bool) -> list[Rule]:
    return mid_block_rules(dst, src, channels, attention, _causal)


def table(config: dict | HunyuanVAEConfig) -> Table:
    """The key map for one architecture (widths, depths and resampling blocks decide which keys exist)."""
    cfg = _as_config(config)
    chans, layout = cfg.block_out_channels, block_layout(cfg)

    rules = _causal("encoder/conv_in", "encoder.conv_in")
    for i, (ft, fs) in enumerate(layout):
        dst, src = f"encoder/down_blocks/{i}", f"encoder.down_blocks.{i}"
        for j in range(cfg.layers_per_block):
            cin = chans[max(i - 1, 0)] if j == 0 else chans[i]
            rules += _resnet(f"{dst}/resnets/{j}", f"{src}.resnets.{j}", cin, chans[i])
        if ft * fs > 1:
            rules += _causal(f"{dst}/downsampler", f"{src}.downsamplers.0.conv")
    rules += _mid("encoder/mid_block", "encoder.mid_block", chans[-1], cfg.mid_block_add_attention)
    rules += _norm("encoder/conv_norm_out", "encoder.conv_norm_out")
    rules += _causal("encoder/conv_out", "encoder.conv_out")

    rev = tuple(reversed(chans))
    rules += _causal("decoder/conv_in", "decoder.conv_in")
    rules += _mid("decoder/mid_block", "decoder.mid_block", rev[0], cfg.mid_block_add_attention)
    for i, (ft, fs) in enumerate(layout):
        dst, src = f"decoder/up_blocks/{i}", f"decoder.up_blocks.{i}"
        for j in range(cfg.layers_per_block + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
            rules += _resnet(f"{dst}/resnets/{j}", f"{src}.resnets.{j}", cin, rev[i])
        if ft * fs > 1:
            rules += _causal(f"{dst}/upsampler", f"{src}.upsamplers.0.conv")
    rules += _norm("decoder/conv_norm_out", "decoder.conv_norm_out")
    rules += _causal("decoder/conv_out", "decoder.conv_out")

    rules += _conv("quant_conv", "quant_conv") + _conv("post_quant_conv", "post_quant_conv")
    # `module.` is what DDP/ColossalAI wrappers leave on training checkpoints.
    return Table(name="hunyuan_vae", rules=rules, strip_prefixes=("module.",))


def abstract_model(config: dict | HunyuanVAEConfig, dtype=None, compute_dtype=None) -> HunyuanVAE:
    """The VAE with abstract (shape-only) parameters of `dtype` (compute: `compute_dtype`, else `dtype`)."""
    return MODELS["hunyuan_vae"].abstract(_as_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


def config_from_source(path) -> dict[str, Any]:
    """The architecture for the checkpoint at `path`: a converted directory's stored config; else the
    `AutoEncoder3DConfig` kwargs of a `config.json` beside the weights (keys it does not know are left out,
    e.g. diffusers bookkeeping); else the released Open-Sora 2.0 configuration."""
    path = pathlib.Path(path)
    if is_converted_dir(path):
        return read_config(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        raw = raw.get("config", raw) if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and "block_out_channels" in raw:
            fields = set(HunyuanVAEConfig.__dataclass_fields__)
            return HunyuanVAEConfig.from_reference({k: v for k, v in raw.items() if k in fields}).to_dict()
    return preset("OpenSora-v2").to_dict()
