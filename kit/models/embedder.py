"""Token embedding plus absolute positions (sinusoidal or learned, optionally randomized)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kit import nn, positional
from kit.models.common import ModelConfig

Array = jax.Array
# Randomized positions draw from fold_in(the dropout key, this), apart from dropout's.
RANDOM_STREAM = 1 << 20
# Vocabularies larger than this are looked up by a gather (see Embedder).
GATHER_ABOVE = 4096


class Embedder(nnx.Module):
    """Token embedding plus absolute positions (sinusoidal or learned), if any.

    Lookups are one-hot matmuls for toy vocabularies, where they are faster on CPU
    than a gather (whose gradient is a scatter); above `GATHER_ABOVE` tokens (a
    pretrained vocabulary: GPT-2's one-hot [T, 50257] product would cost 2 T V D
    FLOPs) they are gathers.

    With `cfg.random_positions` = R > 0 (Ruoss et al., "Randomized Positional
    Encodings Boost Length Generalization of Transformers", 2023), the table has R
    rows and position p reads row ids[p], where ids is a sorted draw of max_len of
    the R without replacement: one draw per call, from `key` in training and from
    a fixed key otherwise (evaluation is deterministic, and a decoding's steps
    agree). The model sees the order of its tokens, not their distance, and in
    training it meets every row of the table, however short its examples.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0)
        self.random = cfg.random_positions
        self.max_len = max(cfg.max_len, cfg.random_positions)  # the table's rows
        self.positions = cfg.max_len  # the positions a call can ask for
        self.tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model)))
        self.learned = (
            nnx.Param(init(rngs.params(), (self.max_len, cfg.d_model)) * 0.02)
            if cfg.positions == "learned"
            else None
        )
        self.sinusoidal = cfg.positions == "sinusoidal"
        self.types = (
            nnx.Param(init(rngs.params(), (cfg.type_vocab_size, cfg.d_model)) * 0.02)
            if cfg.type_vocab_size
            else None
        )
        self.norm = (
            nn.layer_norm(cfg.d_model, cfg.norm_eps, cfg.rms_norm, cfg.dtype, rngs)
            if cfg.embed_norm
            else None
        )
        # The tied head's bias (BERT's masked-LM decoder has one; GPT-2's has none).
        self.head_bias = (
            nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))
            if cfg.tie_embeddings and cfg.head_bias
            else None
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        key: Array | None = None,
        token_types: Array | None = None,
    ) -> Array:
        """tokens, positions `[B, T]` -> `[B, T, D]` in the computation dtype.
        `key`: the draw of randomized positions (see the class), if any.
        `token_types` `[B, T]` (BERT's segments; default all 0) for a model with
        `type_vocab_size`; the embedding's LayerNorm (`embed_norm`) comes last."""
        T = tokens.shape[-1]
        if (self.learned is not None or self.sinusoidal) and self.positions < T:
            raise ValueError(
                f"tokens: {T} positions, but the model has {self.positions} (its max_len)"
            )
        if self.random:
            key = jax.random.key(0) if key is None else jax.random.fold_in(key, RANDOM_STREAM)
            ids = jax.random.choice(key, self.random, (self.positions,), replace=False)
            positions = jnp.sort(ids).astype(jnp.int32)[positions]
        table = self.tokens[...].astype(self.dtype)
        if table.shape[0] > GATHER_ABOVE:
            x = jnp.take(table, tokens, axis=0)
        else:
            x = jax.nn.one_hot(tokens, table.shape[0], dtype=self.dtype) @ table
        if self.learned is not None:
            learned = self.learned[...].astype(self.dtype)
            x = x + jax.nn.one_hot(positions, self.max_len, dtype=self.dtype) @ learned
        if self.sinusoidal:
            # A trace-time constant, not a parameter.
            x = x + positional.sinusoidal(self.max_len, table.shape[1])[positions].astype(
                self.dtype
            )
        if self.types is not None:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + jnp.take(self.types[...].astype(self.dtype), types, axis=0)
        elif token_types is not None:
            raise ValueError("token_types: this model has no token-type embedding")
        return x if self.norm is None else self.norm(x)

    def attend(self, x: Array) -> Array:
        """`x [..., D]` -> logits `[..., V]` through the token table (a tied head)."""
        logits = x @ self.tokens[...].astype(x.dtype).T
        if self.head_bias is not None:
            bias = self.head_bias[...].astype(x.dtype)
            logits = logits + bias.reshape((1,) * (logits.ndim - 1) + bias.shape)
        return logits


def output_head(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear | None:
    """A text model's output head: a biased D -> V projection, or None when it is tied
    to the token embedding (`cfg.tie_embeddings`; `head_logits` then reads `attend`)."""
    if cfg.tie_embeddings:
        return None
    return nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, rngs=rngs)


class HeadTransform(nnx.Module):
    """BERT's masked-LM transform before the head: dense D -> D, activation, LayerNorm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.d_model, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.norm = nn.layer_norm(cfg.d_model, cfg.norm_eps, cfg.rms_norm, cfg.dtype, rngs)
        self.activation = cfg.activation

    def __call__(self, x: Array) -> Array:
        return self.norm(nn.ACTIVATIONS[self.activation](self.dense(x)))


def head_transform(cfg: ModelConfig, rngs: nnx.Rngs) -> HeadTransform | None:
    """The transform before the output head (`cfg.head_transform`), or None."""
    return HeadTransform(cfg, rngs) if cfg.head_transform else None


def head_logits(model, x: Array) -> Array:
    """The logits of a text model (one with `embed`, `head` and `head_transform`)
    from its last states."""
    if model.head_transform is not None:
        x = model.head_transform(x)
    if model.cfg.scale_head_input:  # T5 v1.0
        x = x * jnp.asarray(model.cfg.d_model**-0.5, x.dtype)
    return model.embed.attend(x) if model.head is None else model.head(x)
