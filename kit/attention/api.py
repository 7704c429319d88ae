"""The public attention entry points: check the inputs once, then dispatch.

`dot_product_attention` is a drop-in for `jax.nn.dot_product_attention`;
`attend` is the one internal routine behind it and `kit.multi_head_attention`:
it runs the chosen path and returns the output and, from the same pass, the
weights when asked.

Semantics shared by every path (`kit.attention.core`, `kit.attention.chunked`):

* logits = scale * q @ k^T (+ bias), computed in float32; default scale
  1 / sqrt(H);
* masked positions never reach the softmax with a -inf that could make a NaN: the
  xla path gives them a finite large negative logit (`kit.MASK_VALUE`); the chunked
  kernel sets them to -inf inside a block, where its running max is finite or the
  row is dropped, and returns the log-sum-exp of a row with no live key as -inf;
* softmax runs in float32 and the weights are cast back to the value dtype;
* a query row whose keys are all masked (including rows at or beyond
  `query_seq_lengths`) gets all-zero weights and returns exactly zero, with
  finite (zero) gradients. jax.nn.dot_product_attention returns the mean of
  the values there instead; it agrees with kit everywhere else.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from kit.attention.chunked import BlockSizes, chunked_from_inputs
from kit.attention.core import xla_attention
from kit.attention.few_queries import few_queries_fit, few_query_attention
from kit.attention.inputs import Inputs, check_bool, check_inputs

Array = jax.Array

_IMPLEMENTATIONS = (None, "xla", "chunked", "cudnn")

# From this many query-key pairs per head on, the chunked path wins forward and
# forward+backward, causal or not (1.4x to 2.3x at T = S = 512); at T = S = 256
# the materialized path is faster for non-causal forward+backward, and at 128
# for both kinds (experiments/bench_attention.py, B=4 N=8 H=64, 2-core CPU).
_CHUNKED_MIN_PAIRS = 512 * 512


def _check_options(implementation, dropout_rate, dropout_rng) -> None:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if not isinstance(dropout_rate, numbers.Real) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rng: required when dropout_rate > 0 (got {dropout_rate})")


def _choose_implementation(implementation: str | None, x: Inputs, dropout_rate: float) -> str:
    """Resolves `implementation=None` and rejects paths that cannot serve the call.

    None picks cuDNN (through jax.nn) only where it both runs and keeps the kit's
    contract: on a GPU, in bfloat16 or float16, without dropout, mask, window or
    bias (jax.nn turns a mask into a bias and takes only a full `[B, N, T, S]`
    one), without `query_seq_lengths` or `key_value_seq_lengths` (they can leave
    a row with no live key, which must return zero; cuDNN's output there is not
    specified), and with a head dim its flash kernel takes (a multiple of 8, at
    most 128). A causal mask alone never empties a row. On a CPU, a few queries
    against a long cache (a decode step) take the compiled decode kernel or the
    products in the cache's layout (`kit.attention.few_queries`). Otherwise chunked
    for long inputs, else xla.
    """
    on_gpu = jax.default_backend() == "gpu"
    if implementation is None:
        head_dim = x.query.shape[-1]
        cudnn_fits = (
            on_gpu
            and x.query.dtype in (jnp.bfloat16, jnp.float16)
            and dropout_rate == 0.0
            and x.mask is None
            and x.window is None
            and x.bias is None
            and not x.lengths_given
            and head_dim % 8 == 0
            and head_dim <= 128
        )
        if cudnn_fits:
            return "cudnn"
        if few_queries_fit(x, dropout_rate):
            return "few_queries"
        big = x.query.shape[1] * x.key.shape[1] >= _CHUNKED_MIN_PAIRS
        chunked_fits = dropout_rate == 0.0 and isinstance(x.scale, float)
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


def attend(
    x: Inputs,
    *,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    return_residual: bool = False,
) -> tuple[Array, Array | None, Array | None]:
    """Attention over checked inputs: the output, and the weights and residual when asked.

    With `return_weights` the materialized path runs once and gives both (the
    weights are `[B, N, T, S]` anyway); otherwise the path is chosen as
    `dot_product_attention` documents.

    Returns:
      out `[B, T, N, H]`, weights `[B, N, T, S]` or None, and the residual
      `[B, T, N]` (as `dot_product_attention` documents it) or None; without
      the batch axis for unbatched input.

    Raises:
      ValueError: for an unknown implementation, a dropout rate outside [0, 1)
        or without a key, or a path that cannot serve the call.
    """
    _check_options(implementation, dropout_rate, dropout_rng)
    implementation = _choose_implementation(implementation, x, dropout_rate)
    if return_weights or implementation == "xla":
        out, weights, lse = xla_attention(
            x, dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_residual=return_residual
        )
        weights = x.unbatch(weights) if return_weights else None
        return x.unbatch(out), weights, None if lse is None else x.unbatch(lse)
    if implementation == "chunked":
        out, lse = chunked_from_inputs(x, return_residual=return_residual)
        return out, None, lse
    if implementation == "few_queries":
        out, lse = few_query_attention(x, return_residual=return_residual)
        return x.unbatch(out), None, None if lse is None else x.unbatch(lse)
    out = jax.nn.dot_product_attention(
        x.query,
        x.key,
        x.value,
        x.bias,
        x.mask,
        scale=x.scale,
        is_causal=x.is_causal,
        query_seq_lengths=x.query_seq_lengths,
        key_value_seq_lengths=x.key_value_seq_lengths,
        local_window_size=x.window,
        implementation="cudnn",
        return_residual=return_residual,
    )
    if not return_residual:
        return x.unbatch(out), None, None
    out, lse = out
    lse = _dead_rows_to_minus_inf(lse, x)
    return x.unbatch(out), None, x.unbatch(lse)


def _dead_rows_to_minus_inf(lse: Array, x: Inputs) -> Array:
    """jax.nn's residual `[B, T, N]` with the kit's -inf where a row has no live key
    (by the same combined mask every path uses)."""
    mask = x.full_mask()  # [B|1, N|1, T, S] or None
    if mask is None:
        return lse
    live = jnp.swapaxes(jnp.any(mask, axis=-1), 1, 2)  # [B|1, T, N|1]
    return jnp.where(live, lse, -jnp.inf)


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
    return_residual: bool = False,
) -> Array | tuple[Array, Array]:
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
        device; on a CPU, up to 8 queries against 1024 keys or more (128 in
        float32 with no mask but key/value lengths) take a compiled decode
        kernel or products in the cache's layout, `kit.attention.few_queries`), "xla"
        (materialized logits), "chunked" (memory-efficient,
        `kit.chunked_attention`), or "cudnn" (GPU only, through jax.nn).
      dropout_rate: attention-weight dropout probability, in [0, 1).
      dropout_rng: PRNG key; required when `dropout_rate > 0`. The output is a
        deterministic function of it.
      return_residual: also return the residual, as jax.nn does: the
        log-sum-exp of each query row's logits, log sum_s exp(scale q.k_s +
        bias), over its live keys. Like jax.nn's, it carries no gradient (a
        cotangent sent into it contributes nothing). A row with no live key
        gets -inf, the log of an empty sum, so that merging partial results by
        log-sum-exp weighs it exactly zero (jax.nn gives the mask value plus
        log S there, which depends on S and is -inf in float16 anyway).

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`), dtype of `query`; with `return_residual`,
      `(out, residual)`, residual `[B, T, N]` (or `[T, N]`) in that dtype.

    Raises:
      ValueError: at trace time, naming the argument, for a wrong rank, shape,
        dtype, head count, option or a dropout rate without a key.

    References:
      Vaswani et al., "Attention Is All You Need", 2017.
      Ainslie et al., "GQA: Training Generalized Multi-Query Transformer
      Models from Multi-Head Checkpoints", 2023.
    """
    x = check_inputs(
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
    )
    check_bool("return_residual", return_residual)
    out, _, residual = attend(
        x,
        implementation=implementation,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_residual=bool(return_residual),
    )
    return (out, residual) if return_residual else out


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
      bias: as in `dot_product_attention`.
      mask: as in `dot_product_attention`.
      scale: as in `dot_product_attention`.
      is_causal: as in `dot_product_attention`.
      query_seq_lengths: as in `dot_product_attention`.
      key_value_seq_lengths: as in `dot_product_attention`.
      local_window_size: as in `dot_product_attention`.

    Returns:
      `[B, N, T, S]` (or `[N, T, S]`), dtype of `query`.

    Raises:
      ValueError: as `dot_product_attention`.
    """
    x = check_inputs(
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
    _, weights, _ = xla_attention(x)
    return x.unbatch(weights)


def chunked_attention(
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
    block_q: int | None = None,
    block_k: int | None = None,
    backward_block_q: int | None = None,
    backward_block_k: int | None = None,
    units_per_step: int | None = None,
    return_residual: bool = False,
) -> Array | tuple[Array, Array]:
    """Memory-efficient attention; `kit.dot_product_attention(..., implementation="chunked")`.

    out = softmax(scale * Q K^T + bias, masked) V, computed block by block
    with an online softmax, never forming `[T, S]`. The VJP recomputes block
    scores from the saved log-sum-exp. Query rows with no live key return
    exactly zero, with zero gradients.

    Args:
      query: `[B, T, N, H]` or `[T, N, H]`.
      key: `[B, S, K, H]` or `[S, K, H]`; K divides N.
      value: as `key`.
      bias: optional, broadcastable to `[B, N, T, S]` (a full bias is O(T S)
        memory of its own, and so is its gradient).
      mask: optional bool, broadcastable to `[B, N, T, S]`, True = may attend.
      scale: a Python number; defaults to 1 / sqrt(H).
      is_causal: as in `kit.dot_product_attention`.
      query_seq_lengths: as in `kit.dot_product_attention`.
      key_value_seq_lengths: as in `kit.dot_product_attention`.
      local_window_size: as in `kit.dot_product_attention`.
      block_q: the forward pass's query block size; chosen from T if None.
      block_k: the forward pass's key/value block size; chosen from S if None.
      backward_block_q: the backward pass's query block size; if None,
        `block_q` where given, else chosen from T.
      backward_block_k: the backward pass's key/value block size; if None,
        `block_k` where given, else chosen from S. The lengths are padded to
        multiples of both passes' sizes.
      units_per_step: about how many (example, key/value head) pairs each
        loop step processes together (default: one example per step): a step
        takes max(1, units_per_step // K) whole examples.
      return_residual: also return the row log-sum-exp, as
        `kit.dot_product_attention` documents it.

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`), dtype of `query`; with
      `return_residual`, `(out, residual)`.

    Raises:
      ValueError: for every input `kit.dot_product_attention` rejects, a
        non-positive block size, or a traced `scale`.

    References:
      Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
      Work Partitioning", 2023.
    """
    x = check_inputs(
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
    )
    sizes = BlockSizes(block_q, block_k, backward_block_q, backward_block_k, units_per_step)
    check_bool("return_residual", return_residual)
    out, residual = chunked_from_inputs(x, sizes, return_residual=bool(return_residual))
    return (out, residual) if return_residual else out
