#!/usr/bin/env bash
# One-shot GPU run of the memory/speed sweep (the `gpu`-marked tests) in the machine's own
# Python environment: no installs, no network. Reports (JSON, Markdown, PNG) and the
# pytest-benchmark JSON go to $OUT (default reports/gpu). `timeout` guards the whole run;
# pytest gets SIGINT first so it still prints its summary, then SIGKILL 20 s later.
#
# Only tests/gpu is collected, so a test module elsewhere that cannot import on the GPU
# machine (other library releases) cannot stop the sweep; `nox -s gpu_tests` runs every
# gpu-marked test instead.
#
#   scripts/gpu_sweep.sh            # extra arguments go to pytest
#   GPU_SWEEP_TIMEOUT=420 PYTHON=python3 OUT=/tmp/out scripts/gpu_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-reports/gpu}"
PYTHON="${PYTHON:-python3}"   # the GPU image's python3 is the one that holds CUDA torch
LIMIT="${GPU_SWEEP_TIMEOUT:-450}"
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" QFORMER_LORA_REPORT_DIR="$OUT" PYTHONUNBUFFERED=1
# the sweep plans within the same limit (tests/gpu/conftest.py stops starting configurations
# when too little of it is left); without this it would plan for its default 480 s
export QFORMER_LORA_GPU_BUDGET_S="${QFORMER_LORA_GPU_BUDGET_S:-$LIMIT}"

"$PYTHON" -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| transformers', transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

start=$(date +%s)
status=0
timeout --signal=INT --kill-after=20 "$LIMIT" \
    "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --benchmark-json="$OUT/benchmark.json" tests/gpu "$@" \
    || status=$?
echo "gpu_sweep: exit $status after $(( $(date +%s) - start )) s (limit ${LIMIT} s); files in $OUT:"
ls -l "$OUT"
exit "$status"
