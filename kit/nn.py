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


# Where a block's norms sit: before each sublayer ("pre") or after its residual ("post").
NORM_POSITIONS = ("pre", "post")


def layer_norm(d_model: int, eps: float, rms: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm, or with `rms` RMSNorm (no mean, no bias: T5); statistics in float32,
    output in `dtype`."""
    if rms:
        return nnx.RMSNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
    return nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)


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
        scale: float | None = None,
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
        self.scale = scale  # None: 1/sqrt(H); T5 takes 1 (its init folds the scaling in)
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
        split: Any = None,
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
          split: the sequence split over devices: `split(q, k, v, scale=...)`
            attends instead (`kit.attention.context.split_attention` with the
            call's sides bound; it carries the masks and score function, so
            mask, bias, lengths, score_mod and block_mask are not read).

        Returns:
          `y [B, T, D]`.
        """
        q, k, v = attention.project_qkv(self.params(), x, context)
        if context is None:
            q, k, v = self._rope(x, positions)(q, k, v)
        options = {
            "is_causal": is_causal,
            "key_value_seq_lengths": key_value_seq_lengths,
            "scale": self.scale,
        }
        return self._attend(
            q, k, v, bias, mask, score_mod, block_mask, options, dropout_rng, tap, split=split
        )

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
        y = self._attend(
            q, k, v, None, mask, score_mod, None, {"scale": self.scale}, None, tap, "xla"
        )
        return y, {"key": k, "value": v, "index": index + T}

    def _attend(
        self,
        q,
        k,
        v,
        bias,
        mask,
        score_mod,
        block_mask,
        options,
        rng,
        tap,
        flex_path=None,
        split=None,
    ) -> Array:
        """The one attention path of `__call__` and `decode_step`, from projected heads
        to the output projection, with the hook points along it."""
        tap = tap if tap is not None else Tap(None)
        rate = self.dropout_rate if rng is not None else 0.0
        q, k, v = tap("q", q), tap("k", k), tap("v", v)
        if split is not None:
            return self._attend_split(q, k, v, rate, tap, split)
        inputs = check_inputs(q, k, v, bias, mask, **options)
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
        return self._output(out, tap)

    def _output(self, out: Array, tap: Tap) -> Array:
        out = tap("heads", out)
        kernel, out_bias = self.out["kernel"][...], self.out["bias"][...]
        y = attention.project_output(out, kernel.astype(self.dtype), out_bias.astype(self.dtype))
        return tap("out", y)

    def _attend_split(self, q, k, v, rate, tap, split) -> Array:
        """Attention with the sequence split over devices (no weights to read or drop)."""
        if rate > 0.0:
            raise ValueError(
                "dropout_rate: attention dropout does not run with the sequence split over "
                "devices (its weights are never formed); use 0 there"
            )
        unread = [p for p in ("bias", "scores", "weights") if tap.touches(p)]
        if unread:
            raise ValueError(
                f"hooks: the sequence split over devices forms no {unread}; read them on one "
                "device's sequence"
            )
        return self._output(split(q, k, v, scale=self.scale), tap)

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


# The feed-forward's nonlinearity (ModelConfig.activation): GELU's tanh form (jax's
# default; GPT-2's gelu_new, T5 v1.1's gated-gelu), GELU exact (BERT, ViT), ReLU (the
# original Transformer, T5 v1.0).
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class FeedForward(nnx.Module):
    """Position-wise MLP: D -> F (`activation`) -> D, computed in `dtype` (float32
    parameters). `gated` (T5 v1.1, Shazeer 2020): activation(x W_gate) * (x W_up), then
    down."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu_tanh",
        gated: bool = False,
        dropout_rate: float = 0.0,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}"
            )
        self.up = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.gate = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs) if gated else None
        self.down = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)
        self.activation = activation
        self.dropout_rate = dropout_rate

    def __call__(self, x: Array, *, dropout_rng: Array | None = None) -> Array:
        act = ACTIVATIONS[self.activation]
        h = act(self.up(x)) if self.gate is None else act(self.gate(x)) * self.up(x)
        return self.down(dropout(h, self.dropout_rate, dropout_rng))


class TransformerBlock(nnx.Module):
    """A block: self-attention, optional cross-attention, optional feed-forward.

    Pre-LayerNorm (`norm_position="pre"`, GPT-2, T5, ViT): x = x + Dropout(SelfAttn(LN(x)));
    x = x + Dropout(CrossAttn(LN(x), memory)); x = x + Dropout(FFN(LN(x))).
    Post-LayerNorm ("post", the original Transformer and BERT): x = LN(x + Dropout(SelfAttn(x)))
    and so on. `rms_norm` (T5): the norms are RMSNorm, no mean and no bias. Without
    `feed_forward` the block is attention only (as in the induction-head models of
    Olsson et al., 2022).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        cross_attention: bool = False,
        feed_forward: bool = True,
        dropout_rate: float = 0.0,
        rope: bool = False,
        norm_eps: float = 1e-6,
        norm_position: str = "pre",
        rms_norm: bool = False,
        key_bias: bool = False,
        scale_attention: bool = True,
        activation: str = "gelu_tanh",
        gated: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position: expected one of {NORM_POSITIONS}, got {norm_position!r}"
            )

        def mha(use_rope: bool) -> MultiHeadAttention:
            return MultiHeadAttention(
                d_model,
                num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                dropout_rate=dropout_rate,
                rope=use_rope,
                key_bias=key_bias,
                scale=None if scale_attention else 1.0,
                dtype=dtype,
                rngs=rngs,
            )

        def norm() -> nnx.Module:
            return layer_norm(d_model, norm_eps, rms_norm, dtype, rngs)

        self.norm_self = norm()
        self.self_attention = mha(rope)
        self.norm_cross = norm() if cross_attention else None
        self.cross_attention = mha(False) if cross_attention else None
        self.norm_ff = norm() if feed_forward else None
        self.feed_forward = (
            FeedForward(
                d_model,
                d_ff,
                activation=activation,
                gated=gated,
                dropout_rate=dropout_rate,
                dtype=dtype,
                rngs=rngs,
            )
            if feed_forward
            else None
        )
        self.dropout_rate = dropout_rate
        self.post = norm_position == "post"

    def _sublayer(self, norm, x, run, rng) -> Array:
        """x + Dropout(run(norm(x))) before the norm, or norm(x + Dropout(run(x))) after."""
        if self.post:
            return norm(x + dropout(run(x), self.dropout_rate, rng))
        return x + dropout(run(norm(x)), self.dropout_rate, rng)

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
        self_split: Any = None,
        cross_split: Any = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """Returns `x [B, T, D]` and, when decoding, the updated cache (else None).

        `self_score_mod`, `self_block_mask` and `cross_block_mask` program the
        attention (`kit.flex_attention`): positions as a score function, packed
        documents. `self_split` and `cross_split`: the attentions with the sequence
        split over devices (`MultiHeadAttention`'s `split`). `tap` (`kit.hooks.Tap`,
        scoped to this block) sees resid_pre,
        the attentions' points under "attn." and "cross.", resid_mid (before the
        feed-forward), mlp_out and resid_post."""
        tap = tap if tap is not None else Tap(None)
        x = tap("resid_pre", x)
        new_cache = None

        def self_attention(h):
            nonlocal new_cache
            if cache is None:
                return self.self_attention(
                    h,
                    mask=mask,
                    score_mod=self_score_mod,
                    block_mask=self_block_mask,
                    is_causal=is_causal,
                    key_value_seq_lengths=lengths,
                    positions=positions,
                    dropout_rng=_fold(dropout_rng, 0),
                    tap=tap.scope("attn"),
                    split=self_split,
                )
            # decoding: the KV cache path (lengths are in the cache's mask)
            h, new_cache = self.self_attention.decode_step(
                h,
                cache,
                mask=mask,
                score_mod=self_score_mod,
                positions=positions,
                tap=tap.scope("attn"),
            )
            return h

        x = self._sublayer(self.norm_self, x, self_attention, _fold(dropout_rng, 1))
        if self.cross_attention is not None:

            def cross_attention(h):
                return self.cross_attention(
                    h,
                    memory,
                    key_value_seq_lengths=memory_lengths,
                    block_mask=cross_block_mask,
                    dropout_rng=_fold(dropout_rng, 2),
                    tap=tap.scope("cross"),
                    split=cross_split,
                )

            x = self._sublayer(self.norm_cross, x, cross_attention, _fold(dropout_rng, 3))
        x = tap("resid_mid", x)
        if self.feed_forward is not None:

            def feed_forward(h):
                return tap("mlp_out", self.feed_forward(h, dropout_rng=_fold(dropout_rng, 4)))

            x = self._sublayer(self.norm_ff, x, feed_forward, _fold(dropout_rng, 5))
        return tap("resid_post", x), new_cache
