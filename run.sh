#!/usr/bin/env bash
# One command for each thing a newcomer wants:
#   bash run.sh demo    set up (first time) and run the demo: a generated lesion case scored by a bundled model
#   bash run.sh test    set up (first time) and run the whole test suite
#   bash run.sh bench   set up (first time) and print the predictor speed/memory figures
#   bash run.sh setup   only create .venv and install the project with its test dependencies
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [[ ! -x $VENV/bin/python ]]; then
    "$PY" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import vaeanomaly, torch, slicer, SimpleITK, sklearn, safetensors, nilearn" 2>/dev/null \
     || [[ pyproject.toml -nt $VENV/.installed ]]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    touch "$VENV/.installed"
  fi
}

cmd=${1:-demo}
shift || true
case $cmd in
  setup) setup ;;
  demo)  setup; "$VENV/bin/vaeanomaly" demo "$@" ;;
  test)  setup; "$VENV/bin/python" -m pytest Testing/Python "$@" ;;
  bench) setup; "$VENV/bin/python" benchmarks/bench_predictors.py "$@" ;;
  *) echo "usage: bash run.sh [demo|test|bench|setup]" >&2; exit 2 ;;
esac
