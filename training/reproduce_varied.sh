#!/usr/bin/env bash
# The models that hold up on varied brains: data from the varied generator, the 64x64 beta-VAE
# (fine-tuned from the paper-grid bvae-l64-b10) and a 128x128 beta-VAE (from scratch), calibrated on
# the healthy calibration split, benchmarked per lesion family x domain (held-out EPI domain included)
# with the plain-intensity row, and bundled (float16; the bundled files are what gets benchmarked).
#   bash training/reproduce_varied.sh [data|train|calibrate|bundle|dae|blobs|recalibrate|benchmark|legacy|all]
# dae: the coarse-noise denoising autoencoders (64x64: MINDAE64 CPU minutes, 128x128: MINDAE128), the validation
# split their defaults were chosen on (docs/validation.md), calibration and bundling.
# blobs: dae-128 fine-tuned with sharp-edged blob noise beside the coarse noise (MINBLOBS CPU minutes, one thread),
# calibrated and bundled as dae-128-blobs.
# recalibrate: every bundled model's thresholds again from the calibration split, in place (weights untouched; the
# command is recorded in the checkpoint and its model card), after the inference defaults change.
# Environment: DATA (data/v), LEGACY (data/legacy), RUNS (runs/v), PY (python), MIN64 (40), MIN128 (60):
# CPU minutes per model.
# On 2 CPU cores the two models train side by side, one thread each; on a GPU give more epochs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
DATA=${DATA:-data/v}; LEGACY=${LEGACY:-data/legacy}; RUNS=${RUNS:-runs/v}; PY=${PY:-python}
MIN64=${MIN64:-40}; MIN128=${MIN128:-60}; MINDAE64=${MINDAE64:-35}; MINDAE128=${MINDAE128:-65}; MINBLOBS=${MINBLOBS:-50}
MODELS=VAEAnomaly/Resources/Models
mkdir -p "$RUNS" docs
DESC="varied generator: 150 healthy T2 brains (tse, tse-lowres, tse-3d domains; ages 20-90, pose, atrophy), seeds 0-149"

if [[ $stage == all || $stage == data ]]; then
  $PY training/make_data.py varied --out "$DATA" --train 50 --calibration 8 --benchmark 4 --sizes 64,128
  # the paper-grid lesion cohort (same seeds as training/reproduce.sh): ensemble fitting and the old tables
  $PY training/make_data.py legacy --out "$LEGACY" --healthy 1 --lesion 40
fi
if [[ $stage == all || $stage == train ]]; then
  OMP_NUM_THREADS=1 $PY training/train.py --cache "$DATA/train_64.npz" --image-size 64 --latent 64 --beta 10 \
    --init "$MODELS/bvae-l64-b10.safetensors" --epochs 200 --max-minutes "$MIN64" --val-fraction 0.05 \
    --out "$RUNS/l64_b10.safetensors" --name bvae-l64-b10-v2 --data-description "$DESC" > "$RUNS/l64_b10.log" 2>&1 &
  OMP_NUM_THREADS=1 $PY training/train.py --cache "$DATA/train_128.npz" --image-size 128 --latent 64 --beta 10 \
    --lr 3e-4 --epochs 200 --max-minutes "$MIN128" --val-fraction 0.05 \
    --out "$RUNS/l128_b10.safetensors" --name bvae-l128-b10-v2 --data-description "$DESC" > "$RUNS/l128_b10.log" 2>&1 &
  wait
fi
if [[ $stage == all || $stage == calibrate ]]; then
  # ensemble fitted on 4 legacy lesion cases (never benchmark cases), then every threshold from the calibration split
  $PY training/fit_ensemble.py --checkpoint "$RUNS/l64_b10.safetensors" --cache "$LEGACY/lesion.npz" \
    --out docs/ensemble_l64_b10_v2.md
  $PY training/calibrate.py "$RUNS/l64_b10.safetensors" --cache "$DATA/calibration_64.npz" --all-cases
  $PY training/calibrate.py "$RUNS/l128_b10.safetensors" --cache "$DATA/calibration_128.npz" --all-cases
fi
if [[ $stage == all || $stage == bundle ]]; then
  $PY training/bundle.py "$RUNS/l64_b10.safetensors" --name bvae-l64-b10-v2
  $PY training/bundle.py "$RUNS/l128_b10.safetensors" --name bvae-l128-b10-v2
fi
if [[ $stage == all || $stage == dae ]]; then
  $PY training/make_data.py varied --out "$DATA" --validation 1 --splits validation --sizes 64,128 --workers 1
  OMP_NUM_THREADS=1 $PY training/train_dae.py --cache "$DATA/train_64.npz" --image-size 64 --epochs 300 \
    --max-minutes "$MINDAE64" --out "$RUNS/dae64.safetensors" --name dae-64 --data-description "$DESC" > "$RUNS/dae64.log" 2>&1 &
  OMP_NUM_THREADS=1 $PY training/train_dae.py --cache "$DATA/train_128.npz" --image-size 128 --epochs 300 \
    --max-minutes "$MINDAE128" --out "$RUNS/dae128.safetensors" --name dae-128 --data-description "$DESC" > "$RUNS/dae128.log" 2>&1 &
  wait
  $PY training/calibrate.py "$RUNS/dae64.safetensors" --cache "$DATA/calibration_64.npz" --all-cases --min-region-mm3 100
  $PY training/calibrate.py "$RUNS/dae128.safetensors" --cache "$DATA/calibration_128.npz" --all-cases --min-region-mm3 100
  $PY training/bundle.py "$RUNS/dae64.safetensors" --name dae-64
  $PY training/bundle.py "$RUNS/dae128.safetensors" --name dae-128
fi
if [[ $stage == all || $stage == blobs ]]; then
  OMP_NUM_THREADS=1 $PY training/train_dae.py --cache "$DATA/train_128.npz" --image-size 128 --epochs 300 \
    --max-minutes "$MINBLOBS" --lr 5e-4 --init "$MODELS/dae-128.safetensors" --blobs 6 --blob-radius-mm 3 20 \
    --out "$RUNS/dae128b.safetensors" --name dae-128-blobs --data-description "$DESC" > "$RUNS/dae128b.log" 2>&1
  $PY training/bundle.py "$RUNS/dae128b.safetensors" --name dae-128-blobs
  $PY training/calibrate.py "$MODELS/dae-128-blobs.safetensors" --cache "$DATA/calibration_128.npz" --all-cases \
    --min-region-mm3 100
fi
if [[ $stage == all || $stage == recalibrate ]]; then
  for m in bvae-l64-b10-v2:64 bvae-l128-b10-v2:128 dae-64:64 dae-128:128 dae-128-blobs:128 bvae-l64-b10:64 vae-l64-b1:64; do
    OMP_NUM_THREADS=1 $PY training/calibrate.py "$MODELS/${m%%:*}.safetensors" --cache "$DATA/calibration_${m##*:}.npz" \
      --all-cases
  done
fi
if [[ $stage == all || $stage == benchmark ]]; then
  $PY training/evaluate.py --benchmark "$DATA" --predictors default --out docs/benchmark_varied \
    --title "Benchmark on the held-out varied cohort: what a clinician gets" \
    --checkpoints "$MODELS/bvae-l64-b10.safetensors" "$MODELS/vae-l64-b1.safetensors" \
                  "$MODELS/bvae-l64-b10-v2.safetensors" "$MODELS/bvae-l128-b10-v2.safetensors" \
                  "$MODELS/dae-64.safetensors" "$MODELS/dae-128.safetensors"
  $PY training/evaluate.py --benchmark "$DATA" --predictors default --checkpoints "$MODELS/dae-64.safetensors" \
    --variants polarity=bright evidence=intensity paper --out docs/benchmark_dae_variants --no-verdicts \
    --title "dae-64 with other settings (the held-out benchmark)" --lead "dae-64 dae-residual [polarity=bright]"
  $PY training/evaluate.py --benchmark "$DATA" --predictors default \
    --checkpoints "$MODELS/dae-128-blobs.safetensors" "$MODELS/dae-128.safetensors" --variants default polarity=bright \
    --out docs/benchmark_dae128_blobs --lead "dae-128-blobs dae-residual" \
    --title "dae-128-blobs (blob noise) beside dae-128 on the held-out varied benchmark"
fi
if [[ $stage == all || $stage == legacy ]]; then
  # the paper-grid lesion cohort (Table 2's β = 10 row), bundled files, five non-projection predictors
  $PY training/evaluate.py --cache "$LEGACY/lesion.npz" --predictors rec-error,elbo-grad,kl-grad,rec-grad,combi \
    --out docs/legacy_cohort_v2 --title "Old embedded lesion cohort: paper-grid model vs the varied models (64x64)" \
    --checkpoints "$MODELS/bvae-l64-b10.safetensors" "$MODELS/bvae-l64-b10-v2.safetensors"
fi
