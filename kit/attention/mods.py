"""A small library of score and mask functions for `kit.flex_attention`.

Each returns (or is) a function for scalars, with its reference. Mask
functions `(b, h, q_idx, kv_idx) -> bool` go into `kit.create_block_mask`;
score functions `(score, b, h, q_idx, kv_idx) -> score` into `score_mod`.
Combine masks with `kit.and_masks` / `kit.or_masks`, scores by composing
(`compose`). Arrays given to a factory (slopes, tables, segment ids, sink
logits) are closed over: the kit differentiates through the floating ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kit.positional import alibi_slopes

Array = jax.Array


def causal(b, h, q_idx, kv_idx):
    """Query i attends to keys j <= i (aligned at the top-left, as `is_causal`)."""
    del b, h
    return kv_idx <= q_idx


def sliding_window(left: int, right: int = 0) -> Callable:
    """Query i attends to keys i - left <= j <= i + right (Beltagy et al.,
    "Longformer", 2020; with right = 0 and causal, Mistral's window)."""

    def mask(b, h, q_idx, kv_idx):
        del b, h
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return mask


def prefix_lm(prefix_lengths: Array | int) -> Callable:
    """Causal, but the first `prefix_lengths[b]` keys are visible to every query
    (Raffel et al., "T5", 2020, the prefix LM). An int: the same for every example."""
    prefix = jnp.asarray(prefix_lengths, jnp.int32)

    def mask(b, h, q_idx, kv_idx):
        del h
        p = prefix if prefix.ndim == 0 else prefix[b]
        return (kv_idx <= q_idx) | (kv_idx < p)

    return mask


def documents(segment_ids: Array, kv_segment_ids: Array | None = None) -> Callable:
    """Packed sequences: a query attends only to keys of its own document.

    Args:
      segment_ids: int `[B, T]`, the document of each query position (and key
        position, unless `kv_segment_ids` `[B, S]` is given). Combine with
        `causal` for causal packing (`and_masks`).
    """
    q_seg = jnp.asarray(segment_ids)
    kv_seg = q_seg if kv_segment_ids is None else jnp.asarray(kv_segment_ids)

    def mask(b, h, q_idx, kv_idx):
        del h
        return q_seg[b, q_idx] == kv_seg[b, kv_idx]

    return mask


def _relative(positions: tuple[Array, Array] | None) -> Callable:
    """(b, q_idx, kv_idx) -> key position - query position: the indices themselves, or
    with `positions` (query `[B|1, T]`, key `[B|1, S]`) the positions they hold (packed
    examples restart them; a KV cache's keys are its slots)."""
    if positions is None:
        return lambda b, q_idx, kv_idx: kv_idx - q_idx
    q_pos, kv_pos = positions
    nq, nk = q_pos.shape[0], kv_pos.shape[0]
    return lambda b, q_idx, kv_idx: kv_pos[b % nk, kv_idx] - q_pos[b % nq, q_idx]


def alibi(
    slopes: Array | int,
    *,
    symmetric: bool = False,
    positions: tuple[Array, Array] | None = None,
) -> Callable:
    """ALiBi (Press et al., "Train Short, Test Long", 2022): score + m_h * (j - i),
    a linear penalty on the distance to the key; `symmetric`: -m_h * |i - j|
    (for encoders). `slopes`: `[N]` (learnable), or the number of heads for the
    paper's geometric slopes (`kit.positional.alibi_slopes`). `positions`:
    (query, key) positions `[B|1, T]`, `[B|1, S]` to measure i and j in, instead
    of the indices."""
    slopes = alibi_slopes(slopes) if isinstance(slopes, int) else slopes
    relative = _relative(positions)

    def score(s, b, h, q_idx, kv_idx):
        distance = relative(b, q_idx, kv_idx)
        if symmetric:
            distance = -jnp.abs(distance)
        return s + slopes[h].astype(s.dtype) * distance.astype(s.dtype)

    return score


def softcap(cap: float) -> Callable:
    """Logit soft-capping, cap * tanh(score / cap) (Gemma 2, Gemma Team 2024)."""

    def score(s, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return cap * jnp.tanh(s / cap)

    return score


def t5_bucket(
    relative: Array, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
) -> Array:
    """T5's relative-position bucket of `relative` = key - query (Raffel et al.,
    2020, Mesh TensorFlow's `_relative_position_bucket`): exact buckets for small
    distances, logarithmic ones up to `max_distance`, the last bucket beyond;
    with `bidirectional`, half the buckets for keys after the query."""
    bucket = jnp.zeros_like(relative)
    n = -relative
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(n < 0, num_buckets, 0)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    exact = num_buckets // 2
    scaled = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = exact + (scaled * (num_buckets - exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(n < exact, n, large)


def t5_relative(
    table: Array,
    *,
    max_distance: int = 128,
    bidirectional: bool = True,
    positions: tuple[Array, Array] | None = None,
) -> Callable:
    """score + table[bucket(j - i), h]: T5's learned relative-position bias
    (`t5_bucket`), `table` `[num_buckets, N]`; `positions` as in `alibi`."""
    num_buckets = table.shape[0]
    relative = _relative(positions)

    def score(s, b, h, q_idx, kv_idx):
        bucket = t5_bucket(
            relative(b, q_idx, kv_idx),
            num_buckets=num_buckets,
            max_distance=max_distance,
            bidirectional=bidirectional,
        )
        return s + table[bucket, h].astype(s.dtype)

    return score


def sink(logits: Array) -> Callable:
    """A learned attention sink per head (as in gpt-oss; Xiao et al., "Efficient
    Streaming Language Models with Attention Sinks", 2024): the score of key 0 is
    replaced by `logits[h]`. Use it on keys and values with a zero slot in front
    (`add_sink_slot`), with the mask shifted past it (`after_sink`): the softmax
    then has one more term, exp(logits[h]), whose value is zero."""

    def score(s, b, h, q_idx, kv_idx):
        del b, q_idx
        return jnp.where(kv_idx == 0, logits[h].astype(s.dtype), s)

    return score


def add_sink_slot(key: Array, value: Array) -> tuple[Array, Array]:
    """key, value `[B, S, K, H]` -> `[B, S + 1, K, H]` with a zero slot at key 0."""
    pad = [(0, 0), (1, 0), (0, 0), (0, 0)]
    return jnp.pad(key, pad), jnp.pad(value, pad)


def after_sink(mask_mod: Callable) -> Callable:
    """`mask_mod` for keys shifted one place by `add_sink_slot`, with the sink live."""

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx == 0) | mask_mod(b, h, q_idx, kv_idx - 1)

    return mask


def compose(*score_mods: Callable) -> Callable:
    """The score function applying `score_mods` in order (e.g. ALiBi, then softcap)."""

    def score(s, b, h, q_idx, kv_idx):
        for fn in score_mods:
            s = fn(s, b, h, q_idx, kv_idx)
        return s

    return score
