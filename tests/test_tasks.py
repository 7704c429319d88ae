"""kit.tasks: deterministic batches, correct targets, held-out sets disjoint from training."""

import datetime

import numpy as np
import pytest

from kit import tasks


@pytest.mark.parametrize("name", ["copy", "reverse", "sort", "dates"])
def test_batches_are_a_pure_function_of_seed_and_step(name):
    task = tasks.make_task(name)
    a = tasks.train_batch(task, 0, 5, 16)
    b = tasks.train_batch(task, 0, 5, 16)
    c = tasks.train_batch(task, 0, 6, 16)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["src"], c["src"])


@pytest.mark.parametrize(
    "name, fn",
    [("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", np.sort)],
)
def test_symbol_task_targets(name, fn):
    task = tasks.make_task(name, length=12, num_symbols=7)
    batch = tasks.train_batch(task, 1, 0, 32)
    assert batch["src"].min() >= len(tasks.SPECIALS)
    assert batch["src"].max() < len(tasks.SPECIALS) + 7
    for s, t in zip(batch["src"], batch["tgt"], strict=True):
        np.testing.assert_array_equal(t, fn(s))


def test_dates_targets_are_the_iso_date_of_the_source():
    task = tasks.make_task("dates")
    batch = tasks.train_batch(task, 0, 0, 64)
    for src, n, tgt in zip(batch["src"], batch["src_lengths"], batch["tgt"], strict=True):
        text, iso = task.decode(src[:n]), task.decode(tgt)
        date = datetime.date.fromisoformat(iso)
        assert text in {tasks.format_date(date, s) for s in range(tasks.NUM_DATE_STYLES)}
    assert tasks.format_date(datetime.date(2021, 3, 3), 0) == "3rd of March 2021"
    assert tasks.format_date(datetime.date(2021, 3, 3), 3) == "Wednesday, March 3, 2021"
    assert tasks.format_date(datetime.date(2021, 3, 3), 2) == "03.03.21"


def test_dates_held_out_shares_no_source_string_with_training():
    task = tasks.make_task("dates")
    held_out = tasks.eval_set(task, 0, 2000)
    eval_strings = {
        task.decode(s[:n]) for s, n in zip(held_out["src"], held_out["src_lengths"], strict=True)
    }
    train_strings = set()
    for step in range(40):
        batch = tasks.train_batch(task, 0, step, 256)
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
