"""Open-Sora 2.0 with the Video DC-AE (configs/diffusion/inference/high_compression.py): 768px, 128 frames,
the DC-AE MMDiT (patch 1, 128 latent channels) and raw DC-AE latents."""

from configs.opensora_v2_0 import sample_256px


def get_config():
    c = sample_256px.get_config()
    c.resolution = "768px"
    c.num_frames = 128  # a multiple of 4 for the (non-causal) DC-AE
    c.vae_kind = "dc_ae"
    return c
