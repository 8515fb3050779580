"""Sampling with the demo model this project trained itself (assets/demo: tiny VAE, T5 and STDiT3 on the
synthetic shapes dataset). sample.py uses it when no checkpoint is given:

    python sample.py --prompt "a blue square moving up"

It knows colours (red, green, blue, yellow, cyan, magenta, white, purple), shapes (circle, square,
triangle) and directions (left, right, up, down) on a black background, at 32×32 and 17 frames; the
saved video and its frame grid are enlarged 4× (nearest neighbour) to be watchable.
"""

import pathlib

from configs.opensora_v1_2.sample import get_config as v1_2_config

DEMO_DIR = pathlib.Path(__file__).resolve().parents[2] / "assets" / "demo"


def get_config():
    c = v1_2_config()
    c.stdit3 = str(DEMO_DIR / "stdit3")
    c.vae = str(DEMO_DIR / "vae")
    c.t5 = str(DEMO_DIR / "t5")
    c.image_size = (32, 32)
    c.num_frames = "17"
    c.aes = None  # the demo's captions carry no score suffixes
    c.dtype = "float32"
    c.scheduler.num_sampling_steps = 30
    # Chosen on seeds the quality test does not use (2-5): prompt-grid match at cfg 1.5 / 2 / 2.5 / 3 / 7
    # was 85 / 86 / 87 / 84 / 62% and 90 / 92 / 93 / 93 / 82% for two models of the earlier recipe (batch
    # 32), 90 / 90 / 88 / 70% at cfg 2 / 2.5 / 3 / 7 for SEED=0 of this one; above about 3 the colours
    # drift towards their neighbours (blue → purple, yellow → green, white → purple).
    c.scheduler.cfg_scale = 2.5
    c.scheduler.use_timestep_transform = False  # as the demo STDiT3 was trained (configs/demo/stdit3_tiny.py)
    c.save_upscale = 4
    return c
