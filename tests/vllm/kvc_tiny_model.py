"""A tiny random-weight GQA Llama on disk (config.json, a locally trained WordLevel tokenizer,
safetensors weights): 4 layers, 8 query / 2 KV heads, head_dim 32, fp32. Nothing is downloaded."""
from __future__ import annotations

import json
import os

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a secret code is hidden in a long haystack of text",
    "paged attention stores keys and values in fixed size blocks",
    "compression keeps the most important tokens of every head",
    "what is the secret code ? the code is 4 2 7 1",
    "one two three four five six seven eight nine ten",
]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32",
    # large random weights: attention patterns are peaked, so compression changes outputs
    "initializer_range": 0.2,
}


def build(out: str, seed: int = 0) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES * 4, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    config = dict(CONFIG, vocab_size=len(fast))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def head_scores_file(path: str) -> str:
    """A HeadKV score JSON for the tiny model (made-up scores; shapes are what matters)."""
    from vllm_kvcompress.head_scores import HeadScores

    gen = torch.Generator().manual_seed(1)
    L, H = CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"]
    scores = HeadScores(model="tiny-llama", retrieval=torch.rand(L, H, generator=gen).tolist(),
                        retrieval_reasoning=torch.rand(L, H, generator=gen).tolist())
    scores.save(path)
    return path
