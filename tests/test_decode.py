"""Incremental decoding with the KV cache equals the full forward pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import WIDER, jitted, slow_beyond, tiny_params

from kit import decode, tasks

VOCAB = 12


def _model(kind, positions, num_kv_heads=None):
    wider = {**WIDER, "num_kv_heads": num_kv_heads}
    graphdef, params = tiny_params(kind, **wider, max_len=32, positions=positions)
    return nnx.merge(graphdef, params)


def _tokens(shape, seed):
    return jax.random.randint(jax.random.key(seed), shape, 4, VOCAB, jnp.int32)


VARIANTS = [("sinusoidal", None), ("learned", 2), ("rope", None), ("alibi", 2)]


@pytest.mark.parametrize("positions, kv", slow_beyond(VARIANTS, [], several=True))
def test_encoder_decoder_cache_equals_full_forward(positions, kv):
    model = _model("encoder_decoder", positions, kv)
    src, src_len = _tokens((3, 9), 1), jnp.array([9, 5, 7], jnp.int32)
    tgt_in = _tokens((3, 6), 2)
    full, _ = jitted(model, lambda m: m(src, src_len, tgt_in))

    def incremental(m):
        memory, _ = m.encode(src, src_len)

        def step(caches, t):
            token = jax.lax.dynamic_slice_in_dim(tgt_in, t, 1, axis=1)
            logits, aux = m.decode(token, memory, src_len, caches=caches, start=t)
            return aux["caches"], logits[:, 0]

        caches = decode.init_caches(m.cfg, 2, 3, 6)
        _, logits = jax.lax.scan(step, caches, jnp.arange(6, dtype=jnp.int32))
        return jnp.swapaxes(logits, 0, 1)

    chex.assert_trees_all_close(jitted(model, incremental), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions, kv", slow_beyond(VARIANTS, [("alibi", 2)], several=True))
def test_decoder_only_cache_equals_full_forward(positions, kv):
    model = _model("decoder_only", positions, kv)
    tokens = _tokens((2, 10), 3)
    key_mask = jnp.asarray(np.arange(10)[None, :] != np.array([[2], [5]]))  # a padding slot each
    full, _ = jitted(model, lambda m: m(tokens, key_mask))

    def incremental(m):
        caches = decode.init_caches(m.cfg, 2, 2, 10)
        prefill, aux = m(tokens[:, :4], key_mask, caches=caches, start=0)

        def step(caches, t):
            token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
            logits, aux = m(token, key_mask, caches=caches, start=t)
            return aux["caches"], logits[:, 0]

        _, logits = jax.lax.scan(step, aux["caches"], jnp.arange(4, 10, dtype=jnp.int32))
        return jnp.concatenate([prefill, jnp.swapaxes(logits, 0, 1)], axis=1)

    chex.assert_trees_all_close(jitted(model, incremental), full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_greedy_decoding_equals_argmax_of_full_forward():
    model = _model("encoder_decoder", "sinusoidal")
    src, src_len = _tokens((2, 7), 4), jnp.array([7, 4], jnp.int32)
    fast = jitted(
        model, lambda m: decode.greedy_encoder_decoder(m, src, src_len, bos=tasks.BOS, length=5)
    )

    def slow(m):
        tgt = jnp.full((2, 1), tasks.BOS, jnp.int32)
        for _ in range(5):
            logits, _ = m(src, src_len, tgt)
            tgt = jnp.concatenate([tgt, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)], 1)
        return tgt[:, 1:]

    np.testing.assert_array_equal(fast, jitted(model, slow))

    model = _model("decoder_only", "rope")
    prompt, mask = _tokens((2, 6), 5), jnp.ones((2, 6), bool)
    fast = jitted(model, lambda m: decode.greedy_decoder_only(m, prompt, mask, length=4))

    def slow(m):
        seq = prompt
        for _ in range(4):
            logits, _ = m(seq, jnp.ones(seq.shape, bool))
            seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)], 1)
        return seq[:, 6:]

    np.testing.assert_array_equal(fast, jitted(model, slow))
