"""Q/K/V and output projections, their initial parameters, and functional
multi-head attention over a params pytree.

Shape letters: B batch, T query length, S key/value length, D model dim, N
query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kit.attention.api import attend
from kit.attention.flex import flex_attend
from kit.attention.inputs import check_inputs, check_rank

Array = jax.Array

# process_heads(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H]) -> (q, k, v)
ProcessHeads = Callable[[Array, Array, Array], tuple[Array, Array, Array]]

HEAD_MASK_MODES = ("zero", "mean")


def check_head_mask(head_mask: Any, shape: tuple[int, ...], name: str = "head_mask") -> Array:
    """`head_mask` as an array of `shape` (1 keeps a head, 0 ablates it), bool or float.

    Raises:
      ValueError: naming `name` for another shape or an integer / other dtype.
    """
    mask = jnp.asarray(head_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {mask.shape}")
    if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected bool or float values (1 keeps a head, 0 ablates it), "
            f"got dtype {mask.dtype}"
        )
    return mask


def ablate_heads(out: Array, head_mask: Array, mode: str = "zero") -> Array:
    """Scales or replaces each head's attention output before the output projection.

    With m = head_mask[n] (1 keeps head n, 0 ablates it; values between blend):
      "zero": out[..., n, :] * m
      "mean": out[..., n, :] * m + (1 - m) * mean over the batch of out[:, ..., n, :]
    (the mean is taken per position). A mask of ones returns `out` unchanged,
    bit for bit. The output projection's bias is untouched: an ablated head
    contributes nothing, the layer's bias still does.

    Args:
      out: per-head outputs `[B, T, N, H]`.
      head_mask: `[N]`, bool or float.
      mode: "zero" or "mean".

    Raises:
      ValueError: for an unknown mode or a mask of another shape or dtype.
    """
    if mode not in HEAD_MASK_MODES:
        raise ValueError(f"mode: expected one of {HEAD_MASK_MODES}, got {mode!r}")
    m = check_head_mask(head_mask, (out.shape[-2],)).astype(out.dtype)
    m = m.reshape((1,) * (out.ndim - 2) + (m.shape[0], 1))  # [1, ..., N, 1]
    if mode == "zero":
        return out * m
    mean = jnp.mean(out, axis=0, keepdims=True)
    return out * m + (1 - m) * mean


def head_value_norms(value: Array, out_kernel: Array) -> Array:
    """||f(x_s)|| per query head: the value vector through the head's slice of the
    output projection (Kobayashi et al., 2020), without the shared output bias.

    f_n(x_s) = value[s, n // (N / K)] @ out_kernel[n]

    Args:
      value: `[B, S, K, H]` (after the value projection and its bias).
      out_kernel: `[N, H, D]`.

    Returns:
      `[B, N, S]`.
    """
    N = out_kernel.shape[0]
    v = jnp.repeat(value, N // value.shape[2], axis=2)  # [B, S, N, H]
    f = jnp.einsum("bsnh,nhd->bnsd", v, out_kernel)
    return jnp.sqrt(jnp.sum(jnp.square(f.astype(jnp.float32)), axis=-1))


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
    check_rank("kernel", kernel, (3,), "[D, N, H]")
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
    check_rank("kernel", kernel, (3,), "[N, H, D]")
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


def multi_head_attention(
    params: dict[str, Any],
    x: Array,
    context: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    return_weights: bool = False,
    process_heads: ProcessHeads | None = None,
    **attention_kwargs: Any,
) -> Array | tuple[Array, Array]:
    """Multi-head (or grouped-query) attention over a params pytree.

    y = project_output(dot_product_attention(process_heads(project_qkv(params, x, context))))

    (A model's layer that should read or change what passes between these steps
    composes them itself, as `kit.nn.MultiHeadAttention` does with `kit.hooks`.)

    Args:
      params: as made by `init_attention_params`.
      x: `[B, T, D]`, the queries' source.
      context: `[B, S, D]`, the keys' and values' source (cross-attention);
        defaults to `x` (self-attention).
      bias: as in `dot_product_attention`.
      mask: as in `dot_product_attention`.
      return_weights: also return the weights `[B, N, T, S]`, from the same
        pass as the output (the materialized path).
      process_heads: optional `(q [B, T, N, H], k [B, S, K, H], v) -> (q, k, v)`
        applied to the projected heads before attention, e.g. rotary position
        embeddings (`kit.positional.apply_rope`).
      **attention_kwargs: keyword options of `dot_product_attention`
        (is_causal, lengths, window, scale, dropout, implementation), and
        `score_mod` and `block_mask` of `flex_attention`: given either, the
        call is a programmed one (`kit.attention.flex`).

    Returns:
      `[B, T, D]`, and the weights `[B, N, T, S]` if `return_weights`.

    Raises:
      ValueError: for inconsistent parameter shapes or any error of
        `dot_product_attention`.
    """
    _check_params(params)
    check_rank("x", x, (3,), "[B, T, D]")
    if context is not None:
        check_rank("context", context, (3,), "[B, S, D]")
    q, k, v = project_qkv(params, x, context)
    if process_heads is not None:
        q, k, v = process_heads(q, k, v)
    run = {n: attention_kwargs.pop(n) for n in _RUN_OPTIONS if n in attention_kwargs}
    score_mod = attention_kwargs.pop("score_mod", None)
    block_mask = attention_kwargs.pop("block_mask", None)
    inputs = check_inputs(q, k, v, bias, mask, **attention_kwargs)
    if score_mod is None and block_mask is None:
        out, weights, _ = attend(inputs, return_weights=return_weights, **run)
    else:  # a dense bias or mask is folded into the programmed call (flex.with_dense)
        out, weights, _ = flex_attend(
            inputs, score_mod, block_mask, return_weights=return_weights, **run
        )
    y = project_output(out, params["out"]["kernel"], params["out"].get("bias"))
    return (y, weights) if return_weights else y


# Options of dot_product_attention that choose how attention runs, not what it computes.
_RUN_OPTIONS = ("implementation", "dropout_rate", "dropout_rng")


def _check_params(params: Any) -> None:
    names = ("query", "key", "value", "out")
    if not isinstance(params, dict) or any(n not in params for n in names):
        keys = list(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: expected a dict with keys {names}, got {keys}")
    for n in names:
        if "kernel" not in params[n]:
            raise ValueError(f"params[{n!r}]: missing 'kernel'")
        check_rank(f"params[{n!r}]['kernel']", params[n]["kernel"], (3,), "")
    d, _, h = params["query"]["kernel"].shape
    k_shape = params["key"]["kernel"].shape
    if params["value"]["kernel"].shape != k_shape or k_shape[0] != d or k_shape[2] != h:
        raise ValueError(
            f"params: key and value kernels must be [D, K, H] with D = {d}, H = {h}; got "
            f"key {k_shape}, value {params['value']['kernel'].shape}"
        )
