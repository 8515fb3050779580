"""Tiny random frozen encoders for trying Open-Sora 2.0 training on a laptop: a Hunyuan-style causal VAE, a T5
encoder with a SentencePiece tokenizer trained on a CSV's captions, and a CLIP text encoder with a byte-level BPE
tokenizer, written as converted directories that train.py's 2.0 configs take as `ae`, `t5` and `clip`.

    python -m opensora_jax.tools.tiny_v2 --csv data/synthetic/train.csv ckpt/tiny_v2

OUT_DIR/vae, OUT_DIR/t5 (tokenizer in t5/tokenizer), OUT_DIR/clip (tokenizer in clip/tokenizer), and
OUT_DIR/model_overrides.txt: the --config.model.* flags of a tiny MMDiT that fits these encoders. Random frozen
encoders still give each clip and caption its own code for the diffusion model to learn from; real runs use the
released VAE, T5-XXL and CLIP-L.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np
from flax import nnx

# A 4-channel, 8× spatial / 4× temporal causal VAE: tiny widths, the released structure.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  block_out_channels=[8, 8, 8, 8], scale_factor=0.476986, shift_factor=0, time_compression_ratio=4,
                  spatial_compression_ratio=8, mid_block_add_attention=True, sample_size=256, sample_tsize=64,
                  use_spatial_tiling=True, use_temporal_tiling=False, tile_overlap_factor=0.25)
CLIP_HIDDEN = 32
# CLIP's vocabulary layout: the 256 byte symbols, the same with "</w>", a few merges, then the two specials.
BPE_MERGES = (("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"))


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_bpe(directory, merges=BPE_MERGES) -> pathlib.Path:
    """A small CLIP BPE tokenizer (vocab.json + merges.txt) laid out like CLIP's: the 256 byte symbols, the same with
    "</w>", the merges, then <|startoftext|> and <|endoftext|> (the largest id, also padding)."""
    directory = pathlib.Path(directory)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def clip_config(hidden: int = CLIP_HIDDEN, vocab: int = 520) -> dict:
    """transformers-style CLIPTextConfig of a one-layer encoder over `write_clip_bpe`'s vocabulary."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=516,
                eos_token_id=517, pad_token_id=517, model_type="clip_text_model")


def _save(name: str, config: dict, out: pathlib.Path, seed: int) -> pathlib.Path:
    from opensora_jax.checkpoints import save_converted
    from opensora_jax.families import MODELS

    module = MODELS[name].init(config, seed=seed)
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module))}
    return save_converted(out, flat, config=config, model=name, extra_meta={"made_by": "opensora_jax.tools.tiny_v2",
                                                                           "seed": seed})


def _suffixed_captions(csv_path, out_csv) -> None:
    """A one-column CSV of `csv_path`'s captions, each also with the training suffix of its fps."""
    import csv

    from opensora_jax.tools.tiny_t5 import read_captions

    fps = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        fps = [row.get("fps") for row in csv.DictReader(f) if row.get("text")]
    rows = []
    for text, rate in zip(read_captions(csv_path), fps):
        rows += [text, f"{text} {int(float(rate))} FPS." if rate else text]
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([r] for r in rows)


def make_encoders(csv_path, out_dir, *, seed: int = 0, t5_width: int = 32, overwrite: bool = False) -> dict:
    """Writes OUT_DIR/{vae, t5, clip}; returns their paths and the MMDiT overrides that fit them."""
    from opensora_jax.tools.tiny_t5 import make_text_encoder

    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    captions = out / ".captions.csv"  # the captions as training sees them: with the " {fps} FPS." suffix
    _suffixed_captions(csv_path, captions)
    try:
        t5 = make_text_encoder(captions, out / "t5", d_model=t5_width, num_layers=1, num_heads=4, d_ff=2 * t5_width,
                               seed=seed + 1)
    finally:
        captions.unlink(missing_ok=True)
    paths = {"vae": _save("hunyuan_vae", VAE_CONFIG, out / "vae", seed + 2), "t5": t5,
             "clip": _save("clip", clip_config(), out / "clip", seed + 3)}
    write_clip_bpe(paths["clip"] / "tokenizer")
    overrides = dict(in_channels=VAE_CONFIG["latent_channels"] * 4, vec_in_dim=CLIP_HIDDEN, context_in_dim=t5_width,
                     hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], mlp_ratio=2.0)
    flags = " ".join(f"--config.model.{k}={json.dumps(v).replace(' ', '')}" for k, v in overrides.items())
    (out / "model_overrides.txt").write_text(flags + "\n")
    return {**paths, "overrides": overrides, "flags": flags}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opensora_jax.tools.tiny_v2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write vae/, t5/, clip/ into")
    parser.add_argument("--csv", required=True, help="training CSV whose 'text' column trains the T5 tokenizer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    parser.add_argument("--t5-width", type=int, default=32, help="T5 d_model = the MMDiT's context_in_dim (32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        made = make_encoders(args.csv, args.out_dir, seed=args.seed, t5_width=args.t5_width, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {made['vae']}, {made['t5']}, {made['clip']}")
    print(f"tiny MMDiT overrides for train.py: {made['flags']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
