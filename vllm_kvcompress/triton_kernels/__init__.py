"""Triton kernels of the paged head-block cache, each with its PyTorch reference in
:mod:`vllm_kvcompress.paged.reference` (or :mod:`vllm_kvcompress.policies.observation`) and tested against
it in ``tests/triton_kernels`` (natively on a GPU, under ``TRITON_INTERPRET=1`` on the CPU).

What the vLLM plugin calls, through :mod:`vllm_kvcompress.vllm.attention.kernels` and :mod:`~vllm_kvcompress.paged`:

* ``decode_attention``: decode rows over each head's own pages (split-K with a merge);
* ``write_tokens``: new K/V rows into per-head slots;
* ``paged_window_scores``: observation-window scores straight from the pages (prefill compression
  of row-selecting policies and decode-time recompression);
* ``compaction``: each head's kept rows to the front of its pages, in place (``compact_rows``);
* ``gather_rows``: heads' K and V rows copied densely, right-aligned with zero padding, for the
  reducers that write rows (EMS's merges at a decode-time recompression);
* ``column_mass``: EMS's causal column mass (its global score) during prefill;
* ``redundancy``: EMS's nearest centre of each row that can merge (its classes), K and V
  cosines on tensor cores, nothing of size rows x centres in memory;
* ``merge``: EMS's weighted merge of rows into their classes, K and V in one launch
  (both through :mod:`vllm_kvcompress.paged.merge`).

Benchmark-only alternatives, which the plugin does not call (``benchmarks/bench_cache_ops.py``
compares them with what it does call): ``window_scores`` (dense keys: the plugin scores from the
pages instead) and the CUDA C++ compaction in ``csrc/`` (``KVC_COMPACTION=cuda``).

:func:`runs_on` is the one rule for kernel against reference.
"""
from __future__ import annotations

import torch


def runs_on(where: torch.Tensor | torch.device | str) -> bool:
    """Whether the cache operations on a tensor (or a device) run as Triton kernels: on CUDA they
    do; on the CPU the PyTorch references run (Triton's interpreter is far slower; tests call the
    kernels directly to run them there)."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cuda"
