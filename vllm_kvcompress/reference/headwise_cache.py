"""A dense, per-head variable-length KV cache: the reference of what the paged cache holds.

One :class:`HeadwiseLayer` per attention layer of one request. Head ``h`` holds ``lengths[h]`` valid
rows at the front of ``keys[h]`` / ``values[h]``; the rest is padding. It backs the HF reference
path and is the oracle the paged vLLM cache is compared to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.reduction import RetainedLayer


@dataclass
class HeadwiseLayer:
    """keys, values: [num_kv_heads, width, head_dim]; lengths: int64 [num_kv_heads] (<= width)."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def full(cls, keys: torch.Tensor, values: torch.Tensor) -> "HeadwiseLayer":
        """An uncompressed layer: every head holds all ``keys.shape[1]`` rows."""
        lengths = torch.full((keys.shape[0],), keys.shape[1], dtype=torch.long, device=keys.device)
        return cls(keys, values, lengths)

    @classmethod
    def from_retained(cls, retained: RetainedLayer, dtype: torch.dtype) -> "HeadwiseLayer":
        width = int(retained.lengths.max())
        return cls(
            retained.keys[:, :width].to(dtype).contiguous(),
            retained.values[:, :width].to(dtype).contiguous(),
            retained.lengths.clone(),
        )

    @property
    def uniform(self) -> bool:
        """True when every head is full to the same width (attention needs no mask)."""
        return bool((self.lengths == self.keys.shape[1]).all())

    def valid_mask(self) -> torch.Tensor:
        """bool [num_kv_heads, width]."""
        return torch.arange(self.keys.shape[1], device=self.keys.device)[None, :] < self.lengths[:, None]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add one new token to every head. key, value: [num_kv_heads, head_dim]."""
        if self.uniform:  # the same concatenation HF's DynamicCache does, so `none` stays bit-identical
            self.keys = torch.cat([self.keys, key[:, None]], dim=1)
            self.values = torch.cat([self.values, value[:, None]], dim=1)
        else:
            width = int(self.lengths.max()) + 1
            if width > self.keys.shape[1]:
                pad = width - self.keys.shape[1]
                self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
                self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))
            heads = torch.arange(self.keys.shape[0], device=self.keys.device)
            self.keys[heads, self.lengths] = key.to(self.keys.dtype)
            self.values[heads, self.lengths] = value.to(self.values.dtype)
        self.lengths += 1

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid rows of head ``h``: ([len, head_dim], [len, head_dim])."""
        n = int(self.lengths[h])
        return self.keys[h, :n], self.values[h, :n]

    def replace_head(self, h: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Set head ``h`` to ``keys``/``values`` [n, head_dim] (n <= width); shrinks the width if it can."""
        n = keys.shape[0]
        self.keys[h, :n] = keys.to(self.keys.dtype)
        self.values[h, :n] = values.to(self.values.dtype)
        self.keys[h, n:] = 0
        self.values[h, n:] = 0
        self.lengths[h] = n
        width = int(self.lengths.max())
        self.keys, self.values = self.keys[:, :width].contiguous(), self.values[:, :width].contiguous()

    @property
    def retained_tokens(self) -> int:
        return int(self.lengths.sum())
