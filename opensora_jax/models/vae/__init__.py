"""Video VAEs. Open-Sora v1.2: `OpenSoraVAE` (2D KL autoencoder per frame + causal temporal VAE).

All public tensors are channels-last: video (B, T, H, W, 3) in [-1, 1], latent (B, T', H', W', 4).
"""

from opensora_jax.models.vae.opensora_v1_2 import (
    OPENSORA_VAE_V1_2_PRESET,
    OpenSoraVAE,
    OpenSoraVAEConfig,
    build,
    decode_jit,
    encode_jit,
)
from opensora_jax.models.vae.spatial import SPATIAL_LATENT_SCALE, AutoencoderKL, SpatialVAEConfig
from opensora_jax.models.vae.temporal import TemporalVAE, TemporalVAEConfig

__all__ = [
    "OPENSORA_VAE_V1_2_PRESET",
    "SPATIAL_LATENT_SCALE",
    "AutoencoderKL",
    "OpenSoraVAE",
    "OpenSoraVAEConfig",
    "SpatialVAEConfig",
    "TemporalVAE",
    "TemporalVAEConfig",
    "build",
    "decode_jit",
    "encode_jit",
]
