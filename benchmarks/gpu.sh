#!/usr/bin/env bash
# The GPU run, ready to go: on a machine with CUDA, runs the gpu-marked tests and the device benchmarks and
# writes the figures, with the device named, to BENCHMARKS.md (target: under 8 minutes on one modern GPU).
#
#   bash benchmarks/gpu.sh                 # CUDA machine: the real sizes (256^3 and 512^3, gate on 256^3)
#   bash benchmarks/gpu.sh --dry           # any machine (CPU): tiny sizes, figures to a scratch file
#   bash benchmarks/gpu.sh --dry --md F    # ... to F
#
# Steps: (1) pytest -m gpu (skipped without CUDA), (2) bench_gpu.py: exact tiled prediction voxels/s in
# float32 and autocast bfloat16/float16 (BatchNorm statistics stay float32) with the measured difference to
# float32, (3) bench_gate.py: the gate's time on a 256^3 volume vs one tiled prediction (target < 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
MD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --md) MD="$2"; shift ;;
    *) echo "unknown argument $1 (use --dry, --md FILE)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  MD=${MD:-$(mktemp --suffix=.md)}
  BENCH=(--dry --device cpu)
  GATE=(--quick --device cpu)
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device here: use --dry for the CPU smoke run" >&2
    exit 2
  fi
  MD=${MD:-BENCHMARKS.md}
  BENCH=()
  GATE=(--size 256)
fi
start=$(date +%s)
echo "== gpu-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || [ $? -eq 5 ]
echo "== device throughput"
"$PY" benchmarks/bench_gpu.py "${BENCH[@]}" --md "$MD"
echo "== gate time"
"$PY" benchmarks/bench_gate.py "${GATE[@]}" --md "$MD"
echo "== done in $(( $(date +%s) - start )) s; figures in $MD"
