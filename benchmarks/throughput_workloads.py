"""The throughput benchmark's workloads (``--workloads``) and configurations (``--configs``: ``plain``,
``plain-v1``, ``POLICY@BUDGET[+graphs]``), and the plugin options a configuration gives its engine.
Shared by the parent (``throughput.py``), its child processes (``throughput_child.py``) and the
results (``throughput_results.py``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

POOL_BLOCK_SIZE = 16  # block size pinned for both when --kv-pool-tokens sizes the pool


@dataclass(frozen=True)
class Workload:
    """prompt_len/output_len: tokens (served: the means of the random dataset, +- range_ratio)."""

    name: str
    prompt_len: int
    output_len: int
    description: str
    served: bool = False
    range_ratio: float = 0.0

    @property
    def max_prompt(self) -> int:
        return math.floor(self.prompt_len * (1 + self.range_ratio))

    @property
    def max_model_len(self) -> int:
        """Longest prompt + longest output, rounded up to a multiple of 128."""
        longest = self.max_prompt + math.floor(self.output_len * (1 + self.range_ratio))
        return -(-longest // 128) * 128


WORKLOADS = {
    "a": Workload("a", 16384, 1024, "16k prompt / 1k output, offline"),
    "b": Workload("b", 32768, 512, "32k prompt / 512 output, offline"),
    "c": Workload("c", 2048, 8192, "2k prompt / 8k output (long generation), offline"),
    "d": Workload("d", 8192, 512, "OpenAI server, Poisson arrivals, prompts 8k +-50%, outputs 512 +-50%",
                  served=True, range_ratio=0.5),
}
QUICK_WORKLOADS = {  # --quick: same kinds, CPU-sized
    "a": Workload("a", 300, 8, "--quick: 300 prompt / 8 output, offline"),
    "d": Workload("d", 300, 8, "--quick: OpenAI server, prompts 300 +-20%, outputs 8 +-20%", served=True,
                  range_ratio=0.2),
}
DEFAULT_CONFIGS = "plain,snapkv@0.1,snapkv@0.25,adakv@0.1"
PLAIN = "plain"


@dataclass(frozen=True)
class RunConfig:
    """``plain`` / ``plain-v1`` (stock vLLM; -v1 pins the V1 model runner the plugin uses) or
    ``POLICY@BUDGET`` (budget: tokens per head ``256`` or a fraction of the prompt ``0.1``), with
    ``+graphs`` for the plugin's full CUDA graphs of decode steps (``cuda_graphs``)."""

    label: str
    policy: str  # "none" for plain
    budget: int | float | None = None
    v1_runner: bool = False
    graphs: bool = False

    @property
    def plugin(self) -> bool:
        return self.policy != "none"

    def budget_fraction(self, prompt_len: int) -> float:
        if not self.plugin:
            return 1.0
        if isinstance(self.budget, int):
            return min(1.0, self.budget / prompt_len)
        return float(self.budget)


def parse_config(text: str) -> RunConfig:
    from vllm_kvcompress.policies.budget import Budget
    from vllm_kvcompress.policies.config import PRESET_NAMES

    text = text.strip()
    if text in (PLAIN, "plain-v1"):
        return RunConfig(text, "none", None, v1_runner=text == "plain-v1")
    if "@" not in text:
        raise ValueError(f"configuration {text!r}: expected plain, plain-v1 or POLICY@BUDGET[+graphs] (snapkv@0.1)")
    body, _, flag = text.partition("+")
    if flag not in ("", "graphs"):
        raise ValueError(f"configuration {text!r}: unknown suffix +{flag} (only +graphs)")
    policy, budget_text = body.split("@", 1)
    if policy not in PRESET_NAMES or policy == "none":
        raise ValueError(f"configuration {text!r}: unknown policy {policy!r} ({', '.join(PRESET_NAMES[1:])})")
    budget = Budget.parse(budget_text)
    value = budget.tokens if budget.tokens is not None else budget.fraction
    return RunConfig(f"{policy}@{value}" + ("+graphs" if flag else ""), policy, value, graphs=bool(flag))


def compression_options(config: RunConfig, extra: dict) -> dict | None:
    """The plugin's validated options (CompressionConfig defaults filled in), None for plain."""
    if not config.plugin:
        return None
    from vllm_kvcompress.policies.config import CompressionConfig

    if "cuda_graphs" in extra:
        raise ValueError("--kv-options: cuda_graphs is chosen per configuration (POLICY@BUDGET+graphs)")
    # explicit, so that a label without +graphs means no graphs on any device
    return CompressionConfig.from_dict({**extra, "policy": config.policy, "budget": config.budget,
                                        "cuda_graphs": config.graphs}).to_dict()
