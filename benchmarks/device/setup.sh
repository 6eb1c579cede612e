# Sourced by the recommender device drivers: go to the repository root, install the wheels the device image
# lacks (.whl/, see README.md), and set the environment every run uses. Defines T0 (start time) and B.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1  # the repository root
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
B=benchmarks/quantized_recsys.py
