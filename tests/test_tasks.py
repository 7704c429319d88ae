"""kit.tasks: deterministic batches, correct targets, held-out sets disjoint from training."""

import dataclasses
import datetime

import numpy as np
import pytest
from helpers import load_config

from kit import tasks, training


@pytest.mark.parametrize("name", ["copy", "reverse", "sort", "dates", "pronoun"])
def test_batches_are_a_pure_function_of_seed_and_step(name):
    task = tasks.make_task(name)
    a = task.train_batch(0, 5, 16)
    b = task.train_batch(0, 5, 16)
    c = task.train_batch(0, 6, 16)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["src"], c["src"])


@pytest.mark.parametrize(
    "name, fn",
    [("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", np.sort)],
)
def test_symbol_task_targets(name, fn):
    task = tasks.make_task(name, length=12, num_symbols=7)
    batch = task.train_batch(1, 0, 32)
    assert batch["src"].min() >= len(tasks.SPECIALS)
    assert batch["src"].max() < len(tasks.SPECIALS) + 7
    for s, t in zip(batch["src"], batch["tgt"], strict=True):
        np.testing.assert_array_equal(t, fn(s))


def test_dates_targets_are_the_iso_date_of_the_source():
    task = tasks.make_task("dates")
    batch = task.train_batch(0, 0, 64)
    for src, n, tgt in zip(batch["src"], batch["src_lengths"], batch["tgt"], strict=True):
        text, iso = task.decode(src[:n]), task.decode(tgt)
        date = datetime.date.fromisoformat(iso)
        assert text in {tasks.format_date(date, s) for s in range(tasks.NUM_DATE_STYLES)}
    assert tasks.format_date(datetime.date(2021, 3, 3), 0) == "3rd of March 2021"
    assert tasks.format_date(datetime.date(2021, 3, 3), 3) == "Wednesday, March 3, 2021"
    assert tasks.format_date(datetime.date(2021, 3, 3), 2) == "03.03.21"


def test_dates_held_out_shares_no_source_string_with_training():
    task = tasks.make_task("dates")
    held_out = task.eval_set(0, 2000)
    eval_strings = {
        task.decode(s[:n]) for s, n in zip(held_out["src"], held_out["src_lengths"], strict=True)
    }
    train_strings = set()
    for step in range(40):
        batch = task.train_batch(0, step, 256)
        train_strings |= {
            task.decode(s[:n]) for s, n in zip(batch["src"], batch["src_lengths"], strict=True)
        }
    assert len(eval_strings) > 1500 and len(train_strings) > 9000
    assert not eval_strings & train_strings


def test_task_errors_name_the_field():
    with pytest.raises(ValueError, match=r"task.name: expected one of"):
        tasks.make_task("translate")
    with pytest.raises(ValueError, match=r"task.length: expected a positive int"):
        tasks.make_task("copy", length=0)
    with pytest.raises(ValueError, match=r"task.num_symbols: expected an int in \[2, 36\]"):
        tasks.make_task("sort", num_symbols=99)
    with pytest.raises(ValueError, match=r"text: characters \['#'\] are not in the dates"):
        tasks.make_task("dates").encode("3rd of #")


# ---------------------------------------------------------------- pronoun probe


@pytest.mark.parametrize(
    "a, b, pronoun, antecedent",
    [
        ("Mark", "Sam", "he", "Mark"),  # both match: the subject
        ("Mary", "Anna", "she", "Mary"),
        ("Mark", "Mary", "she", "Mary"),
        ("Mary", "Mark", "he", "Mark"),
        ("Mary", "Mark", "she", "Mary"),
    ],
)
def test_pronoun_resolution_hand_cases(a, b, pronoun, antecedent):
    words, labels = tasks.pronoun_example("A told B that P was V .", a, b, pronoun, "leaving")
    assert words == [a, "told", b, "that", pronoun, "was", "leaving", "."]
    assert labels == ["_", "_", "_", "_", antecedent, "_", "_", "_"]


def test_pronoun_matching_no_name_is_an_error():
    with pytest.raises(ValueError, match=r"pronoun: 'she' matches neither 'Mark' nor 'Sam'"):
        tasks.pronoun_example("A told B that P was V .", "Mark", "Sam", "she", "leaving")


def _sentences(task, batch):
    for src, n, tgt in zip(batch["src"], batch["src_lengths"], batch["tgt"], strict=True):
        yield [task.vocab[i] for i in src[:n]], [task.vocab[i] for i in tgt[:n]]


def test_pronoun_labels_follow_the_rule():
    task = tasks.make_task("pronoun")
    for words, labels in _sentences(task, task.train_batch(0, 3, 256)):
        names = [w for w in words if w in tasks.MALE + tasks.FEMALE]
        (p,) = [i for i, w in enumerate(words) if w in ("he", "she")]
        male = words[p] == "he"
        matching = [n for n in names if (n in tasks.MALE) == male]
        assert len(names) == 2 and matching
        assert labels[p] == matching[0]  # the first matching name is the subject when both do
        assert all(label == "_" for i, label in enumerate(labels) if i != p)


def test_pronoun_held_out_pairs_never_trained_together():
    task = tasks.make_task("pronoun")

    def pairs(batch):
        out = set()
        for words, _ in _sentences(task, batch):
            names = tuple(sorted(w for w in words if w in tasks.MALE + tasks.FEMALE))
            out.add(names)
        return out

    trained = set()
    for step in range(20):
        trained |= pairs(task.train_batch(0, step, 256))
    held_out = pairs(task.eval_set(0, 2000))
    assert len(trained) > 500 and len(held_out) > 80
    assert trained.isdisjoint(held_out)
    assert ("Mark", "Sam") not in trained
    assert tasks.is_held_out_pair("Sam", "Mark")


def test_word_tasks_encode_words_and_name_unknown_ones():
    task = tasks.make_task("pronoun")
    ids = task.encode("Mark told Sam that he was leaving.")
    assert task.decode(ids) == "Mark told Sam that he was leaving ."
    with pytest.raises(ValueError, match=r"text: words \['Zed', 'it'\] are not in the pronoun"):
        task.encode("Zed told Sam that it was leaving.")
    with pytest.raises(ValueError, match=r"text: expected at least one token"):
        task.encode("   ")


# ---------------------------------------------------------------------------
# The registry: a task defined and registered here, in the test file alone.


@dataclasses.dataclass(frozen=True)
class Successor(tasks.Task):
    """Each of 6 symbols becomes the next one (the last of the vocabulary excluded)."""

    def examples(self, rng, n, held_out):
        del held_out
        src = rng.integers(len(tasks.SPECIALS), self.vocab_size - 1, size=(n, 6))
        return list(src), list(src + 1)


def successor(options):
    del options
    return Successor("successor", (*tasks.SPECIALS, *"abcdefgh"), 6, 6, aligned=True)


def test_a_task_registered_from_a_test_file_is_made_by_name(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "successor", (successor, ()))
    task = tasks.make_task("successor")
    batch = task.train_batch(0, 0, 4)
    np.testing.assert_array_equal(batch["tgt"], batch["src"] + 1)
    held_out = task.eval_set(0, 8)
    np.testing.assert_array_equal(held_out["tgt"], held_out["src"] + 1)
    assert not np.array_equal(held_out["src"][:4], batch["src"])
    with pytest.raises(ValueError, match=r"^task.validation: .* got task 'successor'"):
        tasks.make_task("successor", validation=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^task.name: expected one of .*got 'successor'"):
        tasks.make_task("successor")


@pytest.mark.slow
def test_a_task_registered_from_a_test_file_trains_at_the_tiny_size(
    tmp_path, monkeypatch, standard_promotion
):
    monkeypatch.setitem(tasks.TASKS, "successor", (successor, ()))
    config = load_config("copy", **{"task.name": "successor"})
    result = training.train_and_evaluate(config, str(tmp_path), progress=False)
    assert np.isfinite(result["eval/loss"]) and 0.0 <= result["eval/exact_match"] <= 1.0
