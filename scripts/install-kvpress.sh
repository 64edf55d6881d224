#!/usr/bin/env bash
# NVIDIA's kvpress 0.5.5 (the reference implementation of SnapKV, StreamingLLM, PyramidKV, AdaKV,
# ExpectedAttention, KVzip...) in a virtual environment of its own: it pins transformers < 5.3,
# which vLLM 0.26 and this project's environment do not use. benchmarks/quality_kvpress.py runs in
# it, on the model folder that benchmarks/quality.py writes (vllm_kvcompress.tools.models).
#   bash scripts/install-kvpress.sh [VENV]          (default ../kvpress-venv beside the repository; ~6 GB, a few minutes)
set -euo pipefail
# default: kvpress-venv beside this repository
VENV="${1:-$(cd "$(dirname "$0")/../.." && pwd)/kvpress-venv}"
python3 -m venv "$VENV"
# the versions the committed kvpress results were made with (kvpress asks torch >= 2.3.1, < 3 and
# transformers >= 4.56, < 5.3); PyPI's torch brings CUDA libraries along, unused on the CPU
"$VENV/bin/pip" install -q torch==2.14.1 kvpress==0.5.5 transformers==5.2.0 safetensors
"$VENV/bin/python" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('kvpress', 'torch', 'transformers')))"
