"""A few queries against a long cache (kit.attention.few_queries): the path
`implementation=None` takes for a decode step on a CPU, against the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import live_mask, make_qkv, normal, reference_attention
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import kit
from kit.attention import api, few_queries

S = few_queries.MIN_KEYS  # the shortest cache the dispatch sends here
N, H = 8, 16


@pytest.fixture
def taken(monkeypatch):
    """Counts the calls that reach the path (so a test knows the dispatch chose it)."""
    calls = []

    def spy(x, **kwargs):
        calls.append(x.query.shape)
        return few_queries.few_query_attention(x, **kwargs)

    monkeypatch.setattr(api, "few_query_attention", spy)
    return calls


def residual_reference(q, k, scale, mask, bias):
    """log sum exp of each row's live logits `[B, T, N]` in float64, -inf for a dead row."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits = np.where(mask, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
    return np.swapaxes(lse, 1, 2)


# Each case: K key/value heads, T queries, and the options of the call. The random mask
# leaves some rows with no live key (the rows of example 1, head 3), and the lengths
# cut example 1's cache to 700 keys.
def _mask(B, T):
    m = np.array(jax.random.bernoulli(jax.random.key(7), 0.6, (B, N, T, S)))
    m[1, 3] = False
    return jnp.asarray(m)


CASES = {
    "plain, K=8": (8, 1, {}),
    "bias, GQA K=2": (2, 1, {"bias": True}),
    "mask with dead rows, MQA K=1, T=3": (1, 3, {"mask": True}),
    "lengths and causal, K=2, T=8": (
        2,
        8,
        {"key_value_seq_lengths": jnp.array([S, 700]), "is_causal": True},
    ),
    "window and bias, K=8, T=2": (8, 2, {"local_window_size": (300, 5), "bias": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chosen_for_a_decode_step_and_equal_to_the_formula(case, taken):
    K, T, options = CASES[case]
    B = 2
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K, H=H, seed=len(case))
    kwargs = dict(options)
    bias = mask = None
    if kwargs.pop("bias", False):
        bias = normal(jax.random.key(3), (B, N, T, S))
        kwargs["bias"] = bias
    if kwargs.pop("mask", False):
        mask = _mask(B, T)
        kwargs["mask"] = mask
    live = live_mask(B, N, T, S, mask, kwargs)
    scale = H**-0.5

    def run(q, k, v, bias):
        call = dict(kwargs, bias=bias) if bias is not None else kwargs
        return kit.dot_product_attention(q, k, v, return_residual=True, **call)

    out, lse = jax.jit(run)(q, k, v, bias)
    assert taken == [(B, T, N, H)]
    want = reference_attention(q, k, v, scale=scale, mask=live, bias=bias)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    want_lse = residual_reference(q, k, scale, live, bias)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    if not np.all(finite):  # a dead row returns exactly zero
        dead = np.swapaxes(~np.any(live, axis=-1), 1, 2)  # [B, T, N]
        assert np.all(np.asarray(out)[dead] == 0)

    # Gradients of q, k, v and the bias against the formula's, through a loss that
    # weighs each output element differently.
    weights = normal(jax.random.key(5), out.shape)
    args = (q, k, v, bias if bias is not None else jnp.zeros((1, 1, 1, 1)))

    def loss_kit(q, k, v, b):
        return jnp.sum(run(q, k, v, b if bias is not None else None)[0] * weights)

    def loss_formula(q, k, v, b):
        out = reference_attention(
            q, k, v, scale=scale, mask=live, bias=b if bias is not None else None
        )
        return jnp.sum(out * weights)

    got = jax.jit(jax.grad(loss_kit, argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(loss_formula, argnums=(0, 1, 2, 3)))(*args)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-6, rtol=1e-4, err_msg=name)


def test_jvp_vmap_and_an_unbatched_call_equal_the_formula(taken):
    q, k, v = make_qkv(B=3, T=1, S=S, N=N, K=2, H=H, seed=11)
    live = np.ones((1, N, 1, S), bool)
    scale = H**-0.5
    tangents = tuple(normal(jax.random.key(i), x.shape) for i, x in enumerate((q, k, v)))

    def formula(q, k, v):
        return reference_attention(q[None], k[None], v[None], scale=scale, mask=live)[0]

    # vmap over the batch of unbatched calls, inside jvp.
    got = jax.jvp(jax.vmap(kit.dot_product_attention), (q, k, v), tangents)
    want = jax.jvp(jax.vmap(formula), (q, k, v), tangents)
    assert len(taken) >= 1 and all(shape[1:] == (1, N, H) for shape in taken)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


def test_not_chosen_where_it_does_not_pay_or_cannot_split(taken):
    # Too few keys (for the compiled kernel; and for the products, where a mask keeps the
    # kernel out), too many queries, dropout, bfloat16 (few_queries_fit says why): the
    # xla path, whose bfloat16 result is within bfloat16 rounding of the formula's.
    few, shortest = few_queries.FEW_QUERIES, few_queries.KERNEL_MIN_KEYS
    cases = ((1, shortest - 8, ""), (1, S - 8, "mask"), (few + 1, S, ""), (1, S, "drop"))
    for T, length, extra in (*cases, (1, S, "bf16")):
        q, k, v = make_qkv(B=1, T=T, S=length, N=N, K=2, H=H)
        if extra == "mask":
            kit.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, T, length), bool))
        elif extra == "drop":
            kit.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))
        elif extra == "bf16":
            out = kit.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
            want = reference_attention(q, k, v, scale=H**-0.5, mask=np.ones((1, N, T, S), bool))
            np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)
        else:
            kit.dot_product_attention(q, k, v)
    assert taken == []
    # Heads split over an Explicit mesh axis: the product across heads would gather them.
    mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Explicit,))
    q, k, v = make_qkv(B=2, T=1, S=S, N=N, K=2, H=H)
    heads = NamedSharding(mesh, PartitionSpec(None, None, "model", None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    with jax.set_mesh(mesh):
        out = jax.jit(kit.dot_product_attention)(q, k, v)
    assert taken == []
    want = reference_attention(q, k, v, scale=H**-0.5, mask=np.ones((2, N, 1, S), bool))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)


def test_float64_with_x64_on(taken):
    """With x64 on, float64 inputs take the path and keep float64 through the softmax."""
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in make_qkv(B=1, T=2, S=S, N=N, K=2, H=H))
        out, lse = jax.jit(
            lambda q, k, v: kit.dot_product_attention(q, k, v, return_residual=True)
        )(q, k, v)
        assert taken and out.dtype == jnp.float64 and lse.dtype == jnp.float64
        live = np.ones((1, N, 2, S), bool)
        q64, k64, v64 = (np.asarray(x) for x in (q, k, v))
        k64, v64 = (np.repeat(x, N // 2, axis=2) for x in (k64, v64))
        logits = np.einsum("btnh,bsnh->bnts", q64, k64) * H**-0.5
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v64)
        # float64 throughout: agreement far below float32's 1e-7.
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(lse, residual_reference(q, k, H**-0.5, live, None), rtol=1e-12)
