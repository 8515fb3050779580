"""Conversion table: reference OpenSoraVAE_V1_2 state_dict (`VideoAutoencoderPipeline`) → `OpenSoraVAE`.

Reference keys (released `hpcai-tech/OpenSora-VAE-v1.2`): `spatial_vae.module.<diffusers AutoencoderKL
keys>`, `temporal_vae.<encoder|decoder|quant_conv|post_quant_conv>...`, buffers `scale`, `shift`
([1, C, 1, 1, 1]). Layouts: Conv2d [out, in, kh, kw] → (kh, kw, in, out); Conv3d [out, in, kt, kh, kw]
→ (kt, kh, kw, in, out); Linear [out, in] → (in, out); scale/shift → (C,).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any


from convert.keymap import Rule, Table, convert
from opensora_jax.tensor_files import open_source
from opensora_jax.checkpoints import is_converted_dir, load_flat_into, read_config, variable_paths
from opensora_jax.families import MODELS
from opensora_jax.models.vae.opensora_v1_2 import OPENSORA_VAE_V1_2_PRESET, OpenSoraVAE, OpenSoraVAEConfig

DESCRIPTION = "Open-Sora v1.2 video VAE: 2D KL autoencoder + causal temporal VAE (e.g. hpcai-tech/OpenSora-VAE-v1.2)"

SPATIAL = "spatial_vae.module"
TEMPORAL = "temporal_vae"


def _conv2d(w):
    return w.transpose(2, 3, 1, 0)


def _conv3d(w):
    return w.transpose(2, 3, 4, 1, 0)


def _linear(w):
    return w.T


def _flat(b):
    return b.reshape(-1)


def _as_config(config) -> OpenSoraVAEConfig:
    return config if isinstance(config, OpenSoraVAEConfig) else OpenSoraVAEConfig.from_dict(config)


# ----------------------------------------------------------------------------- rule builders


def _conv(dst: str, src: str, transform, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{dst}/kernel", f"{src}.weight", transform)]
    if bias:
        rules.append(Rule(f"{dst}/bias", f"{src}.bias"))
    return rules


def _norm(dst: str, src: str) -> list[Rule]:
    return [Rule(f"{dst}/scale", f"{src}.weight"), Rule(f"{dst}/bias", f"{src}.bias")]


def resnet_rules(dst: str, src: str, cin: int, cout: int, conv) -> list[Rule]:
    """A diffusers-style resnet (norm1, conv1, norm2, conv2, conv_shortcut when widths differ); `conv(dst, src)`
    gives the rules of one convolution (2D, or the causal 3D of the Hunyuan VAE)."""
    rules = _norm(f"{dst}/norm1", f"{src}.norm1") + conv(f"{dst}/conv1", f"{src}.conv1")
    rules += _norm(f"{dst}/norm2", f"{src}.norm2") + conv(f"{dst}/conv2", f"{src}.conv2")
    if cin != cout:
        rules += conv(f"{dst}/conv_shortcut", f"{src}.conv_shortcut")
    return rules


def mid_block_rules(dst: str, src: str, channels: int, attention: bool, conv) -> list[Rule]:
    """A diffusers-style mid block: two resnets and, optionally, a single-head attention between them."""
    rules = []
    for j in range(2):
        rules += resnet_rules(f"{dst}/resnets/{j}", f"{src}.resnets.{j}", channels, channels, conv)
    if attention:
        a_dst, a_src = f"{dst}/attention", f"{src}.attentions.0"
        rules += _norm(f"{a_dst}/group_norm", f"{a_src}.group_norm")
        for name, key in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            rules += _conv(f"{a_dst}/{name}", f"{a_src}.{key}", _linear)
    return rules


def _conv2d_rules(dst: str, src: str) -> list[Rule]:
    return _conv(dst, src, _conv2d)


def _resnet2d(dst: str, src: str, cin: int, cout: int) -> list[Rule]:
    return resnet_rules(dst, src, cin, cout, _conv2d_rules)


def _mid2d(dst: str, src: str, channels: int, attention: bool) -> list[Rule]:
    return mid_block_rules(dst, src, channels, attention, _conv2d_rules)


def _spatial_rules(cfg: OpenSoraVAEConfig) -> list[Rule]:
    s = cfg.spatial
    chans = s.block_out_channels
    n = len(chans)
    rules = _conv("spatial/encoder/conv_in", f"{SPATIAL}.encoder.conv_in", _conv2d)
    for i in range(n):
        dst, src = f"spatial/encoder/down_blocks/{i}", f"{SPATIAL}.encoder.down_blocks.{i}"
        for j in range(s.layers_per_block):
            cin = chans[max(i - 1, 0)] if j == 0 else chans[i]
            rules += _resnet2d(f"{dst}/resnets/{j}", f"{src}.resnets.{j}", cin, chans[i])
        if i < n - 1:
            rules += _conv(f"{dst}/downsample", f"{src}.downsamplers.0.conv", _conv2d)
    rules += _mid2d("spatial/encoder/mid_block", f"{SPATIAL}.encoder.mid_block", chans[-1], s.mid_block_add_attention)
    rules += _norm("spatial/encoder/conv_norm_out", f"{SPATIAL}.encoder.conv_norm_out")
    rules += _conv("spatial/encoder/conv_out", f"{SPATIAL}.encoder.conv_out", _conv2d)

    rev = tuple(reversed(chans))
    rules += _conv("spatial/decoder/conv_in", f"{SPATIAL}.decoder.conv_in", _conv2d)
    rules += _mid2d("spatial/decoder/mid_block", f"{SPATIAL}.decoder.mid_block", rev[0], s.mid_block_add_attention)
    for i in range(n):
        dst, src = f"spatial/decoder/up_blocks/{i}", f"{SPATIAL}.decoder.up_blocks.{i}"
        for j in range(s.layers_per_block + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
            rules += _resnet2d(f"{dst}/resnets/{j}", f"{src}.resnets.{j}", cin, rev[i])
        if i < n - 1:
            rules += _conv(f"{dst}/upsample", f"{src}.upsamplers.0.conv", _conv2d)
    rules += _norm("spatial/decoder/conv_norm_out", f"{SPATIAL}.decoder.conv_norm_out")
    rules += _conv("spatial/decoder/conv_out", f"{SPATIAL}.decoder.conv_out", _conv2d)

    if s.use_quant_conv:
        rules += _conv("spatial/quant_conv", f"{SPATIAL}.quant_conv", _conv2d)
    if s.use_post_quant_conv:
        rules += _conv("spatial/post_quant_conv", f"{SPATIAL}.post_quant_conv", _conv2d)
    return rules


def _causal(dst: str, src: str, bias: bool = True) -> list[Rule]:
    """CausalConv3d: the reference wraps its Conv3d as `<name>.conv`, and so do we."""
    return _conv(f"{dst}/conv", f"{src}.conv", _conv3d, bias)


def _resblock3d(dst: str, src: str, cin: int, cout: int) -> list[Rule]:
    rules = _norm(f"{dst}/norm1", f"{src}.norm1") + _causal(f"{dst}/conv1", f"{src}.conv1", bias=False)
    rules += _norm(f"{dst}/norm2", f"{src}.norm2") + _causal(f"{dst}/conv2", f"{src}.conv2", bias=False)
    if cin != cout:
        rules += _causal(f"{dst}/conv3", f"{src}.conv3", bias=False)
    return rules


def _temporal_rules(cfg: OpenSoraVAEConfig) -> list[Rule]:
    t = cfg.temporal
    n = len(t.channel_multipliers)
    widths = [t.filters * m for m in t.channel_multipliers]
    enc_dst, enc_src = "temporal/encoder", f"{TEMPORAL}.encoder"
    rules = _causal(f"{enc_dst}/conv_in", f"{enc_src}.conv_in", bias=False)
    prev = t.filters
    for i in range(n):
        for j in range(t.num_res_blocks):
            rules += _resblock3d(
                f"{enc_dst}/block_res_blocks/{i}/{j}", f"{enc_src}.block_res_blocks.{i}.{j}", prev, widths[i]
            )
            prev = widths[i]
        if i < n - 1 and t.temporal_downsample[i]:
            rules += _causal(f"{enc_dst}/conv_blocks/{i}", f"{enc_src}.conv_blocks.{i}")
    for j in range(t.num_res_blocks):
        rules += _resblock3d(f"{enc_dst}/res_blocks/{j}", f"{enc_src}.res_blocks.{j}", prev, prev)
    rules += _norm(f"{enc_dst}/norm1", f"{enc_src}.norm1")
    rules += _causal(f"{enc_dst}/conv2", f"{enc_src}.conv2")

    rules += _causal("temporal/quant_conv", f"{TEMPORAL}.quant_conv")
    rules += _causal("temporal/post_quant_conv", f"{TEMPORAL}.post_quant_conv")

    dec_dst, dec_src = "temporal/decoder", f"{TEMPORAL}.decoder"
    rules += _causal(f"{dec_dst}/conv1", f"{dec_src}.conv1")
    for j in range(t.num_res_blocks):
        rules += _resblock3d(f"{dec_dst}/res_blocks/{j}", f"{dec_src}.res_blocks.{j}", widths[-1], widths[-1])
    prev = widths[-1]
    for i in reversed(range(n)):
        for j in range(t.num_res_blocks):
            rules += _resblock3d(
                f"{dec_dst}/block_res_blocks/{i}/{j}", f"{dec_src}.block_res_blocks.{i}.{j}", prev, widths[i]
            )
            prev = widths[i]
        if i > 0 and t.temporal_downsample[i - 1]:
            rules += _causal(f"{dec_dst}/conv_blocks/{i - 1}", f"{dec_src}.conv_blocks.{i - 1}")
    rules += _norm(f"{dec_dst}/norm1", f"{dec_src}.norm1")
    rules += _causal(f"{dec_dst}/conv_out", f"{dec_src}.conv_out")
    return rules


def table(config: dict | OpenSoraVAEConfig) -> Table:
    """The key map for a given VAE architecture (reference pipeline kwargs or `OpenSoraVAEConfig`)."""
    cfg = _as_config(config)
    rules = [Rule("scale", "scale", _flat), Rule("shift", "shift", _flat)]
    rules += _spatial_rules(cfg) + _temporal_rules(cfg)
    # A `module.` prefix is what DDP/ColossalAI wrappers leave on training checkpoints.
    return Table(name="vae_v1_2", rules=rules, strip_prefixes=("module.",))


def abstract_model(config: dict | OpenSoraVAEConfig, dtype=None, compute_dtype=None) -> OpenSoraVAE:
    """The VAE with abstract (shape-only) variables; nothing is allocated. `dtype` sets params (and compute,
    unless `compute_dtype` is given)."""
    return MODELS["vae"].abstract(_as_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------- config discovery


def preset() -> dict[str, Any]:
    """The released OpenSoraVAE_V1_2 architecture as reference kwargs (a fresh copy)."""
    return json.loads(json.dumps(OPENSORA_VAE_V1_2_PRESET))


def _count(keys: set[str], pattern: str) -> int:
    n = 0
    while pattern.format(n) in keys:
        n += 1
    return n


def config_from_shapes(shapes: dict[str, tuple[int, ...]], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Infers the architecture from a reference state_dict's key → shape map.

    Widths, depths, latent sizes, mid-block attention and temporal downsampling are read from the
    shapes; group counts, activations and chunk sizes (not visible in weights) come from the released
    preset. `values` may hold the `scale`/`shift` buffers as flat lists.
    """
    shapes = {k.removeprefix("module."): tuple(v) for k, v in shapes.items()}
    keys = set(shapes)
    cfg = preset()
    s, t = cfg["vae_2d"], cfg["vae_temporal"]
    sp, tp = f"{SPATIAL}.", f"{TEMPORAL}."
    try:
        n2d = _count(keys, sp + "encoder.down_blocks.{}.resnets.0.conv1.weight")
        if n2d == 0:
            raise KeyError(sp + "encoder.down_blocks.0.resnets.0.conv1.weight")
        s["block_out_channels"] = [shapes[f"{sp}encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n2d)]
        s["down_block_types"] = ["DownEncoderBlock2D"] * n2d
        s["up_block_types"] = ["UpDecoderBlock2D"] * n2d
        s["layers_per_block"] = _count(keys, sp + "encoder.down_blocks.0.resnets.{}.conv1.weight")
        s["in_channels"] = shapes[sp + "encoder.conv_in.weight"][1]
        s["out_channels"] = shapes[sp + "decoder.conv_out.weight"][0]
        s["latent_channels"] = shapes[sp + "decoder.conv_in.weight"][1]
        if sp + "encoder.mid_block.attentions.0.to_q.weight" not in keys:
            s["mid_block_add_attention"] = False

        levels = _count(keys, tp + "encoder.block_res_blocks.{}.0.conv1.conv.weight")
        conv_in = shapes[tp + "encoder.conv_in.conv.weight"]
        t["filters"], t["in_out_channels"] = conv_in[0], conv_in[1]
        t["num_res_blocks"] = _count(keys, tp + "encoder.block_res_blocks.0.{}.conv1.conv.weight")
        t["channel_multipliers"] = [
            shapes[f"{tp}encoder.block_res_blocks.{i}.0.conv1.conv.weight"][0] // conv_in[0] for i in range(levels)
        ]
        t["temporal_downsample"] = [f"{tp}encoder.conv_blocks.{i}.conv.weight" in keys for i in range(levels - 1)]
        t["latent_embed_dim"] = shapes[tp + "encoder.conv2.conv.weight"][0] // 2
        t["embed_dim"] = shapes[tp + "quant_conv.conv.weight"][0] // 2
    except KeyError as e:
        raise ValueError(f"cannot infer the VAE architecture: checkpoint has no tensor {e.args[0]!r}") from None
    for name in ("scale", "shift"):
        if values and name in values:
            cfg[name] = [float(v) for v in values[name]]
    try:
        OpenSoraVAEConfig.from_dict(cfg)
    except ValueError as e:
        raise ValueError(
            f"the architecture inferred from the checkpoint's shapes is not valid with the released group "
            f"counts ({e}); pass the architecture explicitly (python -m convert vae ... --config FILE)"
        ) from None
    return cfg


def config_from_source(path) -> dict[str, Any]:
    """The architecture for a checkpoint at `path`.

    In order: a converted directory's stored config; a `config.json` beside the weights that spells
    the architecture (our `vae_2d`/`vae_temporal` kwargs); the shapes of a safetensors checkpoint;
    otherwise (e.g. a pickle, which is not opened here) the released preset.
    """
    path = pathlib.Path(path)
    if is_converted_dir(path):
        return read_config(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        raw = raw.get("config", raw)
        vae_2d = raw.get("vae_2d") if isinstance(raw, dict) else None
        if isinstance(vae_2d, dict) and "block_out_channels" in vae_2d:
            keep = {"vae_2d", "vae_temporal", "micro_frame_size", "micro_batch_size", "shift", "scale"}
            return OpenSoraVAEConfig.from_dict({k: v for k, v in raw.items() if k in keep}).to_dict()
    try:
        source = open_source(path)
    except ValueError:
        return preset()
    with source:
        shapes = {k: source.shape(k) for k in source.keys()}
        values = {}
        for name in ("scale", "shift"):
            for key in (name, f"module.{name}"):
                if key in shapes:
                    values[name] = source.get(key).reshape(-1).tolist()
    return config_from_shapes(shapes, values)


# ----------------------------------------------------------------------------- 2D part alone


def load_spatial_weights(vae: OpenSoraVAE, path, *, allow_pickle: bool = False) -> None:
    """Loads 2D-VAE weights into `vae.spatial` from a diffusers `AutoencoderKL` checkpoint (keys
    `encoder.*`, `decoder.*`, `quant_conv.*`, ...; stage 1 starts from the PixArt-Σ SDXL VAE) or from a
    whole reference VAE checkpoint (its `spatial_vae.module.*` part)."""
    prefix = SPATIAL + "."
    rules = [Rule(r.target.removeprefix("spatial/"), r.source.removeprefix(prefix), r.transform, r.resize_rows)
             for r in table(vae.config).rules if r.target.startswith("spatial/")]
    spatial_table = Table(name="vae_2d", rules=rules, strip_prefixes=("module.", prefix),
                  ignore=(r"temporal_vae\..*", "scale", "shift"))
    targets = variable_paths(vae.spatial)
    with open_source(path, allow_pickle=allow_pickle) as source:
        flat = convert(spatial_table, source, targets)
    load_flat_into(vae.spatial, flat)
