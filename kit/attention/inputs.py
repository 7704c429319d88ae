"""Argument checks shared by every attention path, and the checked inputs.

All checks run at trace time on shapes, dtypes and static options only, and
raise ValueError naming the argument, with what was expected and what was
given, so every implementation accepts and rejects the same inputs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from kit.attention.masks import (
    causal_mask,
    check_window,
    combine_masks,
    local_window_mask,
    padding_mask,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Checked attention inputs, in batched form.

    Attributes:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]`.
      value: `[B, S, K, H]`, or None when only the weights are wanted.
      bias: float, rank 4, broadcastable to `[B, N, T, S]`, or None.
      mask: bool, rank 4, broadcastable to `[B, N, T, S]`, or None.
      scale: the logit scale, a Python float or a traced scalar.
      is_causal: query i attends to keys j <= i.
      query_seq_lengths: int32 `[B]` or None.
      key_value_seq_lengths: int32 `[B]` or None.
      window: `(left, right)` or None.
      unbatched: the caller passed `[T, N, H]`; results drop the batch axis again.
    """

    query: Array
    key: Array
    value: Array | None
    bias: Array | None
    mask: Array | None
    scale: float | Array
    is_causal: bool
    query_seq_lengths: Array | None
    key_value_seq_lengths: Array | None
    window: tuple[int, int] | None
    unbatched: bool

    @property
    def lengths_given(self) -> bool:
        return self.query_seq_lengths is not None or self.key_value_seq_lengths is not None

    def full_mask(self) -> Array | None:
        """The user's mask combined with the causal, window and padding masks, rank 4."""
        T, S = self.query.shape[1], self.key.shape[1]
        masks = [self.mask]
        if self.is_causal:
            masks.append(causal_mask(T, S)[None, None])
        if self.window is not None:
            masks.append(local_window_mask(T, S, self.window)[None, None])
        if self.lengths_given:
            masks.append(padding_mask(self.query_seq_lengths, self.key_value_seq_lengths, T, S))
        return combine_masks(*masks)

    def unbatch(self, x: Array) -> Array:
        """Drops the batch axis that `check_inputs` added to unbatched input."""
        return x[0] if self.unbatched else x


def explicit_axes(*arrays) -> set[str]:
    """The Explicit mesh axes (JAX's default since 0.9) that shard any of `arrays`."""
    axes = set()
    for x in arrays:
        if x is None:
            continue
        sharding = jax.typeof(x).sharding
        explicit = {
            name
            for name, kind in zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True)
            if kind == AxisType.Explicit
        }
        for entry in sharding.spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            axes |= explicit.intersection(n for n in names if n is not None)
    return axes


def keep_split(x: Array | None, dims: tuple[int, ...]) -> Array | None:
    """`x` gathered along every dim but `dims` where an Explicit mesh axis splits it.

    Attention needs every key for each query, so on Explicit meshes (where the
    sharding is part of the type and an op refuses what it cannot split) a
    sequence or head-dim split is undone first; the batch and heads keep theirs.
    """
    if x is None or not explicit_axes(x):
        return x
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    kept = PartitionSpec(*(spec[d] if d in dims else None for d in range(x.ndim)))
    return jax.sharding.reshard(x, kept)


def check_bool(name: str, value: Any) -> None:
    """Raises ValueError naming `name` unless `value` is a Python or numpy bool."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected a bool, got {value!r}")


def check_rank(name: str, x: Any, ranks: Sequence[int], layout: str) -> None:
    if jnp.ndim(x) not in ranks:
        raise ValueError(
            f"{name}: expected rank {' or '.join(map(str, ranks))} {layout}, "
            f"got shape {jnp.shape(x)}"
        )


def _check_broadcastable(name: str, x: Array, target: tuple[int, ...]) -> Array:
    """Left-pads `x` to rank 4 and checks it broadcasts to `[B, N, T, S]`."""
    if x.ndim > 4:
        raise ValueError(
            f"{name}: expected rank <= 4, broadcastable to [B, N, T, S] = {target}, "
            f"got shape {x.shape}"
        )
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(d not in (1, t) for d, t in zip(x.shape, target, strict=True)):
        raise ValueError(
            f"{name}: expected a shape broadcastable to [B, N, T, S] = {target}, got {x.shape}"
        )
    return x


def _check_lengths(name: str, lengths: Any, batch: int, unbatched: bool) -> Array | None:
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {lengths.dtype}")
    if unbatched and lengths.ndim == 0:
        lengths = lengths[None]
    if lengths.shape != (batch,):
        raise ValueError(f"{name}: expected shape [B] = ({batch},), got {lengths.shape}")
    return lengths.astype(jnp.int32)


def _check_arrays(query: Any, key: Any, value: Any) -> tuple[Array, Array, Array | None, bool]:
    """query, key, value in batched form, and whether the input was unbatched."""
    query, key = jnp.asarray(query), jnp.asarray(key)
    check_rank("query", query, (3, 4), "[B, T, N, H] or [T, N, H]")
    unbatched = query.ndim == 3
    kv_layout = "[S, K, H] (query is unbatched)" if unbatched else "[B, S, K, H]"
    check_rank("key", key, (query.ndim,), kv_layout)
    if value is not None:
        value = jnp.asarray(value)
        check_rank("value", value, (query.ndim,), kv_layout)
    if unbatched:
        query, key = query[None], key[None]
        value = None if value is None else value[None]
    B, _, N, H = query.shape
    K = key.shape[2]

    def shown(shape):  # shapes as the caller gave them
        return shape[1:] if unbatched else shape

    if key.shape[0] != B:
        raise ValueError(f"key: batch must equal query's B = {B}, got key shape {key.shape}")
    if key.shape[3] != H:
        raise ValueError(
            f"key: head dim must equal query's H = {H}, got key shape {shown(key.shape)} "
            f"and query shape {shown(query.shape)}"
        )
    if value is not None and value.shape != key.shape:
        raise ValueError(
            f"value: expected the shape of key {shown(key.shape)}, got {shown(value.shape)}"
        )
    if N % K:
        raise ValueError(
            f"key: its K = {K} heads must divide the query's N = {N} heads "
            f"(grouped-query attention), got query {shown(query.shape)}, key {shown(key.shape)}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    for name, x in (("key", key), ("value", value)):
        if x is not None and x.dtype != query.dtype:
            raise ValueError(f"{name}: expected the dtype of query ({query.dtype}), got {x.dtype}")
    return query, key, value, unbatched


def _check_scale(scale: Any, head_dim: int) -> float | Array:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, numbers.Real):
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        return float(scale)
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale: expected a scalar, got shape {jnp.shape(scale)}")
    return scale


def check_inputs(
    query: Any,
    key: Any,
    value: Any | None,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: Any = None,
    is_causal: Any = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: Any = None,
) -> Inputs:
    """Validates the arguments of `kit.dot_product_attention` and brings them to batched form.

    Returns:
      The checked `Inputs`.

    Raises:
      ValueError: naming the argument, with what was expected and what was given.
    """
    query, key, value, unbatched = _check_arrays(query, key, value)
    B, T, N, H = query.shape
    target = (B, N, T, key.shape[1])
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias: expected a floating dtype, got {bias.dtype}")
        bias = _check_broadcastable("bias", bias, target)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask: expected dtype bool (True = may attend), got {mask.dtype}; "
                "pass an additive mask as bias"
            )
        mask = _check_broadcastable("mask", mask, target)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}")
    return Inputs(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=_check_scale(scale, H),
        is_causal=bool(is_causal),
        query_seq_lengths=_check_lengths("query_seq_lengths", query_seq_lengths, B, unbatched),
        key_value_seq_lengths=_check_lengths(
            "key_value_seq_lengths", key_value_seq_lengths, B, unbatched
        ),
        window=None if local_window_size is None else check_window(local_window_size),
        unbatched=unbatched,
    )
