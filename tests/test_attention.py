"""kit.attention against jax.nn.dot_product_attention, hand-computed cases and properties."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOLERANCES,
    live_mask,
    make_qkv,
    normal,
    numpy_mask,
    slow_beyond,
    unoptimized,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import kit
from kit.positional import apply_rope


def reference(q, k, v, bias=None, mask=None, **kw):
    """jax.nn's xla path, with rows that have no live key zeroed (kit's contract)."""
    B, T, N, _ = q.shape
    S = k.shape[1]
    live = live_mask(B, N, T, S, mask, kw).any(-1)  # [B, N, T]
    out = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla", **kw)
    return out * jnp.asarray(live.transpose(0, 2, 1)[..., None], out.dtype)


LENGTHS_Q = np.array([5, 8], np.int32)
LENGTHS_KV = np.array([8, 3], np.int32)
RANDOM_MASK = np.random.default_rng(0).random((2, 1, 8, 8)) < 0.6

CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "causal": dict(is_causal=True),
    "mask": dict(mask=RANDOM_MASK),
    "lengths": dict(query_seq_lengths=LENGTHS_Q, key_value_seq_lengths=LENGTHS_KV),
    "causal+lengths": dict(is_causal=True, query_seq_lengths=LENGTHS_Q),
    "causal+window": dict(is_causal=True, local_window_size=(3, 0)),
    "window": dict(local_window_size=2),
    "everything": dict(
        bias=True,
        mask=RANDOM_MASK,
        is_causal=True,
        key_value_seq_lengths=LENGTHS_KV,
        local_window_size=(4, 1),
        scale=0.3,
    ),
}


def _inputs(case, dtype, shapes):
    """(keyword options, q, k, v, bias, mask) of one case."""
    kw = dict(case)
    with unoptimized():  # the inputs (random draws, compiled op by op)
        q, k, v = make_qkv(dtype=dtype, **shapes)
        B, T, N, _ = q.shape
        S = k.shape[1]
        bias = normal(jax.random.key(7), (B, N, T, S), dtype) if kw.pop("bias", False) else None
    mask = kw.pop("mask", None)
    if mask is not None:
        mask = jnp.asarray(mask[..., :T, :S])
    return kw, q, k, v, bias, mask


def _grad(fn, kw, mask, bias):
    """The gradient (with the output as aux) of a cosine-weighted sum of fn's output."""

    def f(q, k, v, bias):
        out = fn(q, k, v, bias, mask, **kw)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    return jax.grad(f, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2), has_aux=True)


def _reference_run(dtype, kw, q, k, v, bias, mask):
    # jax.nn's own backward pass mixes dtypes, so the reference runs with standard promotion.
    with jax.numpy_dtype_promotion("standard"), unoptimized():
        grad = _grad(reference, kw, mask, bias)
        # Under jit on CPU, jax.nn asks for an F16_F16_F32 dot that the CPU lacks.
        ref_grads, ref_out = (jax.jit(grad) if dtype != jnp.float16 else grad)(q, k, v, bias)
    return ref_out, ref_grads


def _run_case(case, dtype, shapes):
    kw, q, k, v, bias, mask = _inputs(case, dtype, shapes)
    grads, out = jax.jit(_grad(kit.dot_product_attention, kw, mask, bias))(q, k, v, bias)
    ref_out, ref_grads = _reference_run(dtype, kw, q, k, v, bias, mask)
    return out, ref_out, grads, ref_grads


def _check_cases(pairs):
    """kit against jax.nn for each (case name, dtype), kit's side of every case in one
    compiled program (the caller's fixture decides whether XLA's passes are on)."""
    cases = [(name, dtype, _inputs(CASES[name], dtype, {})) for name, dtype in pairs]

    def every_case(arrays):
        return [
            _grad(kit.dot_product_attention, kw, mask, bias)(*qkvb)
            for (_, _, (kw, *_, bias, mask)), qkvb in zip(cases, arrays, strict=True)
        ]

    got = jax.jit(every_case)([inputs[1:5] for _, _, inputs in cases])
    for (name, dtype, inputs), (grads, out) in zip(cases, got, strict=True):
        ref_out, ref_grads = _reference_run(dtype, *inputs)
        fwd_tol, grad_tol = TOLERANCES[dtype]
        message = f"{name}, {jnp.dtype(dtype).name}"
        assert out.dtype == ref_out.dtype == dtype, message
        chex.assert_trees_all_close(
            out, ref_out, atol=fwd_tol, rtol=fwd_tol, custom_message=message
        )
        chex.assert_trees_all_close(
            grads, ref_grads, atol=grad_tol, rtol=grad_tol, custom_message=message
        )


FAST = ["plain", "lengths", "everything"]


def test_matches_jax_nn_forward_and_vjp(optimized):
    """FAST's cases in float32, compiled with XLA's passes on, as users compile."""
    _check_cases([(name, jnp.float32) for name in FAST])


# Every other case in float32; the half-precision dtypes on FAST's cases (no mask, dead
# rows, every option together). tests/test_attention_chunked.py sweeps more against the
# formula.
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
def test_matches_jax_nn_forward_and_vjp_in_every_case(optimized, dtype):
    names = [n for n in CASES if n not in FAST] if dtype == jnp.float32 else FAST
    _check_cases([(name, dtype) for name in names])


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("case", slow_beyond(["plain", "causal", "everything"], ["everything"]))
def test_grouped_query_attention(groups, case):
    shapes = dict(N=4, K=4 // groups)
    out, ref_out, grads, ref_grads = _run_case(CASES[case], jnp.float32, shapes)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "case", slow_beyond(["plain", "bias", "causal", "lengths", "everything"], ["everything"])
)
def test_cross_attention_with_different_lengths(case):
    out, ref_out, grads, ref_grads = _run_case(CASES[case], jnp.float32, dict(T=5, S=8, K=2))
    assert out.shape == (2, 5, 4, 16)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_unbatched_input():
    q, k, v = make_qkv(B=1, K=2)
    bias = normal(jax.random.key(3), (4, 8, 8))
    out = kit.dot_product_attention(q[0], k[0], v[0], bias, is_causal=True)
    assert out.shape == (8, 4, 16)
    with jax.numpy_dtype_promotion("standard"):
        expected = reference(q, k, v, bias[None], is_causal=True)[0]
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = kit.attention_weights(q[0], k[0], bias, is_causal=True)
    assert weights.shape == (4, 8, 8)


def test_hand_computed_single_head():
    # logits [0, ln 3] -> weights [1/4, 3/4] -> out 1/4 * 4 + 3/4 * 8 = 7.
    q = jnp.array([[1.0]])
    k = jnp.array([[0.0], [math.log(3.0)]])
    v = jnp.array([[4.0], [8.0]])
    out, weights = kit.single_head_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(weights, [[0.25, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(out, [[7.0]], rtol=1e-6)


def test_hand_computed_causal_and_scale(optimized):
    # Two positions, equal logits: row 0 sees only key 0, row 1 averages both.
    # Default scale is 1/sqrt(H) = 1/2 for H = 4: logits q.k = 8 -> scaled 4 vs 0.
    q = jnp.zeros((1, 2, 1, 4))
    k = jnp.zeros((1, 2, 1, 4))
    v = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]).reshape(1, 2, 1, 4)
    out = kit.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out[0, :, 0], [[1, 0, 0, 0], [0.5, 1, 0, 0]], rtol=1e-6)
    q2 = jnp.full((1, 1, 1, 4), 2.0)
    k2 = jnp.stack([jnp.full((4,), 1.0), jnp.zeros((4,))]).reshape(1, 2, 1, 4)
    weights = kit.attention_weights(q2, k2)[0, 0, 0]
    np.testing.assert_allclose(weights, jax.nn.softmax(jnp.array([4.0, 0.0])), rtol=1e-6)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = make_qkv()
    mask = np.ones((2, 4, 8, 8), bool)
    mask[0, 1, 3, :] = False  # one dead row
    mask[1, :, :, :] = False  # a whole dead example
    mask = jnp.asarray(mask)
    lengths = jnp.array([6, 8], jnp.int32)

    def f(q, k, v):
        return kit.dot_product_attention(q, k, v, mask=mask, query_seq_lengths=lengths)

    out = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(out[0, 3, 1]) == 0.0)
    assert np.all(np.asarray(out[1]) == 0.0)
    assert np.all(np.asarray(out[0, 6:]) == 0.0)  # beyond query_seq_lengths
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    dq = np.asarray(grads[0])
    assert np.all(dq[0, 3, 1] == 0.0) and np.all(dq[1] == 0.0) and np.all(dq[0, 6:] == 0.0)
    weights = jax.jit(kit.attention_weights)(q, k, mask=mask, query_seq_lengths=lengths)
    assert np.all(np.asarray(weights[1]) == 0.0)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_causal_receptive_field():
    q, k, v = make_qkv(B=1, T=6, S=6)
    for i in range(6):

        def out_i(q, k, v, i=i):
            return jnp.sum(kit.dot_product_attention(q, k, v, is_causal=True)[:, i])

        grads = jax.jit(jax.grad(out_i, argnums=(0, 1, 2)))(q, k, v)
        dq, dk, dv = (np.asarray(g) for g in grads)
        assert np.all(dk[:, i + 1 :] == 0) and np.all(dv[:, i + 1 :] == 0)
        assert np.all(dq[:, np.arange(6) != i] == 0)
        assert np.any(dv[:, : i + 1] != 0)


def test_dropout_is_deterministic_and_scaled():
    # With S = H and value = identity, the output is exactly the dropped weights.
    B, T, N, H = 1, 6, 2, 6
    q, k, _ = make_qkv(B=B, T=T, S=H, N=N, K=N, H=H)
    v = jnp.broadcast_to(jnp.eye(H)[None, :, None, :], (B, H, N, H))
    rate = 0.4
    r1, r2 = jax.random.key(1), jax.random.key(2)
    a = kit.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=r1)
    b = kit.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=r1)
    c = kit.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=r2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    plain = kit.dot_product_attention(q, k, v)
    np.testing.assert_array_equal(plain, kit.dot_product_attention(q, k, v, dropout_rate=0.0))
    weights = np.asarray(kit.attention_weights(q, k)).transpose(0, 2, 1, 3)  # [B, T, N, S]
    a = np.asarray(a)
    kept = a != 0
    assert 0.3 < kept.mean() < 0.9
    np.testing.assert_allclose(a[kept], weights[kept] / (1 - rate), rtol=1e-5)
    # Raw uint32 keys work as well as typed keys.
    kit.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.PRNGKey(0))


def test_vmapped_heads_equal_batched_einsum(optimized):
    q, k, v = make_qkv(N=4, K=2)

    @jax.jit
    def batched(q, k, v):  # an independent computation: kv heads repeated, one einsum
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, kr) / 4.0
        logits = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), logits, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), vr)

    out = jax.jit(kit.dot_product_attention, static_argnames="is_causal")(q, k, v, is_causal=True)
    chex.assert_trees_all_close(out, batched(q, k, v), atol=1e-5, rtol=1e-5)
    # And one head of one example through the single-head core.
    head, _ = jax.jit(kit.single_head_attention)(
        q[1, :, 3], k[1, :, 1], v[1, :, 1], mask=jnp.tril(jnp.ones((8, 8), bool))
    )
    chex.assert_trees_all_close(head, out[1, :, 3], atol=1e-6, rtol=1e-6)


def test_jit_equals_eager_and_compiles_once():
    q, k, v = make_qkv(K=2)
    kw = dict(is_causal=True, local_window_size=(2, 0))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, lengths):
        return kit.dot_product_attention(q, k, v, query_seq_lengths=lengths, **kw)

    lengths = jnp.array([4, 8], jnp.int32)
    eager = kit.dot_product_attention(q, k, v, query_seq_lengths=lengths, **kw)
    chex.assert_trees_all_close(f(q, k, v, lengths), eager, atol=1e-6, rtol=1e-6)
    for seed in range(1, 4):
        q2, k2, v2 = make_qkv(K=2, seed=seed)
        f(q2, k2, v2, lengths + seed % 2)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_multi_head_attention_matches_composition_with_jax_nn(optimized):
    with unoptimized():  # the random draws of the parameters
        params = kit.init_attention_params(jax.random.key(0), 32, 4, num_kv_heads=2)
    assert params["query"]["kernel"].shape == (32, 4, 8)
    assert params["key"]["kernel"].shape == (32, 2, 8)
    assert params["out"]["kernel"].shape == (4, 8, 32)
    assert "bias" not in params["key"]  # softmax cancels it
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
    x = normal(jax.random.key(1), (2, 6, 32))
    context = normal(jax.random.key(2), (2, 9, 32))

    def proj(inp, p):
        y = jnp.einsum("btd,dnh->btnh", inp, p["kernel"])
        return y + p["bias"][None, None] if "bias" in p else y

    @jax.jit  # both sides compiled, as users run them
    def ours_and_composed(params, x, context):
        out = jax.nn.dot_product_attention(
            proj(x, params["query"]), proj(context, params["key"]), proj(context, params["value"])
        )
        expected = jnp.einsum("btnh,nhd->btd", out, params["out"]["kernel"])
        expected = expected + params["out"]["bias"][None, None]
        return kit.multi_head_attention(params, x, context, return_weights=True), expected

    (y, weights), expected = ours_and_composed(params, x, context)
    assert weights.shape == (2, 4, 6, 9)
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_multi_head_attention_process_heads_hook_and_weights_from_one_pass(optimized):
    """RoPE through the hook equals projecting, rotating and attending by hand; the
    weights returned with the output are attention_weights of the processed heads."""
    with unoptimized():  # the random draws of the parameters
        params = kit.init_attention_params(jax.random.key(0), 32, 4, num_kv_heads=2)
    x = normal(jax.random.key(1), (2, 7, 32))
    lengths = jnp.array([7, 4], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32) + 3, (2, 7))

    def rope(q, k, v):
        return apply_rope(q, positions), apply_rope(k, positions), v

    options = dict(is_causal=True, key_value_seq_lengths=lengths)
    # Compiled as users run it: one program with XLA's passes on (op by op, each of its
    # operations compiled on its own: 102 optimized compiles).
    y, weights = jax.jit(
        lambda params, x: kit.multi_head_attention(
            params, x, return_weights=True, process_heads=rope, **options
        )
    )(params, x)
    alone = jax.jit(
        lambda params, x: kit.multi_head_attention(params, x, process_heads=rope, **options)
    )(params, x)

    # By hand, with jax.nn and no kit helper: project, rotate, attend, project out.
    def proj(p):
        y = jnp.einsum("btd,dnh->btnh", x, p["kernel"])
        return y + p["bias"][None, None] if "bias" in p else y

    with unoptimized():  # the reference, op by op
        q, k, v = rope(proj(params["query"]), proj(params["key"]), proj(params["value"]))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
        expected = jnp.einsum("btnh,nhd->btd", out, params["out"]["kernel"])
        expected = expected + params["out"]["bias"][None, None]
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / jnp.sqrt(8.0)
        live = jnp.tril(jnp.ones((7, 7), bool))[None, None] & (
            jnp.arange(7)[None, None, None, :] < lengths[:, None, None, None]
        )
        want = jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=-1)
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(weights, want, atol=1e-6)
    chex.assert_trees_all_close(alone, y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- properties


@st.composite
def attention_inputs(draw):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 6))
    S = draw(st.integers(1, 6))
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2]))
    H = draw(st.sampled_from([1, 4]))
    floats = st.floats(-3, 3, width=32)
    q = draw(hnp.arrays(np.float32, (B, T, N, H), elements=floats))
    k = draw(hnp.arrays(np.float32, (B, S, K, H), elements=floats))
    v = draw(hnp.arrays(np.float32, (B, S, K, H), elements=floats))
    mask = draw(hnp.arrays(np.bool_, (B, 1, T, S)))
    return q, k, v, mask


@settings(max_examples=30, deadline=None)
@given(attention_inputs())
def test_weights_rows_sum_to_one_on_live_rows(inputs):
    q, k, _, mask = inputs
    weights = np.asarray(jax.jit(kit.attention_weights)(q, k, mask=mask), np.float64)
    live = np.broadcast_to(mask, weights.shape).any(-1)
    np.testing.assert_allclose(weights.sum(-1)[live], 1.0, rtol=1e-5)
    assert np.all(weights.sum(-1)[~live] == 0.0)
    assert np.all(weights[~np.broadcast_to(mask, weights.shape)] == 0.0)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
@settings(max_examples=30, deadline=None)
@given(attention_inputs(), st.randoms(use_true_random=False))
def test_permuting_keys_with_values_leaves_output_unchanged(inputs, random):
    q, k, v, mask = inputs
    perm = np.arange(k.shape[1])
    random.shuffle(perm)
    attention = jax.jit(kit.dot_product_attention)
    out = attention(q, k, v, mask=mask)
    permuted = attention(q, k[:, perm], v[:, perm], mask=mask[..., perm])
    chex.assert_trees_all_close(out, permuted, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input

BAD_INPUTS = {
    "batch": (dict(key=(3, 8, 4, 16)), r"key: batch must equal query's B = 2"),
    "head dim": (dict(key=(2, 8, 4, 8), value=(2, 8, 4, 8)), r"key: head dim must equal"),
    "value shape": (dict(value=(2, 7, 4, 16)), r"value: expected the shape of key"),
    "heads": (dict(key=(2, 8, 3, 16), value=(2, 8, 3, 16)), r"K = 3 heads must divide .* N = 4"),
    "rank": (dict(query=(8, 16)), r"query: expected rank 3 or 4 \[B, T, N, H\]"),
    "key rank": (dict(key=(8, 4, 16)), r"key: expected rank 4 \[B, S, K, H\]"),
    "dtype": (dict(key_dtype=jnp.bfloat16), r"key: expected the dtype of query \(float32\)"),
    "int query": (dict(dtype=jnp.int32), r"query: expected a floating dtype, got int32"),
    "mask shape": (dict(mask=np.ones((2, 4, 8, 7), bool)), r"mask: .*\(2, 4, 8, 8\), got"),
    "mask dtype": (dict(mask=np.ones((8, 8), np.float32)), r"mask: expected dtype bool"),
    "mask rank": (dict(mask=np.ones((1, 2, 4, 8, 8), bool)), r"mask: expected rank <= 4"),
    "bias shape": (dict(bias=np.ones((3, 1, 8, 8), np.float32)), r"bias: .* got \(3, 1, 8, 8\)"),
    "implementation": (dict(implementation="flash"), r"implementation: expected one of"),
    "window": (dict(local_window_size=(-1, 2)), r"local_window_size: expected non-negative"),
    "window type": (dict(local_window_size=(1, 2, 3)), r"local_window_size: expected an int"),
    "dropout rng": (dict(dropout_rate=0.1), r"dropout_rng: required when dropout_rate > 0"),
    "dropout rate": (dict(dropout_rate=1.5), r"dropout_rate: expected a number in \[0, 1\)"),
    "q lengths": (
        dict(query_seq_lengths=np.array([1, 2, 3], np.int32)),
        r"query_seq_lengths: expected shape \[B\] = \(2,\), got \(3,\)",
    ),
    "kv lengths dtype": (
        dict(key_value_seq_lengths=np.array([1.0, 2.0], np.float32)),
        r"key_value_seq_lengths: expected an integer dtype",
    ),
    "scale": (dict(scale=float("nan")), r"scale: expected a finite number"),
    "is_causal": (dict(is_causal="yes"), r"is_causal: expected a bool"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(name, jit):
    spec, pattern = BAD_INPUTS[name]
    spec = dict(spec)
    dtype = spec.pop("dtype", jnp.float32)
    shapes = {"query": (2, 8, 4, 16), "key": (2, 8, 4, 16), "value": (2, 8, 4, 16)}
    for arg in shapes:
        if arg in spec:
            shapes[arg] = spec.pop(arg)
    key_dtype = spec.pop("key_dtype", dtype)
    q = jnp.ones(shapes["query"], dtype)
    k = jnp.ones(shapes["key"], key_dtype)
    v = jnp.ones(shapes["value"], dtype)
    fn = kit.dot_product_attention
    if jit:
        arrays = {n: spec.pop(n) for n in ("mask", "bias") if n in spec}

        def call(q, k, v, arrays):
            return kit.dot_product_attention(q, k, v, **arrays, **spec)

        with pytest.raises(ValueError, match=pattern):
            jax.jit(call)(q, k, v, arrays)
        return
    with pytest.raises(ValueError, match=pattern):
        fn(q, k, v, **spec)


def test_mask_helpers_match_numpy():
    np.testing.assert_array_equal(
        kit.causal_mask(3, 5), numpy_mask(1, 1, 3, 5, is_causal=True)[0, 0]
    )
    np.testing.assert_array_equal(
        kit.local_window_mask(6, 6, (2, 1)), numpy_mask(1, 1, 6, 6, window=(2, 1))[0, 0]
    )
    lengths_q, lengths_kv = np.array([2, 4], np.int32), np.array([3, 1], np.int32)
    np.testing.assert_array_equal(
        kit.padding_mask(jnp.asarray(lengths_q), jnp.asarray(lengths_kv), 4, 5),
        numpy_mask(2, 1, 4, 5, q_len=lengths_q, kv_len=lengths_kv),
    )
    combined = kit.combine_masks(kit.causal_mask(4, 4), None, kit.local_window_mask(4, 4, 1))
    np.testing.assert_array_equal(combined, numpy_mask(1, 1, 4, 4, is_causal=True, window=1)[0, 0])
    assert kit.combine_masks(None, None) is None
    with pytest.raises(ValueError, match="combine_masks: mask 0 must be bool"):
        kit.combine_masks(jnp.ones((2, 2)))


def test_projection_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_kv_heads: must divide num_heads = 4, got 3"):
        kit.init_attention_params(jax.random.key(0), 32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"d_model: must be divisible by num_heads = 3"):
        kit.init_attention_params(jax.random.key(0), 32, 3)
    with pytest.raises(ValueError, match=r"x: last dim must equal kernel's D = 32"):
        kit.project_heads(jnp.ones((2, 3, 16)), jnp.ones((32, 4, 8)))
    params = kit.init_attention_params(jax.random.key(0), 32, 4)
    with pytest.raises(ValueError, match=r"params: expected a dict with keys"):
        kit.multi_head_attention({"query": params["query"]}, jnp.ones((2, 3, 32)))
    with pytest.raises(ValueError, match=r"x: expected rank 3 \[B, T, D\]"):
        kit.multi_head_attention(params, jnp.ones((3, 32)))


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_forward_mode_matches_jax_nn(optimized):
    # The masked softmax has a custom JVP; forward mode must stay exact too.
    q, k, v = make_qkv(K=2)
    tangents = make_qkv(K=2, seed=9)

    def run(fn):
        return jax.jit(lambda p, t: jax.jvp(lambda *a: fn(*a, is_causal=True), p, t))(
            (q, k, v), tangents
        )

    (out, d_out), (ref, d_ref) = run(kit.dot_product_attention), run(jax.nn.dot_product_attention)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(d_out, d_ref, atol=1e-4, rtol=1e-4)
