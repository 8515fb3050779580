"""A small text encoder for models trained from scratch: a SentencePiece tokenizer trained on the
captions of a training CSV and a randomly initialised T5 encoder, saved as a converted T5 directory.

    python -m opensora_jax.tools.tiny_t5 --csv data/train.csv OUT_DIR [--d-model 64 --num-layers 2 --seed 0]

OUT_DIR holds the encoder (what `python -m convert t5` writes) and OUT_DIR/tokenizer/spiece.model, so
sample.py and train.py take it as `--t5 OUT_DIR`. Open-Sora trains STDiT3 against a frozen T5; here the
frozen T5 is random, which still gives every word its own embedding for the diffusion model to learn
from. The T5 vocabulary is the SentencePiece one plus T5's 100 sentinel ids (the tokenizer adds them).
"""

from __future__ import annotations

import argparse
import csv
import io
import pathlib
import shutil
import sys

import numpy as np
from flax import nnx

T5_EXTRA_IDS = 100  # sentinel tokens <extra_id_k> the T5 tokenizer appends to the SentencePiece vocabulary
# Words the sampling pipeline may append to a prompt (aesthetic / motion / camera suffixes).
PIPELINE_WORDS = ("aesthetic score", "motion score", "camera motion")


def read_captions(csv_path) -> list[str]:
    """The `text` column of a training CSV."""
    path = pathlib.Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CSV: {str(path)!r}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "text" not in (reader.fieldnames or []):
            raise ValueError(f"{str(path)!r} has no 'text' column (columns: {reader.fieldnames})")
        captions = [row["text"] for row in reader if row["text"]]
    if not captions:
        raise ValueError(f"{str(path)!r} has no captions")
    return captions


def train_sentencepiece(captions: list[str], vocab_size: int) -> bytes:
    """A SentencePiece model of whole words (T5's special ids: pad 0, eos 1, unk 2, no bos) as bytes.

    Word pieces, because on a small closed vocabulary of captions the unigram and BPE trainers stop at
    single letters for most words; a word outside the captions becomes <unk>. `vocab_size` is an upper
    bound (hard_vocab_limit off). One thread: the same captions give the same model.
    """
    import sentencepiece as spm

    # Every caption, repeats included: unigram training needs the word frequencies to keep whole words.
    corpus = list(captions) + list(PIPELINE_WORDS) * max(1, len(captions) // 50)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size, model_type="word",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def t5_config(num_pieces: int, *, d_model: int, num_layers: int, num_heads: int, d_ff: int) -> dict:
    """transformers-style T5 config of the encoder, with a vocabulary that covers the tokenizer's ids."""
    vocab = -(-(num_pieces + T5_EXTRA_IDS) // 8) * 8
    if d_model % num_heads:
        raise ValueError(f"--d-model {d_model} is not divisible by --num-heads {num_heads}")
    return dict(vocab_size=vocab, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
                num_heads=num_heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="t5")


def make_text_encoder(csv_path, out_dir, *, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                      d_ff: int = 128, vocab_size: int = 64, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Writes OUT_DIR (converted T5 encoder, random weights from `seed`) with OUT_DIR/tokenizer; returns it."""
    import sentencepiece as spm

    from opensora_jax.checkpoints import save_converted
    from opensora_jax.models.t5 import T5Config, T5Encoder

    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    model_bytes = train_sentencepiece(read_captions(csv_path), vocab_size)
    num_pieces = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    config = t5_config(num_pieces, d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff)
    encoder = T5Encoder(T5Config.from_dict(config), rngs=nnx.Rngs(seed))
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(encoder))}
    tok_tmp = out.with_name(f".{out.name}.tokenizer.partial")
    shutil.rmtree(tok_tmp, ignore_errors=True)
    tok_tmp.mkdir(parents=True)
    (tok_tmp / "spiece.model").write_bytes(model_bytes)
    save_converted(out, flat, config=config, model="t5", overwrite=overwrite,
                   extra_meta={"made_by": "opensora_jax.tools.tiny_t5", "seed": seed, "sentencepiece_pieces": num_pieces})
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tok_tmp.rename(out / "tokenizer")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.tools.tiny_t5",
        description="Train a SentencePiece tokenizer on a CSV's captions and write it with a randomly "
        "initialised T5 encoder as a converted T5 directory (OUT_DIR, tokenizer in OUT_DIR/tokenizer).")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (must be empty or absent)")
    parser.add_argument("--csv", required=True, help="training CSV whose 'text' column is the tokenizer's corpus")
    parser.add_argument("--d-model", type=int, default=64, help="embedding width = caption_channels of STDiT3 (64)")
    parser.add_argument("--num-layers", type=int, default=2, help="encoder layers (2)")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--d-ff", type=int, default=128, help="feed-forward width (128)")
    parser.add_argument("--vocab-size", type=int, default=64, help="upper bound of SentencePiece pieces (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = make_text_encoder(args.csv, args.out_dir, d_model=args.d_model, num_layers=args.num_layers,
                                num_heads=args.num_heads, d_ff=args.d_ff, vocab_size=args.vocab_size,
                                seed=args.seed, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote the text encoder to {out} (tokenizer in {out / 'tokenizer'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
