"""Conversion table: reference MMDiT state_dict (Open-Sora 2.0, its DC-AE variant, Flux.1-dev) → opensora_jax MMDiT.

The source layout is described by the reference config: `fused_qkv` (Flux.1-dev's `qkv` / `linear1` rows,
q | k | v (| MLP-in)) or unfused (`q_proj`, `k_proj`, `v_proj` / `v_mlp`), and `use_liger_rope` (rotate-half
pairing) or not (interleaved pairing). The converted model is always unfused and rotate-half: fused rows are
split, and interleaved q/k rows (and their q/k-norm scales) are permuted per head, dimension 2j → j and
2j + 1 → j + D/2, which turns the interleaved rotation into the rotate-half one with the same angles while
leaving every q·k product unchanged. So one forward serves both checkpoints.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from convert.keymap import Rule, Table
from opensora_jax.errors import UserError
from opensora_jax.families import MODELS
from opensora_jax.models.mmdit import PRESETS, MMDiT, MMDiTConfig, preset

DESCRIPTION = "MMDiT diffusion transformer (Open-Sora 2.0 11B, its Video DC-AE variant, Flux.1-dev)"


def _cfg(config) -> MMDiTConfig:
    return config if isinstance(config, MMDiTConfig) else MMDiTConfig.from_reference(config)


def converted_config(config: dict | MMDiTConfig) -> dict:
    """The architecture of the converted model: the source's, with unfused parameters and rotate-half RoPE."""
    return {**_cfg(config).to_dict(), "fused_qkv": False, "use_liger_rope": True}


def rope_permutation(head_dim: int) -> np.ndarray:
    """Head-dim indices that take an interleaved-pairs layout to the rotate-half one: new[j] = old[perm[j]]."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def table(config: dict | MMDiTConfig) -> Table:
    """The key map for a source checkpoint of architecture `config` (its own fused_qkv / use_liger_rope)."""
    cfg = _cfg(config)
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    perm = None if cfg.use_liger_rope else rope_permutation(hd)

    def rows(start: int, stop: int):
        return lambda w: w[start:stop]

    def heads_kernel(select=lambda w: w, rotary=False):
        """nn.Linear rows (h·hd) → kernel (d, h, hd), optionally permuted into the rotate-half layout."""

        def f(w):
            k = select(w).T.reshape(d, h, hd)
            return k[..., perm] if rotary and perm is not None else k

        return f

    def heads_bias(select=lambda b: b, rotary=False):
        def f(b):
            out = select(b).reshape(h, hd)
            return out[..., perm] if rotary and perm is not None else out

        return f

    def norm_scale(s):
        return s[perm] if perm is not None else s

    def dense(dst: str, src: str, bias: bool = True) -> list[Rule]:
        out = [Rule(f"{dst}/kernel", f"{src}.weight", lambda w: w.T)]
        return out + ([Rule(f"{dst}/bias", f"{src}.bias")] if bias else [])

    def qkv(dst: str, src: str, names=("q_proj", "k_proj", "v_proj"), fused_key="qkv", bias=True) -> list[Rule]:
        out = []
        for i, name in enumerate(names):
            rotary = name != "v_proj"
            if cfg.fused_qkv:
                select = rows(i * d, (i + 1) * d)
                out.append(Rule(f"{dst}/{name}/kernel", f"{src}.{fused_key}.weight", heads_kernel(select, rotary)))
                if bias:
                    out.append(Rule(f"{dst}/{name}/bias", f"{src}.{fused_key}.bias", heads_bias(select, rotary)))
            else:
                out.append(Rule(f"{dst}/{name}/kernel", f"{src}.{name}.weight", heads_kernel(rotary=rotary)))
                if bias:
                    out.append(Rule(f"{dst}/{name}/bias", f"{src}.{name}.bias", heads_bias(rotary=rotary)))
        return out

    def qk_norm(dst: str, src: str) -> list[Rule]:
        return [Rule(f"{dst}/norm/query_norm", f"{src}.norm.query_norm.scale", norm_scale),
                Rule(f"{dst}/norm/key_norm", f"{src}.norm.key_norm.scale", norm_scale)]

    rules: list[Rule] = []
    rules += dense("img_in", "img_in") + dense("txt_in", "txt_in")
    for name in ("time_in", "vector_in") + (("guidance_in",) if cfg.guidance_embed else ()):
        rules += dense(f"{name}/in_layer", f"{name}.in_layer") + dense(f"{name}/out_layer", f"{name}.out_layer")
    if cfg.cond_embed:
        rules += dense("cond_in", "cond_in")
    rules += dense("final_layer/adaLN_modulation", "final_layer.adaLN_modulation.1")
    rules += dense("final_layer/linear", "final_layer.linear")

    for s in ("img", "txt"):
        dst, src = f"double_blocks/{s}_", f"double_blocks.{{i}}.{s}_"
        rules += dense(f"{dst}mod/lin", f"{src}mod.lin")
        rules += qkv(f"{dst}attn", f"{src}attn", bias=cfg.qkv_bias)
        rules += qk_norm(f"{dst}attn", f"{src}attn")
        rules += [Rule(f"{dst}attn/proj_kernel", f"{src}attn.proj.weight", lambda w: w.T.reshape(h, hd, d)),
                  Rule(f"{dst}attn/proj_bias", f"{src}attn.proj.bias")]
        rules += dense(f"{dst}mlp/fc1", f"{src}mlp.0") + dense(f"{dst}mlp/fc2", f"{src}mlp.2")

    dst, src = "single_blocks", "single_blocks.{i}"
    rules += dense(f"{dst}/modulation/lin", f"{src}.modulation.lin")
    rules += qk_norm(dst, src)
    if cfg.fused_qkv:
        rules += qkv(dst, src, fused_key="linear1")
        rules += [Rule(f"{dst}/mlp_in/kernel", f"{src}.linear1.weight", lambda w: w[3 * d:].T),
                  Rule(f"{dst}/mlp_in/bias", f"{src}.linear1.bias", lambda b: b[3 * d:])]
    else:
        rules += qkv(dst, src, names=("q_proj", "k_proj"))
        rules += [Rule(f"{dst}/v_proj/kernel", f"{src}.v_mlp.weight", heads_kernel(rows(0, d))),
                  Rule(f"{dst}/v_proj/bias", f"{src}.v_mlp.bias", heads_bias(rows(0, d))),
                  Rule(f"{dst}/mlp_in/kernel", f"{src}.v_mlp.weight", lambda w: w[d:].T),
                  Rule(f"{dst}/mlp_in/bias", f"{src}.v_mlp.bias", lambda b: b[d:])]
    rules += [Rule(f"{dst}/attn_out_kernel", f"{src}.linear2.weight", lambda w: w[:, :d].T.reshape(h, hd, d)),
              Rule(f"{dst}/mlp_out_kernel", f"{src}.linear2.weight", lambda w: w[:, d:].T),
              Rule(f"{dst}/out_bias", f"{src}.linear2.bias")]
    # The reference's checkpoints may carry a wrapper prefix (DDP / ColossalAI / diffusers-style "model.").
    return Table(name="mmdit", rules=rules, strip_prefixes=("module.", "model."))


def abstract_model(config: dict | MMDiTConfig, dtype=None, compute_dtype=None) -> MMDiT:
    """The converted model (unfused, rotate-half) with abstract parameters of `dtype`: nothing is allocated."""
    return MODELS["mmdit"].abstract(converted_config(config), param_dtype=dtype, compute_dtype=compute_dtype)


def _infer_from_keys(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The released configuration the checkpoint's keys and shapes describe (depths, widths, layout)."""
    fused = any(k.endswith("img_attn.qkv.weight") for k in shapes)
    name = "Flux.1-dev" if fused else "OpenSora-v2-11B"
    cfg = preset(name).to_dict()
    img_in = shapes.get("img_in.weight")
    if img_in is not None:
        cfg["hidden_size"], cfg["in_channels"] = int(img_in[0]), int(img_in[1])
    cond_in = shapes.get("cond_in.weight")
    cfg["cond_embed"] = cond_in is not None
    if cond_in is not None:  # cond_in has in_channels + p² inputs
        p2 = int(cond_in[1]) - cfg["in_channels"]
        cfg["patch_size"] = int(round(p2 ** 0.5))
    cfg["guidance_embed"] = "guidance_in.in_layer.weight" in shapes
    if "txt_in.weight" in shapes:
        cfg["context_in_dim"] = int(shapes["txt_in.weight"][1])
    if "vector_in.in_layer.weight" in shapes:
        cfg["vec_in_dim"] = int(shapes["vector_in.in_layer.weight"][1])
    norm = shapes.get("double_blocks.0.img_attn.norm.query_norm.scale", shapes.get("single_blocks.0.norm.query_norm.scale"))
    if norm is not None:
        cfg["num_heads"] = cfg["hidden_size"] // int(norm[0])
    mlp = shapes.get("double_blocks.0.img_mlp.0.weight")
    if mlp is not None:
        cfg["mlp_ratio"] = int(mlp[0]) / cfg["hidden_size"]
    for field, prefix in (("depth", "double_blocks."), ("depth_single_blocks", "single_blocks.")):
        indices = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
        cfg[field] = max(indices) + 1 if indices else 0
    return cfg


def config_from_source(path) -> dict:
    """The architecture of a reference checkpoint: a `config.json` beside it (reference MMDiTConfig kwargs, or our
    converted directory's), else read off the checkpoint's own keys and shapes (released head count 24, axes
    (16, 56, 56)); the RoPE layout follows the projections (fused = Flux.1-dev = interleaved)."""
    from opensora_jax.tensor_files import open_source

    path = pathlib.Path(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        raw = raw.get("config", raw)
        fields = {f for f in MMDiTConfig.__dataclass_fields__}
        return MMDiTConfig.from_reference({k: v for k, v in raw.items() if k in fields}).to_dict()
    with open_source(path) as source:
        keys = source.keys()
        shapes = {Table("probe", (), strip_prefixes=("module.", "model.")).strip(k): tuple(source.shape(k)) for k in keys}
    cfg = _infer_from_keys(shapes)
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    if sum(cfg["axes_dim"]) != head_dim:
        raise UserError(f"{path}: the checkpoint has head_dim {head_dim}, so the released RoPE axes "
                        f"{cfg['axes_dim']} do not fit; put the model's config.json (with axes_dim) beside it "
                        "or pass --config FILE")
    return cfg


__all__ = ["DESCRIPTION", "PRESETS", "abstract_model", "config_from_source", "converted_config", "rope_permutation",
           "table"]
