"""What every model kind shares: the hyperparameters and the encoder/decoder stack."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kit import nn, positional

Array = jax.Array

# "none": no position information at all (the decoder still has its causal mask).
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a toy transformer (built from `config.model`)."""

    kind: str
    vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    num_layers: int = 2
    num_decoder_layers: int = 2
    d_ff: int = 128
    max_len: int = 64
    dropout_rate: float = 0.0
    positions: str = "sinusoidal"
    patch_size: int = 2  # vision_transformer: p x p pixels per token
    image_size: int = 0  # vision_transformer: the task's image side


class TaskModel(nnx.Module):
    """A model kind as training reads it. Each kind defines `batch(task arrays)`,
    `positions_needed(task)`, `teacher_forced(mb, *, dropout_rng, return_weights)`
    and `predict(mb)`; `eval_metrics` may add names to the held-out metrics."""

    @staticmethod
    def eval_metrics(result: dict[str, float]) -> dict[str, float]:
        return result


class Stack(nnx.Module):
    """L transformer blocks and a final LayerNorm."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, cross: bool, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nn.TransformerBlock(
                    cfg.d_model,
                    cfg.num_heads,
                    cfg.d_ff,
                    num_kv_heads=cfg.num_kv_heads,
                    cross_attention=cross,
                    dropout_rate=cfg.dropout_rate,
                    rope=cfg.positions == "rope",
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.alibi = cfg.positions == "alibi"
        self.num_heads = cfg.num_heads

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        caches: list[dict[str, Array]] | None = None,
        dropout_rng: Array | None = None,
        return_weights: bool = False,
        **block_kwargs: Any,
    ) -> tuple[Array, dict[str, Any]]:
        bias = None
        if self.alibi:
            key_length = x.shape[1] if caches is None else caches[0]["key"].shape[1]
            key_positions = jnp.arange(key_length, dtype=jnp.int32)
            distance = jnp.abs(positions[:, None, :, None] - key_positions[None, None, None, :])
            slopes = positional.alibi_slopes(self.num_heads)[None, :, None, None]
            bias = -slopes * distance.astype(jnp.float32)  # [B, N, T, S]
        new_caches, weights = [], {"self": [], "cross": []}
        for i, layer in enumerate(self.layers):
            x, aux = layer(
                x,
                self_bias=bias,
                positions=positions,
                cache=None if caches is None else caches[i],
                dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, i),
                return_weights=return_weights,
                **block_kwargs,
            )
            new_caches.append(aux.get("cache"))
            for name in weights:
                if name in aux:
                    weights[name].append(aux[name])
        out_aux: dict[str, Any] = {k: jnp.stack(v) for k, v in weights.items() if v}
        if caches is not None:
            out_aux["caches"] = new_caches
        return self.norm(x), out_aux
