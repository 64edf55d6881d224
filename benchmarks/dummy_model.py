"""A model directory for dummy-weight runs (``load_format="dummy"``): config.json of a real model's
shape plus a small byte-level BPE tokenizer trained offline (no model hub is reachable).

    python benchmarks/dummy_model.py /tmp/llama3-8b --shape llama3-8b

Shapes: ``llama3-8b`` (32 layers, 32 q / 8 KV heads, head_dim 128), ``llama3-8b-narrow`` (the same
layers and heads at head_dim 8: host costs on the CPU) and ``qwen2-7b`` (28 layers, 28 q / 4 KV heads,
head_dim 128). The vocabulary is the tokenizer's (2,000 tokens), so the LM head
costs less than the real model's 128k-token head; attention and MLP are full size.
"""
from __future__ import annotations

import argparse
import os
import random

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rope_theta=500000.0),
    # llama3-8b's layers and heads (so its head-block bookkeeping) at head_dim 8: the host's share
    # of a step, on the CPU
    "llama3-8b-narrow": dict(architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=131072, rope_theta=500000.0),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=131072, rope_theta=1000000.0),
}


def make_dummy(path: str, shape: str = "llama3-8b", vocab_size: int = 2000) -> str:
    """Write config.json + tokenizer for ``shape`` into ``path`` (once) and return ``path``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog secret code is needle haystack city river".split()
    tok.train_from_iterator([" ".join(rng.choice(words) for _ in range(50)) for _ in range(2000)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # a plain chat template so /v1/chat/completions works
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(path)
    spec = dict(SHAPES[shape])
    cls = Qwen2Config if spec["architectures"] == ["Qwen2ForCausalLM"] else LlamaConfig
    cls(vocab_size=len(fast), torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **spec).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    args = parser.parse_args()
    print(make_dummy(args.path, args.shape))


if __name__ == "__main__":
    main()
