#!/usr/bin/env bash
# Installs PyTorch into the virtual environment whose pip is $1.
# With CUDA (nvidia-smi answers) the default build; without it, the CPU build:
# first the local CPU wheel if the machine carries one, else PyTorch's own CPU index.
set -euo pipefail
pip="$1"
python="$(dirname "$pip")/python"
if "$python" -c "import torch" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$pip" install "torch>=2.4"
elif "$pip" install "torch==2.13.0+cpu" 2>/dev/null; then
    :
else
    "$pip" install "torch>=2.4" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
