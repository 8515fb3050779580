"""Conversion table: reference STDiT3 state_dict (PyTorch names and layouts) → opensora_jax STDiT3."""

from __future__ import annotations

import json
import pathlib

from convert.keymap import Rule, Table
from opensora_jax.families import MODELS
from opensora_jax.models.stdit3 import STDiT3, STDiT3Config, preset

DESCRIPTION = "STDiT3 diffusion transformer (Open-Sora v1.2, e.g. hpcai-tech/OpenSora-STDiT-v3)"


def _linear(w):
    """nn.Linear.weight [out, in] → kernel [in, out]."""
    return w.T


def table(config: dict | STDiT3Config) -> Table:
    """The key map for a given architecture (head count and sizes shape the attention kernels)."""
    cfg = config if isinstance(config, STDiT3Config) else STDiT3Config.from_reference(config)
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def block_rules(kind: str) -> list[Rule]:
        src, dst = f"{kind}_blocks.{{i}}", f"blocks/{kind}"
        rules = [
            Rule(f"{dst}/scale_shift_table", f"{src}.scale_shift_table"),
            Rule(f"{dst}/attn/qkv_kernel", f"{src}.attn.qkv.weight", lambda w: w.T.reshape(d, 3, h, hd)),
            Rule(f"{dst}/attn/qkv_bias", f"{src}.attn.qkv.bias", lambda b: b.reshape(3, h, hd)),
            Rule(f"{dst}/attn/proj_kernel", f"{src}.attn.proj.weight", lambda w: w.T.reshape(h, hd, d)),
            Rule(f"{dst}/attn/proj_bias", f"{src}.attn.proj.bias"),
            Rule(f"{dst}/cross_attn/q_kernel", f"{src}.cross_attn.q_linear.weight", lambda w: w.T.reshape(d, h, hd)),
            Rule(f"{dst}/cross_attn/q_bias", f"{src}.cross_attn.q_linear.bias", lambda b: b.reshape(h, hd)),
            Rule(f"{dst}/cross_attn/kv_kernel", f"{src}.cross_attn.kv_linear.weight", lambda w: w.T.reshape(d, 2, h, hd)),
            Rule(f"{dst}/cross_attn/kv_bias", f"{src}.cross_attn.kv_linear.bias", lambda b: b.reshape(2, h, hd)),
            Rule(f"{dst}/cross_attn/proj_kernel", f"{src}.cross_attn.proj.weight", lambda w: w.T.reshape(h, hd, d)),
            Rule(f"{dst}/cross_attn/proj_bias", f"{src}.cross_attn.proj.bias"),
            Rule(f"{dst}/mlp/fc1/kernel", f"{src}.mlp.fc1.weight", _linear),
            Rule(f"{dst}/mlp/fc1/bias", f"{src}.mlp.fc1.bias"),
            Rule(f"{dst}/mlp/fc2/kernel", f"{src}.mlp.fc2.weight", _linear),
            Rule(f"{dst}/mlp/fc2/bias", f"{src}.mlp.fc2.bias"),
        ]
        if cfg.qk_norm:
            rules += [
                Rule(f"{dst}/attn/q_norm", f"{src}.attn.q_norm.weight"),
                Rule(f"{dst}/attn/k_norm", f"{src}.attn.k_norm.weight"),
            ]
        return rules

    rules = [
        Rule("patch_kernel", "x_embedder.proj.weight", lambda w: w.transpose(2, 3, 4, 1, 0)),
        Rule("patch_bias", "x_embedder.proj.bias"),
        Rule("rope_freqs", "rope.freqs"),
        Rule("t_block/kernel", "t_block.1.weight", _linear),
        Rule("t_block/bias", "t_block.1.bias"),
        Rule("y_embedder/y_embedding", "y_embedder.y_embedding", resize_rows=True),
        Rule("final_layer/scale_shift_table", "final_layer.scale_shift_table"),
        Rule("final_layer/linear/kernel", "final_layer.linear.weight", _linear),
        Rule("final_layer/linear/bias", "final_layer.linear.bias"),
    ]
    for name in ("t_embedder", "fps_embedder"):
        rules += [
            Rule(f"{name}/mlp_in/kernel", f"{name}.mlp.0.weight", _linear),
            Rule(f"{name}/mlp_in/bias", f"{name}.mlp.0.bias"),
            Rule(f"{name}/mlp_out/kernel", f"{name}.mlp.2.weight", _linear),
            Rule(f"{name}/mlp_out/bias", f"{name}.mlp.2.bias"),
        ]
    for layer in ("fc1", "fc2"):
        rules += [
            Rule(f"y_embedder/y_proj/{layer}/kernel", f"y_embedder.y_proj.{layer}.weight", _linear),
            Rule(f"y_embedder/y_proj/{layer}/bias", f"y_embedder.y_proj.{layer}.bias"),
        ]
    rules += block_rules("spatial") + block_rules("temporal")
    # The reference's loader drops stored position embeddings (they are recomputed) and a `module.`
    # prefix left by DDP/ColossalAI wrappers.
    return Table(name="stdit3", rules=rules, strip_prefixes=("module.",), ignore=(r"pos_embed", r"pos_embed_temporal"))


def abstract_model(config: dict | STDiT3Config, dtype=None, compute_dtype=None) -> STDiT3:
    """The model with abstract (shape-only) parameters of `dtype`: nothing is allocated."""
    return MODELS["stdit3"].abstract(config, param_dtype=dtype, compute_dtype=compute_dtype)


def config_from_source(path) -> dict:
    """Reads the architecture from a `config.json` beside the weights (HF repo layout); otherwise the
    released STDiT3-XL/2 configuration (qk_norm, caption_channels 4096, 300 tokens)."""
    path = pathlib.Path(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        raw = raw.get("config", raw)  # our converted dirs nest it; HF's config.json is flat
        # HF config.json files also carry generic PretrainedConfig keys; keep the architecture ones.
        fields = set(STDiT3Config.__dataclass_fields__)
        return STDiT3Config.from_reference({k: v for k, v in raw.items() if k in fields}).to_dict()
    return preset("STDiT3-XL/2").to_dict()
