#!/usr/bin/env bash
# Reproduce the paper's grid on the embedded data:
#   l in {32, 64, 256} at beta = 1 (Table 1) and beta in {0.1, 0.5, 1, 2, 10} at l = 64 (Table 2),
# the ensemble on the beta = 10 model, and the two bundled checkpoints.
#   bash training/reproduce.sh            # everything
#   bash training/reproduce.sh data       # only generate data + slice caches (needs SimpleITK, nilearn)
#   bash training/reproduce.sh train      # train + evaluate from the caches (torch only; GPU if present)
#   bash training/reproduce.sh bundle     # copy the two models into VAEAnomaly/Resources/Models
# Environment: DATA (data), RUNS (runs), EPOCHS (300), MAX_MINUTES (0: none; stops each run early), HEALTHY (100), LESION (40), PY (python).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
DATA=${DATA:-data}; RUNS=${RUNS:-runs}; EPOCHS=${EPOCHS:-300}; PY=${PY:-python}; MAX_MINUTES=${MAX_MINUTES:-0}
HEALTHY=${HEALTHY:-100}; LESION=${LESION:-40}
mkdir -p "$RUNS" docs

if [[ $stage == all || $stage == data ]]; then
  $PY training/make_data.py --out "$DATA" --healthy "$HEALTHY" --lesion "$LESION"
fi

if [[ $stage == all || $stage == train ]]; then
  configs=("32 1" "64 1" "256 1" "64 0.1" "64 0.5" "64 2" "64 10")
  for c in "${configs[@]}"; do
    set -- $c
    $PY training/train.py --cache "$DATA/healthy.npz" --latent "$1" --beta "$2" --epochs "$EPOCHS" --max-minutes "$MAX_MINUTES" \
      --out "$RUNS/l$1_b$2.safetensors" --name "l$1-b$2" \
      --data-description "embedded healthy cohort: $HEALTHY generated T2 brains (MNI152 anatomy), seed 0" \
      > "$RUNS/l$1_b$2.log" 2>&1 &
  done
  wait
  # Table 1 and the two ensembles in parallel (they write different checkpoints), then Table 2
  $PY training/evaluate.py --cache "$DATA/lesion.npz" --row latent --out docs/table1_latent \
    --title "Table 1 (embedded data): VAE (β = 1), latent size l" \
    --checkpoints "$RUNS/l32_b1.safetensors" "$RUNS/l64_b1.safetensors" "$RUNS/l256_b1.safetensors" \
    > "$RUNS/table1.log" 2>&1 &
  $PY training/fit_ensemble.py --checkpoint "$RUNS/l64_b10.safetensors" --cache "$DATA/lesion.npz" \
    --out docs/ensemble_l64_b10.md > "$RUNS/ensemble_b10.log" 2>&1 &
  $PY training/fit_ensemble.py --checkpoint "$RUNS/l64_b1.safetensors" --cache "$DATA/lesion.npz" \
    --out docs/ensemble_l64_b1.md > "$RUNS/ensemble_b1.log" 2>&1 &
  wait
  $PY training/evaluate.py --cache "$DATA/lesion.npz" --row beta --out docs/table2_beta \
    --title "Table 2 (embedded data): β-VAE (l = 64), β" --update-card \
    --checkpoints "$RUNS/l64_b0.1.safetensors" "$RUNS/l64_b0.5.safetensors" "$RUNS/l64_b1.safetensors" \
                  "$RUNS/l64_b2.safetensors" "$RUNS/l64_b10.safetensors"
fi

if [[ $stage == all || $stage == bundle ]]; then
  $PY training/bundle.py "$RUNS/l64_b1.safetensors" --name vae-l64-b1
  $PY training/bundle.py "$RUNS/l64_b10.safetensors" --name bvae-l64-b10
fi
