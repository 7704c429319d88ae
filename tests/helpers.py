"""Inputs, tolerances, configs and parameter marks shared by the test modules."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# float32: about 4x and 7x the largest errors against jax.nn that
# experiments/compare_jax_nn.py measures (4.8e-7 output, 1.4e-6 gradients).
TOLERANCES = {  # dtype: (forward, gradient)
    jnp.float32: (2e-6, 1e-5),
    jnp.bfloat16: (2e-2, 2e-2),
    jnp.float16: (2e-2, 2e-2),
}


def normal(rng, shape, dtype=jnp.float32):
    """Standard normal draws, a function of the key `rng`, made on the host: a
    jax.random draw compiles a program for every shape (110 compiles, 14 s of the
    suite), and the inputs need none."""
    seed = np.asarray(jax.random.key_data(rng)).ravel().tolist()
    draws = np.random.default_rng(seed).standard_normal(shape, np.float32)
    # device_put, not jnp.asarray: since jax 0.10 the latter compiles an identity program
    # ("stage") for each new shape, 20-35 ms with its lowering.
    return jax.device_put(draws.astype(jnp.dtype(dtype)))


def make_qkv(B=2, T=8, S=8, N=4, K=4, H=16, dtype=jnp.float32, seed=0):
    rq, rk, rv = jax.random.split(jax.random.key(seed), 3)
    return (
        normal(rq, (B, T, N, H), dtype),
        normal(rk, (B, S, K, H), dtype),
        normal(rv, (B, S, K, H), dtype),
    )


def numpy_mask(B, N, T, S, mask=None, is_causal=False, q_len=None, kv_len=None, window=None):
    """The combined mask [B, N, T, S], built independently of kit with numpy."""
    out = np.ones((B, N, T, S), bool)
    if mask is not None:
        out &= np.broadcast_to(np.asarray(mask), (B, N, T, S))
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    if is_causal:
        out &= s <= t
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        out &= (s >= t - left) & (s <= t + right)
    for b in range(B):
        if q_len is not None:
            out[b, :, int(q_len[b]) :, :] = False
        if kv_len is not None:
            out[b, :, :, int(kv_len[b]) :] = False
    return out


def live_mask(B, N, T, S, mask, options):
    """numpy_mask of an attention call's mask and keyword options (is_causal, lengths,
    local_window_size)."""
    return numpy_mask(
        B,
        N,
        T,
        S,
        mask,
        options.get("is_causal", False),
        options.get("query_seq_lengths"),
        options.get("key_value_seq_lengths"),
        options.get("local_window_size"),
    )


@jax.jit
def reference_attention(q, k, v, *, scale, mask, bias=None):
    """Plain float32 attention: `[B, T, N, H]`, `[B, S, K, H]`, boolean mask `[B, N, T, S]`,
    optional bias broadcastable to `[B, N, T, S]`.

    Written from the formula with jax.numpy only (no kit code); a query row with no
    live key gives zeros, as kit's contract says. Compiled as one program: run op by op,
    each of its dozen operations would compile on its own for every new shape (about
    26 ms each here; docs/benchmarks.md, "Op-by-op compiles").
    """
    N, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), N // K, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), N // K, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k) * scale
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias.astype(jnp.float32), logits.shape)
    logits = jnp.where(mask, logits, -jnp.inf)
    live = jnp.any(mask, axis=-1, keepdims=True)
    shifted = logits - jnp.where(live, jnp.max(logits, axis=-1, keepdims=True), 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, shifted, 0.0)), 0.0)
    p = e / jnp.where(live, jnp.sum(e, axis=-1, keepdims=True), 1.0)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# XLA's CPU options while its optimizations are off, in the tests' processes
# (tests/conftest.py says why) and in the commands they run (command_env).
UNOPTIMIZED_OPTIONS = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
}


@contextlib.contextmanager
def optimizations(enabled: bool):
    """Compiles with (or without) XLA's optimization passes inside the block."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", not enabled)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def unoptimized():
    """Compiles without XLA's optimization passes inside the block, as the suite does
    by default (tests/conftest.py): for a reference inside a test that takes the
    `optimized` fixture, where only the code under test needs compiling as users do."""
    return optimizations(False)


def command_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a command the tests run: CPU with `devices` devices, compiled
    as the in-process tests compile (XLA's optimizations off, UNOPTIMIZED_OPTIONS)."""
    flags = [f"--{name}={str(value).lower()}" for name, value in UNOPTIMIZED_OPTIONS.items()]
    if devices != 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(flags),
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        **extra,
    )


def load_config(name: str, variant: str | None = "tiny", **overrides):
    """configs/<name>.py's get_config(variant), with flattened overrides ("model.kind": ...)."""
    from kit import training

    config = training.from_file(os.path.join(ROOT, "configs", f"{name}.py"), variant)
    config.update_from_flattened_dict(overrides)
    return config


def slow_beyond(values, fast, *, several=False):
    """Parameters for parametrize: those in `fast` run in the inner loop
    (`pytest -m "not slow"`), the others are marked slow. With `several`, each
    value is a tuple of several arguments."""

    def param(v):
        return pytest.param(*(v if several else (v,)), marks=pytest.mark.slow)

    return [v if v in fast else param(v) for v in values]


# A wider small model: grouped-query attention (4 query heads over 2 key/value heads).
WIDER = {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 48}


def tiny_config(kind: str, **overrides):
    """The `ModelConfig` of a small model of `kind` (vocabulary 12, d=16, 2 heads, 2
    layers, or 2 + 2, max_len 16); `overrides` are ModelConfig fields (e.g. `**WIDER`)."""
    from kit import models

    cfg = {"vocab_size": 12, "d_model": 16, "num_heads": 2, "num_layers": 2}
    cfg.update(num_decoder_layers=2, d_ff=32, max_len=16)
    return models.ModelConfig(kind=kind, **{**cfg, **overrides})


def tiny_model(kind: str, **overrides):
    """`tiny_config(kind, **overrides)` built untrained with key 0."""
    import jax

    from kit import models

    return models.build(tiny_config(kind, **overrides), jax.random.key(0))


def tiny_params(kind: str, **overrides):
    """(graphdef, params) of `tiny_config(kind, **overrides)` as training initializes it."""
    import jax

    from kit import training

    return training.init_model(tiny_config(kind, **overrides), jax.random.key(0, impl="rbg"))


def jitted(model, fn):
    """fn(model) under one jit (eager op-by-op dispatch would dominate the test time)."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)
    return jax.jit(lambda p: fn(nnx.merge(graphdef, p)))(params)
