"""kit.attention.chunked equals kit's materialized (xla) path, forward and VJP, both
equal the formula with XLA's optimizations on, and chunked holds no [T, S] buffer."""

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOLERANCES,
    live_mask,
    make_qkv,
    normal,
    reference_attention,
    slow_beyond,
    unoptimized,
)

import kit
from kit.attention import flash_forward
from kit.attention.blocks import default_block_sizes
from kit.attention.chunked import BlockSizes, block_config
from kit.attention.flash_backward import _q_range
from kit.attention.flash_forward import kv_range

# T and S are not multiples of the blocks (8 x 16) on purpose.
B, T, S, N = 2, 37, 45, 4
LENGTHS_Q = np.array([30, 37], np.int32)
LENGTHS_KV = np.array([45, 19], np.int32)

CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bias": dict(bias=(B, N, T, S)),
    "bias shared over batch": dict(bias=(1, N, T, S)),
    "bias shared over heads": dict(bias=(B, 1, T, S)),
    "bias [T, S]": dict(bias=(T, S)),
    "bias over keys only": dict(bias=(B, 1, 1, S)),
    "mask": dict(mask=(B, 1, T, S)),
    "lengths": dict(query_seq_lengths=LENGTHS_Q, key_value_seq_lengths=LENGTHS_KV),
    "causal+lengths": dict(is_causal=True, query_seq_lengths=LENGTHS_Q),
    "causal+window": dict(is_causal=True, local_window_size=(9, 0)),
    "window": dict(local_window_size=(3, 11)),
    "scale": dict(scale=0.05),
    "everything": dict(
        bias=(1, N, T, S),
        mask=(B, N, T, S),
        is_causal=True,
        query_seq_lengths=LENGTHS_Q,
        key_value_seq_lengths=LENGTHS_KV,
        local_window_size=(20, 2),
    ),
}


def _compare(case, *, T=T, S=S, K=2, blocks=(8, 16), units=4, backward=None):
    """chunked against kit's xla path in float32, forward and gradients, unoptimized.
    `units` 4 at K=2 batches both examples in one step (lax.map's vmap), which the
    default (one example a step) never does."""
    kw = dict(case)
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K)
    bias = normal(jax.random.key(5), kw.pop("bias")) if "bias" in kw else None
    mask = None
    if "mask" in kw:
        mask = jax.random.bernoulli(jax.random.key(6), 0.7, kw.pop("mask"))

    def run(attention):
        def loss(q, k, v, bias):
            out = attention(q, k, v, bias, mask, **kw)
            weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return jnp.sum(out.astype(jnp.float32) * weights), out

        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias)

    grads, out = run(
        functools.partial(
            kit.chunked_attention,
            block_q=blocks[0],
            block_k=blocks[1],
            backward_block_q=None if backward is None else backward[0],
            backward_block_k=None if backward is None else backward[1],
            units_per_step=units,
        )
    )
    ref_grads, ref_out = run(functools.partial(kit.dot_product_attention, implementation="xla"))
    fwd_tol, grad_tol = TOLERANCES[jnp.float32]
    assert out.dtype == ref_out.dtype == jnp.float32
    chex.assert_trees_all_close(out, ref_out, atol=fwd_tol, rtol=fwd_tol)
    chex.assert_trees_all_close(grads, ref_grads, atol=grad_tol, rtol=grad_tol)


FAST = ["plain", "bias shared over heads", "everything"]

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Every case in float32; the half-precision dtypes on no option, on rows with no live
# key (lengths), and on every option at once (bias, mask, causal, window, lengths).
HALF = ["plain", "lengths", "everything"]


def _formula_check(pairs):
    """Each path against the formula written with jax.numpy alone (helpers.
    reference_attention, float32), compiled as users compile it: XLA's passes on;
    `pairs`: (case name, dtype).

    The cases of one call share one program per path (and one for the reference): with
    XLA's passes on, five cases compiled in one program took 3.1 s against 5.9 s in
    five, and the checks are the same."""
    cases = []
    with unoptimized():  # the inputs (random draws, compiled op by op)
        for name, dtype in pairs:
            q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=2, dtype=dtype)
            kw = dict(CASES[name])
            bias = normal(jax.random.key(5), kw.pop("bias"), dtype) if "bias" in kw else None
            mask = None
            if "mask" in kw:
                mask = jax.random.bernoulli(jax.random.key(6), 0.7, kw.pop("mask"))
            live = jnp.asarray(live_mask(B, N, T, S, mask, kw))
            scale = kw.get("scale", 1 / np.sqrt(q.shape[-1]))
            case = dict(name=name, dtype=dtype, kw=kw, mask=mask, live=live, scale=scale)
            cases.append((case, (q, k, v, bias)))

    def run(attention):
        """Gradients (float32) and outputs of every case, in one compiled program;
        `attention(case, q, k, v, bias)`."""

        def every_case(inputs):
            results = []
            for (case, _), (q, k, v, bias) in zip(cases, inputs, strict=True):

                def loss(q, k, v, bias, case=case):
                    out = attention(case, q, k, v, bias).astype(jnp.float32)
                    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
                    return jnp.sum(out * weights), out

                argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
                grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
                results.append((jax.tree.map(lambda g: g.astype(jnp.float32), grads), out))
            return results

        return jax.jit(every_case)([inputs for _, inputs in cases])

    with unoptimized():
        want = run(
            lambda case, q, k, v, bias: reference_attention(
                q, k, v, scale=case["scale"], mask=case["live"], bias=bias
            )
        )
    paths = {
        "xla": lambda case, q, k, v, bias: kit.dot_product_attention(
            q, k, v, bias, case["mask"], implementation="xla", **case["kw"]
        ),
        "chunked": lambda case, q, k, v, bias: kit.chunked_attention(
            q, k, v, bias, case["mask"], block_q=8, block_k=16, **case["kw"]
        ),
    }
    for path, attention in paths.items():
        got = run(attention)
        for (case, _), (grads, out), (ref_grads, ref_out) in zip(cases, got, want, strict=True):
            fwd_tol, grad_tol = TOLERANCES[case["dtype"]]
            message = f"{path}, {case['name']}, {jnp.dtype(case['dtype']).name}"
            chex.assert_trees_all_close(
                out, ref_out, atol=fwd_tol, rtol=fwd_tol, custom_message=message
            )
            chex.assert_trees_all_close(
                grads, ref_grads, atol=grad_tol, rtol=grad_tol, custom_message=message
            )


def test_both_paths_equal_the_formula_with_optimizations_on(optimized):
    """Every option at once, in each dtype (the inner loop's case)."""
    _formula_check([("everything", dtype) for dtype in DTYPES])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_paths_equal_the_formula_in_every_case_with_optimizations_on(optimized, dtype):
    """Every case in float32; the half-precision dtypes on no option and on rows with
    no live key (lengths); "everything" is the test above."""
    names = CASES if dtype == jnp.float32 else HALF
    _formula_check([(name, dtype) for name in names if name != "everything"])


# The inner loop's cheaper check (no optimization passes); every case, and the
# half-precision dtypes, are in the formula sweep above, for both paths.
@pytest.mark.parametrize("name", FAST)
def test_chunked_equals_xla_forward_and_vjp(name):
    _compare(CASES[name])


@pytest.mark.parametrize("groups", slow_beyond([1, 2, 4], [2]))
def test_chunked_grouped_query_attention(groups):
    _compare(CASES["causal+lengths"], K=N // groups)


@pytest.mark.parametrize(
    "blocks", slow_beyond([(16, 8), (64, 64), (5, 7)], []), ids=lambda b: f"{b[0]}x{b[1]}"
)
def test_chunked_block_sizes(blocks):
    # Exactly divisible lengths take the mask-free path for blocks below the diagonal.
    _compare(CASES["causal"], T=48, S=48, blocks=blocks, units=8)
    _compare(CASES["bias"] | {"bias": (B, N, 48, 48)}, T=48, S=48, blocks=blocks)


def test_chunked_backward_blocks_differ_from_forward():
    # The backward has its own block sizes (keys as rows); lengths are padded to
    # multiples of both passes' sizes: lcm(8, 12) = 24 queries, lcm(16, 24) = 48 keys.
    # (Divisible lengths, where both passes skip the mask below the diagonal, are
    # in test_chunked_trims_the_causal_diagonal.)
    _compare(CASES["everything"], blocks=(8, 16), backward=(12, 24))


@pytest.mark.parametrize("T,S", slow_beyond([(48, 48), (24, 72), (72, 24)], [], several=True))
def test_chunked_trims_the_causal_diagonal(T, S):
    # On the causal diagonal the forward (query blocks of 24 over key blocks of 8)
    # computes only a block's last 24, 16 and 8 queries, and the backward (key
    # blocks of 24 over query blocks of 8) only a block's first 8, 16 and 24 keys;
    # with a bias, whose gradient covers the skipped pairs too.
    case = CASES["causal"] | {"bias": (B, N, T, S)}
    _compare(case, T=T, S=S, blocks=(24, 8), backward=(8, 24))


@pytest.mark.parametrize(
    "T,S,blocks,diagonal_keys",
    [(24, 24, (24, 8), 4), (24, 72, (24, 8), 4), (256, 256, None, 128)],
    ids=["24x24", "24x72", "256x256-default-blocks"],
)
def test_one_query_block_walks_the_causal_diagonal_in_finer_key_steps(
    T, S, blocks, diagonal_keys, monkeypatch
):
    """With one query block the forward steps over the causal diagonal DIAGONAL_KEYS
    keys at a time, each step computing only the queries that may see its keys (at
    T = 24 with key blocks of 8 and steps of 4: 24, 20, ..., 4 queries; at T = 256 with
    the default blocks and steps of 128: 256 and 128 queries). Forward and gradients
    (q, k, v and a bias, whose gradient covers the skipped pairs too) against the
    formula written with jax.numpy, with GQA."""
    monkeypatch.setattr(flash_forward, "DIAGONAL_KEYS", diagonal_keys)
    sizes = BlockSizes(*(blocks or (None, None)))
    cfg = block_config(T, S, 1.0, True, None, True, sizes)
    assert cfg.num_q_blocks == 1 and flash_forward.diagonal_keys(cfg) == diagonal_keys
    q, k, v = make_qkv(B=2, T=T, S=S, N=4, K=2, H=16)
    bias = normal(jax.random.key(5), (1, 4, T, S))
    causal = jnp.asarray(np.tril(np.ones((T, S), bool)))[None, None]
    scale = 0.25
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def grads(attention):
        def loss(q, k, v, bias):
            out = attention(q, k, v, bias)
            return jnp.sum(out * weights), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    chunked_blocks = {} if blocks is None else dict(block_q=blocks[0], block_k=blocks[1])
    got, out = grads(
        lambda q, k, v, bias: kit.chunked_attention(
            q, k, v, bias, scale=scale, is_causal=True, **chunked_blocks
        )
    )
    want, ref_out = grads(
        lambda q, k, v, bias: reference_attention(q, k, v, scale=scale, mask=causal, bias=bias)
    )
    fwd_tol, grad_tol = TOLERANCES[jnp.float32]
    chex.assert_trees_all_close(out, ref_out, atol=fwd_tol, rtol=fwd_tol)
    chex.assert_trees_all_close(got, want, atol=grad_tol, rtol=grad_tol)


def test_default_blocks_pad_each_length_alike_in_both_passes_and_by_little():
    """The default sizes' padded length is a multiple of every block size of its axis
    (both passes cover it in whole blocks), exceeds the length by less than 128 up to
    768 (by less than 8 up to 512) and by less than 512 above; multiples of 512 and
    lengths above 768 keep the tuned 512 x 256 forward and 256 x 512 backward. Hand-worked
    cases: T = 384 was padded to 768 and T = 300 to 4864 by the earlier rule."""
    for T, S in [(L, L) for L in range(1, 2100, 7)] + [(384, 2048), (2048, 300), (1, 700)]:
        (fq, fk), (bq, bk) = default_block_sizes(T, S), default_block_sizes(T, S, backward=True)
        cfg = block_config(T, S, 1.0, False, None, True)
        Tp, Sp = cfg.padded_lengths
        for length, padded, sizes in ((T, Tp, (fq, bq)), (S, Sp, (fk, bk))):
            assert all(padded % size == 0 and size % 8 == 0 for size in sizes), (T, S)
            slack = 8 if length <= 512 else 128 if length <= 768 else 512
            assert length <= padded < length + slack, (T, S, Tp, Sp)
        if T > 768 or T % 512 == 0:
            assert (fq, bq) == (512, 256), T
        if S > 768 or S % 512 == 0:
            assert (fk, bk) == (256, 512), S
    assert block_config(384, 384, 1.0, True, None, True).padded_lengths == (384, 384)
    assert block_config(300, 300, 1.0, True, None, True).padded_lengths == (304, 304)


@pytest.mark.parametrize(
    "T,blocks",
    [(5, (8, 8, 4, 4)), (37, (8, 16, 8, 16)), (37, (24, 8, 8, 24)), (300, None)],
    ids=["padded-rows-in-a-full-backward-block", "Tp!=Sp", "trimmed-diagonals", "default-300"],
)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "not-causal"])
def test_padded_self_attention_is_structural_only_when_causal_and_is_exact(T, blocks, is_causal):
    """Causal attention with T == S padded at the end: no live query sees a padded key,
    so the kernel runs the padded problem on its structural path (no masks but the
    diagonal's, padded rows live) and slices the padded rows off; without the causal
    mask every query sees the padded keys, which stay masked. Forward and gradients
    (q, k, v and a bias) against the formula written with jax.numpy, with GQA. At T = 5
    with forward blocks of 8 and backward blocks of 4, padded rows 5-7 meet key block 0
    in a backward block below the diagonal, which has no mask: had the forward masked
    them (no live key, lse = MASK_VALUE), exp(s - lse) would overflow there."""
    sizes = BlockSizes(*(blocks or (None,) * 4))
    cfg = block_config(T, T, 1.0, is_causal, None, True, sizes, padded_rows_live=True)
    Tp, Sp = cfg.padded_lengths
    assert cfg.structural_only == is_causal and Tp > T and Sp > T
    assert (Tp != Sp) == (blocks == (8, 16, 8, 16))
    q, k, v = make_qkv(B=2, T=T, S=T, N=4, K=2, H=16)
    bias = normal(jax.random.key(5), (1, 4, T, T))
    live = np.tril(np.ones((T, T), bool)) if is_causal else np.ones((T, T), bool)
    causal = jnp.asarray(live)[None, None]
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    kw = (
        {}
        if blocks is None
        else dict(
            zip(("block_q", "block_k", "backward_block_q", "backward_block_k"), blocks, strict=True)
        )
    )

    def grads(attention):
        def loss(q, k, v, bias):
            out = attention(q, k, v, bias)
            return jnp.sum(out * weights), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    got, out = grads(lambda *a: kit.chunked_attention(*a, scale=0.25, is_causal=is_causal, **kw))
    want, ref_out = grads(
        lambda q, k, v, bias: reference_attention(q, k, v, scale=0.25, mask=causal, bias=bias)
    )
    fwd_tol, grad_tol = TOLERANCES[jnp.float32]
    chex.assert_trees_all_close(out, ref_out, atol=fwd_tol, rtol=fwd_tol)
    chex.assert_trees_all_close(got, want, atol=grad_tol, rtol=grad_tol)


def test_loop_ranges_hold_every_live_block_and_skip_masks_only_on_full_ones():
    """Both passes' loop ranges (kv_range, _q_range: blocks.block_band) on random
    block configs, against the live pairs counted with numpy: every block with a live
    pair is inside its range, and the blocks a range runs without a mask have every
    pair live."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        bq, bk, nq, nk = rng.choice([1, 2, 3, 5, 8], 2).tolist() + rng.integers(1, 6, 2).tolist()
        causal, structural = bool(rng.random() < 0.5), bool(rng.random() < 0.3)
        window = None
        if not structural and rng.random() < 0.6:
            window = (int(rng.integers(0, 11)), int(rng.integers(-3, 11)))
        Tp, Sp = nq * bq, nk * bk
        cfg = block_config(Tp, Sp, 1.0, causal, window, structural, BlockSizes(bq, bk))
        q_len, kv_len = (Tp, Sp) if structural else rng.integers(0, [Tp + 1, Sp + 1]).tolist()
        t, s = np.arange(Tp)[:, None], np.arange(Sp)[None, :]
        live = (t < q_len) & (s < kv_len) & ((s <= t) | (not causal))
        if window is not None:
            live &= (s >= t - window[0]) & (s <= t + window[1])
        live = live.reshape(nq, bq, nk, bk)
        some, every = live.any(axis=(1, 3)), live.all(axis=(1, 3))
        lengths = jnp.int32(q_len), jnp.int32(kv_len)
        for i in range(nq):  # forward: [lo, full) without a mask, [full, hi) with one
            lo, full, hi = map(int, kv_range(cfg, jnp.int32(i), *lengths))
            assert all(lo <= j < hi for j in np.flatnonzero(some[i])), (cfg, i)
            assert every[i, lo:full].all(), (cfg, i)
        for j in range(nk):  # backward: [lo, full) with a mask, [full, hi) without
            lo, full, hi = map(int, _q_range(cfg, jnp.int32(j), *lengths))
            assert all(lo <= i < hi for i in np.flatnonzero(some[:, j])), (cfg, j)
            assert every[full:hi, j].all(), (cfg, j)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_chunked_unbatched_and_default_blocks():
    q, k, v = make_qkv(B=1, T=33, S=33, K=2)
    out = kit.chunked_attention(q[0], k[0], v[0], is_causal=True)
    expected = kit.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="xla")
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_chunked_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = make_qkv(T=20, S=20)
    mask = np.ones((2, 4, 20, 20), bool)
    mask[0, 2, 7] = False
    lengths = jnp.array([0, 12], jnp.int32)  # example 0 has no live key at all

    def f(q, k, v):
        return kit.chunked_attention(
            q, k, v, mask=jnp.asarray(mask), key_value_seq_lengths=lengths, block_q=8, block_k=8
        )

    out = f(q, k, v)
    assert np.all(np.asarray(out[0]) == 0.0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][0]) == 0.0)


def _jaxpr_arrays(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    sizes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            sizes.extend(
                int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")
            )
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return len(jaxpr.jaxpr.eqns), sizes


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_chunked_holds_no_score_matrix_and_compiles_to_loops(optimized):
    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(kit.chunked_attention(q, k, v, is_causal=True)))(
            q, k, v
        )

    shapes, temps = {}, {}
    for length in (4096, 16384):
        spec = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
        num_eqns, sizes = _jaxpr_arrays(fwd_bwd, spec, spec, spec)
        shapes[length] = num_eqns
        # Nothing anywhere in the program, loops included, is as large as one [T, S] head.
        assert max(sizes) < length * length // 16, max(sizes)
        compiled = jax.jit(fwd_bwd).lower(spec, spec, spec).compile()
        temps[length] = compiled.memory_analysis().temp_size_in_bytes
        assert temps[length] < length * length * 4 // 8, temps[length]
    # The program does not grow with T: the blocks are loops, not unrolled; and
    # XLA's scratch memory grows linearly (4x T -> at most ~4x), not quadratically.
    assert shapes[4096] == shapes[16384]
    assert temps[16384] < 5 * temps[4096], temps
    # The materialized path, by contrast, does hold [T, S].
    spec = jax.ShapeDtypeStruct((1, 4096, 2, 16), jnp.float32)
    _, xla_sizes = _jaxpr_arrays(
        lambda q, k, v: kit.dot_product_attention(q, k, v, implementation="xla"), spec, spec, spec
    )
    assert max(xla_sizes) >= 4096 * 4096


def test_implementation_dispatch_and_errors():
    q, k, v = make_qkv(T=16, S=16)
    with pytest.raises(ValueError, match=r"implementation: 'cudnn' needs a GPU backend"):
        kit.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match=r"dropout_rate: the 'chunked' implementation has no"):
        kit.dot_product_attention(
            q, k, v, implementation="chunked", dropout_rate=0.1, dropout_rng=jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"block_q: expected a positive int, got 0"):
        kit.chunked_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match=r"backward_block_k: expected a positive int, got 2.5"):
        kit.chunked_attention(q, k, v, backward_block_k=2.5)
    with pytest.raises(ValueError, match=r"units_per_step: expected a positive int"):
        kit.chunked_attention(q, k, v, units_per_step=-2)
    with pytest.raises(ValueError, match=r"key: batch must equal query's B = 2"):
        kit.chunked_attention(q, k[:1], v[:1])

    # None takes the chunked path (loops) for long sequences, xla for short, and agrees.
    def uses_loops(q, k, v):
        return "while" in str(jax.make_jaxpr(kit.dot_product_attention)(q, k, v))

    assert not uses_loops(q, k, v)
    q, k, v = make_qkv(B=1, T=1030, S=1030, N=2, K=1, H=8)
    assert uses_loops(q, k, v)
    auto = kit.dot_product_attention(q, k, v, is_causal=True)
    xla = kit.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    chex.assert_trees_all_close(auto, xla, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_chunked_under_vmap_equals_each_slice():
    # The kernel's custom_partitioning has no batching rule of its own; under vmap
    # it runs unpartitioned, forward and backward, and agrees slice by slice.
    q, k, v = make_qkv(B=3, T=20, S=20, K=2)
    lengths = jnp.array([20, 9, 0], jnp.int32)

    def loss(q, k, v, lengths):
        out = kit.chunked_attention(
            q[None], k[None], v[None], is_causal=True, key_value_seq_lengths=lengths[None]
        )
        return jnp.sum(jnp.sin(out))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.jit(jax.vmap(grad))(q, k, v, lengths)
    want = [jax.jit(grad)(q[b], k[b], v[b], lengths[b]) for b in range(3)]
    chex.assert_trees_all_close(got, jax.tree.map(lambda *x: jnp.stack(x), *want), atol=1e-5)
