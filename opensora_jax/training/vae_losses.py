"""Losses of Open-Sora v1.2 VAE training (spec §12): the cal_loss forward, the reconstruction/KL terms,
LPIPS, the PatchGAN discriminator and the adversarial formulas.

Layout: channels-last everywhere. Videos are (B, T, H, W, 3) in [-1, 1], 2D latents (B, T, h, w, 4),
temporal latents (B, ceil(T/4), h, w, 4). Frames are flattened to N = B·T for the per-frame terms.

Loss conventions follow the reference exactly, which uses SUMS, not means:
  NLL = Σ (|a − â| + w_p·LPIPS(a, â)) / N        summed over C, H, W and frames; divided by N = B·T
  KL  = Σ_b 0.5·Σ (μ² + σ² − 1 − log σ²) / B      temporal posterior only; divided by B
with the loss module's logvar a constant (0 in v1.2: it is an nn.Parameter no optimizer holds).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opensora_jax.models.layers import param
from opensora_jax.models.vae.layers import Conv, diagonal_gaussian
from opensora_jax.models.vae.spatial import decode_frames, encode_frames

GAN_LOSS_TYPES = ("hinge", "non-saturating")

# --------------------------------------------------------------------------------------------- forward


def vae_forward(vae, x: jax.Array, key: jax.Array | None, *, micro_batch_size: int | None = None,
                decode_pixels: bool = True) -> dict[str, jax.Array]:
    """`VideoAutoencoderPipeline.forward` with cal_loss=True: no chunking, no shift/scale.

    x (B, T, H, W, 3) → dict with
      x_z      (B, T, h, w, 4)        0.18215 · 2D posterior sample (per frame)
      z        (B, T', h, w, 4)       temporal posterior sample; T' = ceil(T/4) (front zero padding)
      mean, logvar (B, T', h, w, 4)   temporal posterior (logvar clamped to [-30, 20])
      x_z_rec  (B, T, h, w, 4)        temporal decode of z to T frames
      x_rec    (B, T, H, W, 3)        2D decode of x_z_rec (absent when `decode_pixels` is False)
    `key=None` uses both posteriors' means instead of samples. `micro_batch_size` only bounds the
    number of frames the 2D VAE processes at once (memory; the result does not depend on it).
    """
    k2d = kt = None
    if key is not None:
        k2d, kt = jax.random.split(key)
    x = x.astype(vae.dtype)
    x_z = encode_frames(vae.spatial, x, micro_batch_size=micro_batch_size, key=k2d)
    z, mean, logvar = diagonal_gaussian(vae.temporal.moments(x_z), kt)
    x_z_rec = vae.temporal.decode(z, x.shape[1])
    out = {"x_z": x_z, "z": z, "mean": mean, "logvar": logvar, "x_z_rec": x_z_rec}
    if decode_pixels:
        out["x_rec"] = decode_frames(vae.spatial, x_z_rec, micro_batch_size=micro_batch_size)
    return out


def spatial_forward(vae, x: jax.Array, key: jax.Array | None) -> dict[str, jax.Array]:
    """Stage 0 (ours; the reference starts from a pretrained SDXL 2D VAE instead): every frame through
    the 2D VAE alone, as an image autoencoder.

    x (B, T, H, W, 3) → dict with x_rec (B, T, H, W, 3) and the per-frame 2D posterior mean, logvar
    (B·T, h, w, 4), so the KL term is per image. `key=None` decodes the posterior means.
    """
    b, t = x.shape[:2]
    frames = _frames(x.astype(vae.dtype))
    sample, mean, logvar = diagonal_gaussian(vae.spatial.moments(frames), key)
    x_rec = vae.spatial.decode(sample)
    return {"x_rec": x_rec.reshape((b, t) + x_rec.shape[1:]), "mean": mean, "logvar": logvar}


# --------------------------------------------------------------------------------------------- VAE terms


def _frames(x: jax.Array) -> jax.Array:
    """(B, T, H, W, C) → (B·T, H, W, C)."""
    return x.reshape((-1,) + x.shape[2:])


PIXEL_LOSSES = ("l1", "l2")


def nll_loss(target: jax.Array, recon: jax.Array, *, logvar: float = 0.0, perceptual: jax.Array | None = None,
             perceptual_weight: float = 0.0, kind: str = "l1") -> jax.Array:
    """The reference VAELoss NLL: Σ_{N,H,W,C} (|a − â| + w·p) / exp(logvar) + logvar, divided by N = B·T.

    target, recon: (B, T, H, W, C). perceptual: per-frame LPIPS (N,) broadcast over each frame's
    H·W·C elements (so it weighs w·H·W·C per frame), or None. Computed in float32.
    """
    if target.shape != recon.shape:
        raise ValueError(f"nll_loss: target {tuple(target.shape)} and reconstruction {tuple(recon.shape)} differ")
    if kind not in PIXEL_LOSSES:
        raise ValueError(f"pixel loss {kind!r} unknown; choose one of {PIXEL_LOSSES}")
    a = _frames(target).astype(jnp.float32)
    diff = a - _frames(recon).astype(jnp.float32)
    r = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    if perceptual is not None and perceptual_weight > 0:
        r = r + perceptual_weight * perceptual.astype(jnp.float32).reshape(-1, 1, 1, 1)
    nll = r / jnp.exp(jnp.float32(logvar)) + jnp.float32(logvar)
    return jnp.sum(nll) / a.shape[0]


def kl_loss(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over all of (T', h, w, C) and over the batch, divided by B (unweighted)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl / mean.shape[0]


# --------------------------------------------------------------------------------------------- LPIPS

# torchvision vgg16.features indices of the 13 convs (all 3×3, padding 1) and the LPIPS slice ends.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_MAXPOOL_BEFORE = (5, 10, 17, 24)  # a 2×2 max-pool (features 4, 9, 16, 23) precedes these convs
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def _slice_of(index: int) -> int:
    return next(s for s, (lo, hi) in enumerate(_LPIPS_SLICES) if lo <= index < hi)


def lpips_source_keys() -> dict[str, list[str]]:
    """Accepted checkpoint names per LPIPS tensor (PyTorch layouts), first the taming LPIPS names.

    convs: `net.slice{s}.{i}.weight|bias` [out, in, 3, 3] (taming) or `features.{i}.weight|bias`
    (torchvision vgg16); lin layers: `lin{k}.model.1.weight` [1, C, 1, 1] (or `lin{k}.model.0.weight`
    from a model built without dropout).
    """
    keys = {}
    for i in VGG16_CONV_INDICES:
        for part in ("weight", "bias"):
            keys[f"conv{i}.{part}"] = [f"net.slice{_slice_of(i) + 1}.{i}.{part}", f"features.{i}.{part}"]
    for k in range(5):
        keys[f"lin{k}"] = [f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"]
    return keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LPIPS:
    """The taming-transformers LPIPS (VGG16 features + learned 1×1 "lin" layers), frozen, as a pytree.

    conv_kernels[j]: (3, 3, C_in, C_out) HWIO; conv_biases[j]: (C_out,); lin_weights[k]: (C_k,).
    Call with two image batches (N, H, W, 3) in [-1, 1] → (N,) distances (dropout off: eval mode).
    """

    conv_kernels: list
    conv_biases: list
    lin_weights: list

    def features(self, x: jax.Array) -> list[jax.Array]:
        """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled input, channels-last."""
        shift = jnp.asarray(LPIPS_SHIFT, x.dtype)
        scale = jnp.asarray(LPIPS_SCALE, x.dtype)
        h = (x - shift) / scale
        outs = []
        for j, index in enumerate(VGG16_CONV_INDICES):
            if index in _MAXPOOL_BEFORE:
                outs.append(h)
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            k = self.conv_kernels[j].astype(h.dtype)
            h = jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + self.conv_biases[j].astype(h.dtype))
        outs.append(h)
        return outs

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise ValueError(f"LPIPS expects two (N, H, W, 1 or 3) batches of equal shape, got {a.shape}, {b.shape}")
        if a.shape[-1] == 1:
            a, b = jnp.repeat(a, 3, axis=-1), jnp.repeat(b, 3, axis=-1)
        total = 0.0
        for fa, fb, lin in zip(self.features(a), self.features(b), self.lin_weights):
            d = jnp.square(_unit_normalize(fa) - _unit_normalize(fb))
            total = total + jnp.mean(d @ lin.astype(d.dtype), axis=(1, 2))
        return total


def _unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """x / (‖x‖₂ over channels + eps); the norm's gradient at an all-zero feature vector is taken as 0."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return (x / (norm + eps)).astype(x.dtype)


def _read_tensors(path: pathlib.Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    from opensora_jax.tensor_files import open_source

    with open_source(path, allow_pickle=allow_pickle) as source:
        return {k: source.get(k) for k in source.keys()}


def load_lpips(paths: str | pathlib.Path | Sequence, *, allow_pickle: bool = False, dtype=jnp.float32) -> LPIPS:
    """LPIPS weights from local files (PyTorch layouts): .npz, .safetensors, or with `allow_pickle` a .pth.

    `paths` is one path, a comma-separated string or a list; tensors of all files are merged, so the
    VGG16 (torchvision `vgg16` state dict, or taming's `net.slice*` names) and the lin layers (taming
    `vgg.pth`) may come from separate files. Names: see `lpips_source_keys`. Raises FileNotFoundError
    naming a missing file, KeyError listing missing tensors.
    """
    if isinstance(paths, (str, pathlib.Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    paths = [pathlib.Path(str(p).strip()) for p in paths]
    if not paths:
        raise FileNotFoundError(
            "LPIPS is enabled (perceptual loss) but no weight file is given: set lpips.weights to a local "
            ".npz/.safetensors (or .pth with lpips.allow_pickle) holding the VGG16 features and lin0..lin4 "
            "weights, or disable LPIPS (lpips.enabled=False)"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weight file {str(path)!r} not found (needed for the perceptual loss; "
                "set lpips.weights, or disable LPIPS with lpips.enabled=False)"
            )
        tensors.update(_read_tensors(path, allow_pickle))
    found, missing = {}, []
    for name, candidates in lpips_source_keys().items():
        key = next((c for c in candidates if c in tensors), None)
        if key is None:
            missing.append(candidates[0])
        else:
            found[name] = np.asarray(tensors[key], np.float32)
    if missing:
        raise KeyError(f"LPIPS weights in {[str(p) for p in paths]} lack {len(missing)} tensors: {missing}")
    kernels, biases = [], []
    for i, cout in zip(VGG16_CONV_INDICES, VGG16_CHANNELS):
        w = found[f"conv{i}.weight"]
        if w.shape[0] != cout or w.shape[2:] != (3, 3):
            raise ValueError(f"LPIPS conv {i}: expected weight [{cout}, C_in, 3, 3], got {list(w.shape)}")
        kernels.append(jnp.asarray(w.transpose(2, 3, 1, 0), dtype))
        biases.append(jnp.asarray(found[f"conv{i}.bias"].reshape(-1), dtype))
    lins = []
    for k, c in enumerate(LPIPS_CHANNELS):
        w = found[f"lin{k}"].reshape(-1)
        if w.shape != (c,):
            raise ValueError(f"LPIPS lin{k}: expected {c} weights, got shape {list(found[f'lin{k}'].shape)}")
        lins.append(jnp.asarray(w, dtype))
    return LPIPS(conv_kernels=kernels, conv_biases=biases, lin_weights=lins)


def random_lpips(key: jax.Array, dtype=jnp.float32) -> LPIPS:
    """LPIPS with random weights (tests and shape checks only: not a perceptual metric)."""
    keys = jax.random.split(key, len(VGG16_CHANNELS) + 5)
    kernels, biases, cin = [], [], 3
    for j, cout in enumerate(VGG16_CHANNELS):
        kernels.append(jax.random.normal(keys[j], (3, 3, cin, cout), dtype) * (2.0 / (9 * cin)) ** 0.5)
        biases.append(jnp.zeros((cout,), dtype))
        cin = cout
    lins = [jax.random.uniform(keys[len(VGG16_CHANNELS) + k], (c,), dtype) for k, c in enumerate(LPIPS_CHANNELS)]
    return LPIPS(conv_kernels=kernels, conv_biases=biases, lin_weights=lins)


# --------------------------------------------------------------------------------------------- discriminator


class BatchStat(nnx.Variable):
    """BatchNorm running statistics: updated by forward passes in train mode, never by the optimizer."""


class BatchNorm2d(nnx.Module):
    """PyTorch BatchNorm2d over channels-last (N, H, W, C), train mode only: normalises with the batch's
    mean and biased variance (eps 1e-5) and updates the running stats with momentum 0.1 (running_var
    takes the unbiased variance), counting `num_batches_tracked`."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5, momentum: float = 0.1,
                 param_dtype=jnp.float32):
        self.eps, self.momentum = eps, momentum
        self.scale = param(rngs, nnx.initializers.ones_init(), (channels,), ("channels",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (channels,), ("channels",), param_dtype)
        self.running_mean = BatchStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = BatchStat(jnp.ones((channels,), jnp.float32))
        self.num_batches_tracked = BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
        n = xf.size // xf.shape[-1]
        m = self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        self.running_var[...] = (1 - m) * self.running_var[...] + m * unbiased
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class NLayerDiscriminator(nnx.Module):
    """pix2pix PatchGAN (the reference's `NLayerDiscriminator`): frames (N, H, W, input_nc) → patch
    logits (N, H', W', 1); for 256² frames with n_layers 3, 30×30 patches.

    conv k4 s2 p1 (bias) → LeakyReLU(0.2); (n_layers − 1) × [conv k4 s2 p1 (no bias) → BatchNorm →
    LeakyReLU]; conv k4 s1 p1 (no bias) → BatchNorm → LeakyReLU; conv k4 s1 p1 (bias) → 1 channel.
    Widths ndf·min(2^n, 8). BatchNorm always runs in train mode (batch statistics), as in the reference.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        pad = ((1, 1), (1, 1))
        convs, norms = [Conv(input_nc, ndf, (4, 4), strides=(2, 2), padding=pad, **kw)], [None]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            convs.append(Conv(ndf * prev, ndf * mult, (4, 4), strides=(stride, stride), padding=pad,
                              use_bias=False, **kw))
            norms.append(BatchNorm2d(ndf * mult, rngs=rngs, param_dtype=param_dtype))
        convs.append(Conv(ndf * mult, 1, (4, 4), padding=pad, **kw))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for conv, norm in zip(self.convs[:-1], self.norms):
            h = conv(h)
            if norm is not None:
                h = norm(h)
            h = jax.nn.leaky_relu(h, 0.2)
        return self.convs[-1](h)


# --------------------------------------------------------------------------------------------- adversarial


def _check_type(kind: str) -> None:
    if kind not in GAN_LOSS_TYPES:
        raise ValueError(f"GAN loss type {kind!r} is not supported; choose one of {GAN_LOSS_TYPES}")


def generator_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """hinge: −mean D(x̂); non-saturating: mean softplus(−D(x̂)) (sigmoid cross-entropy with label 1)."""
    _check_type(kind)
    fake = fake_logits.astype(jnp.float32)
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """hinge: 0.5·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)));
    non-saturating (= "vanilla" in the reference): 0.5·(mean softplus(−D(x)) + mean softplus(D(x̂)))."""
    kind = "non-saturating" if kind == "vanilla" else kind
    _check_type(kind)
    real, fake = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def gan_gate(step: jax.Array, factor: float, start: int) -> jax.Array:
    """f(step) = factor if step ≥ start else 0 (`adopt_weight`); step = updates done before this one."""
    return jnp.where(jnp.asarray(step) >= start, jnp.float32(factor), jnp.float32(0.0))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, generator_factor: float = 0.5) -> jax.Array:
    """λ = generator_factor · clip(‖∇_W NLL‖ / (‖∇_W g‖ + 1e-4), 0, 1e4), without gradient.

    Both gradients are taken w.r.t. the same last layer W (the temporal decoder's conv_out kernel).
    """
    ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32).ravel()) / (
        jnp.linalg.norm(g_grad.astype(jnp.float32).ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * generator_factor)


# --------------------------------------------------------------------------------------------- all terms


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Which terms form the generator loss, and their weights (spec §12.3; stage flags in §12.2)."""

    perceptual_loss_weight: float = 0.1
    kl_loss_weight: float = 1e-6
    logvar: float = 0.0
    use_real_rec_loss: bool = False
    use_z_rec_loss: bool = True
    use_image_identity_loss: bool = False
    log_pixel_loss: bool = True  # decode to pixels and log the pixel NLL even when it is not trained on
    pixel_loss: str = "l1"  # the reference's; "l2" (ours) learns small bright objects on black much sooner
    latent_loss: str = "l1"  # of the z-space and identity terms; "l2" (ours) for the same reason


def needs_pixels(cfg: VAELossConfig, use_discriminator: bool) -> bool:
    """Whether the 2D decoder must run: pixel loss trained on or logged, or a discriminator."""
    return cfg.use_real_rec_loss or cfg.log_pixel_loss or use_discriminator


def vae_loss_terms(x: jax.Array, out: dict, cfg: VAELossConfig, lpips: LPIPS | None = None) -> dict[str, jax.Array]:
    """The unweighted-by-flag loss terms of one forward (`out` from `vae_forward`), float32 scalars:

      nll       pixel NLL(L1 + w_p·LPIPS)    (only when `out` has x_rec)
      kl        kl_loss_weight · KL          (temporal posterior; the 2D one in stage 0)
      z_nll     NLL(x_z, x_z_rec), no LPIPS  (not in stage 0)
      identity  NLL(x_z, z), no LPIPS        (only when T == 1)
    """
    terms = {}
    if "x_rec" in out:
        perceptual = None
        if lpips is not None and cfg.perceptual_loss_weight > 0:
            dtype = lpips.lin_weights[0].dtype  # the reference runs LPIPS in the training dtype (bf16)
            perceptual = lpips(_frames(x).astype(dtype), _frames(out["x_rec"]).astype(dtype))
        terms["nll"] = nll_loss(x, out["x_rec"], logvar=cfg.logvar, perceptual=perceptual,
                                perceptual_weight=cfg.perceptual_loss_weight, kind=cfg.pixel_loss)
    terms["kl"] = cfg.kl_loss_weight * kl_loss(out["mean"], out["logvar"])
    if "x_z_rec" in out:  # absent in stage 0 (2D VAE alone)
        terms["z_nll"] = nll_loss(out["x_z"], out["x_z_rec"], logvar=cfg.logvar, kind=cfg.latent_loss)
    if x.shape[1] == 1 and "z" in out:
        terms["identity"] = nll_loss(out["x_z"], out["z"], logvar=cfg.logvar, kind=cfg.latent_loss)
    return terms


def term_weights(terms: dict, cfg: VAELossConfig) -> dict[str, float]:
    """Flag weight (0 or 1) of each term in the generator loss (the adversarial term is weighted apart)."""
    weights = {"nll": float(cfg.use_real_rec_loss), "kl": float(cfg.use_real_rec_loss),
               "z_nll": float(cfg.use_z_rec_loss), "identity": float(cfg.use_image_identity_loss)}
    return {name: weights.get(name, 0.0) for name in terms}
