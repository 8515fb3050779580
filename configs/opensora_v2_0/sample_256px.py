"""Open-Sora 2.0 text/image-to-video sampling at 256px, the reference's inference defaults (spec §1.1).

configs/diffusion/inference/256px.py: 16:9 (W:H), 129 frames, 50 steps, guidance 7.5 (text) / 3.0 (image) with
oscillation and the temporal image-guidance ramp, shift on, 24 fps, motion score 4, bfloat16.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "opensora_v2_0"  # which pipeline (opensora_jax.families)
    # What to generate.
    c.prompts = ml_collections.FieldReference([], field_type=list)
    c.prompt_file = ""
    c.negative_prompt = ml_collections.FieldReference([], field_type=list)  # default: "" for every prompt
    c.resolution = "256px"
    c.aspect_ratio = "16:9"  # W:H, as the reference names them
    c.image_size = ml_collections.FieldReference((), field_type=tuple)  # (H, W): overrides the two above
    c.num_frames = 129  # 4k+1 for the Hunyuan VAE (1 = an image, written as PNG)
    c.fps = 24  # the "24 FPS." prompt suffix and the MP4 rate
    c.save_fps = 24
    c.motion_score = "4"  # the "4 motion score." prompt suffix; "" to omit
    c.seed = 42
    c.batch_size = 1
    c.num_sample = 1
    # Conditioning: t2v, i2v_head, i2v_tail, i2v_loop, v2v_head, v2v_tail, v2v_head_easy, v2v_tail_easy.
    c.cond_type = "t2v"
    c.reference_path = ml_collections.FieldReference([], field_type=list)
    c.paste_all_samples = False  # the reference pastes the reference frames back into batch element 0 only
    # Sampler.
    c.num_steps = 50
    c.guidance = 7.5
    c.guidance_img = 3.0
    c.text_osci = True
    c.image_osci = True
    c.scale_temporal_osci = True
    c.shift = True
    c.flow_shift = ml_collections.FieldReference(None, field_type=float)  # overrides the computed shift
    # Models: converted directories (python -m convert ...) or the reference's files; or ckpt_dir laid out as the
    # reference's ckpts/ (Open_Sora_v2.safetensors, hunyuan_vae.safetensors, google/t5-v1_1-xxl,
    # openai/clip-vit-large-patch14).
    c.ckpt_dir = ""
    c.mmdit = ""
    c.vae = ""
    c.vae_kind = "hunyuan_vae"  # or dc_ae (high_compression.py)
    c.t5 = ""
    c.clip = ""
    c.t5_tokenizer = ""  # default: beside the T5 checkpoint
    c.clip_tokenizer = ""  # default: beside the CLIP checkpoint
    c.lora = ""  # a LoRA adapter directory merged into the MMDiT as it loads (sample.py --lora)
    c.t5_max_length = 512  # T5 tokens, padded and attended unmasked, as the reference
    c.dtype = "bfloat16"
    c.attention = "auto"
    c.mesh = ""  # e.g. "fsdp=8" (256px) or "sequence=8" (768px: ring attention over the joint sequence)
    # Output.
    c.out_dir = "samples"
    c.overwrite = False
    c.frame_grid = True
    c.save_upscale = 1
    c.progress = True
    return c
