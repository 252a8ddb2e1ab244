#!/usr/bin/env bash
# One command for each thing a newcomer wants:
#   bash run.sh demo    set up (first time) and run the demo: a generated lesion case scored by a bundled model
#   bash run.sh test    set up (first time) and run the core test suite (tests marked slow are skipped;
#                       RUN_SLOW=1 bash run.sh test runs every test, as CI does: .ci/run)
#   bash run.sh bench   set up (first time) and print the predictor speed/memory figures
#   bash run.sh setup   only create .venv and install the project with its test dependencies
# The library accepts torch>=2.1; this environment pins the CPU build exactly (constraints-cpu.txt).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [[ ! -x $VENV/bin/python ]]; then
    "$PY" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import vaeanomaly, torch, slicer, SimpleITK, sklearn, safetensors, nilearn" 2>/dev/null \
     || [[ pyproject.toml -nt $VENV/.installed ]] || [[ constraints-cpu.txt -nt $VENV/.installed ]]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first, exactly the pinned CPU build, so nothing below pulls another (CUDA) build
    "$VENV/bin/python" -m pip install --quiet -c constraints-cpu.txt torch
    "$VENV/bin/python" -m pip install --quiet -c constraints-cpu.txt -e ".[test]"
    touch "$VENV/.installed"
  fi
}

cmd=${1:-demo}
shift || true
case $cmd in
  setup) setup ;;
  demo)  setup; "$VENV/bin/vaeanomaly" demo "$@" ;;
  test)  setup
         if [[ ${RUN_SLOW:-0} == 1 ]]; then "$VENV/bin/python" -m pytest Testing/Python "$@"
         else "$VENV/bin/python" -m pytest Testing/Python -m "not slow" "$@"; fi ;;
  bench) setup; "$VENV/bin/python" benchmarks/bench_predictors.py "$@" ;;
  *) echo "usage: bash run.sh [demo|test|bench|setup]" >&2; exit 2 ;;
esac
