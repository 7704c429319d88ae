"""Inputs and tolerances shared by the test modules."""

import jax
import jax.numpy as jnp

TOLERANCES = {  # dtype: (forward, gradient)
    jnp.float32: (1e-5, 1e-4),
    jnp.bfloat16: (2e-2, 2e-2),
    jnp.float16: (2e-2, 2e-2),
}


def normal(rng, shape, dtype=jnp.float32):
    return jax.random.normal(rng, shape, jnp.float32).astype(dtype)


def make_qkv(B=2, T=8, S=8, N=4, K=4, H=16, dtype=jnp.float32, seed=0):
    rq, rk, rv = jax.random.split(jax.random.key(seed), 3)
    return (
        normal(rq, (B, T, N, H), dtype),
        normal(rk, (B, S, K, H), dtype),
        normal(rv, (B, S, K, H), dtype),
    )
