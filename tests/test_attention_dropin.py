"""kit.dot_product_attention where JAX users run it, against jax.nn: return_residual, x64,
Explicit-axis meshes, inside a user's shard_map, forward-mode and second-order
derivatives, jax.checkpoint with lax.scan over layers, and jax.export. Each case runs
the xla and the chunked path (the one implementation=None picks on CPU from 512 x 512)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import live_mask, make_qkv, normal, reference_attention, slow_beyond, unoptimized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kit
from kit.attention import cpu_kernels

PATHS = ["xla", "chunked"]
B, T, S, N, K = 2, 37, 45, 4, 2  # T and S not multiples of the chunked blocks
Q_LEN = jnp.array([30, 37], jnp.int32)
KV_LEN = jnp.array([45, 0], jnp.int32)  # example 1 has no live key: every row dead


def _attention(path, **kw):
    if path == "chunked":  # small blocks, so that several are live and skipped
        return functools.partial(kit.chunked_attention, block_q=8, block_k=16, **kw)
    return functools.partial(kit.dot_product_attention, implementation=path, **kw)


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


# --- return_residual -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path, unbatched",
    slow_beyond([("chunked", False), ("xla", True)], [], several=True),
)
def test_residual_equals_jax_nn_with_its_layout_and_no_gradient(path, unbatched):
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K)
    cotangents = normal(jax.random.key(3), (B, T, N, 16)), normal(jax.random.key(4), (B, T, N))
    if unbatched:
        q, k, v = q[0], k[0], v[0]
        cotangents = tuple(c[0] for c in cotangents)

    def ours(q, k, v):
        return kit.dot_product_attention(
            q, k, v, is_causal=True, implementation=path, return_residual=True
        )

    def theirs(q, k, v):
        G = N // K  # jax.nn's xla path takes the grouped heads repeated
        k, v = (jnp.repeat(x, G, axis=-2) for x in (k, v))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)

    def with_vjp(f):
        def run(q, k, v, cotangents):
            value, vjp = jax.vjp(f, q, k, v)
            return value, vjp(cotangents)

        return jax.jit(run)

    ours_vjp = with_vjp(ours)
    (out, lse), grads = ours_vjp(q, k, v, cotangents)
    (ref_out, ref_lse), ref_grads = with_vjp(theirs)(q, k, v, cotangents)
    assert lse.shape == q.shape[:-1] and lse.dtype == q.dtype
    _close((out, lse), (ref_out, ref_lse))
    _close(grads, ref_grads, 1e-4)
    # jax.nn's residual carries no gradient: a cotangent sent into it changes nothing.
    _, without = ours_vjp(q, k, v, (cotangents[0], jnp.zeros_like(cotangents[1])))
    _close(grads, without, 0.0)


@pytest.mark.parametrize("path", slow_beyond(PATHS, ["chunked"]))
def test_residual_is_the_row_logsumexp_and_minus_inf_without_keys(path):
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K)
    bias = normal(jax.random.key(7), (1, N, T, S))
    kw = dict(is_causal=True, query_seq_lengths=Q_LEN, key_value_seq_lengths=KV_LEN)
    out, lse = jax.jit(_attention(path, return_residual=True, **kw))(q, k, v, bias)
    # by hand, in float64 numpy: log sum over the live keys of exp(q.k / sqrt(H) + bias)
    qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
    logits = np.einsum("btnh,bsnh->btns", qn, kn) / 4.0 + np.moveaxis(np.asarray(bias), 1, 2)
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    live = (s <= t)[None] & (t < np.asarray(Q_LEN)[:, None, None])
    live = live & (s < np.asarray(KV_LEN)[:, None, None])  # [B, T, S]
    with np.errstate(divide="ignore"):
        expected = np.log(np.sum(np.where(live[:, :, None], np.exp(logits), 0.0), axis=-1))
    assert np.isneginf(expected).any() and np.isfinite(expected).any()
    np.testing.assert_allclose(np.asarray(lse), expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[~live.any(-1)] == 0.0)


def test_residual_option_is_checked():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="return_residual"):
        kit.dot_product_attention(q, k, v, return_residual="yes")


# --- x64 -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, dtype", [("chunked", "float32"), ("chunked", "float64"), ("xla", "float64")]
)
def test_x64_forward_and_gradients(path, dtype):
    with jax.enable_x64(True):
        q, k, v = (x.astype(dtype) for x in make_qkv(B=B, T=T, S=S, N=N, K=N))
        kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([45, 20], jnp.int32))

        def loss(attention):
            return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, **kw)))

        ours = jax.jit(jax.value_and_grad(loss(_attention(path)), argnums=(0, 1, 2)))(q, k, v)
        theirs = jax.jit(jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2)))
        with jax.numpy_dtype_promotion("standard"):  # jax.nn is not strict-promotion clean
            ref = theirs(q, k, v)
        assert ours[1][0].dtype == jnp.dtype(dtype)
        # jax.nn softmaxes float64 in float32; kit keeps float64, so compare at float32's level
        _close(ours, ref, 1e-5)
        if dtype == "float64":  # and against a float64 reference, far tighter
            scores = jnp.einsum("btnh,bsnh->bnts", q, k) / 4.0
            t = jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
            s = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
            live = (s <= t) & (s < kw["key_value_seq_lengths"][:, None, None, None])
            p = jax.nn.softmax(jnp.where(live, scores, -jnp.inf), axis=-1)
            expected = jnp.einsum("bnts,bsnh->btnh", p, v)
            ours = jax.jit(lambda q, k, v: _attention(path)(q, k, v, **kw))(q, k, v)
            _close(ours, expected, 1e-12)


# --- meshes: Explicit axes and a user's shard_map ------------------------------------


def _collectives(hlo: str) -> list[str]:
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return [op for op in ops if op in hlo]


@pytest.mark.parametrize("path", slow_beyond(PATHS, []))
def test_explicit_mesh_batch_and_heads_split_without_collectives(path, optimized):
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    q, k, v = make_qkv(B=4, T=T, S=S, N=N, K=K)
    g = normal(jax.random.key(9), q.shape)

    def loss(q, k, v):
        return jnp.sum(_attention(path, is_causal=True)(q, k, v) * g)

    with unoptimized():  # the unsharded reference; the sharded program compiles as users do
        ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
        unsharded = jax.jit(_attention(path, is_causal=True))(q, k, v)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, P("data", None, "model", None)) for x in (q, k, v)]
        forward = jax.jit(_attention(path, is_causal=True))
        assert _collectives(forward.lower(*args).compile().as_text()) == []
        out = forward(*args)
        assert jax.typeof(out).sharding.spec[:3] == ("data", None, "model")
        ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    _close(out, unsharded)
    _close(ours, ref, 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_explicit_mesh_sequence_split_is_gathered(path):
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))
    q, k, v = make_qkv(B=B, T=40, S=40, N=N, K=K)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, P(None, "seq")) for x in (q, k, v)]
        out = jax.jit(_attention(path, is_causal=True))(*args)
    _close(out, jax.jit(_attention(path, is_causal=True))(q, k, v))


@pytest.mark.parametrize("path", slow_beyond(PATHS, []))
def test_inside_a_users_shard_map(path):
    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Explicit,))
    q, k, v = make_qkv(B=4, T=T, S=S, N=N, K=K)
    lengths = jnp.array([45, 10, 0, 33], jnp.int32)
    attention = _attention(path, is_causal=True)

    def loss(q, k, v, lengths):
        return jnp.sum(jnp.sin(attention(q, k, v, key_value_seq_lengths=lengths)))

    def per_device(q, k, v, lengths):
        out = attention(q, k, v, key_value_seq_lengths=lengths)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lengths)
        return out, grads

    split = jax.shard_map(per_device, mesh=mesh, in_specs=P("b"), out_specs=P("b"))
    args = [jax.device_put(x, NamedSharding(mesh, P("b"))) for x in (q, k, v, lengths)]
    out, grads = jax.jit(split)(*args)
    want, want_grads = jax.jit(per_device)(q, k, v, lengths)  # the whole batch on one device
    _close(out, want)
    _close(grads, want_grads, 1e-4)


# --- derivatives ---------------------------------------------------------------------

JVP_CASES = {
    "causal": dict(is_causal=True),
    "window and lengths": dict(
        local_window_size=(5, 3), query_seq_lengths=Q_LEN, key_value_seq_lengths=KV_LEN
    ),
    "mask": dict(mask=(B, 1, T, S)),
    "bias": dict(bias=(1, N, T, S), is_causal=True),
}


@pytest.mark.parametrize("name", slow_beyond(list(JVP_CASES), ["bias"]))
def test_chunked_jvp_equals_jvp_of_the_formula(name):
    kw = dict(JVP_CASES[name])
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K)
    primals = [q, k, v]
    if "mask" in kw:
        kw["mask"] = jax.random.bernoulli(jax.random.key(6), 0.7, kw["mask"])
    if "bias" in kw:
        primals.append(normal(jax.random.key(5), kw.pop("bias")))
    tangents = [normal(jax.random.key(10 + i), x.shape) for i, x in enumerate(primals)]

    def ours(*args):
        return kit.chunked_attention(*args, block_q=8, block_k=16, **kw)

    live = jnp.asarray(live_mask(B, N, T, S, kw.get("mask"), kw))

    def theirs(q, k, v, *bias):  # the formula, whose jvp is jax's own
        bias = bias[0] if bias else None
        return reference_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=live, bias=bias)

    out, d_out = jax.jit(lambda p, t: jax.jvp(ours, p, t))(primals, tangents)
    ref, d_ref = jax.jit(lambda p, t: jax.jvp(theirs, p, t))(primals, tangents)
    _close(out, ref)
    _close(d_out, d_ref, 1e-5)


def _tiny_causal():
    q, k, v = make_qkv(B=1, T=6, S=6, N=2, K=1, H=4)
    causal = jnp.asarray(live_mask(1, 2, 6, 6, None, {"is_causal": True}))

    def f(path):  # "formula": written from the definition, differentiated by jax
        if path == "formula":
            return lambda q: reference_attention(q, k, v, scale=0.5, mask=causal)
        return lambda q: _attention(path, is_causal=True)(q, k, v)

    return q, normal(jax.random.key(1), q.shape), f


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_chunked_linearize():
    q, t, f = _tiny_causal()
    ours = jax.jit(lambda q, t: jax.linearize(f("chunked"), q)[1](t))(q, t)
    _close(ours, jax.jit(lambda q, t: jax.jvp(f("formula"), (q,), (t,))[1])(q, t))


@pytest.mark.slow
def test_chunked_jacfwd_and_vmap_of_jvp_and_grad():
    q, t, f = _tiny_causal()
    _close(jax.jit(jax.jacfwd(f("chunked")))(q), jax.jit(jax.jacfwd(f("formula")))(q), 1e-5)
    qs, ts = jnp.stack([q, 2 * q]), jnp.stack([t, -t])

    def jvps(path):
        return jax.jit(jax.vmap(lambda q, t: jax.jvp(f(path), (q,), (t,))))(qs, ts)

    def grads(path):
        return jax.jit(jax.vmap(jax.grad(lambda q: jnp.sum(f(path)(q) ** 2))))(qs)

    _close(jvps("chunked"), jvps("formula"))
    _close(grads("chunked"), grads("formula"), 1e-5)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_default_path_jvp_at_a_chunked_length():
    q, k, v = make_qkv(B=1, T=512, S=512, N=2, K=2, H=8)
    t = normal(jax.random.key(2), q.shape)

    def jvp(attention):
        return jax.jit(
            lambda q, t: jax.jvp(lambda q: attention(q, k, v, is_causal=True), (q,), (t,))
        )(q, t)

    _close(jvp(kit.dot_product_attention), jvp(jax.nn.dot_product_attention), 1e-5)


def _second_order_setup():
    q, k, v = make_qkv(B=1, T=16, S=16, N=2, K=2, H=4)
    t = normal(jax.random.key(2), q.shape)

    def loss(attention):
        return lambda q: jnp.sum(jnp.sin(attention(q, k, v, is_causal=True)))

    def hvp(f):
        return jax.jit(lambda q, t: jax.jvp(jax.grad(f), (q,), (t,))[1])(q, t)

    return q, loss, hvp


def test_second_derivatives_on_the_chunked_path_name_the_remedy():
    q, loss, hvp = _second_order_setup()
    chunked = loss(_attention("chunked"))
    for second in (lambda: hvp(chunked), lambda: jax.hessian(chunked)(q)):
        with pytest.raises(ValueError, match="implementation='xla'"):
            second()


@pytest.mark.slow
def test_second_derivatives_on_the_xla_path_equal_jax_nn():
    q, loss, hvp = _second_order_setup()
    ours = loss(functools.partial(kit.dot_product_attention, implementation="xla"))
    theirs = loss(jax.nn.dot_product_attention)
    _close(hvp(ours), hvp(theirs), 1e-5)

    def grad_of_grad(f):
        return jax.jit(jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2)))(q)

    _close(grad_of_grad(ours), grad_of_grad(theirs), 1e-4)


# --- checkpoint, scan over layers, export --------------------------------------------


@pytest.mark.parametrize("path", slow_beyond(PATHS, []))
def test_checkpointed_layers_in_scan_and_export(path):
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=N)
    attention = _attention(path, is_causal=True)

    def layers(q, remat):
        def body(x, _):
            layer = jax.checkpoint(attention) if remat else attention
            return layer(x, k, v), None

        return jnp.sum(jnp.sin(jax.lax.scan(body, q, None, length=3)[0]))

    grad = jax.jit(jax.grad(functools.partial(layers, remat=True)))
    _close(grad(q), jax.jit(jax.grad(functools.partial(layers, remat=False)))(q), 1e-5)
    compiled = path == "chunked" and cpu_kernels.available() and jax.default_backend() == "cpu"
    if not compiled:
        exported = jax.export.export(grad)(q)
        restored = jax.export.deserialize(exported.serialize())
        _close(restored.call(q), grad(q), 0.0)
        return
    # The chunked path's compiled CPU kernel is a custom call with no compatibility
    # guarantee, which jax.export refuses; under flash_disabled the program traces the
    # jax.numpy kernel and exports (equal to the compiled kernel's to rounding).
    with pytest.raises(ValueError, match="kit_flash_forward_f32"):
        jax.export.export(grad)(q)
    with cpu_kernels.flash_disabled():
        exported = jax.export.export(grad)(q)
        assert "kit_flash" not in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    _close(restored.call(q), grad(q), 1e-5)
