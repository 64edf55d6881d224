"""Fixtures of the vLLM integration tests. Engine tests are ``slow`` and share module-scoped
engines (each start costs ~1 min on 2 CPU cores); everything else loads no model."""
import pytest

from vllm_kvcompress.tools import models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of the tiny random-weight GQA Llama (built once per session, in a tmp dir)."""
    return models.tiny_llama_folder(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def head_scores_path(tmp_path_factory):
    return models.tiny_head_scores_file(str(tmp_path_factory.mktemp("scores") / "tiny-scores.json"))


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """The same weights in transformers, for the HF oracle (vllm_kvcompress.reference.hf.generate)."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
