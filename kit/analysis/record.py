"""What a model's attention did on one example, as one value: `AttentionSet`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class AttentionSet(Mapping):
    """One attention set of one example (`[L, N, T, S]`, the one axis order), with
    the tokens on both sides and, where the model gave them, the vectors it used.

    It is also a read-only mapping of its given fields, which is the form
    `kit.views.viewer.attention_html` validates: `entry.weights` and
    `entry["weights"]` are the same array.

    Attributes:
      weights: `[L, N, T, S]`.
      query_tokens: T labels.
      key_tokens: S labels.
      causal: self-attention under a causal mask.
      query_vectors: `[L, N, T, H]` (after RoPE), or None.
      key_vectors: `[L, N, S, H]` (key/value heads repeated to the N query heads), or None.
      value_vectors: `[L, N, S, H]`, or None.
      value_norms: ||f(x_s)|| `[L, N, S]`, or None.
      bias: the positions' additive bias `[L, N, T, S]` (ALiBi, T5), or None.
    """

    weights: np.ndarray
    query_tokens: list[str]
    key_tokens: list[str]
    causal: bool = False
    query_vectors: np.ndarray | None = None
    key_vectors: np.ndarray | None = None
    value_vectors: np.ndarray | None = None
    value_norms: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __getitem__(self, name: str) -> Any:
        value = getattr(self, name, None) if name in self._names() else None
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names() if getattr(self, n) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
