"""Open-Sora 2.0 text/image/video-to-video sampling with opensora-jax (sample.py --family opensora_v2_0).

    python sample.py --family opensora_v2_0 --ckpt-dir ckpts --prompt "raining, sea"
    python sample.py --config configs/opensora_v2_0/sample_768px.py --ckpt-dir ckpts --mesh sequence=8 --prompt "..."
    python sample.py --family opensora_v2_0 --ckpt-dir ckpts --cond-type i2v_head --reference first.png --prompt "..."

Checkpoints: one --ckpt-dir laid out as the reference's ckpts/ (Open_Sora_v2.safetensors, hunyuan_vae.safetensors,
google/t5-v1_1-xxl/, openai/clip-vit-large-patch14/), or --mmdit/--vae/--t5/--clip, each a converted directory or
the reference's file. Prompts get the reference's suffixes ("... 24 FPS. 4 motion score."). Every flag sets a
field of the config (configs/opensora_v2_0/sample_256px.py unless --config); any field can also be set as
--config.FIELD=VALUE. The final config is saved as OUT_DIR/config.json, and each video gets a JSON sidecar.
"""

from __future__ import annotations

import sys

import convert
from opensora_jax.config_utils import config_from_cli, config_parser
from opensora_jax.families import FAMILIES
from opensora_jax.parallel import initialize_distributed
from opensora_jax.pipelines.run import run

DEFAULT_CONFIG = FAMILIES["opensora_v2_0"].sample_config

# flag → (config field, type, help)
FLAGS = {
    "--prompt": ("prompts", str, "a prompt; repeat the flag for several"),
    "--prompt-file": ("prompt_file", str, "text file with one prompt per line, or the reference's prompt CSV "
                      "(.csv with a text column; optional ref and neg columns set --reference / --negative-prompt "
                      "per row)"),
    "--negative-prompt": ("negative_prompt", str, "negative prompt for guidance (default: the empty prompt); "
                          "repeat per prompt or give one for all"),
    "--resolution": ("resolution", str, "256px (default) or 768px"),
    "--aspect-ratio": ("aspect_ratio", str, "W:H as the reference names them: 16:9 (default, 192x336 at 256px), "
                       "9:16, 1:1, 4:3, 3:4, 3:2, 2:3, 2:1, 1:2, 2.39:1, 1:2.39, 1.85:1, 1:1.85, 5:8, 8:5"),
    "--num-frames": ("num_frames", int, "pixel frames: 4k+1 for the Hunyuan VAE (1 = an image, written as PNG; "
                     "default 129), a multiple of 4 for the DC-AE"),
    "--fps": ("fps", int, "frame rate in the prompt suffix and of the MP4 (default 24)"),
    "--motion-score": ("motion_score", str, "motion score in the prompt suffix (default 4; '' to omit)"),
    "--steps": ("num_steps", int, "denoising steps (default 50)"),
    "--guidance": ("guidance", float, "text guidance scale (default 7.5)"),
    "--guidance-img": ("guidance_img", float, "image guidance scale (default 3.0)"),
    "--flow-shift": ("flow_shift", float, "time-shift strength; default: from the resolution and length"),
    "--seed": ("seed", int, "random seed of the initial noise (default 42)"),
    "--cond-type": ("cond_type", str, "t2v (default), i2v_head, i2v_tail, i2v_loop, v2v_head, v2v_tail, "
                    "v2v_head_easy, v2v_tail_easy"),
    "--reference": ("reference_path", str, "reference image or video for --cond-type (i2v_loop: head;tail); "
                    "repeat per prompt or give one for all"),
    "--batch-size": ("batch_size", int, "prompts per batch (default 1)"),
    "--num-sample": ("num_sample", int, "videos per prompt (default 1)"),
    "--out-dir": ("out_dir", str, "where videos, sidecars and config.json go (default samples/)"),
    "--dtype": ("dtype", str, "models' dtype: bfloat16 (default, as the reference) or float32"),
    "--attention": ("attention", str, "auto (default), blockwise, xla, cudnn or splash (see README)"),
    "--mesh": ("mesh", str, "device mesh, e.g. 'fsdp=8' (shards the 11B) or 'sequence=8' (ring attention over "
               "the joint sequence); default: one device"),
    "--ckpt-dir": ("ckpt_dir", str, "a directory laid out as the reference's ckpts/ (all four models)"),
    "--mmdit": ("mmdit", str, "MMDiT checkpoint: converted directory or Open_Sora_v2.safetensors"),
    "--vae": ("vae", str, "autoencoder checkpoint: converted directory or hunyuan_vae.safetensors"),
    "--vae-kind": ("vae_kind", str, "hunyuan_vae (default) or dc_ae"),
    "--t5": ("t5", str, "T5 encoder: converted directory or the google/t5-v1_1-xxl folder"),
    "--clip": ("clip", str, "CLIP text tower: converted directory or the openai/clip-vit-large-patch14 folder"),
    "--t5-tokenizer": ("t5_tokenizer", str, "T5 tokenizer directory; default: beside the T5 checkpoint"),
    "--clip-tokenizer": ("clip_tokenizer", str, "CLIP tokenizer directory (vocab.json, merges.txt); default: beside "
                         "the CLIP checkpoint"),
    "--lora": ("lora", str, "LoRA adapter directory (lora.json + adapters.safetensors), merged into the MMDiT "
               "as it loads"),
}
LIST_FIELDS = {"prompts", "reference_path", "negative_prompt"}


def build_parser():
    parser = config_parser("sample.py --family opensora_v2_0", __doc__,
                           "ml_collections config file with get_config() (default: "
                           "configs/opensora_v2_0/sample_256px.py)", FLAGS, LIST_FIELDS, config_required=False)
    parser.add_argument("--family", default="opensora_v2_0", help="model family (this help: opensora_v2_0)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars [config: progress=False]")
    parser.add_argument("--overwrite", action="store_true",
                        help="number files from sample_0000 again; default: the next free index [config: overwrite]")
    parser.add_argument("--paste-all-samples", action="store_true",
                        help="paste the reference frames back into every sample of a batch; the reference does it "
                        "for the first sample only, which stays the default for parity [config: paste_all_samples]")
    return parser


def make_config(argv: list[str]):
    parser = build_parser()
    parser.set_defaults(config=str(DEFAULT_CONFIG))
    config, args = config_from_cli(argv, parser, FLAGS, LIST_FIELDS)
    config.progress = config.progress and not args.no_progress
    config.overwrite = config.overwrite or args.overwrite
    config.paste_all_samples = config.paste_all_samples or args.paste_all_samples
    return config


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = make_config(argv)
    initialize_distributed()
    run(config, load=convert.load_model)
    return 0
