#!/usr/bin/env bash
# GPU checks in one short run, for a machine with a CUDA GPU (and possibly no network).
#
#   where there is network, once:  bash benchmarks/gpu_check.sh --download benchmarks/gpu_wheels
#   on the GPU machine:            bash benchmarks/gpu_check.sh [--wheels benchmarks/gpu_wheels] [--quick]
#
# --download fetches (GPU_PYTHON_VERSION=3.12 for another Python than this one's), without their dependencies, the wheels a bare GPU machine (torch + CUDA,
# transformers, accelerate, peft, pyarrow) lacks for these checks: benchmarks/gpu_wheels.txt.
# --wheels installs them from that folder (no index, no dependencies). Then it runs the tests
# marked gpu (tests/test_gpu.py; each skips when a library it needs is absent) and
# benchmarks/gpu_check.py (drawer images/s at SD-1.5's size, describer tokens/s), and writes
# benchmarks/results/gpu_check_<device>.json and gpu_check_<device>.pytest.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""; QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --download) mkdir -p "$2"
                # GPU_PYTHON_VERSION=3.12: wheels for the GPU machine's Python rather than this one's
                grep -v '^#' benchmarks/gpu_wheels.txt | xargs $PY -m pip download -q --no-deps -d "$2" \
                  ${GPU_PYTHON_VERSION:+--python-version $GPU_PYTHON_VERSION --only-binary=:all:}
                du -sh "$2"; exit 0 ;;
    --wheels) WHEELS="$2"; shift ;;
    --quick) QUICK="--quick" ;;
    *) echo "gpu_check.sh: unknown option $1 (known: --download DIR, --wheels DIR, --quick)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device on this machine')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SLUG=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name(0).lower()).strip('_'))")
mkdir -p benchmarks/results
set +e
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "benchmarks/results/gpu_check_${SLUG}.pytest.txt"
TESTS=${PIPESTATUS[0]}
set -e
$PY benchmarks/gpu_check.py $QUICK
exit "$TESTS"
