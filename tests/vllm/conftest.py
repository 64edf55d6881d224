"""Fixtures of the vLLM integration tests. Engine tests are ``slow`` and share module-scoped
engines (each start costs ~1 min on 2 CPU cores); everything else loads no model."""
import benchmark_modules
import pytest
from kvc_server import shared_server

from vllm_kvcompress.tools import models
from vllm_kvcompress.tools.openai_server import ServerError, write_chat_template


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


@pytest.fixture(scope="module")
def kvc_plugin_server(request, tiny_model_dir, tmp_path_factory):
    """benchmarks/load.py's server (tiny model, snapkv, budget 32, its ENGINE_FLAGS and POOL_FLAGS),
    ONE start for every test module of the session that uses it (:func:`kvc_server.shared_server`):
    its ``load.Target``."""
    load = benchmark_modules.load("load")

    def start():
        workdir = str(tmp_path_factory.mktemp("kvc-plugin-server"))
        try:
            server, target = load.start_server(workdir, tiny_model_dir, write_chat_template(workdir))
        except ServerError as error:
            pytest.fail(str(error))
        server.target = target
        return server

    return shared_server(request, start).target
