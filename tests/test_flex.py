"""kit.flex_attention, block masks and the mods library against dense formulas written here."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_qkv, normal, slow_beyond, unoptimized

import kit
from kit import mods

SMALL_BLOCKS = {"block_q": 32, "block_k": 16, "backward_block_q": 16, "backward_block_k": 32}
IMPLS = ["xla", "chunked"]
# In the inner loop the chunked path; the xla path (the materialized reference) in the full run.
IMPL_PARAMS = slow_beyond(IMPLS, ["chunked"])


def dense(q, k, v, *, scores=None, mask=None, scale=None):
    """Attention from the formula: logits `[B, N, T, S]` -> `scores(logits)`, where
    `mask` `[B|1, N|1, T, S]` is False the logit is dropped; rows with no live key are 0."""
    _, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * (scale or 1 / math.sqrt(H))
    if scores is not None:
        logits = scores(logits)
    mask = jnp.ones((1, 1, T, S), bool) if mask is None else mask
    mask = jnp.broadcast_to(mask, logits.shape)
    live = jnp.any(mask, axis=-1, keepdims=True)
    top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(logits - jnp.where(live, top, 0.0)), 0.0)
    p = e / jnp.where(live, jnp.sum(e, axis=-1, keepdims=True), 1.0)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def grids(B, N, T, S):
    """Index arrays b, h, t, s broadcastable to `[B, N, T, S]`."""
    return (
        jnp.arange(B)[:, None, None, None],
        jnp.arange(N)[None, :, None, None],
        jnp.arange(T)[None, None, :, None],
        jnp.arange(S)[None, None, None, :],
    )


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def check_against(flex_fn, dense_fn, args, tol=(2e-5, 2e-4)):
    """Forward and gradients (w.r.t. every arg) of two functions of the same args, each
    compiled once (forward and backward in one program, as training runs them)."""
    argnums = tuple(range(len(args)))

    def compiled(fn):
        def loss(*a):
            out = fn(*a)
            weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return jnp.sum(out * weights), out

        return jax.jit(jax.grad(loss, argnums, has_aux=True))(*args)

    (got, got_out), (want, want_out) = compiled(flex_fn), compiled(dense_fn)
    close(got_out, want_out, tol[0])
    for g, w in zip(got, want, strict=True):
        close(g, w, tol[1])


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_alibi_documents_causal_match_the_formula(impl):
    """Random shapes, lengths not multiples of any block, GQA, a captured slope
    table with its gradient, and per-example segment ids (block states differ by example)."""
    B, T, S, N, K = 2, 75, 83, 4, 2
    q, k, v = make_qkv(B, T, S, N, K, H=8, seed=1)
    slopes = jnp.array([0.5, 0.3, 0.2, 0.1])
    seg = jnp.stack([jnp.arange(90) // 30, jnp.arange(90) // 20])  # [B, 90]
    mask_mod = kit.and_masks(mods.causal, mods.documents(seg[:, :T], seg[:, :S]))
    block_mask = kit.create_block_mask(mask_mod, B, None, T, S, block_size=16)
    assert 0 < block_mask.sparsity() < 1

    def flex(q, k, v, slopes):
        return kit.flex_attention(
            q, k, v, mods.alibi(slopes), block_mask, implementation=impl,
            kernel_options=SMALL_BLOCKS,
        )  # fmt: skip

    _, h, t, s = grids(B, N, T, S)
    mask = (s <= t) & (seg[:, None, :T, None] == seg[:, None, None, :S])

    def reference(q, k, v, slopes):
        return dense(q, k, v, scores=lambda x: x + slopes[h] * (s - t).astype(x.dtype), mask=mask)

    check_against(flex, reference, (q, k, v, slopes))


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_dead_blocks_are_never_read():
    """NaN keys and values in blocks the block mask leaves dead do not reach the
    output or the gradients: those blocks are skipped, not computed and masked."""
    B, T, N, H = 1, 128, 2, 8
    q, k, v = make_qkv(B, T, T, N, N, H)
    seg = (jnp.arange(T) // 32)[None]
    block_mask = kit.create_block_mask(kit.mods.documents(seg), None, None, T, T, block_size=16)
    poisoned = (jnp.arange(T) >= 96)[None, :, None, None]  # document 3: keys 96..127
    k_bad, v_bad = jnp.where(poisoned, jnp.nan, k), jnp.where(poisoned, jnp.nan, v)
    options = {"block_q": 32, "block_k": 32, "backward_block_q": 32, "backward_block_k": 32}

    def loss(q, k, v):
        out = kit.flex_attention(q, k, v, None, block_mask, implementation="chunked",
                                 kernel_options=options)  # fmt: skip
        return jnp.sum(out[:, :96] ** 2)  # the queries of documents 0-2

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = value_and_grads(q, k_bad, v_bad)
    want, want_grads = value_and_grads(q, k, v)
    close(value, want, 1e-5)
    close(grads[0][:, :96], want_grads[0][:, :96], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_no_live_key_are_exact_zeros(impl):
    B, T, N = 2, 40, 2
    q, k, v = make_qkv(B, T, T, N, N, H=8)
    # Queries 10..19 of example 1 may attend to nothing.
    dead = jnp.zeros((B, T), bool).at[1, 10:20].set(True)
    block_mask = kit.create_block_mask(lambda b, h, t, s: ~dead[b, t], B, None, T, T, block_size=8)

    def loss(q, k, v):
        out = kit.flex_attention(q, k, v, mods.softcap(3.0), block_mask, implementation=impl,
                                 kernel_options=SMALL_BLOCKS)  # fmt: skip
        return out, jnp.sum(out**2)

    out, _ = jax.jit(loss)(q, k, v)
    assert np.all(np.asarray(out[1, 10:20]) == 0)
    assert np.all(np.isfinite(np.asarray(out)))
    grad_q = jax.jit(jax.grad(lambda q: loss(q, k, v)[1]))(q)
    assert np.all(np.asarray(grad_q[1, 10:20]) == 0)


def t5_bucket_reference(relative, num_buckets, max_distance):
    """T5's bidirectional bucket, written from the paper's code in numpy."""
    half = num_buckets // 2
    out = np.where(relative > 0, half, 0)
    n = np.abs(relative)
    exact = half // 2
    with np.errstate(divide="ignore"):
        large = exact + (
            np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)
        ).astype(np.int64)
    return out + np.where(n < exact, n, np.minimum(large, half - 1))


def t5_bias(table):
    """`[1, N, T, T]`: table[bucket(s - t), h]."""
    buckets = t5_bucket_reference(np.arange(T)[None] - np.arange(T)[:, None], 16, 20)
    return jnp.moveaxis(table[jnp.asarray(buckets)], -1, 0)[None]


B, T, N, K = 2, 37, 4, 2
_, HEADS, POS_T, POS_S = grids(B, N, T, T)
PREFIX = jnp.array([5, 20])
SEG = jnp.stack([jnp.arange(T) // 12, jnp.arange(T) // 7])
TABLE = normal(jax.random.key(3), (16, N))
SLOPES = jnp.array([0.4, 0.2, 0.1, 0.05])

# name: (mask_mod or None, score_mod factory of the captured array or None, the
# captured array, dense mask, dense scores of (logits, captured))
MODS = {
    "causal": (mods.causal, None, None, POS_S <= POS_T, None),
    "sliding_window": (mods.sliding_window(4, 2), None, None,
                       (POS_S >= POS_T - 4) & (POS_S <= POS_T + 2), None),
    "prefix_lm": (mods.prefix_lm(PREFIX), None, None,
                  (POS_S <= POS_T) | (PREFIX[:, None, None, None] > POS_S), None),
    "documents": (mods.documents(SEG), None, None,
                  SEG[:, None, :, None] == SEG[:, None, None, :], None),
    "alibi": (None, mods.alibi, SLOPES, None,
              lambda x, m: x + m[HEADS] * (POS_S - POS_T).astype(x.dtype)),
    "alibi_symmetric": (None, lambda m: mods.alibi(m, symmetric=True), SLOPES, None,
                        lambda x, m: x - m[HEADS] * jnp.abs(POS_S - POS_T).astype(x.dtype)),
    "softcap": (None, lambda c: mods.softcap(c), 2.0, None, lambda x, c: c * jnp.tanh(x / c)),
    "t5": (None, lambda table: mods.t5_relative(table, max_distance=20), TABLE, None,
           lambda x, table: x + t5_bias(table)),
}  # fmt: skip


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("name", slow_beyond(list(MODS), []))
def test_each_mod_matches_its_formula(name, impl):
    mask_mod, score_factory, captured, mask, scores = MODS[name]
    q, k, v = make_qkv(B, T, T, N, K, H=8, seed=2)
    block_mask = None if mask_mod is None else kit.create_block_mask(
        mask_mod, B, None, T, T, block_size=8
    )  # fmt: skip
    args = (
        (q, k, v) if score_factory is None or isinstance(captured, float) else (q, k, v, captured)
    )

    def flex(q, k, v, *c):
        score_mod = None if score_factory is None else score_factory(c[0] if c else captured)
        return kit.flex_attention(q, k, v, score_mod, block_mask, implementation=impl,
                                  kernel_options=SMALL_BLOCKS)  # fmt: skip

    def reference(q, k, v, *c):
        fn = None if scores is None else (lambda x: scores(x, c[0] if c else captured))
        return dense(q, k, v, scores=fn, mask=mask)

    check_against(flex, reference, args)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_sink_adds_one_term_to_the_softmax(impl):
    """A learned sink logit z_h: out = sum_j e^{s_j} v_j / (e^{z_h} + sum_j e^{s_j}),
    causal; gradients reach z."""
    q, k, v = make_qkv(B, T, T, N, K, H=8, seed=4)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    k1, v1 = mods.add_sink_slot(k, v)
    block_mask = kit.create_block_mask(mods.after_sink(mods.causal), None, None, T, T + 1,
                                       block_size=8)  # fmt: skip

    def flex(q, k, v, z):
        k1, v1 = mods.add_sink_slot(k, v)
        return kit.flex_attention(q, k1, v1, mods.sink(z), block_mask, implementation=impl,
                                  kernel_options=SMALL_BLOCKS)  # fmt: skip

    def reference(q, k, v, z):
        kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, kk) / math.sqrt(8)
        logits = jnp.where(POS_S <= POS_T, logits, -jnp.inf)
        top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), z[HEADS[..., 0:1]])
        e = jnp.exp(logits - top)
        denom = jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(z[HEADS[..., 0:1]] - top)
        return jnp.einsum("bnts,bsnh->btnh", e / denom, vv)

    del k1, v1
    check_against(flex, reference, (q, k, v, sinks))


def test_block_mask_under_jit_with_traced_segment_ids():
    """Segment ids traced by jit (they differ per batch): the block mask is built
    inside, and the result is the dense formula's."""
    q, k, v = make_qkv(B, T, T, N, K, H=8, seed=5)

    @jax.jit
    def packed(q, k, v, seg):
        mask_mod = kit.and_masks(mods.causal, mods.documents(seg))
        block_mask = kit.create_block_mask(mask_mod, B, None, T, T, block_size=8)
        return kit.flex_attention(q, k, v, None, block_mask, implementation="chunked",
                                  kernel_options=SMALL_BLOCKS)  # fmt: skip

    for seg in (SEG, SEG[::-1] // 2):
        mask = (POS_S <= POS_T) & (seg[:, None, :, None] == seg[:, None, None, :])
        close(packed(q, k, v, seg), dense(q, k, v, mask=mask), 2e-5)


@pytest.mark.slow
def test_jvp_and_vmap_through_a_captured_table():
    q, k, v = make_qkv(B, T, T, N, K, H=8, seed=6)

    def run(impl):
        def f(q, table):
            return kit.flex_attention(q, k, v, mods.t5_relative(table, max_distance=20),
                                      implementation=impl, kernel_options=SMALL_BLOCKS)  # fmt: skip

        return f

    tangents = (jnp.sin(q), jnp.cos(TABLE))

    def tangent(impl):
        return jax.jit(lambda p, t: jax.jvp(run(impl), p, t)[1])((q, TABLE), tangents)

    close(tangent("chunked"), tangent("xla"), 2e-5)
    stacked = jnp.stack([TABLE, 2 * TABLE])
    got = jax.jit(jax.vmap(lambda t: run("chunked")(q, t)))(stacked)
    close(got[1], jax.jit(run("xla"))(q, 2 * TABLE), 2e-5)


@pytest.mark.slow
def test_float64_keeps_float64():
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in make_qkv(1, 40, 40, 2, 2, H=8))
        score_mod = mods.softcap(4.0)
        out = kit.flex_attention(q, k, v, score_mod, implementation="chunked",
                                 kernel_options=SMALL_BLOCKS)  # fmt: skip
        want = dense(q, k, v, scores=lambda x: 4.0 * jnp.tanh(x / 4.0))
        assert out.dtype == jnp.float64
        close(out, want, 1e-12)


def test_bad_inputs_name_the_argument():
    q, k, v = make_qkv(1, 16, 16, 2, 2, H=8)
    with pytest.raises(ValueError, match="score_mod: expected a function of 5"):
        kit.flex_attention(q, k, v, lambda s, b, h: s)
    with pytest.raises(ValueError, match="score_mod: must return a float score scalar"):
        kit.flex_attention(q, k, v, lambda s, b, h, t, u: jnp.stack([s, s]))
    with pytest.raises(ValueError, match="score_mod: expected a function"):
        kit.flex_attention(q, k, v, 3.0)
    with pytest.raises(ValueError, match="mask_mod: expected a function of 4"):
        kit.create_block_mask(lambda b, h, t: t > 0, None, None, 16, 16)
    with pytest.raises(ValueError, match="mask_mod: must return a bool"):
        kit.create_block_mask(lambda b, h, t, s: t - s, None, None, 16, 16)
    block_mask = kit.create_block_mask(mods.causal, None, None, 16, 16)
    with pytest.raises(ValueError, match="block_mask: built for"):
        kit.flex_attention(q[:, :8], k, v, None, block_mask)
    heads = kit.create_block_mask(mods.causal, None, 3, 16, 16)
    with pytest.raises(ValueError, match="block_mask: built for"):
        kit.flex_attention(q, k, v, None, heads)
    with pytest.raises(ValueError, match=r"block_mask: expected a kit\.BlockMask"):
        kit.flex_attention(q, k, v, None, jnp.ones((16, 16), bool))
    with pytest.raises(ValueError, match="implementation"):
        kit.flex_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="block_size"):
        kit.create_block_mask(mods.causal, None, None, 16, 16, block_size=0)
    with pytest.raises(ValueError, match="kernel_options"):
        kit.flex_attention(q, k, v, kernel_options={"block": 8})


# --- meshes: Auto and Explicit axes, a user's shard_map ---------------------------------


def _collectives(hlo: str) -> list[str]:
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return [op for op in ops if op in hlo]


def _packed_call(q, k, v, slopes, seg):
    """Causal documents from per-example segment ids and learned ALiBi slopes."""
    T = q.shape[1]
    block_mask = kit.create_block_mask(
        kit.and_masks(mods.causal, mods.documents(seg)), q.shape[0], None, T, T, block_size=8
    )
    return kit.flex_attention(q, k, v, mods.alibi(slopes), block_mask, implementation="chunked",
                              kernel_options=SMALL_BLOCKS)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_batch_and_head_mesh_splits_without_collectives(axis_type, optimized):
    """On a ("data", "model") mesh the forward needs no collective; the gradients,
    the captured slopes' summed over the devices, equal the unsharded ones."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    kind = getattr(AxisType, axis_type)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(kind, kind))
    q, k, v = make_qkv(4, 40, 40, 4, 2, H=8, seed=7)
    seg = jnp.stack([jnp.arange(40) // d for d in (10, 13, 40, 7)])
    weights = normal(jax.random.key(8), q.shape)

    def loss(q, k, v, slopes):
        return jnp.sum(_packed_call(q, k, v, slopes, seg) * weights)

    with unoptimized():  # the unsharded reference; the sharded program compiles as users do
        want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, SLOPES)
    with jax.set_mesh(mesh):
        split = NamedSharding(mesh, P("data", None, "model", None))
        args = [jax.device_put(x, split) for x in (q, k, v)] + [SLOPES]
        forward = jax.jit(lambda q, k, v, s: _packed_call(q, k, v, s, seg))
        assert _collectives(forward.lower(*args).compile().as_text()) == []
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    close(got[0], want[0], 1e-4)
    for g, w in zip(got[1], want[1], strict=True):
        close(g, w, 2e-4)


@pytest.mark.slow
def test_inside_a_users_shard_map():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Explicit,))
    q, k, v = make_qkv(4, 40, 40, 4, 2, H=8, seed=9)
    seg = jnp.stack([jnp.arange(40) // d for d in (10, 13, 40, 7)])

    def loss(q, k, v, seg):
        return jnp.sum(jnp.sin(_packed_call(q, k, v, SLOPES, seg)))

    def per_device(q, k, v, seg):
        return _packed_call(q, k, v, SLOPES, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, seg)

    split = jax.shard_map(per_device, mesh=mesh, in_specs=P("b"), out_specs=P("b"))
    args = [jax.device_put(x, NamedSharding(mesh, P("b"))) for x in (q, k, v, seg)]
    out, grads = jax.jit(split)(*args)
    want, want_grads = jax.jit(per_device)(q, k, v, seg)  # the whole batch on one device
    close(out, want, 2e-5)
    for g, w in zip(grads, want_grads, strict=True):
        close(g, w, 2e-4)


@pytest.mark.slow
def test_bfloat16_matches_float32_within_its_precision():
    q, k, v = make_qkv(B, T, T, N, K, H=8, seed=11)
    block_mask = kit.create_block_mask(mods.causal, None, None, T, T, block_size=8)

    @functools.partial(jax.jit, static_argnums=0)
    def run(dtype):
        args = (x.astype(dtype) for x in (q, k, v))
        options = {"implementation": "chunked", "kernel_options": SMALL_BLOCKS}
        return kit.flex_attention(*args, mods.alibi(SLOPES), block_mask, **options)

    low = run(jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    close(low.astype(jnp.float32), run(jnp.float32), 2e-2)


# --- random block masks, per-head masks, T != S, GQA: forward, gradients, tangents ------


def _random_mask_case(seed=0):
    """q, k, v (T=45 != S=70, 4 query heads over 2 key/value heads), a random mask
    `[B, N, T, S]` that differs by example and head: whole 16-blocks dead at random,
    random elements dead inside the live ones (partial blocks), and fully dead rows
    (row 5 of every head of example 0; row 20 of head 1 only)."""
    B, T, S, N, K = 2, 45, 70, 4, 2
    q, k, v = make_qkv(B, T, S, N, K, H=8, seed=seed)
    rng = np.random.default_rng(seed)
    blocks = rng.random((B, N, -(-T // 16), -(-S // 16))) < 0.6
    table = np.repeat(np.repeat(blocks, 16, axis=2), 16, axis=3)[:, :, :T, :S]
    table &= rng.random((B, N, T, S)) < 0.7
    table[0, :, 5] = False
    table[:, 1, 20] = False
    table = jnp.asarray(table)
    slopes = jnp.array([0.5, -0.3, 0.2, 0.1])
    bias = normal(jax.random.key(seed + 1), (B, N, T, S))  # a captured table, differentiated
    return q, k, v, table, slopes, bias


def _random_mask_flex(table, B, N, T, S):
    block_mask = kit.create_block_mask(
        lambda b, h, q_idx, kv_idx: table[b, h, q_idx, kv_idx], B, N, T, S, block_size=16
    )

    def flex(q, k, v, slopes, bias):
        def score(s, b, h, q_idx, kv_idx):
            return s + slopes[h] * (kv_idx - q_idx).astype(s.dtype) + bias[b, h, q_idx, kv_idx]

        return kit.flex_attention(q, k, v, score, block_mask, implementation="chunked",
                                  kernel_options=SMALL_BLOCKS)  # fmt: skip

    return block_mask, flex


def _random_mask_dense(table, B, N, T, S):
    _, h, t, s = grids(B, N, T, S)

    def reference(q, k, v, slopes, bias):
        return dense(
            q, k, v, scores=lambda x: x + slopes[h] * (s - t).astype(x.dtype) + bias, mask=table
        )

    return reference


def test_random_per_head_block_mask_forward_and_gradients():
    q, k, v, table, slopes, bias = _random_mask_case()
    B, T, N = q.shape[:3]
    S = k.shape[1]
    block_mask, flex = _random_mask_flex(table, B, N, T, S)
    states = np.asarray(block_mask.sparsity())
    assert 0 < states < 1  # some blocks dead, some live
    out = jax.jit(flex)(q, k, v, slopes, bias)
    # the fully dead rows are exact zeros
    assert not np.any(np.asarray(out[0, 5])) and not np.any(np.asarray(out[:, 20, 1]))
    check_against(flex, _random_mask_dense(table, B, N, T, S), (q, k, v, slopes, bias))


def test_random_per_head_block_mask_tangents():
    # The tangent kernel with a block mask and a score function with captures,
    # evaluated, against jax.jvp of the formula.
    q, k, v, table, slopes, bias = _random_mask_case(seed=2)
    B, T, N = q.shape[:3]
    S = k.shape[1]
    _, flex = _random_mask_flex(table, B, N, T, S)
    reference = _random_mask_dense(table, B, N, T, S)
    primals = (q, k, v, slopes, bias)
    tangents = tuple(normal(jax.random.key(20 + i), x.shape) for i, x in enumerate(primals))

    def jvp(f):
        return jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)

    (out, d_out), (want, d_want) = jvp(flex), jvp(reference)
    close(out, want, 2e-5)
    close(d_out, d_want, 1e-4)


def test_nan_in_dead_blocks_reaches_no_gradient_with_partly_live_blocks():
    """NaN keys and values in blocks the mask leaves dead reach neither the output nor
    dq, dk or dv, where the documents' edges cut blocks (partly live blocks)."""
    B, T, N, H = 1, 128, 2, 8
    q, k, v = make_qkv(B, T, T, N, N, H, seed=4)
    seg = jnp.asarray(np.searchsorted([27, 61, 96], np.arange(T), side="right"))[None]
    mask_mod = kit.and_masks(mods.causal, mods.documents(seg))
    block_mask = kit.create_block_mask(mask_mod, None, None, T, T, block_size=32)
    # key block 3 (96..127, document 3) is dead for query blocks 0-2, whose blocks the
    # documents' edges at 27 and 61 cut
    poisoned = (jnp.arange(T) >= 96)[None, :, None, None]
    k_bad, v_bad = jnp.where(poisoned, jnp.nan, k), jnp.where(poisoned, jnp.nan, v)
    options = {"block_q": 32, "block_k": 32, "backward_block_q": 32, "backward_block_k": 32}

    def loss(q, k, v):
        out = kit.flex_attention(q, k, v, None, block_mask, implementation="chunked",
                                 kernel_options=options)  # fmt: skip
        weights = jnp.cos(jnp.arange(96 * N * H, dtype=jnp.float32)).reshape(1, 96, N, H)
        return jnp.sum(out[:, :96] * weights)  # the queries of documents 0-2

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k_bad, v_bad)
    t, s = grids(1, 1, T, T)[2:]
    mask = (s <= t) & (seg[:, None, :, None] == seg[:, None, None, :])

    def reference(q, k, v):
        out = dense(q, k, v, mask=mask)
        weights = jnp.cos(jnp.arange(96 * N * H, dtype=jnp.float32)).reshape(1, 96, N, H)
        return jnp.sum(out[:, :96] * weights)

    want, want_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(q, k, v)
    close(value, want, 1e-5)
    for got, ref in zip(grads, want_grads, strict=True):
        close(got[:, :96], ref[:, :96], 1e-5)
