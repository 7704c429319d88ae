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
from kit.attention.flex import flex_attend
from kit.attention.inputs import check_inputs
from kit.attention.programs import score_grid
from kit.hooks import Tap

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
    """Multi-head / grouped-query attention: owns the parameters and composes the
    functional pieces (`kit.project_qkv`, RoPE, `kit.dot_product_attention` or
    `kit.flex_attention`, `kit.project_output`) with hook points between them
    (`kit.hooks`). `decode_step` runs the same path through a KV cache.

    Parameters: query `[D, N, H]`, key and value `[D, K, H]`, out `[N, H, D]`
    kernels, each with a bias but the key's (see kit.init_attention_params; `key_bias`
    adds one), stored in float32 and cast to `dtype` for the computation; `x` comes
    in `dtype` too. The softmax runs in float32 whatever `dtype` (kit.attention).
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
        key_bias: bool = False,
        implementation: str | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = attention.init_attention_params(
            rngs.params(), d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        if key_bias:  # for checkpoints that have one (GPT-2); zero, as the others
            params["key"]["bias"] = jnp.zeros_like(params["value"]["bias"])
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
        tap: Tap | None = None,
    ) -> Array:
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
          tap: the hook points of this attention (`kit.hooks.Tap`, scoped to it):
            q, k, v, bias, scores, weights, heads, out.

        Returns:
          `y [B, T, D]`.
        """
        q, k, v = attention.project_qkv(self.params(), x, context)
        if context is None:
            q, k, v = self._rope(x, positions)(q, k, v)
        options = {"is_causal": is_causal, "key_value_seq_lengths": key_value_seq_lengths}
        return self._attend(q, k, v, bias, mask, score_mod, block_mask, options, dropout_rng, tap)

    def decode_step(
        self,
        x: Array,
        cache: dict[str, Array],
        *,
        mask: Array | None = None,
        score_mod: Any = None,
        positions: Array | None = None,
        tap: Tap | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Self-attention of new tokens `x [B, T, D]` through a KV cache (no dropout).

        The new keys and values are written into `cache` (`{"key", "value":
        [B, Smax, K, H], "index": int32 []}`) at `index`, and query t attends to
        cached keys 0..index + t. Then attention runs as in `__call__`, hook
        points included (k and v are the whole cache; "mean" ablation takes the
        mean over the batch of this step's values).

        Returns:
          `y [B, T, D]` and the updated cache.
        """
        B, T = x.shape[:2]
        index = cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        q, k, v = attention.project_qkv(self.params(), x)
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
        # With a score function the cache mask goes into a block mask
        # (kit.attention.flex.with_dense), on the materialized path.
        y = self._attend(q, k, v, None, mask, score_mod, None, {}, None, tap, "xla")
        return y, {"key": k, "value": v, "index": index + T}

    def _attend(
        self, q, k, v, bias, mask, score_mod, block_mask, options, rng, tap, flex_path=None
    ) -> Array:
        """The one attention path of `__call__` and `decode_step`, from projected heads
        to the output projection, with the hook points along it."""
        tap = tap if tap is not None else Tap(None)
        q, k, v = tap("q", q), tap("k", k), tap("v", v)
        inputs = check_inputs(q, k, v, bias, mask, **options)
        rate = self.dropout_rate if rng is not None else 0.0
        run = {
            "implementation": self.implementation if rate == 0.0 else "xla",
            "dropout_rate": rate,
            "dropout_rng": rng,
        }
        if tap.touches("bias"):
            B, T, N = q.shape[:3]
            S = k.shape[1]
            if score_mod is not None:
                tap("bias", score_grid(score_mod, B, N, T, S))
            elif bias is not None:
                tap("bias", jnp.broadcast_to(bias, (B, N, T, S)))
        if tap.touches("scores") or tap.touches("weights"):
            out, _, _ = flex_attend(inputs, score_mod, block_mask, **run, tap=tap)
        elif score_mod is None and block_mask is None:
            out, _, _ = attend(inputs, **run)
        else:
            run["implementation"] = flex_path or run["implementation"]
            out, _, _ = flex_attend(inputs, score_mod, block_mask, **run)
        out = tap("heads", out)
        kernel, out_bias = self.out["kernel"][...], self.out["bias"][...]
        y = attention.project_output(out, kernel.astype(self.dtype), out_bias.astype(self.dtype))
        return tap("out", y)

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
        norm_eps: float = 1e-6,
        key_bias: bool = False,
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
                key_bias=key_bias,
                dtype=dtype,
                rngs=rngs,
            )

        def norm() -> nnx.LayerNorm:  # statistics in float32, output in dtype
            return nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)

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
        tap: Tap | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """Returns `x [B, T, D]` and, when decoding, the updated cache (else None).

        `self_score_mod`, `self_block_mask` and `cross_block_mask` program the
        attention (`kit.flex_attention`): positions as a score function, packed
        documents. `tap` (`kit.hooks.Tap`, scoped to this block) sees resid_pre,
        the attentions' points under "attn." and "cross.", resid_mid (before the
        feed-forward), mlp_out and resid_post."""
        tap = tap if tap is not None else Tap(None)
        x = tap("resid_pre", x)
        new_cache = None
        if cache is None:
            h = self.self_attention(
                self.norm_self(x),
                mask=mask,
                score_mod=self_score_mod,
                block_mask=self_block_mask,
                is_causal=is_causal,
                key_value_seq_lengths=lengths,
                positions=positions,
                dropout_rng=_fold(dropout_rng, 0),
                tap=tap.scope("attn"),
            )
        else:  # decoding: the KV cache path (lengths are in the cache's mask)
            h, new_cache = self.self_attention.decode_step(
                self.norm_self(x),
                cache,
                mask=mask,
                score_mod=self_score_mod,
                positions=positions,
                tap=tap.scope("attn"),
            )
        x = x + dropout(h, self.dropout_rate, _fold(dropout_rng, 1))
        if self.cross_attention is not None:
            h = self.cross_attention(
                self.norm_cross(x),
                memory,
                key_value_seq_lengths=memory_lengths,
                block_mask=cross_block_mask,
                dropout_rng=_fold(dropout_rng, 2),
                tap=tap.scope("cross"),
            )
            x = x + dropout(h, self.dropout_rate, _fold(dropout_rng, 3))
        x = tap("resid_mid", x)
        if self.feed_forward is not None:
            h = tap(
                "mlp_out", self.feed_forward(self.norm_ff(x), dropout_rng=_fold(dropout_rng, 4))
            )
            x = x + dropout(h, self.dropout_rate, _fold(dropout_rng, 5))
        return tap("resid_post", x), new_cache
