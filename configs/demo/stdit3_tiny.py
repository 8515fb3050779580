"""Demo model, the diffusion part: a tiny STDiT3 trained with train.py on precomputed features of the
synthetic shapes dataset (latents of the demo VAE, embeddings of the demo T5). See assets/demo/README.md.

    python train.py --config configs/demo/stdit3_tiny.py --features RUN/features --out-dir RUN/stdit3

Architecture: depth 3, hidden 96, 4 heads, patch 1×2×2 over 5×8×8×4 latents (17 frames at 32×32) →
80 tokens; captions of 16 tokens from the 64-wide demo T5. Plain text-to-video training (no frame
conditioning masks): the demo's job is to follow the prompt.

Batch 8 (the "demo" bucket config of the features step), 12000 steps: on 2 CPU cores a step costs about
linearly in the batch (8: 0.062 s, 16: 0.117 s, 32: 0.23 s), and per second of training the small batch
learns the prompts fastest. Prompt-grid match at cfg 2.5 (seeds 2-5, one VAE): batch 8 85% after 6000
steps (6 min), 90% after 8000 (8 min), 92% after 12000; batch 16 85% after 4000 (8 min), 91% after
6000 (12 min); batch 32 75% after 2000 (8 min), 87% after 3000 (12 min). Over three seeds of the whole
recipe the worst model matched 84% after 8000 steps and 92% after 12000.
"""

import ml_collections

from configs.opensora_v1_2.train_common import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.out_dir = "outputs/demo_stdit3"
    c.model_preset = ""
    c.model = ml_collections.ConfigDict(dict(depth=3, hidden_size=96, num_heads=4, caption_channels=64,
                                             model_max_length=16, qk_norm=True))
    c.dtype = "float32"
    c.remat = "nothing"
    c.freeze_y_embedder = False  # trained from scratch: the caption projection must learn too
    c.data.features = "outputs/demo_features"
    c.data.num_workers = 0
    c.mask_ratios = {}
    # No resolution-dependent time shift: at 32×32 it would be 0.14 (designed for ≥ 256² it shifts towards
    # noise), so training and sampling would spend nearly all their time at low noise, where colour and
    # motion are already decided.
    c.scheduler.use_timestep_transform = False
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.995
    c.steps = 12000
    c.ckpt_every = 2000
    c.keep_checkpoints = 1
    c.log_every = 1000
    return c
