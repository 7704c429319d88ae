"""Boolean attention masks (True = may attend) and the finite mask value.

Shape letters: B batch, T query length, S key/value length.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def stat_dtype(dtype) -> np.dtype:
    """The dtype of scores, softmax statistics and accumulators for inputs of `dtype`:
    float64 for float64 inputs (with x64 on), else float32. (jax.nn computes
    float64 scores too, though it then softmaxes them in float32.)"""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# -0.7 * float32 max, as in jax.nn: finite, and exp(mask - max) underflows to 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def causal_mask(query_length: int, key_length: int | None = None) -> Array:
    """Lower-triangular mask: query i may attend to keys j <= i.

    Aligned at the top-left corner like jax.nn.dot_product_attention's
    `is_causal`, also when T != S.

    Args:
      query_length: T.
      key_length: S; defaults to T.

    Returns:
      bool `[T, S]`.
    """
    key_length = query_length if key_length is None else key_length
    q = jnp.arange(query_length)[:, None]
    k = jnp.arange(key_length)[None, :]
    return k <= q


def local_window_mask(query_length: int, key_length: int, window: int | tuple[int, int]) -> Array:
    """Sliding-window mask: query i may attend to keys i - left <= j <= i + right.

    Args:
      query_length: T.
      key_length: S.
      window: `(left, right)` non-negative ints, or one int for both sides.

    Returns:
      bool `[T, S]`.

    Raises:
      ValueError: if `window` is negative or not one or two ints.
    """
    left, right = check_window(window)
    q = jnp.arange(query_length)[:, None]
    k = jnp.arange(key_length)[None, :]
    return (k >= q - left) & (k <= q + right)


def padding_mask(
    query_seq_lengths: Array | None,
    key_value_seq_lengths: Array | None,
    query_length: int,
    key_length: int,
) -> Array:
    """Mask from sequence lengths: query t and key s are live if t < len_q, s < len_kv.

    Args:
      query_seq_lengths: int `[B]` or None (all T queries live).
      key_value_seq_lengths: int `[B]` or None (all S keys live).
      query_length: T.
      key_length: S.

    Returns:
      bool `[B, 1, T, S]` (`[1, 1, T, S]` if both lengths are None).
    """
    q_live = jnp.ones((1, query_length), dtype=bool)
    kv_live = jnp.ones((1, key_length), dtype=bool)
    if query_seq_lengths is not None:
        lengths = jnp.asarray(query_seq_lengths, jnp.int32)
        q_live = jnp.arange(query_length, dtype=jnp.int32)[None, :] < lengths[:, None]
    if key_value_seq_lengths is not None:
        lengths = jnp.asarray(key_value_seq_lengths, jnp.int32)
        kv_live = jnp.arange(key_length, dtype=jnp.int32)[None, :] < lengths[:, None]
    return (q_live[:, None, :, None] & kv_live[:, None, None, :]).astype(bool)


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of boolean masks of broadcastable shapes; None entries are skipped.

    Args:
      *masks: bool arrays of the same rank, broadcastable to each other, or None.

    Returns:
      The combined bool mask, or None if every entry is None.

    Raises:
      ValueError: if a mask is not boolean or the ranks differ.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    for i, m in enumerate(present):
        if jnp.asarray(m).dtype != jnp.bool_:
            raise ValueError(f"combine_masks: mask {i} must be bool, got {jnp.asarray(m).dtype}")
    rank = jnp.ndim(present[0])
    if any(jnp.ndim(m) != rank for m in present):
        raise ValueError(
            "combine_masks: masks must share one rank, "
            f"got shapes {[jnp.shape(m) for m in present]}"
        )
    combined = present[0]
    for m in present[1:]:
        combined = jnp.logical_and(combined, m)
    return combined


def check_window(window: Any) -> tuple[int, int]:
    """`local_window_size` as a `(left, right)` pair of non-negative ints.

    Raises:
      ValueError: naming `local_window_size` for anything else.
    """
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        window = (window, window)
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)
    ):
        raise ValueError(
            f"local_window_size: expected an int or a (left, right) pair of ints, got {window!r}"
        )
    if window[0] < 0 or window[1] < 0:
        raise ValueError(f"local_window_size: expected non-negative sizes, got {tuple(window)}")
    return int(window[0]), int(window[1])
