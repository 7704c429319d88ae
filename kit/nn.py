"""Flax NNX modules: they own the parameters and call kit.attention's pure functions.

Randomness is explicit: dropout takes a `dropout_rng` argument (None means no
dropout), so a module call is a pure function of its parameters and inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kit import attention, positional
from kit.attention.api import attend
from kit.attention.flex import flex_attend, score_grid
from kit.attention.inputs import check_inputs

Array = jax.Array


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; the identity when `rng` is None or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _fold(rng: Array | None, index: int) -> Array | None:
    return None if rng is None else jax.random.fold_in(rng, index)


class MultiHeadAttention(nnx.Module):
    """Multi-head / grouped-query attention: owns the parameters and calls the
    functional `kit.multi_head_attention`, with RoPE as its `process_heads` hook.
    `decode_step` is the separate KV-cache path for incremental decoding.

    Parameters: query `[D, N, H]`, key and value `[D, K, H]`, out `[N, H, D]`
    kernels, each with a bias but the key's (see kit.init_attention_params),
    stored in float32 and cast to `dtype` for the computation; `x` comes in
    `dtype` too. The softmax runs in float32 whatever `dtype` (kit.attention).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        dropout_rate: float = 0.0,
        rope: bool = False,
        implementation: str | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = attention.init_attention_params(
            rngs.params(), d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        self.query = nnx.Dict({n: nnx.Param(a) for n, a in params["query"].items()})
        self.key = nnx.Dict({n: nnx.Param(a) for n, a in params["key"].items()})
        self.value = nnx.Dict({n: nnx.Param(a) for n, a in params["value"].items()})
        self.out = nnx.Dict({n: nnx.Param(a) for n, a in params["out"].items()})
        self.dropout_rate = dropout_rate
        self.rope = rope
        self.implementation = implementation
        self.dtype = jnp.dtype(dtype)

    def params(self) -> dict[str, dict[str, Array]]:
        """The parameters as the pytree `kit.multi_head_attention` reads, in the
        computation dtype (they are stored in float32)."""
        return {
            name: {k: v[...].astype(self.dtype) for k, v in getattr(self, name).items()}
            for name in ("query", "key", "value", "out")
        }

    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        key_value_seq_lengths: Array | None = None,
        score_mod: Any = None,
        block_mask: Any = None,
        positions: Array | None = None,
        dropout_rng: Array | None = None,
        return_weights: bool = False,
        head_mask: Array | None = None,
        head_mask_mode: str = "zero",
    ) -> tuple[Array, dict[str, Any]]:
        """Attends from `x [B, T, D]` to `context [B, S, D]` (default: to `x` itself).

        Args:
          x: `[B, T, D]`.
          context: `[B, S, D]` for cross-attention.
          mask, bias, is_causal, key_value_seq_lengths: as in
            `kit.dot_product_attention`.
          score_mod, block_mask: as in `kit.flex_attention` (instead of a bias
            or mask).
          positions: int `[B, T]` positions of `x` (for RoPE); defaults to 0..T-1.
          dropout_rng: PRNG key for attention dropout; None disables it.
          return_weights: also return the attention weights `[B, N, T, S]` and
            the vectors attention used (see `_inspect`).
          head_mask: optional `[N]`: 1 keeps a head, 0 ablates it (kit.ablate_heads).
          head_mask_mode: "zero" or "mean".

        Returns:
          `y [B, T, D]` and an aux dict with "weights" and "vectors" (if asked).
        """
        rate = self.dropout_rate if dropout_rng is not None else 0.0
        rope = self._rope(x, positions) if context is None else None
        seen: dict[str, Array] = {}

        def process_heads(q, k, v):
            if rope is not None:
                q, k, v = rope(q, k, v)
            if return_weights:  # what attention reads, from this very pass
                seen.update(query=q, key=k, value=v)
            return q, k, v

        programmed = {
            name: fn for name, fn in (("score_mod", score_mod), ("block_mask", block_mask)) if fn
        }
        result = attention.multi_head_attention(
            self.params(),
            x,
            context,
            bias,
            mask,
            **programmed,
            return_weights=return_weights,
            process_heads=process_heads,
            head_mask=head_mask,
            head_mask_mode=head_mask_mode,
            is_causal=is_causal,
            key_value_seq_lengths=key_value_seq_lengths,
            implementation=self.implementation if rate == 0.0 else "xla",
            dropout_rate=rate,
            dropout_rng=dropout_rng,
        )
        if not return_weights:
            return result, {}
        y, weights = result
        return y, {"weights": weights, "vectors": self._inspect(seen, bias, score_mod)}

    def _inspect(self, qkv: dict[str, Array], bias: Array | None, score_mod=None):
        """q `[B, T, N, H]`, k and v `[B, S, K, H]` as attention read them (after
        RoPE), ||f(x_s)|| `[B, N, S]` (kit.head_value_norms) and the additive
        bias `[B, N, T, S]` if there was one (a score function's, evaluated on
        zero scores: the models' score functions are additive)."""
        out = dict(qkv)
        out["value_norms"] = attention.head_value_norms(qkv["value"], self.out["kernel"][...])
        B, T, N = qkv["query"].shape[:3]
        S = qkv["key"].shape[1]
        if score_mod is not None:
            out["bias"] = score_grid(score_mod, B, N, T, S)
        elif bias is not None:
            out["bias"] = jnp.broadcast_to(bias, (B, N, T, S))
        return out

    def decode_step(
        self,
        x: Array,
        cache: dict[str, Array],
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        score_mod: Any = None,
        positions: Array | None = None,
        return_weights: bool = False,
        head_mask: Array | None = None,
        head_mask_mode: str = "zero",
    ) -> tuple[Array, dict[str, Any]]:
        """Self-attention of new tokens `x [B, T, D]` through a KV cache (no dropout).

        The new keys and values are written into `cache` (`{"key", "value":
        [B, Smax, K, H], "index": int32 []}`) at `index`, and query t attends to
        cached keys 0..index + t.

        `head_mask` / `head_mask_mode` ablate heads as in `__call__` ("mean":
        the mean over the batch of this step's outputs).

        Returns:
          `y [B, T, D]` and an aux dict with "cache" (the updated cache) and
          "weights" `[B, N, T, Smax]` and "vectors" (if asked).
        """
        B, T = x.shape[:2]
        index = cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        params = self.params()
        q, k, v = attention.project_qkv(params, x)
        q, k, v = self._rope(x, positions)(q, k, v)
        k = jax.lax.dynamic_update_slice(
            cache["key"], k.astype(cache["key"].dtype), (0, index, 0, 0)
        )
        v = jax.lax.dynamic_update_slice(
            cache["value"], v.astype(cache["value"].dtype), (0, index, 0, 0)
        )
        # Query at position p sees cached keys 0..p: causal with an offset.
        key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
        cache_mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
        mask = cache_mask if mask is None else mask & cache_mask
        if score_mod is None:
            out, weights, _ = attend(
                check_inputs(q, k, v, bias, mask),
                implementation=self.implementation,
                return_weights=return_weights,
            )
        else:  # the cache mask goes into a block mask (kit.attention.flex.with_dense)
            out, weights, _ = flex_attend(
                check_inputs(q, k, v, bias, mask),
                score_mod,
                None,
                implementation="xla",
                return_weights=return_weights,
            )
        aux: dict[str, Any] = {"cache": {"key": k, "value": v, "index": index + T}}
        if return_weights:
            aux["weights"] = weights
            aux["vectors"] = self._inspect({"query": q, "key": k, "value": v}, bias, score_mod)
        if head_mask is not None:
            out = attention.ablate_heads(out, head_mask, head_mask_mode)
        y = attention.project_output(out, params["out"]["kernel"], params["out"]["bias"])
        return y, aux

    def _rope(self, x: Array, positions: Array | None):
        """The process_heads hook: RoPE on queries and keys at `positions`, if enabled."""
        if positions is None:
            B, T = x.shape[:2]
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        def process_heads(q, k, v):
            if not self.rope:
                return q, k, v
            return positional.apply_rope(q, positions), positional.apply_rope(k, positions), v

        return process_heads


class FeedForward(nnx.Module):
    """Position-wise MLP: D -> F (GELU) -> D, computed in `dtype` (float32 parameters)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        dropout_rate: float = 0.0,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.up = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)
        self.dropout_rate = dropout_rate

    def __call__(self, x: Array, *, dropout_rng: Array | None = None) -> Array:
        h = dropout(jax.nn.gelu(self.up(x)), self.dropout_rate, dropout_rng)
        return self.down(h)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: self-attention, optional cross-attention, optional feed-forward.

    x = x + Dropout(SelfAttn(LN(x))); x = x + Dropout(CrossAttn(LN(x), memory));
    x = x + Dropout(FFN(LN(x))). Without `feed_forward` the block is attention
    only (as in the induction-head models of Olsson et al., 2022).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: int | None = None,
        cross_attention: bool = False,
        feed_forward: bool = True,
        dropout_rate: float = 0.0,
        rope: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        def mha(use_rope: bool) -> MultiHeadAttention:
            return MultiHeadAttention(
                d_model,
                num_heads,
                num_kv_heads=num_kv_heads,
                dropout_rate=dropout_rate,
                rope=use_rope,
                dtype=dtype,
                rngs=rngs,
            )

        def norm() -> nnx.LayerNorm:  # statistics in float32, output in dtype
            return nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)

        self.norm_self = norm()
        self.self_attention = mha(rope)
        self.norm_cross = norm() if cross_attention else None
        self.cross_attention = mha(False) if cross_attention else None
        self.norm_ff = norm() if feed_forward else None
        self.feed_forward = (
            FeedForward(d_model, d_ff, dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
            if feed_forward
            else None
        )
        self.dropout_rate = dropout_rate

    def __call__(
        self,
        x: Array,
        *,
        memory: Array | None = None,
        mask: Array | None = None,
        self_score_mod: Any = None,
        self_block_mask: Any = None,
        cross_block_mask: Any = None,
        is_causal: bool = False,
        lengths: Array | None = None,
        memory_lengths: Array | None = None,
        positions: Array | None = None,
        cache: dict[str, Array] | None = None,
        dropout_rng: Array | None = None,
        return_weights: bool = False,
        head_mask: Array | None = None,
        cross_head_mask: Array | None = None,
        head_mask_mode: str = "zero",
    ) -> tuple[Array, dict[str, Any]]:
        """Returns `x [B, T, D]` and aux: "self" and "cross" weights and their
        "self_vectors" / "cross_vectors" (if asked); "cache" when decoding.

        `head_mask` / `cross_head_mask` `[N]` ablate heads of the self- and
        cross-attention (kit.ablate_heads, in `head_mask_mode`). `self_score_mod`,
        `self_block_mask` and `cross_block_mask` program the attention
        (`kit.flex_attention`): positions as a score function, packed documents."""
        aux: dict[str, Any] = {}
        ablation = {"head_mask": head_mask, "head_mask_mode": head_mask_mode}
        if cache is None:
            h, self_aux = self.self_attention(
                self.norm_self(x),
                mask=mask,
                score_mod=self_score_mod,
                block_mask=self_block_mask,
                is_causal=is_causal,
                key_value_seq_lengths=lengths,
                positions=positions,
                dropout_rng=_fold(dropout_rng, 0),
                return_weights=return_weights,
                **ablation,
            )
        else:  # decoding: the KV cache path (lengths are in the cache's mask)
            h, self_aux = self.self_attention.decode_step(
                self.norm_self(x),
                cache,
                mask=mask,
                score_mod=self_score_mod,
                positions=positions,
                return_weights=return_weights,
                **ablation,
            )
        x = x + dropout(h, self.dropout_rate, _fold(dropout_rng, 1))
        if "cache" in self_aux:
            aux["cache"] = self_aux["cache"]
        if return_weights:
            aux["self"] = self_aux["weights"]
            aux["self_vectors"] = self_aux["vectors"]
        if self.cross_attention is not None:
            h, cross_aux = self.cross_attention(
                self.norm_cross(x),
                memory,
                key_value_seq_lengths=memory_lengths,
                block_mask=cross_block_mask,
                dropout_rng=_fold(dropout_rng, 2),
                return_weights=return_weights,
                head_mask=cross_head_mask,
                head_mask_mode=head_mask_mode,
            )
            x = x + dropout(h, self.dropout_rate, _fold(dropout_rng, 3))
            if return_weights:
                aux["cross"] = cross_aux["weights"]
                aux["cross_vectors"] = cross_aux["vectors"]
        if self.feed_forward is None:
            return x, aux
        h = self.feed_forward(self.norm_ff(x), dropout_rng=_fold(dropout_rng, 4))
        return x + dropout(h, self.dropout_rate, _fold(dropout_rng, 5)), aux
