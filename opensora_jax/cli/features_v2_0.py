"""python -m opensora_jax.cli.features_v2_0 (opensora-features-v2): encode a dataset once for Open-Sora 2.0 training.

One epoch of the training loader of a 2.0 training config (its CSV, buckets and seed) goes through the frozen
autoencoder (Hunyuan VAE or Video DC-AE), T5 and CLIP into OUT_DIR: one .npz per batch holding `latent`
(B, T', H', W', C), `txt` (B, 512, 4096), `y_vec` (B, 768) and the reference latents the config's condition
mix needs (`ref_head`, `ref_tail`, ... each encoded from its own frames), plus NAME.index.json and
null_text.npz (the encodings of "" that text dropout swaps in). Then train from it:

    python -m opensora_jax.cli.features_v2_0 --config configs/opensora_v2_0/train_stage1.py \\
        --config.data.csv=data.csv --config.ae=ckpt/vae --config.t5=ckpt/t5 --config.clip=ckpt/clip OUT_DIR
    python train.py --config configs/opensora_v2_0/train_stage1.py --features OUT_DIR ...

Batch k's latents use the posterior key train.py uses at step k on the fly, so features are exactly what that
run would encode in its first epoch (captions get the training suffix here, as on the fly).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time


import convert
from opensora_jax.conditioning.training_conditions import check_weights, needed_references
from opensora_jax.config_utils import config_from_cli, config_parser, console_entry, run_cli
from opensora_jax.data.features import NULL_TEXT_FILE, write_arrays, write_feature_batches
from opensora_jax.errors import UserError

FLAGS = {
    "--csv": ("data.csv", str, "training CSV (path, text, num_frames, height, width, fps, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser("opensora-features-v2", __doc__, "an Open-Sora 2.0 training config "
                           "(configs/opensora_v2_0/train_*.py)", FLAGS)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created; must be empty unless "
                        "--overwrite)")
    parser.add_argument("--max-batches", type=int, default=None, metavar="N", help="stop after N batches "
                        "(default: one whole epoch)")
    parser.add_argument("--name", default="features", help="shard file prefix (default features)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR's contents")
    return parser


def encode_dataset(config, out_dir, *, max_batches=None, name="features", overwrite=False, load=convert.load_model):
    """Writes the features of one epoch of `config`'s loader to `out_dir`; returns (index path, batches)."""
    from opensora_jax.training import mmdit_loop

    out = pathlib.Path(out_dir)
    if out.is_file():
        raise UserError(f"OUT_DIR {out} is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"OUT_DIR {out} is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(out)
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches must be >= 1, got {max_batches}")
    if config.data.get("features"):
        raise UserError("the config already trains from features (data.features); give data.csv")
    mix = check_weights(config.get("cond_weights") or {"t2v": 1.0})
    cfg = mmdit_loop.model_config(config)
    references = needed_references([n for n, _ in mix]) if cfg.cond_embed else ()
    loader = mmdit_loop.make_loader(config)
    ae, text = mmdit_loop.load_frozen(config, load)
    encoder = mmdit_loop.BatchEncoder(ae, text, kind=config.get("ae_type", "hunyuan_vae"), references=references,
                                      seed=config.seed, caption_suffix=config.get("caption_suffix", True))
    out.mkdir(parents=True, exist_ok=True)
    null_txt, null_vec = encoder.null()
    write_arrays(out / NULL_TEXT_FILE, {"null_txt": null_txt, "null_vec": null_vec})
    total = loader.num_batches(0) if max_batches is None else min(max_batches, loader.num_batches(0))
    started, step = time.perf_counter(), [0]

    def encode(batch):
        k = step[0]
        step[0] += 1
        import jax

        encoded = encoder.encode_video(batch["video"], jax.random.fold_in(encoder.key, k))
        txt, y_vec = encoder.encode_text(batch)
        print(f"batch {k + 1}/{total}  latent {list(encoded['x0'].shape)}  {time.perf_counter() - started:.1f}s",
              flush=True)
        arrays = {"latent": encoded.pop("x0"), "txt": txt, "y_vec": y_vec}
        return {**arrays, **encoded}

    batches = iter(loader)
    try:
        index = write_feature_batches(batches, out, encode, name=name, max_batches=total)
    finally:
        batches.close()
    return index, step[0]


def main(argv=None) -> int:
    config, args = config_from_cli(sys.argv[1:] if argv is None else argv, build_parser(), FLAGS)
    if config.get("family") != "opensora_v2_0":
        raise UserError(f"--config must be an Open-Sora 2.0 training config (family opensora_v2_0), got family "
                        f"{config.get('family', 'opensora_v1_2')!r}; for v1.2 use python -m opensora_jax.cli.features")
    index, batches = encode_dataset(config, args.out_dir, max_batches=args.max_batches, name=args.name,
                                    overwrite=args.overwrite)
    print(f"wrote {batches} batches to {args.out_dir} ({pathlib.Path(index).name}); train with "
          f"--features {args.out_dir}", flush=True)
    return 0


cli = console_entry(main)

if __name__ == "__main__":
    sys.exit(run_cli(main))
