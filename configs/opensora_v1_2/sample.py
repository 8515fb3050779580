"""Open-Sora v1.2 text-to-video sampling, the reference's inference defaults (spec §1.1)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "opensora_v1_2"  # which pipeline (opensora_jax.families)
    # What to generate.
    c.prompts = ml_collections.FieldReference([], field_type=list)
    c.prompt_file = ""
    c.resolution = "240p"
    c.aspect_ratio = "9:16"  # H:W, so 9:16 is landscape (240×426 at 240p)
    c.image_size = ml_collections.FieldReference((), field_type=tuple)  # (H, W): overrides the two above
    c.num_frames = "51"  # a number, or a name such as "2s", "4s"
    c.fps = 24
    c.save_fps = 24
    c.seed = 42
    c.batch_size = 1
    c.num_sample = 1
    c.aes = 6.5  # aesthetic score suffix; None to omit
    c.flow = ml_collections.FieldReference(None, field_type=float)  # motion score suffix
    c.camera_motion = ml_collections.FieldReference(None, field_type=str)
    c.clean_captions = True
    # Conditioning (image-to-video, extension, editing, loops): spec §7.
    c.reference_path = ml_collections.FieldReference([], field_type=list)
    c.mask_strategy = ml_collections.FieldReference([], field_type=list)
    c.loop = 1
    c.condition_frame_length = 5
    c.condition_frame_edit = 0.0
    c.align = 5
    # Models. Paths are converted directories (python -m convert ...) or the reference's weights.
    c.dtype = "bfloat16"  # STDiT3 and VAE; T5 runs in float32 as in the reference
    c.stdit3 = ""
    c.vae = ""
    c.t5 = ""
    c.tokenizer = ""  # default: the T5 checkpoint directory
    c.lora = ""  # a LoRA adapter directory merged into the STDiT3 as it loads (sample.py --lora)
    c.attention = "auto"  # auto (picks per backend) | blockwise | xla | cudnn | splash: models/attention.py
    c.mesh = ""  # device mesh, e.g. "sequence=8" or "data=2,sequence=4"; empty = one device
    # Scheduler (RFLOW kwargs).
    c.scheduler = ml_collections.ConfigDict(dict(
        num_sampling_steps=30, num_timesteps=1000, cfg_scale=7.0, use_timestep_transform=True,
        use_discrete_timesteps=False, step0_rounding_quirk=True,
    ))
    # Output.
    c.out_dir = "samples"
    c.overwrite = False  # True: start at sample_0000 again; False: the next free index in out_dir
    c.frame_grid = True  # a PNG of 8 frames beside each MP4
    c.save_upscale = 1  # nearest-neighbour enlargement of the saved videos
    c.progress = True
    return c
