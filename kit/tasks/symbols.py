"""Symbol tasks: copy, reverse and sort a random string; induction (a random half, repeated)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from kit.tasks.base import SPECIALS, SYMBOLS, LossSpan, Options, Task

RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda src: src,
    "reverse": lambda src: src[:, ::-1],
    "sort": lambda src: np.sort(src, axis=1),
}


@dataclasses.dataclass(frozen=True)
class SymbolTask(Task):
    """`length` random symbols out of `num_symbols`; the target is a rule of them."""

    length: int = 16
    num_symbols: int = 10

    def examples(self, rng, n, held_out):
        del held_out  # the held-out stream is another seed
        src = rng.integers(len(SPECIALS), self.vocab_size, size=(n, self.length))
        return list(src), list(RULES[self.name](src))


@dataclasses.dataclass(frozen=True)
class InductionTask(Task):
    """No source: the target is a random half of h symbols, then the same half again,
    with h drawn from [length / 2, length] so that no fixed offset finds the copy."""

    length: int = 16
    num_symbols: int = 10
    # Of a row [a, a] with L = 2h tokens: the first half, and the second half after
    # its first token (which nothing before it predicts).
    loss_spans: ClassVar = (LossSpan("first", 0.0, 0, 0.5, 0), LossSpan("repeat", 0.5, 1, 1.0, 0))
    metric: ClassVar = "eval/loss_repeat"

    def examples(self, rng, n, held_out):
        del held_out
        src = rng.integers(len(SPECIALS), self.vocab_size, size=(n, self.length))
        halves = rng.integers((self.length + 1) // 2, self.length + 1, size=n)
        return [[] for _ in range(n)], [np.tile(s[:h], 2) for s, h in zip(src, halves, strict=True)]


def symbol_task(name: str) -> Callable[[Options], Task]:
    def make(o: Options) -> Task:
        vocab = SPECIALS + tuple(SYMBOLS[: o.num_symbols])
        return SymbolTask(
            name, vocab, o.length, o.length, True, length=o.length, num_symbols=o.num_symbols
        )

    return make


def induction_task(o: Options) -> Task:
    vocab = SPECIALS + tuple(SYMBOLS[: o.num_symbols])
    return InductionTask(
        "induction", vocab, 0, 2 * o.length, length=o.length, num_symbols=o.num_symbols
    )
