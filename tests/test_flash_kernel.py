"""The compiled CPU flash kernel (kit/attention/cpu/flash.cc), the chunked path's forward
and backward on a CPU, against the formula: ragged blocks, causal with T != S, grouped
heads, sequence lengths down to zero, jvp, vmap, x64, meshes (Explicit and Auto), and the
dispatch that sends a chunked pass to it only where it fits."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_qkv, normal, numpy_mask, reference_attention
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import kit
from kit.attention import cpu_kernels

if not cpu_kernels.available():
    if os.environ.get("CI"):
        raise RuntimeError("the CPU kernels did not build or load (kit/attention/cpu)")
    pytest.skip("the CPU kernels are not built", allow_module_level=True)


def chunked(q, k, v, **options):
    return kit.dot_product_attention(q, k, v, implementation="chunked", **options)


def targets(fn, *args) -> set[str]:
    """Which of the flash kernel's custom calls the compiled program of fn holds."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return {t for t in (cpu_kernels.FLASH_FORWARD, cpu_kernels.FLASH_BACKWARD) if t in text}


def loss_of(attend, w):
    return lambda q, k, v: jnp.sum(attend(q, k, v) * w)


# (B, T, S, N, K, H, causal, query lengths, key/value lengths). T and S are not multiples
# of the kernel's blocks (64 queries a forward task, 128 keys a step; 64 and 64 in the
# backward) and the lengths cut inside blocks and down to zero.
CASES = {
    "MHA causal, ragged": (2, 200, 200, 4, 4, 64, True, None, None),
    "GQA, T != S": (2, 130, 300, 4, 2, 32, False, None, None),
    "MQA causal, one block": (1, 64, 64, 4, 1, 16, True, None, None),
    "causal, T < S": (2, 100, 260, 2, 2, 16, True, None, None),
    "causal, T > S": (1, 150, 70, 2, 1, 16, True, None, None),
    "lengths": (3, 90, 150, 4, 2, 32, False, [90, 50, 0], [150, 10, 3]),
    "causal with lengths": (3, 140, 140, 2, 2, 16, True, [140, 65, 3], [0, 70, 140]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_the_formula(case):
    B, T, S, N, K, H, causal, q_len, kv_len = CASES[case]
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K, H=H, seed=len(case))
    w = normal(jax.random.key(7), (B, T, N, H))
    options = {"is_causal": causal}
    if q_len is not None:
        options["query_seq_lengths"] = jnp.asarray(q_len, jnp.int32)
    if kv_len is not None:
        options["key_value_seq_lengths"] = jnp.asarray(kv_len, jnp.int32)
    mask = numpy_mask(B, N, T, S, None, causal, q_len, kv_len)

    def ours(q, k, v):
        return chunked(q, k, v, **options)

    def formula(q, k, v):
        return reference_attention(q, k, v, scale=H**-0.5, mask=mask)

    grad = jax.grad(loss_of(ours, w), argnums=(0, 1, 2))
    assert targets(grad, q, k, v) == {cpu_kernels.FLASH_FORWARD, cpu_kernels.FLASH_BACKWARD}
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), formula(q, k, v), atol=2e-6, rtol=1e-5)
    got = jax.jit(grad)(q, k, v)
    want = jax.grad(loss_of(formula, w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_equal_to_the_jax_numpy_kernel_with_the_residual():
    """The same call with the compiled kernel and with the chunked path's jax.numpy
    kernel (`flash_disabled`): out and lse (-inf for a dead row) agree to rounding."""
    q, k, v = make_qkv(B=2, T=300, S=300, N=8, K=2, H=64, seed=3)
    lengths = jnp.array([300, 120], jnp.int32)

    def run(q, k, v):
        return chunked(q, k, v, is_causal=True, query_seq_lengths=lengths, return_residual=True)

    assert targets(run, q, k, v) == {cpu_kernels.FLASH_FORWARD}
    out, lse = jax.jit(run)(q, k, v)
    with cpu_kernels.flash_disabled():
        assert targets(run, q, k, v) == set()
        want_out, want_lse = jax.jit(run)(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    assert np.isneginf(np.asarray(lse)[1, 120:]).all() and np.isfinite(np.asarray(lse)[0]).all()
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], rtol=1e-5)


def test_jvp_and_vmap():
    q, k, v = make_qkv(B=2, T=96, S=96, N=4, K=2, H=32, seed=5)
    dq, dk, dv = make_qkv(B=2, T=96, S=96, N=4, K=2, H=32, seed=6)
    mask = numpy_mask(2, 4, 96, 96, None, True)

    def ours(q, k, v):
        return chunked(q, k, v, is_causal=True)

    def formula(q, k, v):
        return reference_attention(q, k, v, scale=32**-0.5, mask=mask)

    # jvp: the kernel's forward with the jax.numpy tangent kernel
    out, tangent = jax.jit(lambda *a: jax.jvp(ours, a[:3], a[3:]))(q, k, v, dq, dk, dv)
    want, want_tangent = jax.jvp(formula, (q, k, v), (dq, dk, dv))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(tangent, want_tangent, atol=2e-5, rtol=1e-4)
    # vmap over a leading axis (one cache for all, vmap_method="broadcast_all"), forward
    # and gradient: each item as it would be alone
    qs = jnp.stack([q, 2 * q, -q])
    w = normal(jax.random.key(1), (2, 96, 4, 32))
    grad = jax.grad(loss_of(ours, w))
    vmapped = jax.vmap(lambda q: (ours(q, k, v), grad(q, k, v)))
    assert targets(vmapped, qs) == {cpu_kernels.FLASH_FORWARD, cpu_kernels.FLASH_BACKWARD}
    outs, grads = jax.jit(vmapped)(qs)
    for i in range(3):
        np.testing.assert_allclose(outs[i], formula(qs[i], k, v), atol=2e-6, rtol=1e-5)
        want_grad = jax.grad(loss_of(formula, w))(qs[i], k, v)
        np.testing.assert_allclose(grads[i], want_grad, atol=2e-5, rtol=1e-4)


def test_x64_float32_takes_the_kernel():
    q, k, v = make_qkv(B=2, T=80, S=80, N=2, K=2, H=16, seed=2)
    mask = numpy_mask(2, 2, 80, 80, None, True, [80, 33])
    with jax.enable_x64(True):
        lengths = jnp.array([80, 33])  # int64 under x64

        def ours(q, k, v):
            return chunked(q, k, v, is_causal=True, query_seq_lengths=lengths)

        assert targets(ours, q, k, v) == {cpu_kernels.FLASH_FORWARD}
        out = jax.jit(ours)(q, k, v)
        want = reference_attention(q, k, v, scale=0.25, mask=mask)
        np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
        assert targets(ours, q64, k64, v64) == set()


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_on_a_mesh_each_device_runs_the_kernel_on_its_shard(axis_type):
    """Explicit axes (JAX's default) split the passes with shard_map, Auto axes with
    custom_partitioning: either way each device runs the kernel on its examples and
    heads, and the results are the formula's."""
    mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(axis_type, axis_type))
    q, k, v = make_qkv(B=4, T=128, S=128, N=4, K=2, H=16, seed=8)
    w = normal(jax.random.key(2), (4, 128, 4, 16))
    spec = NamedSharding(mesh, PartitionSpec("data", None, "heads"))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    mask = numpy_mask(4, 4, 128, 128, None, True)

    def ours(q, k, v):
        return chunked(q, k, v, is_causal=True)

    def formula(q, k, v):
        return reference_attention(q, k, v, scale=0.25, mask=mask)

    grad = jax.grad(loss_of(ours, w), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        assert targets(grad, *placed) == {cpu_kernels.FLASH_FORWARD, cpu_kernels.FLASH_BACKWARD}
        got = jax.jit(grad)(*placed)
        out = jax.jit(ours)(*placed)
    np.testing.assert_allclose(out, formula(q, k, v), atol=2e-6, rtol=1e-5)
    want = jax.grad(loss_of(formula, w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_dispatch_takes_the_kernel_only_where_it_fits():
    q, k, v = make_qkv(B=2, T=64, S=64, N=4, K=2, H=16, seed=1)
    assert targets(chunked, q, k, v) == {cpu_kernels.FLASH_FORWARD}
    bias = jnp.zeros((2, 4, 64, 64))
    mask = jnp.ones((2, 4, 64, 64), bool)
    for options in ({"bias": bias}, {"mask": mask}, {"local_window_size": 5}):
        assert targets(lambda q, k, v, o=options: chunked(q, k, v, **o), q, k, v) == set()
    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    assert targets(chunked, *low) == set()
    assert targets(chunked, *make_qkv(B=2, T=64, S=64, N=4, K=2, H=8)) == set()
    with cpu_kernels.flash_disabled():
        assert targets(chunked, q, k, v) == set()
    assert targets(chunked, q, k, v) == {cpu_kernels.FLASH_FORWARD}


def test_the_kernel_rejects_shapes_it_cannot_take():
    # Called directly (the dispatch never sends these): an error naming the kernel.
    from kit.attention.chunked import block_config

    cfg = block_config(64, 64, 0.25, False, None, True)
    q, k, v = make_qkv(B=1, T=64, S=64, N=4, K=2, H=8, seed=0)
    lengths = jnp.array([64], jnp.int32)
    with pytest.raises(Exception, match="kit flash: the head dim"):
        jax.block_until_ready(cpu_kernels.flash_forward(cfg, q, k, v, lengths, lengths))
    q, k, v = make_qkv(B=1, T=64, S=64, N=4, K=3, H=16, seed=0)
    with pytest.raises(Exception, match="kit flash: N must be a multiple of K"):
        jax.block_until_ready(cpu_kernels.flash_forward(cfg, q, k, v, lengths, lengths))
