"""The HF transformers reference engine: what the vLLM plugin is checked against token for token."""
