"""The compiled CPU decode kernel (kit.attention.cpu_kernels, kit/attention/cpu/decode.cc)
against the formula: shapes that cross its chunks, key/value lengths, vmap with an
unbatched cache, derivatives of the first and second order, x64, shard_map, and the
dispatch that sends a decode step to it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_qkv, normal, reference_attention
from jax.sharding import NamedSharding, PartitionSpec

import kit
from kit.attention import cpu_kernels, few_queries

# CI builds the kernel (setup.py); a checkout without a compiler may not have it.
if not cpu_kernels.available():
    if os.environ.get("CI"):
        raise RuntimeError("the CPU decode kernel did not build or load (kit/attention/cpu)")
    pytest.skip("the CPU decode kernel is not built", allow_module_level=True)

S = few_queries.MIN_KEYS


def lse_reference(q, k, scale, lengths):
    """log sum exp of each row's live logits `[B, T, N]` in float64, -inf for a dead row."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = np.einsum("btnh,bsnh->btns", q, k) * scale
    live = np.arange(k.shape[1])[None, None, None, :] < np.asarray(lengths)[:, None, None, None]
    logits = np.where(live, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]


def length_mask(B, N, T, S, lengths):
    return np.arange(S)[None, None, None, :] < np.asarray(lengths)[:, None, None, None] + np.zeros(
        (B, N, T, 1), int
    )


def kernel_in(fn, *args) -> bool:
    return cpu_kernels.TARGET in jax.jit(fn).lower(*args).as_text()


# K, T, H, S and the lengths: each S spans several of the kernel's chunks (128 KiB of
# keys: 64 keys at K * H = 512, 2048 at 16) with a ragged last one, and the lengths cut
# caches inside a chunk, at a chunk's end, to one key and to none.
CASES = {
    "MHA K=8 H=64, one query": (8, 1, 64, 1500, [1500, 640, 1]),
    "GQA K=2 H=16, T=3": (2, 3, 16, 5000, [5000, 4096, 0]),
    "MQA K=1 H=8, T=8": (1, 8, 8, 3001, [3001, 2, 1999]),
    "K=4 H=24, T=2": (4, 2, 24, 1100, [1100, 1024, 700]),
    "a short cache, K=2 H=16": (2, 1, 16, few_queries.KERNEL_MIN_KEYS + 2, [130, 64, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equal_to_the_formula_across_chunks_and_lengths(case):
    K, T, H, S_, lengths = CASES[case]
    B, N = len(lengths), 8
    q, k, v = make_qkv(B=B, T=T, S=S_, N=N, K=K, H=H, seed=len(case))
    lengths = jnp.asarray(lengths, jnp.int32)

    def run(q, k, v):
        return kit.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, return_residual=True
        )

    assert kernel_in(run, q, k, v)
    out, lse = jax.jit(run)(q, k, v)
    mask = length_mask(B, N, T, S_, lengths)
    want = reference_attention(q, k, v, scale=H**-0.5, mask=mask)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    want_lse = lse_reference(q, k, H**-0.5, lengths)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    dead = np.asarray(lengths) == 0
    assert np.all(np.asarray(out)[dead] == 0)  # a row with no live key is exactly zero


@pytest.mark.parametrize("N,K,T", [(6, 2, 1), (12, 4, 1), (12, 4, 3)])
def test_rows_that_do_not_fill_a_vector(N, K, T):
    # 6, 12 and 36 query rows a task: the softmax's rows past the last whole vector of 8.
    B, H, S_ = 2, 16, 700
    q, k, v = make_qkv(B=B, T=T, S=S_, N=N, K=K, H=H, seed=N + K + T)
    lengths = jnp.asarray([S_, 333], jnp.int32)

    def run(q, k, v):
        return kit.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, return_residual=True
        )

    assert kernel_in(run, q, k, v)
    out, lse = jax.jit(run)(q, k, v)
    want = reference_attention(q, k, v, scale=H**-0.5, mask=length_mask(B, N, T, S_, lengths))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_reference(q, k, H**-0.5, lengths), rtol=1e-5, atol=1e-5)


def test_large_logits_and_a_traced_scale():
    # Logits far from zero (the kernel's exponential sees -80 and less) and a scale that
    # is a traced value, which goes into the queries.
    q, k, v = make_qkv(B=2, T=1, S=S, N=8, K=8, H=16, seed=3)
    mask = np.ones((2, 8, 1, S), bool)
    for scale in (2.0, 0.01):
        out = jax.jit(lambda q, s: kit.dot_product_attention(q * 4, k, v, scale=s))(q, scale)
        want = reference_attention(q * 4, k, v, scale=scale, mask=mask)
        np.testing.assert_allclose(out, want, atol=5e-6, rtol=1e-5)


def test_derivatives_equal_the_formula():
    B, T, N, K, H = 2, 2, 8, 2, 16
    q, k, v = make_qkv(B=B, T=T, S=S + 37, N=N, K=K, H=H, seed=5)
    lengths = jnp.array([S + 37, 900], jnp.int32)
    mask = length_mask(B, N, T, S + 37, lengths)
    weights = normal(jax.random.key(9), q.shape)

    def ours(q, k, v):
        out = kit.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
        return jnp.sum(jnp.sin(out) * weights)

    def formula(q, k, v):
        return jnp.sum(jnp.sin(reference_attention(q, k, v, scale=H**-0.5, mask=mask)) * weights)

    assert kernel_in(ours, q, k, v)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(formula, argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-6, rtol=1e-4, err_msg=name)
    # jvp, and a second derivative (the gradient of a gradient's norm) with respect to q.
    tangent = normal(jax.random.key(2), q.shape)
    np.testing.assert_allclose(
        jax.jvp(ours, (q, k, v), (tangent, jnp.zeros_like(k), jnp.zeros_like(v)))[1],
        jax.jvp(formula, (q, k, v), (tangent, jnp.zeros_like(k), jnp.zeros_like(v)))[1],
        rtol=1e-4,
        atol=1e-5,
    )

    def second(f):
        return jax.jit(jax.grad(lambda q: jnp.sum(jax.grad(f)(q, k, v) ** 2)))(q)

    np.testing.assert_allclose(second(ours), second(formula), rtol=1e-3, atol=1e-5)


def test_vmap_over_queries_with_one_cache_and_nested():
    # Only the queries are batched: the kernel broadcasts the cache (vmap's
    # expand_dims), and a second vmap over the lengths nests it.
    B, N, K, H = 2, 8, 2, 16
    q, k, v = make_qkv(B=B, T=1, S=S, N=N, K=K, H=H, seed=8)
    qs = jnp.stack([q, 2 * q, -q])
    lengths = jnp.array([[S, 10], [5, S], [1, 0]], jnp.int32)

    def one(q, lengths):
        return kit.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)

    got = jax.jit(jax.vmap(one))(qs, lengths)
    for i in range(3):
        mask = length_mask(B, N, 1, S, lengths[i])
        want = reference_attention(qs[i], k, v, scale=H**-0.5, mask=mask)
        np.testing.assert_allclose(got[i], want, atol=2e-6, rtol=1e-5)
    nested = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))(qs, lengths)
    for i in range(3):
        for j in range(3):
            mask = length_mask(B, N, 1, S, lengths[j])
            want = reference_attention(qs[i], k, v, scale=H**-0.5, mask=mask)
            np.testing.assert_allclose(nested[i, j], want, atol=2e-6, rtol=1e-5)


def test_x64_and_float64():
    q, k, v = make_qkv(B=2, T=1, S=S, N=8, K=8, H=16, seed=4)
    mask = np.ones((2, 8, 1, S), bool)
    with jax.enable_x64(True):
        # float32 inputs with x64 on still take the kernel; float64 keeps jax.numpy.
        assert kernel_in(kit.dot_product_attention, q, k, v)
        out = jax.jit(kit.dot_product_attention)(q, k, v)
        want = reference_attention(q, k, v, scale=0.25, mask=mask)
        np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
        assert not kernel_in(kit.dot_product_attention, q64, k64, v64)


def test_inside_shard_map_over_the_batch():
    mesh = jax.make_mesh((2,), ("data",))
    q, k, v = make_qkv(B=4, T=1, S=S, N=8, K=2, H=16, seed=6)
    lengths = jnp.array([S, 3, 600, 0], jnp.int32)
    spec = PartitionSpec("data")

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec)
    def sharded(q, k, v, lengths):
        return kit.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)

    # JAX's default mesh axes are Explicit: the inputs are put on the mesh first.
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, lengths)]
    mask = length_mask(4, 8, 1, S, lengths)
    want = reference_attention(q, k, v, scale=0.25, mask=mask)
    assert cpu_kernels.TARGET in sharded.lower(*placed).as_text()
    np.testing.assert_allclose(sharded(*placed), want, atol=2e-6, rtol=1e-5)


def test_dispatch_takes_the_kernel_only_where_it_fits():
    q, k, v = make_qkv(B=2, T=1, S=S, N=8, K=2, H=16, seed=1)
    assert kernel_in(kit.dot_product_attention, q, k, v)
    # From KERNEL_MIN_KEYS keys on (shorter than the products' MIN_KEYS), up to
    # FEW_QUERIES queries.
    shortest, few = few_queries.KERNEL_MIN_KEYS, few_queries.FEW_QUERIES
    assert kernel_in(kit.dot_product_attention, *make_qkv(B=2, T=few, S=shortest, N=8, K=2, H=16))
    assert not kernel_in(kit.dot_product_attention, *make_qkv(B=2, T=1, S=shortest - 1, N=8, K=2))
    assert not kernel_in(kit.dot_product_attention, *make_qkv(B=2, T=few + 1, S=S, N=8, K=2))
    # A mask, a bias, causal, a window, bfloat16, a head dim not a multiple of 8, or an
    # explicit implementation: the kernel is not in the program.
    bias = jnp.zeros((2, 8, 1, S))
    mask = jnp.ones((2, 8, 1, S), bool)
    assert not kernel_in(lambda q, k, v: kit.dot_product_attention(q, k, v, bias=bias), q, k, v)
    assert not kernel_in(lambda q, k, v: kit.dot_product_attention(q, k, v, mask=mask), q, k, v)
    for options in ({"is_causal": True}, {"local_window_size": 5}, {"implementation": "xla"}):
        assert not kernel_in(
            lambda q, k, v, o=options: kit.dot_product_attention(q, k, v, **o), q, k, v
        )
    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    assert not kernel_in(kit.dot_product_attention, *low)
    q12, k12, v12 = make_qkv(B=2, T=1, S=S, N=8, K=2, H=12, seed=1)
    assert not kernel_in(kit.dot_product_attention, q12, k12, v12)


def test_the_kernel_rejects_shapes_it_cannot_take():
    # Called directly (the dispatch never sends these): an error naming the kernel.
    q, k, v = make_qkv(B=1, T=1, S=64, N=8, K=2, H=12, seed=0)
    with pytest.raises(Exception, match="kit decode"):
        jax.block_until_ready(cpu_kernels._kernel(q, k, v, jnp.array([64], jnp.int32), 1.0))
    q, k, v = make_qkv(B=1, T=1, S=64, N=8, K=3, H=16, seed=0)
    with pytest.raises(Exception, match="kit decode"):
        jax.block_until_ready(cpu_kernels._kernel(q, k, v, jnp.array([64], jnp.int32), 1.0))


def test_cache_read_sums_every_element_once():
    # Sizes around the kernel's 1 MiB tasks and its 32-float steps: several tasks with a
    # ragged last one, a tail of single floats, an empty array; against numpy in float64.
    rng = np.random.default_rng(0)
    for n_k, n_v in [(2**18 * 3 + 37, 5), (31, 2**18), (0, 1000), (0, 0)]:
        k = rng.standard_normal(n_k).astype(np.float32).reshape(-1, 1)
        v = rng.uniform(0.0, 2.0, n_v).astype(np.float32)
        got = float(jax.jit(cpu_kernels.cache_read)(k, v))
        want = k.astype(np.float64).sum() + v.astype(np.float64).sum()
        # float32 sums of <= 800k terms of size <= 2: within 1e-6 relative, 1e-3 absolute.
        assert abs(got - want) <= 1e-3 + 1e-6 * abs(want), (n_k, n_v, got, want)
    # Reading k twice gives twice its sum: each element is read once per argument.
    k = rng.standard_normal((4, 1000, 2, 16)).astype(np.float32)
    np.testing.assert_allclose(
        float(cpu_kernels.cache_read(k, k)), 2 * k.astype(np.float64).sum(), atol=1e-3
    )
    with pytest.raises(ValueError, match="v must be float32"):
        cpu_kernels.cache_read(k, k.astype(np.float16))
