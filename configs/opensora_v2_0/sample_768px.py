"""Open-Sora 2.0 sampling at 768px (configs/diffusion/inference/768px.py): the 256px defaults at 768px; the
reference splits the joint sequence over 8 GPUs there (here: --mesh sequence=8)."""

from configs.opensora_v2_0 import sample_256px


def get_config():
    c = sample_256px.get_config()
    c.resolution = "768px"
    return c
