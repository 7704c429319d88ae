"""Functional KV cache and greedy decoding.

A cache is a list (one entry per decoder layer) of `{"key", "value":
[B, Smax, K, H], "index": int32 []}`: a pytree, so decoding is a `lax.scan`
that jit compiles once. Prefill writes the prompt; each step writes one token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def init_caches(cfg: Any, num_layers: int, batch: int, length: int, dtype=None):
    """Empty caches for `num_layers` layers: `[B, Smax, K, H]` zeros, index 0.

    `cfg` is a `kit.models.ModelConfig` (d_model, num_heads, num_kv_heads, head_dim, dtype:
    the caches' dtype unless `dtype` is given).
    """
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    kv_heads = cfg.num_kv_heads or cfg.num_heads
    shape = (batch, length, kv_heads, cfg.head_dim or cfg.d_model // cfg.num_heads)
    return [
        {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype), "index": jnp.int32(0)}
        for _ in range(num_layers)
    ]


def argmax(logits: Array, step: Any = None) -> Array:
    """The most likely token of each row: logits `[B, V]` -> int32 `[B]`."""
    del step
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def greedy_encoder_decoder(
    model: Any,
    src: Array,
    src_lengths: Array,
    *,
    bos: int,
    length: int,
    forbid: int | None = None,
    until: Array | None = None,
    hooks: Any = None,
    select: Any = None,
) -> Array:
    """Greedy decoding: src `[B, S]` -> tokens `[B, length]` (the BOS is not included).
    `select(logits [B, V], step)` -> tokens `[B]` picks each token instead of the argmax
    (a sampler: `kit.pretrained.sampler`).

    With `forbid` (a token) and `until` (int `[B]`), row b never emits that token
    at its first until[b] steps: decoding to a given length with end-of-sequence
    forbidden (Lake & Baroni's "given the true output length").
    `hooks`' writes (`kit.hooks.Hooks`) go to every model call; its reads are dropped."""
    hooks = None if hooks is None else hooks.without_reads()
    select = argmax if select is None else select
    memory, _ = model.encode(src, src_lengths, hooks=hooks)
    caches = init_caches(model.cfg, model.cfg.num_decoder_layers, src.shape[0], length)

    def step(carry, t):
        caches, token = carry
        logits, aux = model.decode(token, memory, src_lengths, caches=caches, start=t, hooks=hooks)
        logits = logits[:, -1]
        if forbid is not None:
            banned = (jnp.arange(logits.shape[-1]) == forbid)[None, :] & (t < until)[:, None]
            logits = jnp.where(banned, -jnp.inf, logits)
        token = select(logits, t)[:, None]
        return (aux["caches"], token), token[:, 0]

    start = jnp.full((src.shape[0], 1), bos, jnp.int32)
    _, tokens = jax.lax.scan(step, (caches, start), jnp.arange(length, dtype=jnp.int32))
    return tokens.T


def greedy_decoder_only(
    model: Any,
    prompt: Array,
    prompt_mask: Array,
    *,
    length: int,
    hooks: Any = None,
    select: Any = None,
) -> Array:
    """Greedy continuation of prompt `[B, P]` (mask `[B, P]`, False = padding) -> `[B, length]`.

    `hooks`' writes (`kit.hooks.Hooks`) go to every model call; its reads are dropped.
    `select(logits [B, V], step)` -> tokens `[B]` picks each token instead of the argmax."""
    hooks = None if hooks is None else hooks.without_reads()
    select = argmax if select is None else select
    B, P = prompt.shape
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, length), bool)], axis=1)
    caches = init_caches(model.cfg, model.cfg.num_layers, B, P + length)
    logits, aux = model(prompt, key_mask, caches=caches, start=0, hooks=hooks)
    first = select(logits[:, -1], 0)

    def step(carry, t):
        caches, token = carry
        logits, aux = model(token[:, None], key_mask, caches=caches, start=P + t, hooks=hooks)
        nxt = select(logits[:, -1], t + 1)
        return (aux["caches"], nxt), nxt

    _, rest = jax.lax.scan(step, (aux["caches"], first), jnp.arange(length - 1, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1)
