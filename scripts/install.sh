#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with optimum-odllm and its test extras.
# torch==2.13.0 goes first so that nothing later pulls a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# MovieLens-100K ships inside the recbole wheel; we only read its data files, never import recbole.
.venv/bin/python -m pip install -q --no-deps "recbole==1.2.1"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, transformers, optimum_odllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| optimum-odllm', optimum_odllm.__version__)"
