"""kit.analysis.interp (pattern scores, value-weighted norms, rollout) and head ablation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jitted, slow_beyond, tiny_model

from kit import decode
from kit.analysis import interp
from kit.attention.projections import ablate_heads

# ---------------------------------------------------------------------------
# Patterns and scores on hand-made attention arrays.


def one_hot_rows(targets, S):
    """Attention `[T, S]` that puts all of row t on key targets[t]."""
    a = np.zeros((len(targets), S))
    a[np.arange(len(targets)), targets] = 1.0
    return a


def test_patterns_by_hand():
    tokens = np.array([5, 6, 5, 6, 7])
    prev = interp.previous_token_pattern(tokens)
    assert [tuple(x) for x in np.argwhere(prev)] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    dup = interp.duplicate_token_pattern(tokens)
    assert [tuple(x) for x in np.argwhere(dup)] == [(2, 0), (3, 1)]
    # Query 2 holds 5; the token after the earlier 5 (position 0) is position 1.
    ind = interp.induction_pattern(tokens)
    assert [tuple(x) for x in np.argwhere(ind)] == [(2, 1), (3, 2)]
    first = interp.first_token_pattern(tokens)
    assert first[:, 0].all() and not first[:, 1:].any()
    # Ignored tokens (padding) take no part, as query or key.
    assert not interp.first_token_pattern(np.array([0, 4, 0]), ignore=[0])[[0, 2]].any()


def test_cross_attention_patterns():
    # Cross: a key equal to the query anywhere, and the key after such a copy.
    q, k = np.array([1, 2]), np.array([2, 1, 3])
    assert [tuple(x) for x in np.argwhere(interp.duplicate_token_pattern(q, k))] == [
        (0, 1),
        (1, 0),
    ]
    assert [tuple(x) for x in np.argwhere(interp.induction_pattern(q, k))] == [(0, 2), (1, 1)]


def test_scores_of_ideal_heads():
    """Four heads that each do one job exactly score 1 on their own pattern."""
    tokens = np.array([3, 4, 5, 3, 4, 5])
    T = len(tokens)
    induction_targets = [0, 0, 0, 1, 2, 3]  # rows 0..2 have no earlier copy
    heads = np.stack(
        [
            one_hot_rows([0, *range(T - 1)], T),  # previous token (row 0 -> 0)
            one_hot_rows([0, 1, 2, 0, 1, 2], T),  # duplicate (rows 3..5)
            one_hot_rows(induction_targets, T),
            one_hot_rows([0] * T, T),  # first token
        ]
    )[None]  # [L=1, N=4, T, T]
    scores = interp.head_scores(heads, tokens)
    assert scores["previous_token"][0, 0] == 1.0
    assert scores["duplicate_token"][0, 1] == 1.0
    assert scores["induction"][0, 2] == 1.0
    assert scores["first_token"][0, 3] == 1.0
    # The induction head's previous-token score: of rows 1..5 only row 1 (on key 0) hits t - 1.
    assert scores["previous_token"][0, 2] == pytest.approx(1 / 5)
    for name in interp.SCORES:  # the abs variant agrees on exact heads
        abs_scores = interp.head_scores(heads, tokens, mode="abs")[name]
        mul_scores = interp.head_scores(heads, tokens)[name]
        exact = mul_scores == 1.0
        np.testing.assert_allclose(abs_scores[exact], 1.0)


def test_score_formulas_on_a_mixed_head():
    # Row t spreads 0.5 on t - 1 and 0.5 on 0 (row 0: all on 0; row 1: 0 and t - 1 coincide).
    T = 4
    a = np.zeros((T, T))
    a[0, 0] = 1.0
    a[1, 0] = 1.0
    for t in (2, 3):
        a[t, 0] = a[t, t - 1] = 0.5
    w = a[None, None]
    prev = interp.previous_token_pattern(np.arange(T))
    # mul: rows 1..3 have the pattern: masses 1, 0.5, 0.5.
    assert interp.pattern_score(w, prev)[0, 0] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # Excluding the first token renormalizes what is left: rows 2 and 3 are all on t - 1,
    # row 1 (whose only pattern key is 0) drops out.
    assert interp.pattern_score(w, prev, exclude_first_token=True)[0, 0] == pytest.approx(1.0)
    # abs: total-variation distance 0 on row 1 and 0.5 on rows 2, 3.
    assert interp.pattern_score(w, prev, mode="abs")[0, 0] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # A user pattern [T, S] and a batch of two examples with per-example patterns.
    user = np.zeros((T, T), bool)
    user[:, 0] = True
    batched = np.stack([w[0], w[0]])[:, :, :]  # [B, L, N, T, S] with L = N = 1
    assert interp.pattern_score(batched[:, None][:, 0][:, None], user)[0, 0] == pytest.approx(
        (1 + 1 + 0.5 + 0.5) / 4
    )
    assert np.isnan(interp.pattern_score(w, np.zeros((T, T))))[0, 0]


def test_exclude_current_token():
    a = np.eye(3)[None, None] * 0.5 + np.eye(3, k=-1)[None, None] * 0.5
    a[0, 0, 0, 0] = 1.0
    pattern = interp.previous_token_pattern(np.arange(3))
    assert interp.pattern_score(a, pattern)[0, 0] == pytest.approx(0.5)
    assert interp.pattern_score(a, pattern, exclude_current_token=True)[0, 0] == 1.0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda w: interp.pattern_score(w, np.zeros((3, 4))), "pattern"),
        (lambda w: interp.pattern_score(w, np.full((4, 4), 2.0)), "pattern"),
        (lambda w: interp.pattern_score(w, np.zeros((4, 4)), mode="max"), "mode"),
        (
            lambda w: interp.pattern_score(
                w[..., :3], np.zeros((4, 3)), exclude_current_token=True
            ),
            "exclude_current_token",
        ),
        (lambda w: interp.pattern_score(w[0, 0], np.zeros((4, 4))), "weights"),
        (lambda w: interp.value_weighted(w, np.ones((2, 2, 3))), "value_norms"),
        (lambda w: interp.attention_rollout(w, head_fusion="median"), "head_fusion"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    w = np.full((2, 2, 4, 4), 0.25)
    with pytest.raises(ValueError, match=f"^{name}:"):
        call(w)


def test_value_weighted_and_rollout():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(5), size=(2, 3, 5))  # [L, N, T, S]
    norms = rng.uniform(0, 2, size=(2, 3, 5))
    vw = interp.value_weighted(w, norms)
    for l, n, t, s in itertools.product(range(2), range(3), range(5), range(5)):
        assert vw[l, n, t, s] == pytest.approx(w[l, n, t, s] * norms[l, n, s])
    # Max fusion by hand for two layers.
    fused = w.max(axis=1)
    fused = fused / fused.sum(-1, keepdims=True)
    hat = [0.5 * f + 0.5 * np.eye(5) for f in fused]
    hat = [h / h.sum(-1, keepdims=True) for h in hat]
    np.testing.assert_allclose(interp.attention_rollout(w, head_fusion="max"), hat[1] @ hat[0])


def test_ablation_mask_and_its_errors():
    shapes = {"encoder": (2, 3), "cross": (1, 3)}
    m = interp.ablation_mask(shapes, "encoder", layer=1, head=2)
    assert m["encoder"].sum() == 5 and m["encoder"][1, 2] == 0 and m["cross"].all()
    assert interp.ablation_mask(shapes, "encoder", layer=0)["encoder"][0].sum() == 0
    assert interp.ablation_mask(shapes, "cross")["cross"].sum() == 0
    for kwargs, name in (
        ({"layer": 2}, "layer"),
        ({"layer": 0, "head": 3}, "head"),
        ({"layer": -1}, "layer"),
        ({"head": 0}, "layer"),
    ):
        with pytest.raises(ValueError, match=f"^{name}:"):
            interp.ablation_mask(shapes, "encoder", **kwargs)
    with pytest.raises(ValueError, match=r"^name:"):
        interp.ablation_mask(shapes, "decoder")


# ---------------------------------------------------------------------------
# Head ablation in the models (model.head_ablation: hooks on each head's output).


def build(kind, **overrides):
    return tiny_model(kind, **overrides)


def batch(B=3, T=6, seed=1):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, 12, size=(B, T)).astype(np.int32)
    lengths = np.array([T, T - 2, T - 1][:B], np.int32)
    return jnp.asarray(src), jnp.asarray(lengths)


def ones(model):
    return {n: jnp.ones(s, jnp.float32) for n, s in model.attention_shapes().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, mode", [("encoder_only", "zero"), ("encoder_only", "mean"), ("encoder_decoder", "zero")]
)
def test_mask_of_ones_is_bit_for_bit(kind, mode):
    model = build(kind)
    src, lengths = batch()
    args = (src, lengths) if kind == "encoder_only" else (src, lengths, src[:, :5])
    plain, _ = model(*args)
    masked, _ = model(*args, hooks=model.head_ablation(ones(model), mode))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(masked))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, h: nnx.merge(graphdef, p)(*args, hooks=h)[0])
    plain_jit = jax.jit(lambda p: nnx.merge(graphdef, p)(*args)[0])
    np.testing.assert_array_equal(
        np.asarray(plain_jit(params)),
        np.asarray(run(params, model.head_ablation(ones(model), mode))),
    )


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_ablating_a_layer_equals_a_hand_built_forward():
    """Every head of encoder layer 1 ablated == that layer's attention replaced by its
    output bias, the rest of the forward written out from the model's parts."""
    model = build("encoder_only")
    src, lengths = batch()
    mask = interp.ablation_mask(model.attention_shapes(), "encoder", layer=1)
    logits, _ = model(src, lengths, hooks=model.head_ablation(mask))

    positions = jnp.broadcast_to(jnp.arange(src.shape[1]), src.shape)
    x = model.embed(src, positions)
    for i, layer in enumerate(model.encoder.layers):
        if i == 1:
            h = jnp.broadcast_to(layer.self_attention.out["bias"][...], x.shape)
        else:
            h = layer.self_attention(layer.norm_self(x), key_value_seq_lengths=lengths)
        x = x + h
        x = x + layer.feed_forward(layer.norm_ff(x))
    expected = model.head(model.encoder.norm(x))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
    plain, _ = model(src, lengths)
    assert not np.allclose(np.asarray(plain), np.asarray(expected), atol=1e-3)


def test_mean_ablation_on_identical_rows_changes_nothing():
    """The batch mean of identical examples is each example: mean ablation is a no-op,
    zero ablation is not."""
    model = build("encoder_only")
    src, lengths = batch(B=1)
    src, lengths = jnp.repeat(src, 3, axis=0), jnp.repeat(lengths, 3)
    mask = interp.ablation_mask(model.attention_shapes(), "encoder", layer=0, head=1)
    plain, mean, zero = jitted(
        model,
        lambda m: [
            m(src, lengths, hooks=hooks)[0]
            for hooks in (None, m.head_ablation(mask, "mean"), m.head_ablation(mask, "zero"))
        ],
    )
    np.testing.assert_allclose(np.asarray(mean), np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(zero), np.asarray(plain), atol=1e-4)


def test_ablate_heads_by_hand():
    out = np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2)
    m = np.array([1.0, 0.0, 0.5], np.float32)
    zero = np.asarray(ablate_heads(jnp.asarray(out), m, "zero"))
    np.testing.assert_array_equal(zero, out * m[:, None])
    mean = np.asarray(ablate_heads(jnp.asarray(out), m, "mean"))
    np.testing.assert_allclose(mean, out * m[:, None] + (1 - m[:, None]) * out.mean(0))


@pytest.mark.parametrize("kind", slow_beyond(["decoder_only", "encoder_decoder"], []))
def test_kv_cache_path_ablates_like_the_teacher_forced_path(kind):
    """Greedy decoding through the KV cache with a head ablated gives the tokens that
    the teacher-forced pass with the same mask predicts at every step."""
    model = build(kind)
    src, lengths = batch()
    ablated = interp.ablation_mask(model.attention_shapes(), "decoder", layer=0, head=0)

    def run(model):  # under one jit: eager dispatch of the decoding steps dominated
        mask = model.head_ablation(ablated)
        if kind == "decoder_only":
            key_mask = jnp.ones(src.shape, bool)
            out = decode.greedy_decoder_only(model, src, key_mask, length=4, hooks=mask)
            full = jnp.concatenate([src, out], axis=1)
            logits, _ = model(full, jnp.ones(full.shape, bool), hooks=mask)
            forced = jnp.argmax(logits[:, src.shape[1] - 1 : -1], axis=-1)
            plain = decode.greedy_decoder_only(model, src, key_mask, length=4)
        else:
            out = decode.greedy_encoder_decoder(model, src, lengths, bos=1, length=4, hooks=mask)
            tgt_in = jnp.concatenate([jnp.ones((src.shape[0], 1), jnp.int32), out[:, :-1]], 1)
            logits, _ = model(src, lengths, tgt_in, hooks=mask)
            forced = jnp.argmax(logits, axis=-1)
            plain = decode.greedy_encoder_decoder(model, src, lengths, bos=1, length=4)
        return out, forced, plain

    out, forced, plain = jitted(model, run)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(forced))
    del plain  # the unablated decode runs too: the mask is optional on this path


def test_changing_the_mask_does_not_recompile():
    model = build("decoder_only")
    graphdef, params = nnx.split(model)
    src, _ = batch()
    traces = []

    @jax.jit
    def run(p, m):
        traces.append(1)
        return nnx.merge(graphdef, p)(src, jnp.ones(src.shape, bool), hooks=m)[0]

    shapes = model.attention_shapes()
    a = run(params, model.head_ablation(interp.ablation_mask(shapes, "decoder", layer=0, head=0)))
    b = run(params, model.head_ablation(interp.ablation_mask(shapes, "decoder", layer=1, head=1)))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "head_mask, match",
    [
        ({"encoder": np.ones((2, 3), np.float32)}, r"head_mask\['encoder'\]: expected shape"),
        ({"encoder": np.ones((2, 2), np.int32)}, r"head_mask\['encoder'\]: expected bool or float"),
        ({"decoder": np.ones((2, 2), np.float32)}, r"head_mask: unknown attention set"),
        (np.ones((2, 2), np.float32), r"head_mask: expected a dict"),
    ],
)
def test_bad_head_masks(head_mask, match):
    model = build("encoder_only")
    src, lengths = batch()
    with pytest.raises(ValueError, match=match):
        model.head_ablation(head_mask)
    with pytest.raises(ValueError, match=r"^mode:"):
        model.head_ablation(ones(model), "random")
    del src, lengths


@pytest.mark.slow  # tests/test_probe.py checks the fast case: vectors reproduce the weights
def test_vectors_reproduce_the_weights_and_the_value_norms():
    """The attention hooks read what attention used: softmax(q k / sqrt(H)) from them
    equals the weights read, and the value norms equal ||v W_O|| by hand."""
    model = build("encoder_decoder", positions="rope", num_kv_heads=1)
    src, lengths = batch()
    tgt = src[:, :5]
    _, aux = jitted(model, lambda m: m(src, lengths, tgt, hooks=m.attention_hooks()))
    aux = model.attention_sets(aux["activations"])
    vec = aux["vectors"]["decoder"]
    q, k = np.asarray(vec["query"], np.float64), np.asarray(vec["key"], np.float64)
    T, N, H = q.shape[2:]  # q [B, L, T, N, H]
    k = np.repeat(k, N, axis=3)  # GQA: one kv head for N query heads
    logits = np.einsum("bltnh,blsnh->blnts", q, k) / np.sqrt(H)
    causal = np.tril(np.ones((T, T), bool))
    logits = np.where(causal, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, np.asarray(aux["decoder"]), rtol=1e-4, atol=1e-6)
    layer = model.decoder.layers[0].self_attention
    v = np.asarray(vec["value"][:, 0], np.float64)  # layer 0: [B, S, 1, H]
    wo = np.asarray(layer.out["kernel"][...], np.float64)  # [N, H, D]
    by_hand = np.linalg.norm(np.einsum("bsh,nhd->bnsd", v[:, :, 0], wo), axis=-1)
    np.testing.assert_allclose(np.asarray(vec["value_norms"][:, 0]), by_hand, rtol=1e-5)
    assert set(aux["vectors"]) == {"encoder", "decoder", "cross"}


# --------------------------------------------------------------------------
# attention_rollout


def test_attention_rollout_hand_computed():
    # Layer 1: heads [[1, 0], [.5, .5]] and [[0, 1], [.5, .5]] average to all 0.5;
    #   0.5 * A + 0.5 * I = [[.75, .25], [.25, .75]].
    # Layer 2: both heads [[1, 0], [1, 0]]; 0.5 * A + 0.5 * I = [[1, 0], [.5, .5]].
    # R = A2 @ A1 = [[.75, .25], [.5 * .75 + .5 * .25, .5 * .25 + .5 * .75]]
    #             = [[.75, .25], [.5, .5]]
    # (the other order, A1 @ A2, would give [[.875, .125], [.625, .375]]).
    # Without the residual: [[1, 0], [1, 0]] @ [[.5, .5], [.5, .5]] = all 0.5.
    weights = np.array(
        [
            [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]],
            [[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
        ]
    )  # [L=2, N=2, T=2, T=2]
    np.testing.assert_allclose(interp.attention_rollout(weights), [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(
        interp.attention_rollout(weights, residual=False), np.full((2, 2), 0.5)
    )


def test_attention_rollout_properties():
    batched = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3, 4, 5))
    rollout = interp.attention_rollout(jnp.asarray(batched, jnp.float32))  # [B, L, N, T, T]
    assert rollout.shape == (2, 5, 5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-6)
    assert (rollout >= 0).all()
    for b in range(2):
        np.testing.assert_allclose(interp.attention_rollout(batched[b]), rollout[b], rtol=1e-6)
    one_layer = interp.attention_rollout(batched[0, :1])
    np.testing.assert_allclose(one_layer, 0.5 * batched[0, 0].mean(0) + 0.5 * np.eye(5))
    # A fully masked query row (all zero weights) keeps to itself instead of vanishing.
    masked = batched[0].copy()
    masked[:, :, 2] = 0.0
    np.testing.assert_allclose(interp.attention_rollout(masked).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 2, 3, 4), r"weights: expected self-attention with T = S.*T=3, S=4"),
        ((2, 3, 3), r"weights: expected rank 4 .*given rank 3"),
    ],
)
def test_attention_rollout_rejects_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        interp.attention_rollout(np.ones(shape))
