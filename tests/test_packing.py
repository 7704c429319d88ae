"""Packed training rows: each packed example gets the logits it gets alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import WIDER, load_config, normal, slow_beyond, tiny_params

from kit import metrics, models, tasks, training
from kit.models import packing

POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "t5"]


def _model(kind, task, positions):
    graphdef, params = tiny_params(
        kind, **WIDER, vocab_size=task.vocab_size, max_len=64, positions=positions
    )
    # T5's tables start at zero: make them matter.
    params = jax.tree.map_with_path(
        lambda path, x: (
            normal(jax.random.key(1), x.shape) if "t5" in jax.tree_util.keystr(path) else x
        ),
        params,
    )
    return graphdef, params


def _examples_of(packed):
    """(row, slice of each sequence) of every packed example, in packing order."""
    names = [k[: -len("_segments")] for k in packed if k.endswith("_segments")]
    out = []
    for row in range(packed[f"{names[0]}_segments"].shape[0]):
        for seg in range(1, packed[f"{names[0]}_segments"][row].max() + 1):
            where = {n: np.flatnonzero(packed[f"{n}_segments"][row] == seg) for n in names}
            out.append((row, where))
    return out


# Every encoding on the encoder-decoder, whose encoder is the encoder-only model's stack
# and whose decoder packs both self- and cross-attention; the encoder-only model once.
CASES = [("encoder_decoder", "scan", p) for p in POSITIONS] + [("encoder_only", "copy", "alibi")]


@pytest.mark.parametrize(
    "kind, task_name, positions", slow_beyond(CASES, [CASES[-1]], several=True), ids=str
)
def test_packed_logits_equal_the_separate_examples(kind, task_name, positions):
    task = tasks.make_task(task_name, length=8, num_symbols=6, split="simple")
    mb = models.MODELS[kind].batch(task.train_batch(0, 3, 12))
    widths = packing.row_widths(mb, models.MODELS[kind].PACKED, span=3)
    packed = models.MODELS[kind].pack(mb, rows=3, widths=widths)
    placed = _examples_of(packed)
    assert len(placed) > 3  # more examples than rows: something was packed
    graphdef, params = _model(kind, task, positions)

    @jax.jit
    def logits(params, batch):
        return nnx.merge(graphdef, params).teacher_forced(batch)[0]

    alone = logits(params, {k: jnp.asarray(v) for k, v in mb.items()})
    together = logits(params, {k: jnp.asarray(v) for k, v in packed.items()})
    alone, together = np.asarray(alone), np.asarray(together)  # indexed on the host below
    target = "tgt" if kind == "encoder_decoder" else "src"
    for i, (row, where) in enumerate(placed):
        n = len(where[target])
        np.testing.assert_allclose(together[row, where[target]], alone[i, :n], atol=1e-5)
        # The packed targets and weights are the example's own.
        np.testing.assert_array_equal(packed["targets"][row, where[target]], mb["targets"][i, :n])
        assert packed["weights"][row, where[target]].all()


def test_pack_fills_rows_in_order_and_pads_the_rest():
    mb = {
        "src": np.array([[5, 6, 0], [7, 0, 0], [8, 9, 10]], np.int32),
        "src_lengths": np.array([2, 1, 3], np.int32),
    }
    packed = packing.pack(mb, {"src": ("src_lengths", "src")}, rows=2, widths=(3,))
    # Example 0 (2 tokens) and example 1 (1 token) share row 0; example 2 fills row 1.
    np.testing.assert_array_equal(packed["src"], [[5, 6, 7], [8, 9, 10]])
    np.testing.assert_array_equal(packed["src_segments"], [[1, 1, 2], [1, 1, 1]])
    np.testing.assert_array_equal(packed["src_positions"], [[0, 1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(packed["src_lengths"], [3, 3])


def test_pack_config_is_checked():
    config = load_config("copy", **{"task.pack": True, "model.kind": "decoder_only"})
    with pytest.raises(ValueError, match=r"config\.task\.pack: packs token examples"):
        training.check_config(config)
    config = load_config("copy", **{"task.pack": True, "task.pack_span": 3})
    with pytest.raises(ValueError, match=r"config\.task\.pack_span: must divide"):
        training.check_config(config)


@pytest.mark.slow
def test_packed_training_runs_and_evaluates(tmp_path, standard_promotion):
    # The held-out split is SCAN's 4,182 commands: in batches of 8 the evaluation
    # dispatched 523 decodes (18.8 s of the test), in batches of 1,100 it takes 4.
    overrides = {"task.pack": True, "task.pack_span": 2, "train.eval_batch_size": 1100}
    config = load_config("scan_simple", **overrides)
    training.train_and_evaluate(config, str(tmp_path), progress=False)
    lines = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    assert all(np.isfinite(line["eval/loss"]) for line in lines if "eval/loss" in line)
