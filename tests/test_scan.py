"""SCAN from its grammar: hand-checked translations, the published split sizes, a smoke run."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from kit import metrics, scan, tasks, training

pytestmark = pytest.mark.usefixtures("standard_promotion")

L, R = "I_TURN_LEFT", "I_TURN_RIGHT"

# Every construction of the grammar and their nesting, translated by hand.
HAND = {
    "jump": ["I_JUMP"],
    "turn left": [L],
    "turn right": [R],
    "walk left": [L, "I_WALK"],
    "look right": [R, "I_LOOK"],
    "run opposite left": [L, L, "I_RUN"],
    "turn opposite right": [R, R],
    "turn around left": [L] * 4,
    "jump around right": [R, "I_JUMP"] * 4,
    "walk twice": ["I_WALK"] * 2,
    "look thrice": ["I_LOOK"] * 3,
    "turn left twice": [L, L],
    "walk and run": ["I_WALK", "I_RUN"],
    "walk after run": ["I_RUN", "I_WALK"],
    "jump around left twice": [L, "I_JUMP"] * 8,
    "walk opposite right thrice after run": ["I_RUN", *[R, R, "I_WALK"] * 3],
    "turn around right twice and look opposite left thrice": [R] * 8 + [L, L, "I_LOOK"] * 3,
    "run left thrice after turn opposite right twice": [R, R] * 2 + [L, "I_RUN"] * 3,
}


def test_hand_checked_translations():
    pairs = dict(scan.scan_pairs())
    for command, actions in HAND.items():
        assert pairs[command] == " ".join(actions), command


def test_the_grammar_has_20910_distinct_commands():
    pairs = scan.scan_pairs()
    assert len(pairs) == len({c for c, _ in pairs}) == 20910
    assert max(len(c.split()) for c, _ in pairs) == 9
    assert max(len(a.split()) for _, a in pairs) == 48
    assert {w for c, _ in pairs for w in c.split()} == set(scan.COMMAND_WORDS)


@pytest.mark.parametrize(
    "name, sizes",
    [("simple", (16728, 4182)), ("length", (16990, 3920)), ("addprim_jump", (14670, 7706))],
)
def test_published_split_sizes(name, sizes):
    train, test = scan.scan_split(name)
    assert (len(train), len(test)) == sizes
    if name != "addprim_jump":  # disjoint commands
        assert not {c for c, _ in train} & {c for c, _ in test}


def test_length_split_boundaries():
    train, test = scan.scan_split("length")
    assert max(len(a.split()) for _, a in train) <= 22
    assert min(len(a.split()) for _, a in test) >= 24
    assert max(len(a.split()) for _, a in test) == 48


def test_addprim_jump_repeats_the_lone_jump_and_tests_every_other_jump():
    train, test = scan.scan_split("addprim_jump")
    with_jump = [c for c, _ in train if "jump" in c.split()]
    assert with_jump == ["jump"] * 1467
    assert all("jump" in c.split() and c != "jump" for c, _ in test)


def test_unknown_split_fails_at_start_naming_the_field():
    with pytest.raises(
        ValueError,
        match=r"config\.task\.split: expected one of \('simple', 'length', 'addprim_jump'\) "
        r"or 'length_<N>' with N in \[1, 47\], got 'random'",
    ):
        training.check_config(load_config("scan_simple", **{"task.split": "random"}))


def test_length_split_cutoffs():
    standard = scan.scan_split("length")
    assert scan.scan_split("length", cutoff=22) == standard == scan.scan_split("length_22")
    train, test = scan.scan_split("length_26")
    assert len(train) + len(test) == 20_910
    assert max(len(a.split()) for _, a in train) <= 26 < min(len(a.split()) for _, a in test)
    assert len(train) > len(standard[0])
    for bad in ({"name": "length", "cutoff": 0}, {"name": "simple", "cutoff": 26}):
        with pytest.raises(ValueError, match="cutoff: applies to a length split"):
            scan.scan_split(**bad)
    with pytest.raises(ValueError, match=r"task\.split: expected one of"):
        tasks.make_task("scan", split="length_48")


def test_length_split_test_set_parts():
    """3,144 test commands have a "U around D thrice" conjunct, never seen in training;
    the other 776 only recombine, with targets of 24, 25, 28 and 32 actions."""
    train, test = scan.scan_split("length")
    around = [scan.around_thrice(c) for c, _ in test]
    assert sum(around) == 3144 and len(test) - sum(around) == 776
    assert not any(scan.around_thrice(c) for c, _ in train)
    rest = [a for (_, a), x in zip(test, around, strict=True) if not x]
    lengths = collections.Counter(len(a.split()) for a in rest)
    assert lengths == {24: 328, 25: 256, 28: 64, 32: 128}
    groups = tasks.make_task("scan", split="length").eval_groups(0, 0)
    assert groups["around_thrice"].sum() == 3144 and groups["recombination"].sum() == 776
    assert tasks.make_task("scan", split="simple").eval_groups(0, 0) == {}


def test_batches_encode_the_split_and_are_a_pure_function_of_seed_and_step():
    task = tasks.make_task("scan", split="length")
    a, b = task.train_batch(1, 5, 32), task.train_batch(1, 5, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    train = dict(scan.scan_split("length")[0])
    for src, n, tgt, m in zip(a["src"], a["src_lengths"], a["tgt"], a["tgt_lengths"], strict=True):
        command = " ".join(task.tokens(src[:n]))
        assert train[command] == " ".join(task.tokens(tgt[:m]))


@pytest.mark.slow  # decodes all 3,920 test commands (once: an evaluation at the end)
def test_tiny_length_run_reports_exact_match_by_length(tiny_run):
    workdir = tiny_run("scan_length", **{"train.eval_batch_size": 1000, "train.eval_every": 4})
    evals = [
        line
        for line in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if "eval/exact_match" in line
    ]
    assert [line["step"] for line in evals] == [4]
    by_length = evals[-1]["eval/exact_match_by_length"]
    test = scan.scan_split("length")[1]
    assert set(by_length) == {str(len(a.split())) for _, a in test}
    counts = {n: sum(len(a.split()) == int(n) for _, a in test) for n in by_length}
    overall = sum(by_length[n] * counts[n] for n in by_length) / len(test)
    assert overall == pytest.approx(evals[-1]["eval/exact_match"], abs=1e-6)
    last = evals[-1]
    assert last["eval/count_around_thrice"] == 3144 and last["eval/count_recombination"] == 776
    parts = sum(
        last[f"eval/exact_match_{g}"] * last[f"eval/count_{g}"]
        for g in ("around_thrice", "recombination")
    )
    assert parts / len(test) == pytest.approx(last["eval/exact_match"], abs=1e-6)
    assert 0.0 <= last["eval/exact_match_oracle_length"] <= 1.0  # decoded to the true lengths


@pytest.mark.slow  # a fast neighbour covers the same code
def test_oracle_length_decoding_never_ends_early_and_ends_at_the_length():
    """With end-of-sequence made the model's favourite token, plain greedy decoding
    emits it at once; decoding to the true length emits it at no step before that
    length, and (still the favourite) right at it."""
    from flax import nnx

    from kit import models

    task = tasks.make_task("scan", split="length")
    cfg = models.ModelConfig(kind="encoder_decoder", vocab_size=task.vocab_size, d_model=16,
                             num_heads=2, num_layers=1, num_decoder_layers=1, d_ff=32,
                             max_len=64)  # fmt: skip
    graphdef, params = training.init_model(cfg, jax.random.key(0, impl="rbg"))
    model = nnx.merge(graphdef, params)
    model.head.bias[...] = model.head.bias[...].at[tasks.EOS].set(100.0)
    mb = models.MODELS["encoder_decoder"].batch(task.train_batch(0, 0, 6))
    mb = {k: jnp.asarray(v) for k, v in mb.items()}
    plain = np.asarray(model.predict(mb))
    oracle = np.asarray(model.predict(mb, oracle_length=True))
    assert np.all(plain[:, 0] == tasks.EOS)
    lengths = np.asarray(mb["weights"]).sum(axis=1) - 1
    for row, n in zip(oracle, lengths, strict=True):
        assert tasks.EOS not in row[:n] and row[n] == tasks.EOS


@pytest.mark.parametrize("name", ["simple", "length", "length_26", "addprim_jump"])
def test_validation_is_drawn_from_the_training_split_alone(name):
    """Cut from the split's training part alone (no test command is seen), as the
    split is cut: a length split's validation holds its last 4 training lengths;
    addprim_jump's every command with "look" but "look" alone, which training repeats
    1,467 times as it repeats "jump"; simple's a tenth of its training commands."""
    train, test = scan.scan_split(name)
    inner, validation = scan.scan_split(name, validation=True)
    extra = collections.Counter({("look", "I_LOOK"): 1466} if name == "addprim_jump" else {})
    cut_from = collections.Counter(inner) + collections.Counter(validation)
    assert cut_from == collections.Counter(train) + extra
    assert not set(validation) & set(test) and not set(validation) & set(inner)
    cut = scan.length_cutoff(name)
    if cut is not None:
        assert {len(a.split()) for _, a in validation} == {
            n for n in range(cut - 3, cut + 1) if any(len(a.split()) == n for _, a in train)
        }
        assert max(len(a.split()) for _, a in inner) <= cut - 4
    elif name == "addprim_jump":
        assert all("look" in c.split() and c != "look" for c, _ in validation)
        assert not any("look" in c.split() and c != "look" for c, _ in inner)
        assert not any("jump" in c.split() and c != "jump" for c, _ in inner)
        counts = collections.Counter(inner)
        assert counts[("look", "I_LOOK")] == counts[("jump", "I_JUMP")] == 1467
    else:
        assert len(validation) == round(0.1 * len(train))


def test_validation_runs_evaluate_the_validation_part(tmp_path):
    """task.validation: the held-out set is the validation part, without the test
    split's parts; on a task without published splits it fails naming the field."""
    task = tasks.make_task("scan", split="length", validation=True)
    held_out = task.eval_set(0, 0)
    validation = scan.scan_split("length", validation=True)[1]
    assert len(held_out["src"]) == len(validation)
    first = " ".join(task.tokens(held_out["src"][0][: held_out["src_lengths"][0]]))
    assert first == validation[0][0]
    assert task.eval_groups(0, 0) == {}
    with pytest.raises(ValueError, match=r"^config\.task\.validation: draws from a published"):
        training.check_config(load_config("copy", **{"task.validation": True}))
