"""Per-channel latent statistics of a trained VAE, written into its `shift` / `scale`.

The diffusion model sees `(z − shift) / scale`; rectified-flow training expects that to be roughly zero
mean and unit variance per channel. The released v1.2 VAE ships such constants; a VAE trained here (the
demo) gets its own from its data:

    python -m opensora_jax.tools.latent_stats --vae RUN/vae_temporal/vae_model --csv DATA/train.csv \
        --frames 17 --size 32 32 OUT_DIR

OUT_DIR is a copy of the VAE directory whose config and buffers carry the measured shift (mean) and
scale (standard deviation) of the temporal posterior means over the clips read.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from opensora_jax.checkpoints import load_converted, load_model, read_config, save_converted, save_module
from opensora_jax.models.vae.spatial import SPATIAL_LATENT_SCALE
from opensora_jax.training.vae_train import make_vae_loader


def latent_moments(vae, batches) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean (C,), std (C,), count) of the raw latents (before shift/scale; posterior means) over video
    batches (B, T, H, W, 3) in [-1, 1], accumulated in float64."""
    from opensora_jax.models.vae.opensora_v1_2 import encode_jit

    total = total_sq = None
    count = 0
    scale = np.asarray(vae.scale[...], np.float64)
    shift = np.asarray(vae.shift[...], np.float64)
    for video in batches:
        z = np.asarray(encode_jit(vae, jnp.asarray(video, vae.dtype), None), np.float64) * scale + shift
        flat = z.reshape(-1, z.shape[-1])
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq = (flat**2).sum(0) if total_sq is None else total_sq + (flat**2).sum(0)
        count += flat.shape[0]
    if not count:
        raise ValueError("no batch to measure latent statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, std, count


def spatial_latent_moments(vae, batches) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean (C,), std (C,), count) of the 2D VAE's scaled per-frame latents (0.18215 · posterior mean,
    what the temporal VAE reads) over video batches (B, T, H, W, 3) in [-1, 1]."""
    from opensora_jax.models.vae.spatial import encode_frames

    encode = jax.jit(lambda frames: encode_frames(vae.spatial, frames))
    moments = [np.asarray(encode(jnp.asarray(video, vae.dtype)), np.float64) for video in batches]
    if not moments:
        raise ValueError("no batch to measure latent statistics on")
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in moments])
    return flat.mean(0), flat.std(0), flat.shape[0]


def standardize_spatial_latents(vae, mean, std) -> None:
    """Reparametrises the 2D VAE in place so that its scaled latents have zero mean and unit variance per
    channel, as SDXL's do (the temporal VAE and its z-space loss assume that scale), without changing
    what it reconstructs: z' = a·z + b on quant_conv's mean half, logvar' = logvar + 2 ln a, and
    post_quant_conv undoes it (a 1×1 conv, exact). `mean`, `std`: of the scaled latents, as measured by
    `spatial_latent_moments`."""
    spatial = vae.spatial
    if spatial.quant_conv is None or spatial.post_quant_conv is None:
        raise ValueError("standardising 2D latents needs both quant_conv and post_quant_conv")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if np.any(std <= 0):
        raise ValueError(f"latent std must be positive per channel, got {std}")
    a, b = 1.0 / std, -mean / std  # in the scaled space: x' = a·x + b; the raw latent takes the same map
    b_raw = b / SPATIAL_LATENT_SCALE
    c = a.shape[0]
    q = spatial.quant_conv
    k, bias = np.asarray(q.kernel.get_value(), np.float64), np.asarray(q.bias.get_value(), np.float64)
    k[..., :c] *= a
    bias[:c] = bias[:c] * a + b_raw
    bias[c:] += 2.0 * np.log(a)
    q.kernel.set_value(jnp.asarray(k, q.kernel.get_value().dtype))
    q.bias.set_value(jnp.asarray(bias, q.bias.get_value().dtype))
    pq = spatial.post_quant_conv
    w, pb = np.asarray(pq.kernel.get_value(), np.float64), np.asarray(pq.bias.get_value(), np.float64)
    w_new = w / a[:, None]  # kernel (1, 1, in, out): z_old = (z_new − b_raw) / a
    pb = pb - np.einsum("io,i->o", w[0, 0], b_raw / a)
    pq.kernel.set_value(jnp.asarray(w_new, pq.kernel.get_value().dtype))
    pq.bias.set_value(jnp.asarray(pb, pq.bias.get_value().dtype))


def write_vae(vae, source_dir, out_dir, *, overwrite: bool = False, extra_meta: dict | None = None):
    """Saves `vae` (loaded from the converted directory `source_dir`) to out_dir with source_dir's config."""
    return save_module(out_dir, vae, config=read_config(source_dir), model="vae", dtype=np.float32,
                       overwrite=overwrite, extra_meta=extra_meta)


def write_with_stats(vae_dir, out_dir, shift, scale, *, overwrite: bool = False, extra_meta: dict | None = None):
    """Copies a converted VAE directory to out_dir with new shift / scale (config and buffers)."""
    flat, meta = load_converted(vae_dir)
    config = dict(meta["config"])
    config["shift"] = [float(v) for v in shift]
    config["scale"] = [float(v) for v in scale]
    for name, values in (("shift", shift), ("scale", scale)):
        if flat[name].shape != np.shape(values):
            raise ValueError(f"{vae_dir}: buffer {name} has shape {flat[name].shape}, statistics {np.shape(values)}")
        flat[name] = np.asarray(values, flat[name].dtype)
    return save_converted(out_dir, flat, config=config, model="vae", overwrite=overwrite,
                          extra_meta={**meta.get("conversion", {}), **(extra_meta or {})})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora_jax.tools.latent_stats", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the VAE with measured shift/scale is written")
    parser.add_argument("--vae", required=True, help="converted VAE directory (e.g. train_vae.py's vae_model)")
    parser.add_argument("--csv", required=True, help="CSV of clips to measure on")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (17)")
    parser.add_argument("--size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"), help="clip size (32 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch (16)")
    parser.add_argument("--max-batches", type=int, default=32, help="batches to read at most (32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--spatial", action="store_true",
                        help="instead: standardise the 2D VAE's scaled latents (exact reparametrisation of "
                        "quant_conv / post_quant_conv), before training a temporal VAE on them")
    args = parser.parse_args(argv)

    import ml_collections

    vae, _ = load_model("vae", args.vae, dtype=jnp.float32)
    config = ml_collections.ConfigDict(dict(seed=0, data=dict(
        csv=args.csv, num_frames=args.frames, image_size=tuple(args.size), batch_size=args.batch_size,
        frame_interval=1, num_workers=0)))
    loader = make_vae_loader(config, num_epochs=1)

    def batches():
        with iter(loader) as it:
            for k, batch in enumerate(it):
                if k >= args.max_batches:
                    break
                yield np.asarray(batch["video"])

    if args.spatial:
        mean, std, count = spatial_latent_moments(vae, batches())
        print(f"2D latents (scaled): mean {np.round(mean, 4).tolist()}  std {np.round(std, 4).tolist()}  "
              f"over {count} positions; standardising")
        standardize_spatial_latents(vae, mean, std)
        out = write_vae(vae, args.vae, args.out_dir, overwrite=args.overwrite,
                        extra_meta={"spatial_latent_stats": {"csv": args.csv, "mean": mean.tolist(),
                                                             "std": std.tolist()}})
        print(f"wrote {out}")
        return 0
    mean, std, count = latent_moments(vae, batches())
    print(f"latent shift (mean) {np.round(mean, 4).tolist()}  scale (std) {np.round(std, 4).tolist()}  "
          f"over {count} latent positions ({jax.default_backend()})")
    out = write_with_stats(args.vae, args.out_dir, mean, std, overwrite=args.overwrite,
                           extra_meta={"latent_stats": {"csv": args.csv, "positions": count}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
