"""Context parallelism: training with the sequence split over devices equals one device."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, slow_beyond
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import kit
from kit import sharding, training
from kit.attention import context
from kit.training.steps import init_model, train_model_batch

# optax's Adam is not strict-promotion clean: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("standard_promotion")


def dense_attention(q, k, v, q_side, k_side, causal, slopes):
    """softmax(q.k / sqrt(H) - slope_h |pos_k - pos_q|, masked) v, written out: the
    mask from the sides (live keys, same segment, causal by place), GQA by repeat."""
    N, H = q.shape[2:]
    G = N // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    distance = jnp.abs(k_side["positions"][:, None, :] - q_side["positions"][:, :, None])
    s = s - slopes[None, :, None, None] * distance[:, None].astype(s.dtype)
    live = k_side["live"][:, None, :] & (
        q_side["segments"][:, :, None] == k_side["segments"][:, None, :]
    )
    if causal:
        live = live & (k_side["index"][:, None, :] <= q_side["index"][:, :, None])
    s = jnp.where(live[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def score_fn(q_positions, k_positions, slopes):
    def score(s, b, h, q_idx, kv_idx):
        distance = jnp.abs(k_positions[b, kv_idx] - q_positions[b, q_idx])
        return s - slopes[h] * distance.astype(s.dtype)

    return score


@pytest.mark.parametrize(
    "strategy, causal, axis_type",
    slow_beyond(
        [
            ("ring", True, AxisType.Auto),
            ("all_gather", True, AxisType.Auto),
            ("ring", False, AxisType.Explicit),
            ("all_gather", False, AxisType.Explicit),
        ],
        [("ring", True, AxisType.Auto), ("all_gather", False, AxisType.Explicit)],
        several=True,
    ),
)
def test_split_attention_equals_the_formula(strategy, causal, axis_type):
    """Queries, keys and sides split over 4 devices (batch over 2), rows permuted into
    the zig-zag order, segments and dead keys, GQA, a score function with a learned
    per-head array (the causal ring in two head groups, so the array's head index
    is global): the output and the gradients of q, k, v and that array against the
    formula on the unpermuted rows."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"), (axis_type,) * 2)
    # the causal ring passes its two key/value heads one at a time (head_groups)
    split = context.SequenceSplit(
        mesh, strategy, head_groups=2 if causal and strategy == "ring" else 1
    )
    B, T, N, K, H = 2, 32, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    slopes = jnp.asarray(rng.uniform(0.1, 0.5, N), jnp.float32)
    places = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    side = {
        "index": places,
        "positions": places,
        "segments": jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32),
        "live": jnp.asarray(rng.random((B, T)) > 0.2) | (places == 0),
    }
    order = split.order(T, causal)
    inverse = np.argsort(order)
    w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)

    def split_loss(q, k, v, slopes):
        permuted = {name: x[:, order] for name, x in side.items()}
        q_side = {name: permuted[name] for name in ("index", "positions", "segments")}
        out = context.split_attention(
            split, q[:, order], k[:, order], v[:, order], q_side=q_side, k_side=permuted,
            causal=causal, score_fn=score_fn, extras=(slopes,),
        )  # fmt: skip
        # On Explicit axes the output's split is in its type: gathered to permute back.
        out = jax.sharding.reshard(out, NamedSharding(mesh, PartitionSpec()))
        return jnp.sum(out[:, inverse] * w), out[:, inverse]

    def dense_loss(q, k, v, slopes):
        out = dense_attention(q, k, v, side, side, causal, slopes)
        out = jnp.where(jnp.isnan(out), 0.0, out)  # rows with no live key: zero
        return jnp.sum(out * w), out

    (_, got), got_grads = jax.jit(
        jax.value_and_grad(split_loss, argnums=(0, 1, 2, 3), has_aux=True)
    )(q, k, v, slopes)
    (_, want), want_grads = jax.jit(
        jax.value_and_grad(dense_loss, argnums=(0, 1, 2, 3), has_aux=True)
    )(q, k, v, slopes)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for name, g, want_g in zip("qkv", got_grads, want_grads, strict=False):
        np.testing.assert_allclose(g, want_g, atol=5e-6, err_msg=name)
    np.testing.assert_allclose(got_grads[3], want_grads[3], rtol=1e-5, err_msg="slopes")


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_zigzag_order_balances_causal_work(parts):
    """Each device's slots hold chunks i and 2P-1-i; counted from an explicit causal
    mask, every device then has the same live (query, key) pairs and the same live
    blocks (`live_blocks_per_device`), where contiguous slots do not."""
    L, block = 64 * parts, 16
    order = context.zigzag_order(L, parts)
    assert sorted(order) == list(range(L))
    chunks = order.reshape(parts, 2, -1)
    chunk = L // (2 * parts)
    for i in range(parts):
        assert list(chunks[i, 0]) == list(range(i * chunk, (i + 1) * chunk))
        j = 2 * parts - 1 - i
        assert list(chunks[i, 1]) == list(range(j * chunk, (j + 1) * chunk))

    def pairs(order):  # live pairs per device from the dense causal mask
        live = order[None, :] <= order[:, None]  # [query slot, key slot]
        return live.reshape(parts, -1, L).sum(axis=(1, 2))

    def blocks(order):  # live (query block, key block) pairs per device, by brute force
        live = order[None, :] <= order[:, None]
        tiles = live.reshape(L // block, block, L // block, block).any(axis=(1, 3))
        return tiles.reshape(parts, -1, L // block).sum(axis=(1, 2))

    zig, flat = pairs(order), pairs(np.arange(L))
    assert len(set(zig.tolist())) == 1
    assert flat.max() / flat.mean() > 1.3
    np.testing.assert_array_equal(
        context.live_blocks_per_device(order, parts, block), blocks(order)
    )
    contiguous = context.live_blocks_per_device(np.arange(L), parts, block)
    np.testing.assert_array_equal(contiguous, blocks(np.arange(L)))
    assert len(set(blocks(order).tolist())) == 1
    assert contiguous.max() / contiguous.mean() > 1.3


def step_losses(config, steps=3):
    """The losses of `steps` train steps of `config` (its mesh), straight from the
    train step (no evaluation, no checkpoints)."""
    s = training.setup(config)
    _, params = init_model(s.mcfg, jax.random.key(config.seed), s.state_shardings["params"])
    state = jax.jit(s.trainer.init_state, out_shardings=s.state_shardings)(params)
    step = jax.jit(s.trainer.train_step, out_shardings=(s.state_shardings, s.replicated))
    span = config.task.pack_span if config.task.get("pack", False) else 0
    losses = []
    for i in range(steps):
        mb = train_model_batch(s.task, s.kind, config.seed, i, config.train.batch_size, span)
        state, metrics = step(state, sharding.put_batch(mb, s.batch_sharding), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


SPLIT_RUNS = [
    # (model kind, task length, positions, packed, mesh (data, seq), strategy): both
    # kinds under both strategies, packed and not, seq 4 and 8, four position kinds
    # (sinusoidal: the checkpoint test below; segments under both strategies: the
    # formula test above)
    ("decoder_only", 5, "alibi", False, (2, 4), "ring"),
    ("decoder_only", 5, "rope", False, (1, 4), "all_gather"),
    ("encoder_decoder", 8, "t5", True, (2, 4), "ring"),
    ("encoder_decoder", 8, "learned", False, (1, 8), "all_gather"),
]


@pytest.mark.parametrize(
    "kind, length, positions, packed, mesh, strategy",
    slow_beyond(SPLIT_RUNS, SPLIT_RUNS[:1], several=True),
)
def test_training_with_the_sequence_split_equals_one_device(
    kind, length, positions, packed, mesh, strategy
):
    """Three training steps on the sequence split over devices (causal rows in the
    zig-zag order) give one device's losses step by step, to float32 rounding."""
    base = {
        "model.kind": kind,
        "model.positions": positions,
        "task.length": length,
        "train.batch_size": 8,
    }
    if packed:
        base.update({"task.pack": True, "task.pack_span": 2})
    one = step_losses(load_config("copy", **base))
    data, seq = mesh
    split = {"mesh.data": data, "mesh.seq": seq, "model.context_strategy": strategy}
    got = step_losses(load_config("copy", **base, **split))
    np.testing.assert_allclose(got, one, rtol=2e-6)
    assert len(set(one.tolist())) == 3  # the steps learned something


@pytest.mark.slow
def test_balance_off_and_a_checkpoint_resumes_on_another_mesh(tmp_path):
    """A run on mesh seq=4 (contiguous rows, no zig-zag) saves at step 2; resumed on
    one device it reaches step 4 with the uninterrupted one-device run's losses."""
    base = {"model.kind": "decoder_only", "task.length": 5, "train.steps": 4}
    whole = str(tmp_path / "whole")
    training.train_and_evaluate(load_config("copy", **base), whole, progress=False)
    split = str(tmp_path / "split")
    first = {
        "mesh.seq": 4,
        "model.context_strategy": "ring",
        "model.context_balance": False,
        "model.context_head_groups": 2,
    }
    config = load_config("copy", **base, **first)
    config.train.steps = 2
    training.train_and_evaluate(config, split, progress=False)
    training.train_and_evaluate(load_config("copy", **base), split, progress=False)

    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    want, got = losses(whole), losses(split)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-6
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.context_strategy": "ulysses"},
            r"config\.model\.context_strategy: expected one of",
        ),
        (
            {"model.kind": "encoder_only", "task.name": "sort"},
            r"config\.model\.kind: encoder_only does not",
        ),
        ({"model.dropout_rate": 0.1}, r"config\.model\.dropout_rate: attention dropout"),
        (
            {"model.max_len": 11},
            r"config\.model\.max_len: the sequence split pads the row sequence from 11 to 16",
        ),
        ({"mesh.seq": 3}, r"config\.mesh\.seq: 3 does not divide the 8 devices"),
    ],
)
def test_split_mistakes_fail_at_start_naming_the_field(tmp_path, overrides, message):
    """Bad split settings stop before anything is compiled or written."""
    config = load_config(
        "copy", **{"model.kind": "decoder_only", "task.length": 5, "mesh.data": -1, "mesh.seq": 4}
    )
    config.update_from_flattened_dict(overrides)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(config, str(workdir), progress=False)
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("causal", [True, False])
def test_block_states_from_summaries_are_sound_and_exact_where_they_can_be(causal):
    """`side_block_mask`'s states against the mask function evaluated on every pair
    (`kit.create_block_mask`): never full where a pair is dead, never dead where one
    is live; with places in the zig-zag order and every key live (no segments) the
    summaries are exact, and they equal the evaluated states block for block."""
    B, T, blocks = 2, 64, (8, 8)
    rng = np.random.default_rng(3)
    order = jnp.asarray(context.zigzag_order(T, 4))
    places = jnp.broadcast_to(order, (B, T))
    segments = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)[:, order]
    live = jnp.asarray(rng.random((B, T)) > 0.1)
    for side in (
        {"index": places, "segments": segments, "live": live},
        {"index": places},
    ):
        got = context.side_block_mask(side, side, causal, T, T, blocks)
        want = kit.create_block_mask(got.mask_mod, B, None, T, T, block_size=blocks)
        got_states, want_states = np.asarray(got.states), np.asarray(want.states)
        assert not np.any((got_states == 2) & (want_states != 2))
        assert not np.any((got_states == 0) & (want_states != 0))
        if len(side) == 1:
            np.testing.assert_array_equal(got_states, want_states)
            assert {0, 2} <= set(np.unique(want_states).tolist()) or not causal
