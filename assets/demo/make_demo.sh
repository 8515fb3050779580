#!/usr/bin/env bash
# Re-creates the demo model (assets/demo) from nothing on a CPU: synthetic data, a tokenizer and random
# T5, the VAE (2D stage, then temporal stage), latent statistics, precomputed features, STDiT3, and the
# quality check. Run from the repository root:
#
#     bash assets/demo/make_demo.sh [RUN_DIR]        # default RUN_DIR: outputs/demo_run
#
# PYTHON picks the interpreter (default: python). SEED seeds every step: data, T5 weights, VAE and
# STDiT3 init, batch order, noise; another SEED is a fresh draw of the whole recipe. The default, 1, made
# the committed model (assets/demo/README.md has the other seeds' figures). The finished model is
# RUN_DIR/model/{stdit3,vae,t5}. About 21 minutes on 2 idle CPU cores.
set -euo pipefail
RUN=${1:-outputs/demo_run}
PY=${PYTHON:-python}
SEED=${SEED:-1}
START=$(date +%s)
# Re-running into the same RUN_DIR resumes a killed run (data and T5 are re-made identically, the training
# stages continue from their checkpoints); only with the seed it was started with.
if [[ -f "$RUN/SEED" && "$(cat "$RUN/SEED")" != "$SEED" ]]; then
    echo "make_demo.sh: $RUN was started with SEED=$(cat "$RUN/SEED"), not $SEED: pick another RUN_DIR" >&2
    exit 2
fi
mkdir -p "$RUN" && echo "$SEED" > "$RUN/SEED"
stamp() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

stamp "1/9 synthetic dataset (2000 clips) and held-out clips (64)"
$PY -m opensora_jax.data.synthetic "$RUN/data" --num-clips 2000 --frames 20 --size 32 32 --seed "$SEED" \
    --format npy --short-caption-ratio 0.5
$PY -m opensora_jax.data.synthetic "$RUN/heldout" --num-clips 64 --frames 20 --size 32 32 --seed "$((SEED + 1))" \
    --format npy

stamp "2/9 tokenizer (SentencePiece on the captions) + random T5 encoder"
$PY -m opensora_jax.tools.tiny_t5 --csv "$RUN/data/train.csv" "$RUN/t5" --seed "$SEED" --overwrite

stamp "3/9 VAE stage 0: the 2D VAE as an image autoencoder"
$PY train_vae.py --config configs/demo/vae_tiny_2d.py --csv "$RUN/data/train.csv" --seed "$SEED" \
    --eval-csv "$RUN/heldout/train.csv" --out-dir "$RUN/vae_2d"

stamp "4/9 standardise the 2D latents (exact reparametrisation)"
$PY -m opensora_jax.tools.latent_stats --spatial --vae "$RUN/vae_2d/vae_model" --csv "$RUN/data/train.csv" \
    --frames 17 --size 32 32 --max-batches 16 --overwrite "$RUN/vae_2d_std"

stamp "5/9 VAE stage 1: the temporal VAE on the frozen 2D VAE"
$PY train_vae.py --config configs/demo/vae_tiny.py --csv "$RUN/data/train.csv" --seed "$SEED" \
    --eval-csv "$RUN/heldout/train.csv" --config.from_pretrained="$RUN/vae_2d_std" --out-dir "$RUN/vae_temporal"

stamp "6/9 latent statistics → the VAE's shift/scale"
$PY -m opensora_jax.tools.latent_stats --vae "$RUN/vae_temporal/vae_model" --csv "$RUN/data/train.csv" \
    --frames 17 --size 32 32 --overwrite "$RUN/vae"

stamp "7/9 features: VAE latents + T5 embeddings of one epoch"
$PY -m opensora_jax.cli.features --csv "$RUN/data/train.csv" --vae "$RUN/vae" --t5 "$RUN/t5" \
    --bucket-config demo --resolutions synthetic --model-max-length 16 --dtype float32 --seed "$SEED" \
    --overwrite "$RUN/features"

stamp "8/9 STDiT3 from the features"
$PY train.py --config configs/demo/stdit3_tiny.py --features "$RUN/features" --seed "$SEED" --out-dir "$RUN/stdit3"

stamp "9/9 assemble RUN/model and check it"
rm -rf "$RUN/model" && mkdir -p "$RUN/model"
cp -r "$RUN/stdit3/ema_model" "$RUN/model/stdit3"
cp -r "$RUN/vae" "$RUN/model/vae"
cp -r "$RUN/t5" "$RUN/model/t5"
stamp "trained in $(( $(date +%s) - START )) s"
$PY -m opensora_jax.tools.shape_metrics --model-dir "$RUN/model" --seeds 2 | tail -1
