"""kit.positional against hand-computed values and the properties that define them."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jitted, normal, tiny_model

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
    q = normal(jax.random.key(0), (1, 1, 1, 8))
    k = normal(jax.random.key(1), (1, 1, 1, 8))

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


@functools.partial(jax.jit, static_argnums=0)
def _distances(cfg, positions, key):
    """Squared distances `[T, R]` between what the embedder added to the token embedding
    at each position and each row of the sinusoidal table of R rows."""
    from flax import nnx

    from kit.models.text import Embedder

    embed = Embedder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros_like(positions)
    added = embed(tokens, positions, key) - embed.tokens[...][0][None, None]
    table = positional.sinusoidal(cfg.random_positions, cfg.d_model)
    return jnp.sum((added[0][:, None, :] - table[None]) ** 2, axis=-1)


def _rows_read(cfg, positions, key):
    """Which rows of the sinusoidal table the embedder read at each position: found by
    matching what it added to the token embedding against the formula's rows."""
    distance = np.asarray(_distances(cfg, positions, key))
    assert distance.min(axis=-1).max() < 1e-8  # each is a row of the table
    return distance.argmin(axis=-1)


def test_randomized_positions_read_sorted_distinct_rows_of_the_wide_table():
    """model.random_positions (Ruoss et al., 2023): the positions 0..max_len-1 of a call
    read increasing rows of a table of R rows, drawn anew for each training key and
    fixed without one (evaluation and each decoding step agree)."""
    from kit.models import ModelConfig

    cfg = ModelConfig(
        kind="encoder_decoder", vocab_size=5, d_model=16, max_len=12, random_positions=200
    )
    positions = jnp.arange(12, dtype=jnp.int32)[None]
    rows = _rows_read(cfg, positions, jax.random.key(3))
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 200
    again = _rows_read(cfg, positions, jax.random.key(3))
    other = _rows_read(cfg, positions, jax.random.key(4))
    np.testing.assert_array_equal(rows, again)
    assert not np.array_equal(rows, other)
    fixed = _rows_read(cfg, positions, None)
    # a decoding step at position 5 reads the row the whole sequence read there
    np.testing.assert_array_equal(_rows_read(cfg, positions[:, 5:6], None), fixed[5:6])
    draws = np.concatenate([_rows_read(cfg, positions, jax.random.key(k)) for k in range(20)])
    assert draws.max() > 150  # training meets rows far beyond max_len


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.positions": "rope"}, "randomizes the absolute positions"),
        ({"model.random_positions": 8}, "must be at least that, got 8"),
    ],
)
def test_randomized_positions_are_refused_where_they_mean_nothing(overrides, message):
    from helpers import load_config

    from kit import training

    config = load_config("scan_simple", **{"model.random_positions": 256, **overrides})
    with pytest.raises(ValueError, match=rf"^config\.model\.random_positions: .*{message}"):
        training.check_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_a_run_with_randomized_positions_trains_and_evaluates(tiny_run, positions):
    from kit import metrics

    overrides = {"model.random_positions": 128, "model.positions": positions}
    workdir = tiny_run("copy", **overrides)
    lines = metrics.read_metrics(f"{workdir}/metrics.jsonl")
    losses = [line["loss"] for line in lines if "loss" in line]
    evals = [line["eval/loss"] for line in lines if "eval/loss" in line]
    assert losses and evals and np.all(np.isfinite(losses + evals))


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["rope", "alibi", "t5"])
def test_cross_attention_has_no_positions_under_relative_encodings(positions):
    """Relative encodings act in self-attention only: the decoder reads the encoder's
    memory by content, so permuting the memory's rows leaves its output unchanged."""
    model = tiny_model("encoder_decoder", vocab_size=9, positions=positions)
    memory = normal(jax.random.key(1), (2, 7, 16))
    lengths = jnp.array([7, 7], jnp.int32)
    tgt = jnp.array([[1, 4, 5, 6], [1, 7, 8, 4]], jnp.int32)
    order = jnp.array([3, 0, 6, 1, 5, 2, 4])
    out, permuted = jitted(
        model, lambda m: [m.decode(tgt, x, lengths)[0] for x in (memory, memory[:, order])]
    )
    np.testing.assert_allclose(permuted, out, atol=1e-5)
