"""Scaled dot-product attention as pure JAX functions.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (K divides N; G = N // K query heads share one key/value
head), H head dim, D model dim.

The defining design: `single_head_attention` works on one example and one head
(`[T, H]`, `[S, H]`); `dot_product_attention` adds heads and batch with
`jax.vmap`, mapping each query head to its key/value head for grouped-query
attention. Nothing here imports flax, parses flags or prints.

Semantics shared by every function here (and by `kit.chunked`):

* logits = scale * q @ k^T (+ bias), computed in float32; default scale
  1 / sqrt(H);
* masked positions get a finite large negative logit, never -inf;
* softmax runs in float32 and the weights are cast back to the value dtype;
* a query row whose keys are all masked (including rows at or beyond
  `query_seq_lengths`) gets all-zero weights and returns exactly zero, with
  finite (zero) gradients. jax.nn.dot_product_attention returns the mean of
  the values there instead; it agrees with kit everywhere else.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# -0.7 * float32 max, as in jax.nn: finite, and exp(mask - max) underflows to 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

IMPLEMENTATIONS = (None, "xla", "chunked", "cudnn")


# --------------------------------------------------------------------------
# Masks (boolean, True = may attend).


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
    left, right = _check_window(window)
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


# --------------------------------------------------------------------------
# Projections.


def project_heads(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Projects model vectors to heads: `[B, T, D] x [D, N, H] -> [B, T, N, H]`.

    Args:
      x: `[..., D]`.
      kernel: `[D, N, H]` (or `[D, K, H]` for keys and values).
      bias: optional `[N, H]`.

    Returns:
      `[..., N, H]`.

    Raises:
      ValueError: if D differs between `x` and `kernel` or shapes have the wrong rank.
    """
    _check_rank("kernel", kernel, (3,), "[D, N, H]")
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x: last dim must equal kernel's D = {kernel.shape[0]}, got x shape {x.shape}"
        )
    y = jnp.einsum("...d,dnh->...nh", x, kernel)  # [..., D] x [D, N, H] -> [..., N, H]
    if bias is not None:
        if bias.shape != kernel.shape[1:]:
            raise ValueError(f"bias: expected shape [N, H] = {kernel.shape[1:]}, got {bias.shape}")
        y = y + bias[(None,) * (y.ndim - 2)]
    return y


def project_output(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Merges heads back to model vectors: `[B, T, N, H] x [N, H, D] -> [B, T, D]`.

    Args:
      x: `[..., N, H]`.
      kernel: `[N, H, D]`.
      bias: optional `[D]`.

    Returns:
      `[..., D]`.

    Raises:
      ValueError: if N or H differ between `x` and `kernel`.
    """
    _check_rank("kernel", kernel, (3,), "[N, H, D]")
    if x.ndim < 2 or x.shape[-2:] != kernel.shape[:2]:
        raise ValueError(
            f"x: trailing dims must equal kernel's [N, H] = {kernel.shape[:2]}, "
            f"got x shape {x.shape}"
        )
    y = jnp.einsum("...nh,nhd->...d", x, kernel)  # [..., N, H] x [N, H, D] -> [..., D]
    if bias is not None:
        if bias.shape != kernel.shape[2:]:
            raise ValueError(f"bias: expected shape [D] = {kernel.shape[2:]}, got {bias.shape}")
        y = y + bias[(None,) * (y.ndim - 1)]
    return y


def project_qkv(
    params: dict[str, Any], x: Array, context: Array | None = None
) -> tuple[Array, Array, Array]:
    """Q/K/V projection of `x` (self-attention) or of `x` and `context` (cross-attention).

    Args:
      params: a pytree as made by `init_attention_params`: `params[name]["kernel"]`
        `[D, N, H]` for "query" and `[D, K, H]` for "key" and "value", each with
        an optional "bias" `[N, H]` / `[K, H]`.
      x: `[B, T, D]` (queries come from here).
      context: `[B, S, D]` (keys and values come from here); defaults to `x`.

    Returns:
      q `[B, T, N, H]`, k `[B, S, K, H]`, v `[B, S, K, H]`.
    """
    context = x if context is None else context
    q = project_heads(x, params["query"]["kernel"], params["query"].get("bias"))
    k = project_heads(context, params["key"]["kernel"], params["key"].get("bias"))
    v = project_heads(context, params["value"]["kernel"], params["value"].get("bias"))
    return q, k, v


def init_attention_params(
    rng: Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Initial parameters for `multi_head_attention` (LeCun normal kernels, zero biases).

    The key projection has no bias: it would add q·b to every score of a query
    row, which the softmax cancels, so its gradient is zero and an adaptive
    optimizer would move it by rounding noise alone.

    Args:
      rng: PRNG key.
      d_model: D.
      num_heads: N.
      num_kv_heads: K (divides N); defaults to N.
      head_dim: H; defaults to D // N.
      use_bias: whether to add biases to the query, value and output projections.
      dtype: parameter dtype.

    Returns:
      `{"query", "key", "value", "out"}`, each `{"kernel": ..., "bias": ...}`
      (key: kernel only): kernels `[D, N, H]`, `[D, K, H]`, `[D, K, H]`, `[N, H, D]`.

    Raises:
      ValueError: if a size is not positive, K does not divide N, or D is not
        divisible by N when `head_dim` is not given.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (
        ("d_model", d_model),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
    ):
        if not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: must divide num_heads = {num_heads}, got {num_kv_heads}")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model: must be divisible by num_heads = {num_heads} when head_dim "
                f"is not given, got {d_model}"
            )
        head_dim = d_model // num_heads
    elif not isinstance(head_dim, numbers.Integral) or head_dim <= 0:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")

    heads_init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    out_init = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    rq, rk, rv, ro = jax.random.split(rng, 4)
    shapes = {
        "query": (rq, (d_model, num_heads, head_dim), heads_init),
        "key": (rk, (d_model, num_kv_heads, head_dim), heads_init),
        "value": (rv, (d_model, num_kv_heads, head_dim), heads_init),
        "out": (ro, (num_heads, head_dim, d_model), out_init),
    }
    params = {}
    for name, (r, shape, init) in shapes.items():
        params[name] = {"kernel": init(r, shape, dtype)}
        if use_bias and name != "key":
            bias_shape = shape[2:] if name == "out" else shape[1:]
            params[name]["bias"] = jnp.zeros(bias_shape, dtype)
    return params


# --------------------------------------------------------------------------
# The single-head core.


def masked_softmax(logits: Array, mask: Array | None = None) -> Array:
    """Softmax over the last axis in float32 in which masked entries get weight 0.

    A row with no live entry returns all zeros (not the uniform distribution),
    and its gradient is zero and finite.

    Args:
      logits: `[..., S]`.
      mask: bool, broadcastable to `logits` with the same rank, or None.

    Returns:
      float32 weights, same shape as `logits`.
    """
    logits = logits.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    return _masked_softmax(logits, mask)


@jax.custom_jvp
def _masked_softmax(logits: Array, mask: Array) -> Array:
    logits = jnp.where(mask, logits, MASK_VALUE)
    shift = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.where(mask, jnp.exp(logits - shift), 0.0)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total > 0, total, 1.0)


@_masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    # The softmax derivative, dy = y * (dx - sum(dx * y)), written once so that the
    # backward pass is one fused expression rather than the chain through exp,
    # where and the division (1.3x faster causal fwd+bwd at T = 1024 on CPU).
    # Masked entries and dead rows have y = 0, so their derivative is exactly zero.
    logits, mask = primals
    d_logits, _ = tangents
    weights = _masked_softmax(logits, mask)
    return weights, weights * (d_logits - jnp.sum(d_logits * weights, axis=-1, keepdims=True))


def attention_logits(
    query: Array, key: Array, bias: Array | None = None, *, scale: float | Array
) -> Array:
    """float32 logits of one head: `scale * q k^T + bias`.

    Args:
      query: `[T, H]`.
      key: `[S, H]`.
      bias: optional, broadcastable to `[T, S]` with rank 2.
      scale: multiplies the dot products.

    Returns:
      float32 `[T, S]`.
    """
    logits = jnp.einsum(
        "th,sh->ts", query, key, preferred_element_type=jnp.float32
    )  # [T, H] x [S, H] -> [T, S]
    logits = logits * jnp.asarray(scale, jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return logits


def single_head_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Attention for one example and one head.

    out = dropout(softmax(scale * q k^T + bias, masked)) v, softmax in float32.

    Args:
      query: `[T, H]`.
      key: `[S, H]`.
      value: `[S, H]`.
      bias: optional additive bias, broadcastable to `[T, S]` (rank 2).
      mask: optional bool, True = may attend, broadcastable to `[T, S]` (rank 2).
      scale: defaults to 1 / sqrt(H).
      dropout_rate: probability of dropping an attention weight.
      dropout_rng: PRNG key, needed when `dropout_rate > 0`.

    Returns:
      out `[T, H]` (dtype of `query`) and the pre-dropout weights `[T, S]`
      (dtype of `value`). Rows with no live key are exactly zero in both.

    References:
      Vaswani et al., "Attention Is All You Need", 2017.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    weights = masked_softmax(attention_logits(query, key, bias, scale=scale), mask)
    out = jnp.einsum(
        "ts,sh->th", _dropout(weights, dropout_rate, dropout_rng).astype(value.dtype), value
    )  # [T, S] x [S, H] -> [T, H]
    return out.astype(query.dtype), weights.astype(value.dtype)


def _dropout(weights: Array, rate: float, rng: Array | None) -> Array:
    if rate == 0.0:
        return weights
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


# --------------------------------------------------------------------------
# Heads and batch by vmap.


def _leading(x: Array | None, size: int) -> tuple[Array | None, int | None]:
    """Unmaps a leading axis of size 1 (shared by all) and maps a full one."""
    if x is None:
        return None, None
    if x.shape[0] == 1 and size != 1:
        return x[0], None
    return x, 0


def _map_heads(
    head_fn: Callable[..., tuple[Array, Array]],
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    rng: Array | None,
) -> tuple[Array, Array]:
    """Lifts `head_fn(q [T, H], k [S, H], v [S, H], bias, mask, rng)` to all heads and examples.

    Query head n uses key/value head n // G. bias and mask are `[B|1, N|1, T|1, S|1]`.

    Returns:
      out `[B, T, N, H]` (None if `head_fn` returns None for it) and weights
      `[B, N, T, S]`.
    """
    B, T, N, H = query.shape
    K = key.shape[2]
    G = N // K
    query = query.reshape(B, T, K, G, H)

    def grouped(x: Array | None) -> Array | None:
        # [B|1, N|1, T, S] -> [B|1, K|1, G|1, T, S]
        if x is None:
            return None
        b, n = x.shape[:2]
        if n == 1:
            return x[:, :, None]
        return x.reshape(b, K, G, *x.shape[2:])

    bias, mask = grouped(bias), grouped(mask)
    rngs = None if rng is None else jax.random.split(rng, (B, K, G))

    def per_example(q, k, v, b, m, r):  # q [T, K, G, H], k, v [S, K, H], b [K|1, G|1, T, S]
        def per_kv_head(q, k, v, b, m, r):  # q [T, G, H], k, v [S, H], b [G|1, T, S]
            def per_query_head(q, b, m, r):  # q [T, H], b [T, S]
                return head_fn(q, k, v, b, m, r)

            (b, b_ax), (m, m_ax) = _leading(b, G), _leading(m, G)
            return jax.vmap(per_query_head, in_axes=(1, b_ax, m_ax, 0), out_axes=(1, 0))(
                q, b, m, r
            )  # -> out [T, G, H], weights [G, T, S]

        (b, b_ax), (m, m_ax) = _leading(b, K), _leading(m, K)
        return jax.vmap(per_kv_head, in_axes=(1, 1, 1, b_ax, m_ax, 0), out_axes=(1, 0))(
            q, k, v, b, m, r
        )  # -> out [T, K, G, H], weights [K, G, T, S]

    (b, b_ax), (m, m_ax) = _leading(bias, B), _leading(mask, B)
    out, weights = jax.vmap(per_example, in_axes=(0, 0, 0, b_ax, m_ax, 0))(
        query, key, value, b, m, rngs
    )  # -> out [B, T, K, G, H], weights [B, K, G, T, S]
    out = None if out is None else out.reshape(B, T, N, H)
    return out, weights.reshape(B, N, T, weights.shape[-1])


# --------------------------------------------------------------------------
# Input checks (all at trace time: shapes, dtypes and static options only).


def _check_rank(name: str, x: Any, ranks: Sequence[int], layout: str) -> None:
    if jnp.ndim(x) not in ranks:
        raise ValueError(
            f"{name}: expected rank {' or '.join(map(str, ranks))} {layout}, "
            f"got shape {jnp.shape(x)}"
        )


def _check_window(window: Any) -> tuple[int, int]:
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


def prepare_inputs(
    query: Any,
    key: Any,
    value: Any | None,
    bias: Any,
    mask: Any,
    *,
    scale: Any,
    is_causal: bool,
    query_seq_lengths: Any,
    key_value_seq_lengths: Any,
    local_window_size: Any,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Any = None,
) -> dict[str, Any]:
    """Validates the arguments of `dot_product_attention` and brings them to batched form.

    Used by every implementation so that all of them accept and reject the
    same inputs. Raises ValueError naming the argument, with what was expected
    and what was given.

    Returns:
      A dict with query `[B, T, N, H]`, key, value `[B, S, K, H]` (value may be
      None), bias and mask of rank 4 broadcastable to `[B, N, T, S]` (or None),
      int32 lengths `[B]` (or None), window `(left, right)` (or None), the
      float scale, and `unbatched`.
    """
    query, key = jnp.asarray(query), jnp.asarray(key)
    _check_rank("query", query, (3, 4), "[B, T, N, H] or [T, N, H]")
    unbatched = query.ndim == 3
    kv_layout = "[S, K, H] (query is unbatched)" if unbatched else "[B, S, K, H]"
    _check_rank("key", key, (query.ndim,), kv_layout)
    if value is not None:
        value = jnp.asarray(value)
        _check_rank("value", value, (query.ndim,), kv_layout)
    if unbatched:
        query, key = query[None], key[None]
        value = None if value is None else value[None]
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    prefix = (lambda s: s[1:]) if unbatched else (lambda s: s)
    if key.shape[0] != B:
        raise ValueError(f"key: batch must equal query's B = {B}, got key shape {key.shape}")
    if key.shape[3] != H:
        raise ValueError(
            f"key: head dim must equal query's H = {H}, got key shape {prefix(key.shape)} "
            f"and query shape {prefix(query.shape)}"
        )
    if value is not None and value.shape != key.shape:
        raise ValueError(
            f"value: expected the shape of key {prefix(key.shape)}, got {prefix(value.shape)}"
        )
    if N % K:
        raise ValueError(
            f"key: its K = {K} heads must divide the query's N = {N} heads "
            f"(grouped-query attention), got query {prefix(query.shape)}, key {prefix(key.shape)}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    for name, x in (("key", key), ("value", value)):
        if x is not None and x.dtype != query.dtype:
            raise ValueError(f"{name}: expected the dtype of query ({query.dtype}), got {x.dtype}")

    target = (B, N, T, S)
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

    query_seq_lengths = _check_lengths("query_seq_lengths", query_seq_lengths, B, unbatched)
    key_value_seq_lengths = _check_lengths(
        "key_value_seq_lengths", key_value_seq_lengths, B, unbatched
    )
    window = None if local_window_size is None else _check_window(local_window_size)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}")

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif isinstance(scale, numbers.Real):
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        scale = float(scale)
    elif jnp.ndim(scale) != 0:
        raise ValueError(f"scale: expected a scalar, got shape {jnp.shape(scale)}")

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if not isinstance(dropout_rate, numbers.Real) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rng: required when dropout_rate > 0 (got {dropout_rate})")

    return dict(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=bool(is_causal),
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        window=window,
        unbatched=unbatched,
    )


# From this many query-key pairs per head on, the chunked path wins forward and
# forward+backward, causal or not (1.4x to 2.3x at T = S = 512); at T = S = 256
# the materialized path is faster for non-causal forward+backward, and at 128
# for both kinds (experiments/bench_attention.py, B=4 N=8 H=64, 2-core CPU).
CHUNKED_MIN_PAIRS = 512 * 512


def _choose_implementation(implementation: str | None, p: dict[str, Any], dropout_rate: float):
    """Resolves `implementation=None` and rejects paths that cannot serve the call."""
    dtype = p["query"].dtype
    on_gpu = jax.default_backend() == "gpu"
    if implementation is None:
        cudnn_fits = (
            on_gpu
            and dtype in (jnp.bfloat16, jnp.float16)
            and dropout_rate == 0.0
            and p["mask"] is None
            and p["window"] is None
        )
        if cudnn_fits:
            return "cudnn"
        big = p["query"].shape[1] * p["key"].shape[1] >= CHUNKED_MIN_PAIRS
        chunked_fits = dropout_rate == 0.0 and isinstance(p["scale"], float)
        return "chunked" if big and chunked_fits else "xla"
    if implementation == "cudnn":
        if not on_gpu:
            raise ValueError(
                "implementation: 'cudnn' needs a GPU backend, but jax's default backend "
                f"is {jax.default_backend()!r}; use None, 'xla' or 'chunked'"
            )
        if dropout_rate > 0.0:
            raise ValueError("dropout_rate: the 'cudnn' implementation has no attention dropout")
    if implementation == "chunked" and dropout_rate > 0.0:
        raise ValueError(
            "dropout_rate: the 'chunked' implementation has no attention dropout; "
            "use implementation='xla'"
        )
    return implementation


def _full_mask(p: dict[str, Any]) -> Array | None:
    """The user's mask combined with causal, window and padding masks, rank 4."""
    T, S = p["query"].shape[1], p["key"].shape[1]
    masks = [p["mask"]]
    if p["is_causal"]:
        masks.append(causal_mask(T, S)[None, None])
    if p["window"] is not None:
        masks.append(local_window_mask(T, S, p["window"])[None, None])
    if p["query_seq_lengths"] is not None or p["key_value_seq_lengths"] is not None:
        masks.append(padding_mask(p["query_seq_lengths"], p["key_value_seq_lengths"], T, S))
    return combine_masks(*masks)


def _xla_attention(p: dict[str, Any], dropout_rate: float, dropout_rng: Array | None):
    def head_fn(q, k, v, b, m, r):
        return single_head_attention(
            q, k, v, b, m, scale=p["scale"], dropout_rate=dropout_rate, dropout_rng=r
        )

    rng = dropout_rng if dropout_rate > 0.0 else None
    return _map_heads(head_fn, p["query"], p["key"], p["value"], p["bias"], _full_mask(p), rng)


# --------------------------------------------------------------------------
# Public entry points.


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Scaled dot-product attention; a drop-in for `jax.nn.dot_product_attention`.

    out = softmax(scale * Q K^T + bias, masked) V per head, with the softmax in
    float32. Query head n attends with key/value head n // (N // K).

    A query row whose keys are all masked, by any combination of `mask`,
    `is_causal`, `local_window_size` and the lengths, returns exactly zero with
    finite (zero) gradients; so do rows at or beyond `query_seq_lengths`.
    (jax.nn returns the mean of the values in such rows.)

    Args:
      query: `[B, T, N, H]` or unbatched `[T, N, H]`.
      key: `[B, S, K, H]` or `[S, K, H]`; K must divide N.
      value: same shape and dtype as `key`.
      bias: optional additive bias broadcastable to `[B, N, T, S]` (rank <= 4,
        missing leading dims are added).
      mask: optional bool mask broadcastable to `[B, N, T, S]`, True = may attend.
      scale: logit scale; defaults to 1 / sqrt(H).
      is_causal: query i attends to keys j <= i (top-left aligned, as jax.nn).
      query_seq_lengths: int `[B]`; queries at t >= length are padding.
      key_value_seq_lengths: int `[B]`; keys at s >= length are padding.
      local_window_size: `(left, right)` or one int for both: query i attends
        to keys i - left <= j <= i + right.
      implementation: None (the fastest correct path for the shape and
        device), "xla" (materialized logits), "chunked" (memory-efficient,
        `kit.chunked`), or "cudnn" (GPU only, through jax.nn).
      dropout_rate: attention-weight dropout probability, in [0, 1).
      dropout_rng: PRNG key; required when `dropout_rate > 0`. The output is a
        deterministic function of it.

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`), dtype of `query`.

    Raises:
      ValueError: at trace time, naming the argument, for a wrong rank, shape,
        dtype, head count, option or a dropout rate without a key.

    References:
      Vaswani et al., "Attention Is All You Need", 2017.
      Ainslie et al., "GQA: Training Generalized Multi-Query Transformer
      Models from Multi-Head Checkpoints", 2023.
    """
    p = prepare_inputs(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        implementation=implementation,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    implementation = _choose_implementation(implementation, p, dropout_rate)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=p["scale"],
            is_causal=is_causal,
            query_seq_lengths=p["query_seq_lengths"],
            key_value_seq_lengths=p["key_value_seq_lengths"],
            local_window_size=local_window_size,
            implementation="cudnn",
        )
    if implementation == "chunked":
        # Imported here: kit.chunked builds on this module's checks.
        from kit.chunked import chunked_from_prepared

        return chunked_from_prepared(p)
    out, _ = _xla_attention(p, dropout_rate, dropout_rng)
    return out[0] if p["unbatched"] else out


def attention_weights(
    query: Array,
    key: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Array:
    """The softmax attention weights, for inspection and plotting.

    Same arguments and semantics as `dot_product_attention` (without value or
    dropout). Rows with no live key are all zero; every other row sums to 1.

    Args:
      query: `[B, T, N, H]` or `[T, N, H]`.
      key: `[B, S, K, H]` or `[S, K, H]`.
      bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
        local_window_size: as in `dot_product_attention`.

    Returns:
      `[B, N, T, S]` (or `[N, T, S]`), dtype of `query`.

    Raises:
      ValueError: as `dot_product_attention`.
    """
    p = prepare_inputs(
        query,
        key,
        None,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
    )

    def head_fn(q, k, v, b, m, r):
        return None, masked_softmax(attention_logits(q, k, b, scale=p["scale"]), m)

    # `value` stands in only to give vmap the key/value head axis; it is not read.
    _, weights = _map_heads(head_fn, p["query"], p["key"], p["key"], p["bias"], _full_mask(p), None)
    weights = weights.astype(p["query"].dtype)
    return weights[0] if p["unbatched"] else weights


def multi_head_attention(
    params: dict[str, Any],
    x: Array,
    context: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    return_weights: bool = False,
    **attention_kwargs: Any,
) -> Array | tuple[Array, Array]:
    """Multi-head (or grouped-query) attention over a params pytree.

    y = project_output(dot_product_attention(project_qkv(params, x, context)))

    Args:
      params: as made by `init_attention_params`.
      x: `[B, T, D]`, the queries' source.
      context: `[B, S, D]`, the keys' and values' source (cross-attention);
        defaults to `x` (self-attention).
      bias, mask: as in `dot_product_attention`.
      return_weights: also return the weights `[B, N, T, S]`.
      **attention_kwargs: keyword options of `dot_product_attention`
        (is_causal, lengths, window, scale, dropout, implementation).

    Returns:
      `[B, T, D]`, and the weights `[B, N, T, S]` if `return_weights`.

    Raises:
      ValueError: for inconsistent parameter shapes or any error of
        `dot_product_attention`.
    """
    _check_params(params)
    _check_rank("x", x, (3,), "[B, T, D]")
    if context is not None:
        _check_rank("context", context, (3,), "[B, S, D]")
    q, k, v = project_qkv(params, x, context)
    out = dot_product_attention(q, k, v, bias, mask, **attention_kwargs)
    y = project_output(out, params["out"]["kernel"], params["out"].get("bias"))
    if not return_weights:
        return y
    weight_kwargs = {
        name: attention_kwargs[name]
        for name in (
            "scale",
            "is_causal",
            "query_seq_lengths",
            "key_value_seq_lengths",
            "local_window_size",
        )
        if name in attention_kwargs
    }
    return y, attention_weights(q, k, bias, mask, **weight_kwargs)


def _check_params(params: Any) -> None:
    names = ("query", "key", "value", "out")
    if not isinstance(params, dict) or any(n not in params for n in names):
        keys = list(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: expected a dict with keys {names}, got {keys}")
    for n in names:
        if "kernel" not in params[n]:
            raise ValueError(f"params[{n!r}]: missing 'kernel'")
        _check_rank(f"params[{n!r}]['kernel']", params[n]["kernel"], (3,), "")
    d, _, h = params["query"]["kernel"].shape
    k_shape = params["key"]["kernel"].shape
    if params["value"]["kernel"].shape != k_shape or k_shape[0] != d or k_shape[2] != h:
        raise ValueError(
            f"params: key and value kernels must be [D, K, H] with D = {d}, H = {h}; got "
            f"key {k_shape}, value {params['value']['kernel'].shape}"
        )
