"""Position information: sinusoidal tables, rotary embeddings (RoPE), ALiBi biases.

Pure JAX; shape letters as in kit.attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal(length: int, dim: int, *, max_timescale: float = 10_000.0) -> Array:
    """The fixed sinusoidal table: PE[t, 2i] = sin(t / m^(2i/D)), PE[t, 2i+1] = cos(...).

    Args:
      length: T.
      dim: D (even).
      max_timescale: m.

    Returns:
      float32 `[T, D]`.

    Raises:
      ValueError: if `dim` is odd.

    References:
      Vaswani et al., "Attention Is All You Need", 2017.
    """
    if dim % 2:
        raise ValueError(f"dim: expected an even model dim for sinusoidal positions, got {dim}")
    position = np.arange(length, dtype=np.float64)[:, None]
    inv_freq = np.exp(-math.log(max_timescale) * np.arange(0, dim, 2) / dim)[None, :]
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq)
    return jnp.asarray(table)


def apply_rope(x: Array, positions: Array, *, max_timescale: float = 10_000.0) -> Array:
    """Rotates pairs (x_i, x_{i + H/2}) by the angle position / m^(2i/H).

    q k^T of rotated vectors depends only on the relative position.

    Args:
      x: `[B, T, N, H]` queries or keys (H even).
      positions: int `[B, T]`.

    Returns:
      `[B, T, N, H]`, dtype of `x`.

    Raises:
      ValueError: if H is odd or `positions` is not `[B, T]`.

    References:
      Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    """
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"x: RoPE needs an even head dim H, got shape {x.shape}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions: expected shape [B, T] = {x.shape[:2]}, got {positions.shape}")
    inv_freq = jnp.exp(-math.log(max_timescale) * jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
    sin, cos = jnp.sin(angle), jnp.cos(angle)  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> Array:
    """Head slopes 2^(-8 n / N), n = 1..N (the paper's geometric sequence, any N).

    References:
      Press et al., "Train Short, Test Long: Attention with Linear Biases", 2022.
    """
    return jnp.asarray(2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads), jnp.float32)


def alibi_bias(num_heads: int, query_length: int, key_length: int) -> Array:
    """ALiBi as an additive attention bias: -slope_n * |t - s|.

    Args:
      num_heads: N.
      query_length: T.
      key_length: S.

    Returns:
      float32 `[N, T, S]`, to pass as `bias` (it broadcasts over B).
    """
    distance = jnp.abs(jnp.arange(query_length)[:, None] - jnp.arange(key_length)[None, :])
    return -alibi_slopes(num_heads)[:, None, None] * distance[None].astype(jnp.float32)
