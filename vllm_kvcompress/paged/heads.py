"""Heads of the paged cache seen as one observation, without gathering their keys.

:class:`PagedHeads` answers what scorers ask of a
:class:`~vllm_kvcompress.policies.observation.LayerObservation` -- the window's attention mass, lengths,
padding, shapes -- straight from the head-blocks, so decode-time recompression of reducers that
only select rows (``Reducer.selects_rows``) scores and compacts every head due in one pass, with
memory for the scores alone (4 bytes a row instead of the rows' K and V). The heads are laid out
right-aligned in ``width`` columns, as ``LayerObservation.lengths`` describes.

CUDA: the Triton kernel (``vllm_kvcompress/triton_kernels/paged_window_scores.py``); CPU: the PyTorch reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_kvcompress.triton_kernels import runs_on
from vllm_kvcompress.paged import reference
from vllm_kvcompress.paged.query_ring import QueryRing, dense_queries


@dataclass
class PagedHeads:
    """n KV heads from any requests and layers.

    queries: [n, group, count, D] each head's query heads' ``count`` most recent queries (the
        newest at the head's last row), or a :class:`QueryRing` that holds them (decode-time
        recompression: the scoring kernel reads them there); key_cache: [num_blocks, block_size, D];
    head_block_table: int32 [n, max_blocks]; lengths: int64 [n] on the cache's device (rows each
        head holds, all >= count); width: max(lengths), known on the host; k_scale: when key_cache
        is fp8, the key scale of each head's layer, float32 [n] (or [1]: heads of one layer), else None;
    global_attention: float32 [n, width] or None, the prompt's column mass
        (:class:`~vllm_kvcompress.policies.observation.LayerObservation`): a prefill's heads carry it,
        decode-time recompression has no view of the prompt's queries."""

    queries: torch.Tensor | QueryRing
    key_cache: torch.Tensor
    head_block_table: torch.Tensor
    lengths: torch.Tensor
    width: int
    k_scale: torch.Tensor | None = None
    global_attention: torch.Tensor | None = None

    @property
    def window_queries(self) -> torch.Tensor:
        """[n * group, count, D], as LayerObservation holds them (copied out of a ring)."""
        return dense_queries(self.queries).flatten(0, 1)

    @property
    def device(self) -> torch.device:
        return self.key_cache.device

    @property
    def num_kv_heads(self) -> int:
        return self.queries.shape[0]

    @property
    def seq_len(self) -> int:
        return self.width

    @property
    def window(self) -> int:
        return self.queries.shape[2]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.queries.shape[-1])

    @property
    def padding(self) -> torch.Tensor:
        """bool [n, width], True at the columns before each head's own rows."""
        start = self.width - self.lengths
        return torch.arange(self.width, device=self.device)[None, :] < start[:, None]

    def window_mass(self, power: int = 1) -> torch.Tensor:
        """float32 [n, width]: LayerObservation.window_mass, from the pages."""
        if runs_on(self.key_cache):
            from vllm_kvcompress.triton_kernels.paged_window_scores import paged_window_scores

            return paged_window_scores(self.queries, self.key_cache, self.head_block_table, self.lengths, self.width,
                                       self.scale, power, k_scale=self.k_scale)
        return reference.paged_window_scores(self.queries, self.key_cache, self.head_block_table, self.lengths,
                                             self.width, self.scale, power, self.k_scale)
