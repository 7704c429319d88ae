"""Tasks as a registry: `TASKS` maps a name to a factory of `Task`s; `make_task` builds one.

One module per family: `symbols` (copy, reverse, sort, induction), `dates`,
`pronoun`, `scan` (Lake & Baroni's published splits) and `digits` (images). A
task owns its vocabulary, its batches (`task.train_batch(seed, step, batch_size)`,
a pure function of its arguments, so resuming needs no data state), its
held-out set (`task.eval_set`, from another seed stream or a fixed split) and
what evaluation reports on it (`loss_spans`, `eval_groups`, `by_length`,
`metric`). A new task is a `Task` subclass and one `register` call, from any
module (tests/test_tasks.py registers one from the test file).
"""

from __future__ import annotations

from collections.abc import Callable

from kit import scan as _scan_data
from kit.tasks import dates as _dates
from kit.tasks import digits, pronoun, symbols
from kit.tasks import scan as _scan_family
from kit.tasks.base import BOS, EOS, PAD, SEP, SPECIALS, SYMBOLS, LossSpan, Options, Task
from kit.tasks.dates import NUM_DATE_STYLES, format_date
from kit.tasks.pronoun import FEMALE, MALE, NO_LABEL, is_held_out_pair, pronoun_example

Factory = Callable[[Options], Task]
# name -> (factory, the options it reads beyond length and num_symbols, checked for all)
TASKS: dict[str, tuple[Factory, tuple[str, ...]]] = {}


def register(name: str, factory: Factory, reads: tuple[str, ...] = ()) -> None:
    """Makes `make_task(name, ...)` return `factory(Options(...))`. `reads` names the
    options only some families take ("augment", "split", "validation") that this
    one reads: giving another a non-default value of those is an error."""
    TASKS[name] = (factory, tuple(reads))


for _name in symbols.RULES:
    register(_name, symbols.symbol_task(_name))
register("induction", symbols.induction_task)
register("dates", _dates.dates_task)
register("pronoun", pronoun.pronoun_task)
register("scan", _scan_family.scan_task, reads=("split", "validation"))
register("digits", digits.digits_task, reads=("augment",))


def make_task(
    name: str,
    *,
    length: int = 16,
    num_symbols: int = 10,
    augment: bool = True,
    split: str = "simple",
    validation: bool = False,
) -> Task:
    """The task registered as `name` (`TASKS`).

    `length` and `num_symbols` shape the symbol tasks, `augment` the digits'
    training images and `split` picks SCAN's split (`validation`: train on its
    training part less a validation part, evaluated instead of the test split,
    `kit.scan.scan_split`); they are checked for every task, so an invalid value
    never passes unnoticed.

    Raises:
      ValueError: naming `task.name` for an unknown name, or the option that is
        invalid or that the task does not read (`task.validation`).
    """
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ValueError(f"task.length: expected a positive int, got {length!r}")
    if not isinstance(num_symbols, int) or not 2 <= num_symbols <= len(SYMBOLS):
        raise ValueError(
            f"task.num_symbols: expected an int in [2, {len(SYMBOLS)}], got {num_symbols!r}"
        )
    if not isinstance(augment, bool):
        raise ValueError(f"task.augment: expected a bool, got {augment!r}")
    if not isinstance(split, str):
        raise ValueError(f"task.split: expected a str, got {split!r}")
    _scan_data.length_cutoff(split)  # raises ValueError naming task.split
    if not isinstance(validation, bool):
        raise ValueError(f"task.validation: expected a bool, got {validation!r}")
    if name not in TASKS:
        raise ValueError(f"task.name: expected one of {', '.join(TASKS)}, got {name!r}")
    factory, reads = TASKS[name]
    if validation and "validation" not in reads:
        raise ValueError(
            f"task.validation: draws from a published split's training part (task 'scan'), "
            f"got task {name!r}"
        )
    return factory(Options(length, num_symbols, augment, split, validation))


__all__ = [
    "BOS",
    "EOS",
    "FEMALE",
    "MALE",
    "NO_LABEL",
    "NUM_DATE_STYLES",
    "PAD",
    "SEP",
    "SPECIALS",
    "SYMBOLS",
    "TASKS",
    "LossSpan",
    "Options",
    "Task",
    "format_date",
    "is_held_out_pair",
    "make_task",
    "pronoun_example",
    "register",
]
