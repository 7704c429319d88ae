"""kit.positional against hand-computed values and the properties that define them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kit import positional


def test_sinusoidal_matches_the_formula():
    table = np.asarray(positional.sinusoidal(10, 8))
    t = 7  # column 2i = 4 holds sin(t / 10000^(4/8)), column 5 the cos
    np.testing.assert_allclose(table[t, 4], math.sin(t / 10000 ** (4 / 8)), rtol=1e-6)
    np.testing.assert_allclose(table[t, 5], math.cos(t / 10000 ** (4 / 8)), rtol=1e-6)
    np.testing.assert_allclose(table[0, 0::2], 0.0)
    np.testing.assert_allclose(table[0, 1::2], 1.0)
    with pytest.raises(ValueError, match="dim: expected an even model dim"):
        positional.sinusoidal(4, 7)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(p, s):
        rq = positional.apply_rope(q, jnp.array([[p]], jnp.int32))
        rk = positional.apply_rope(k, jnp.array([[s]], jnp.int32))
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-4
    # A rotation keeps the norm.
    rotated = positional.apply_rope(q, jnp.array([[9]], jnp.int32))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-5)
    with pytest.raises(ValueError, match=r"positions: expected shape \[B, T\]"):
        positional.apply_rope(q, jnp.zeros((2, 1), jnp.int32))


def test_alibi_bias_hand_computed():
    bias = np.asarray(positional.alibi_bias(2, 3, 3))
    slopes = [2.0**-4, 2.0**-8]  # 2^(-8 n / N) for N = 2
    for n, slope in enumerate(slopes):
        expected = -slope * np.abs(np.arange(3)[:, None] - np.arange(3)[None, :])
        np.testing.assert_allclose(bias[n], expected, rtol=1e-6)
