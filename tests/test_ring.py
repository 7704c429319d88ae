"""kit.ring_attention on a ring of 8 simulated CPU devices equals kit.dot_product_attention,
forward and VJP, and holds per device a fraction of the single-device program's memory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_qkv
from jax.sharding import AxisType

import kit
from kit.attention import cpu_kernels

AXIS = "ring"


def ring_mesh(axis_type=AxisType.Auto):
    return jax.make_mesh((8,), (AXIS,), (axis_type,))


def _grads(attention, q, k, v):
    """Output and dq, dk, dv of sum(sin(out)), jitted."""

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _compare(*, T=64, K=4, reference="xla", tol=1e-5, **options):
    q, k, v = make_qkv(B=2, T=T, S=T, N=4, K=K, H=16)
    mesh = ring_mesh()
    got = _grads(
        lambda q, k, v: kit.ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, **options), q, k, v
    )
    want = _grads(
        lambda q, k, v: kit.dot_product_attention(q, k, v, implementation=reference, **options),
        q,
        k,
        v,
    )
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    return got


# Example 0 has no live key; example 1's keys end inside the third device's block.
LENGTHS = np.array([0, 19], np.int32)
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(), marks=SLOW),
        pytest.param(dict(is_causal=True), marks=SLOW),
        dict(is_causal=True, key_value_seq_lengths=LENGTHS, K=2),
        pytest.param(dict(key_value_seq_lengths=LENGTHS, K=1), marks=SLOW),
        pytest.param(dict(scale=0.3, is_causal=True, K=1), marks=SLOW),
    ],
    ids=["plain", "causal", "causal+gqa+lengths", "mqa+lengths", "scale"],
)
def test_ring_equals_dot_product_attention(options):
    out, (dq, dk, dv) = _compare(**options)
    if "key_value_seq_lengths" in options:  # a query row with no live key: zero, zero gradients
        assert np.all(np.asarray(out[0]) == 0.0)
        for g in (dq, dk, dv):
            assert np.all(np.asarray(g[0]) == 0.0)


@pytest.mark.slow
def test_ring_long_sequence_equals_chunked(optimized):
    # T = 8,192 (1,024 per device, more than one of the kernel's blocks on each); the
    # reference is kit's single-device chunked path. (The memory test below compiles,
    # without running, T = 16,384; running it took 15 s of the suite.)
    _compare(T=8192, K=1, reference="chunked", is_causal=True)


@pytest.mark.slow
def test_ring_with_explicit_mesh_axes():
    q, k, v = make_qkv(B=2, T=64, S=64, N=4, K=2, H=16)
    mesh = ring_mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        out = jax.jit(
            lambda q, k, v: kit.ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, is_causal=True)
        )(q, k, v)
    want = kit.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-5)


def _compiled_bytes(fn, *specs):
    memory = jax.jit(fn).lower(*specs).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes


@pytest.mark.slow
def test_ring_memory_per_device_is_a_fraction_of_one_device(optimized):
    """At T = 16,384 on 8 devices, forward+backward, per device: at most a quarter of the
    single-device chunked program (0.246 measured; it would be 1/8 if each device held
    only its own blocks; it also holds the blocks in flight, their float32 gradient
    accumulators, loop copies and the kernel's block scratch)."""
    spec = jax.ShapeDtypeStruct((1, 16384, 8, 64), jnp.float32)
    mesh = ring_mesh()

    def fwd_bwd(attention):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v))

        return jax.grad(loss, argnums=(0, 1, 2))

    def ring_bytes(spec):
        def ring(q, k, v):
            return kit.ring_attention(q, k, v, mesh=mesh, axis_name=AXIS, is_causal=True)

        return _compiled_bytes(fwd_bwd(ring), spec, spec, spec)

    # XLA's plan counts the jax.numpy kernel's buffers, not those the compiled CPU kernel
    # allocates itself (its head-major copies), so both sides trace the jax.numpy kernel.
    with cpu_kernels.flash_disabled():
        ring = ring_bytes(spec)
        one = _compiled_bytes(
            fwd_bwd(lambda q, k, v: kit.chunked_attention(q, k, v, is_causal=True)),
            spec,
            spec,
            spec,
        )
        assert ring <= 0.25 * one, (ring / 2**20, one / 2**20)
        # Memory grows linearly with T / P (block scratch is a constant part): doubling T at
        # most doubles it.
        ring_half = ring_bytes(jax.ShapeDtypeStruct((1, 8192, 8, 64), jnp.float32))
        assert ring_half < ring < 2 * ring_half, (ring_half / 2**20, ring / 2**20)


def test_ring_bad_inputs_name_the_argument():
    q, k, v = make_qkv(B=2, T=64, S=64, N=4, K=2, H=16)
    mesh = ring_mesh()

    def ring(q=q, k=k, v=v, **options):
        options = {"mesh": mesh, "axis_name": AXIS} | options
        return kit.ring_attention(q, k, v, **options)

    with pytest.raises(ValueError, match=r"axis_name: expected one of the mesh's axes"):
        ring(axis_name="seq")
    with pytest.raises(ValueError, match=r"mesh: expected a jax.sharding.Mesh, got str"):
        ring(mesh="ring")
    with pytest.raises(ValueError, match=r"query: its length T = 60 must be divisible by the 8"):
        ring(q=q[:, :60])
    with pytest.raises(ValueError, match=r"key: its length S = 60 must be divisible by the 8"):
        ring(k=k[:, :60], v=v[:, :60])
    with pytest.raises(ValueError, match=r"is_causal: ring attention's causal mask needs T == S"):
        ring(q=q[:, :32], is_causal=True)
    with pytest.raises(ValueError, match=r"is_causal: expected a bool"):
        ring(is_causal="yes")
    with pytest.raises(ValueError, match=r"key: its K = 3 heads must divide"):
        ring(k=jnp.zeros((2, 64, 3, 16)), v=jnp.zeros((2, 64, 3, 16)))
    with pytest.raises(ValueError, match=r"key_value_seq_lengths: expected shape \[B\]"):
        ring(key_value_seq_lengths=jnp.array([3], jnp.int32))
    with pytest.raises(ValueError, match=r"scale: the chunked path needs a Python number"):
        ring(scale=jnp.float32(0.5))


# Slow set: the inner loop checks the same ring, with a learned score function, in
# tests/test_context.py::test_split_attention_equals_the_formula.
@pytest.mark.slow
def test_ring_with_score_and_mask_functions_equals_the_formula():
    """Score and mask functions on the ring (global indices): ALiBi-like distances
    with learned per-head slopes, a window of 20 keys back, causal and lengths: the
    output and the gradients of q, k, v and the slopes against the formula written
    out (GQA by repeating heads)."""
    B, T, N, K, H = 2, 64, 4, 2, 16
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H)
    slopes = jnp.asarray([0.1, 0.2, 0.3, 0.45], jnp.float32)
    lengths = jnp.asarray([64, 41], jnp.int32)
    w = jnp.cos(jnp.arange(B * T * N * H, dtype=jnp.float32)).reshape(B, T, N, H)
    mesh = ring_mesh()

    def ring(q, k, v, slopes):
        def score(s, b, h, q_idx, kv_idx):
            return s - slopes[h] * jnp.abs(q_idx - kv_idx).astype(s.dtype)

        def window(b, h, q_idx, kv_idx):
            return q_idx - kv_idx < 20

        out = kit.ring_attention(
            q, k, v, mesh=mesh, axis_name=AXIS, is_causal=True, key_value_seq_lengths=lengths,
            score_mod=score, mask_mod=window,
        )  # fmt: skip
        return jnp.sum(out * w), out

    def formula(q, k, v, slopes):
        kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        s = jnp.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(H)
        i, j = jnp.arange(T, dtype=jnp.int32)[:, None], jnp.arange(T, dtype=jnp.int32)[None, :]
        s = s - slopes[None, :, None, None] * jnp.abs(i - j).astype(jnp.float32)[None, None]
        live = (j <= i)[None] & (i - j < 20)[None] & (j[None] < lengths[:, None, None])
        # a row with no live key (past the window of example 1's 41 keys) gives zeros
        s = jnp.where(live[:, None], s, -1e30)
        any_live = jnp.any(live, axis=-1).astype(jnp.float32)[:, None, :, None]
        p = jax.nn.softmax(s, axis=-1) * any_live
        out = jnp.einsum("bnts,bsnh->btnh", p, vv)
        return jnp.sum(out * w), out

    (_, got), got_grads = jax.jit(jax.value_and_grad(ring, (0, 1, 2, 3), has_aux=True))(
        q, k, v, slopes
    )
    (_, want), want_grads = jax.value_and_grad(formula, (0, 1, 2, 3), has_aux=True)(q, k, v, slopes)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for name, g, want_g in zip(("q", "k", "v", "slopes"), got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=5e-6, err_msg=name)
