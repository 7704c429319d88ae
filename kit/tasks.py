"""Deterministic tasks: copy, reverse, sort, date translation, pronoun probe (generated)
and handwritten digits (shipped with scikit-learn, see kit.digits).

A training batch is a pure function of (seed, step), so resuming needs no data
state. Held-out sets come from another seed stream; for dates they also use
only dates that training never samples, so no source string is shared; for the
pronoun probe they use only name pairs that training never puts together.

Token ids: 0 PAD, 1 BOS, 2 EOS, 3 SEP, then the task's symbols.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import re
import typing
import zlib

import numpy as np

from kit import digits, scan

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DATE_CHARS = " ,-./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
EVAL_STREAM = 1_000_003  # seed offset of the held-out stream

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DATE = datetime.date(1950, 1, 1).toordinal()
LAST_DATE = datetime.date(2049, 12, 31).toordinal()


class LossSpan(typing.NamedTuple):
    """Target positions [start, stop) of a row whose target has L tokens (before EOS):
    start = start_fraction * L + start_offset, stop likewise."""

    name: str
    start_fraction: float
    start_offset: int
    stop_fraction: float
    stop_offset: int

    def mask(self, lengths: np.ndarray, width: int) -> np.ndarray:
        """bool `[B, width]`: the span of each row, given its target length `[B]`."""
        lengths = np.asarray(lengths)[:, None]
        start = np.floor(self.start_fraction * lengths).astype(int) + self.start_offset
        stop = np.floor(self.stop_fraction * lengths).astype(int) + self.stop_offset
        positions = np.arange(width)[None, :]
        return (positions >= start) & (positions < stop)


@dataclasses.dataclass(frozen=True)
class Task:
    """A sequence-to-sequence task over a fixed vocabulary."""

    name: str
    vocab: tuple[str, ...]
    src_len: int  # longest source
    tgt_len: int  # longest target, without EOS
    aligned: bool  # target has the source's length (an encoder-only model can solve it)
    length: int = 0
    num_symbols: int = 0
    words: bool = False  # tokens are words and punctuation, not characters
    image_size: int = 0  # an image task: square images of this side, one class each
    augment: bool = False  # image tasks: one-pixel shifts of the training images
    data_split: str = ""  # a task with published splits (SCAN): which one
    validation: bool = False  # SCAN: evaluate on a validation part of the training split
    by_length: bool = False  # evaluation also reports exact match per target length
    # eval/loss_<name> over parts of each row's target, e.g. induction's "first", "repeat"
    loss_spans: tuple[LossSpan, ...] = ()
    # what head ablation (experiments/heads.py) measures by default
    metric: str = "eval/exact_match"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        """Text -> token strings: characters, or words and punctuation marks."""
        return re.findall(r"\w+|[^\w\s]", text) if self.words else list(text)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; raises ValueError naming the tokens not in the vocabulary."""
        index = {tok: i for i, tok in enumerate(self.vocab)}
        tokens = self.split(text)
        unknown = sorted({t for t in tokens if t not in index or index[t] < len(SPECIALS)})
        if unknown:
            kind = "words" if self.words else "characters"
            raise ValueError(f"text: {kind} {unknown} are not in the {self.name} vocabulary")
        if not tokens:
            raise ValueError("text: expected at least one token, got an empty text")
        return [index[t] for t in tokens]

    def tokens(self, ids) -> list[str]:
        """ids -> token strings, stopping at EOS and skipping PAD/BOS/SEP."""
        out = []
        for i in ids:
            if int(i) == EOS:
                break
            if int(i) >= len(SPECIALS):
                out.append(self.vocab[int(i)])
        return out

    def decode(self, ids) -> str:
        """ids -> text (tokens joined by spaces for a word-level task)."""
        return (" " if self.words else "").join(self.tokens(ids))


def make_task(
    name: str,
    *,
    length: int = 16,
    num_symbols: int = 10,
    augment: bool = True,
    split: str = "simple",
    validation: bool = False,
) -> Task:
    """The task called `name` ("copy", "reverse", "sort", "dates", "pronoun", "digits",
    "scan", "induction").

    `length` and `num_symbols` shape the symbol tasks, `augment` the digits'
    training images and `split` picks SCAN's split (`validation`: train on its
    training part less a validation part, evaluated instead of the test split,
    `scan.scan_split`); they are checked for every
    task, so an invalid value never passes unnoticed.

    Raises:
      ValueError: for an unknown name or a bad length / symbol count.
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
    scan.length_cutoff(split)  # raises ValueError naming task.split
    if not isinstance(validation, bool):
        raise ValueError(f"task.validation: expected a bool, got {validation!r}")
    if validation and name != "scan":
        raise ValueError(
            f"task.validation: draws from a published split's training part (task 'scan'), "
            f"got task {name!r}"
        )
    if name == "scan":
        vocab = SPECIALS + scan.COMMAND_WORDS + scan.ACTIONS
        longest = max(len(a.split()) for _, a in scan.scan_pairs())
        return Task(
            "scan",
            vocab,
            9,
            longest,
            False,
            words=True,
            data_split=split,
            validation=validation,
            by_length=scan.length_cutoff(split) is not None,
        )
    if name == "digits":
        digits.load()  # fails here, naming the extra, without scikit-learn
        size = digits.IMAGE_SIZE
        return Task(
            "digits", digits.CLASSES, size * size, 1, False, image_size=size, augment=augment
        )
    if name == "dates":
        return Task("dates", SPECIALS + tuple(DATE_CHARS), 32, 10, aligned=False)
    if name == "pronoun":
        return Task("pronoun", PRONOUN_VOCAB, PRONOUN_LEN, PRONOUN_LEN, aligned=True, words=True)
    if name == "induction":
        return Task(
            "induction",
            SPECIALS + tuple(SYMBOLS[:num_symbols]),
            0,
            2 * length,
            False,
            length=length,
            num_symbols=num_symbols,
            # Of a row [a, a] with L = 2h tokens: the first half, and the second half
            # after its first token (which nothing before it predicts).
            loss_spans=(LossSpan("first", 0.0, 0, 0.5, 0), LossSpan("repeat", 0.5, 1, 1.0, 0)),
            metric="eval/loss_repeat",
        )
    if name not in ("copy", "reverse", "sort"):
        raise ValueError(
            "task.name: expected one of copy, reverse, sort, dates, pronoun, digits, scan, "
            f"induction, got {name!r}"
        )
    vocab = SPECIALS + tuple(SYMBOLS[:num_symbols])
    return Task(name, vocab, length, length, True, length=length, num_symbols=num_symbols)


# --------------------------------------------------------------------------
# Dates.


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def format_date(date: datetime.date, style: int) -> str:
    """One of the human-readable styles (0..len(DATE_STYLES)-1)."""
    d, m, y = date.day, date.month, date.year
    month, weekday = MONTHS[m - 1], DAYS[date.weekday()]
    styles = (
        f"{_ordinal(d)} of {month} {y}",
        f"{month[:3]} {d}, {y}",
        f"{d:02d}.{m:02d}.{y % 100:02d}",
        f"{weekday}, {month} {d}, {y}",
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"{m:02d}/{d:02d}/{y}",
        f"{d} {month[:3]} {y % 100:02d}",
        f"{weekday.lower()} {d} {month.lower()} {y}",
        f"{d}.{m}.{y}",
        f"{weekday[:3]}, {d} {month[:3]} {y}",
        f"{month.upper()} {d}, {y}",
        f"the {_ordinal(d)} of {month.lower()}, {y}",
    )
    return styles[style]


NUM_DATE_STYLES = 13


def _is_eval_date(ordinal: np.ndarray) -> np.ndarray:
    # A fixed hash of the day: one date in ten is held out, never trained on.
    return (ordinal.astype(np.uint64) * np.uint64(2654435761) % np.uint64(2**32)) % 10 == 0


def _sample_dates(rng: np.random.Generator, n: int, held_out: bool) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        ordinals = rng.integers(FIRST_DATE, LAST_DATE + 1, size=2 * n)
        styles = rng.integers(0, NUM_DATE_STYLES, size=2 * n)
        keep = _is_eval_date(ordinals) == held_out
        for o, s in zip(ordinals[keep], styles[keep], strict=True):
            date = datetime.date.fromordinal(int(o))
            out.append((format_date(date, int(s)), date.isoformat()))
    return out[:n]


# --------------------------------------------------------------------------
# The pronoun probe: "Mark told Sam that he was leaving ." -> the label "Mark" at
# "he" and "_" everywhere else. The antecedent is the name whose gender matches
# the pronoun, and the subject when both match, so the pronoun's position has
# to find the right name by attention.

MALE = (
    "Mark", "Sam", "John", "Paul", "David", "Peter", "James", "Tom", "Mike", "Adam",
    "Ben", "Chris", "Daniel", "Eric", "Frank", "George", "Henry", "Jack", "Kevin", "Luke",
)  # fmt: skip
FEMALE = (
    "Mary", "Anna", "Emma", "Sarah", "Lisa", "Kate", "Julia", "Laura", "Alice", "Grace",
    "Helen", "Jane", "Lucy", "Nina", "Olivia", "Rachel", "Sophie", "Susan", "Clara", "Eva",
)  # fmt: skip
VERBS = (
    "leaving", "working", "sleeping", "running", "cooking", "reading",
    "waiting", "singing", "driving", "laughing", "winning", "travelling",
)  # fmt: skip
TEMPLATES = (  # A: subject, B: the other name, P: pronoun, V: verb
    "A told B that P was V .",
    "A called B because P was V .",
    "A asked B whether P was V .",
    "A warned B that P was V .",
    "A texted B while P was V .",
    "after A met B , P was V .",
    "A and B talked , and then P was V .",
    "when A saw B , P was V .",
)
NO_LABEL = "_"
PRONOUN_LEN = max(len(t.split()) for t in TEMPLATES)
_TEMPLATE_WORDS = sorted({w for t in TEMPLATES for w in t.split()} - {"A", "B", "P", "V"})
PRONOUN_VOCAB = (*SPECIALS, NO_LABEL, "he", "she", *MALE, *FEMALE, *VERBS, *_TEMPLATE_WORDS)
HELD_OUT_PAIRS = (("Mark", "Sam"),)  # the article's sentence is never trained on


def is_held_out_pair(a: str, b: str) -> bool:
    """One unordered name pair in eight (by a fixed hash), and the article's pair."""
    pair = tuple(sorted((a, b)))
    if pair in {tuple(sorted(p)) for p in HELD_OUT_PAIRS}:
        return True
    return zlib.crc32(" ".join(pair).encode()) % 8 == 0


_NAMES = MALE + FEMALE
_PAIRS = {
    held_out: [
        (a, b) for a, b in itertools.permutations(_NAMES, 2) if is_held_out_pair(a, b) == held_out
    ]
    for held_out in (False, True)
}


def pronoun_example(template: str, a: str, b: str, pronoun: str, verb: str):
    """(sentence tokens, label tokens) for one filled template."""
    antecedent = a if (pronoun == "he") == (a in MALE) else b
    if (pronoun == "he") != (antecedent in MALE):
        raise ValueError(f"pronoun: {pronoun!r} matches neither {a!r} nor {b!r}")
    fill = {"A": a, "B": b, "P": pronoun, "V": verb}
    words = [fill.get(w, w) for w in template.split()]
    labels = [antecedent if w == "P" else NO_LABEL for w in template.split()]
    return words, labels


def _sample_pronouns(rng: np.random.Generator, n: int, held_out: bool):
    pairs = _PAIRS[held_out]
    out = []
    for _ in range(n):
        a, b = pairs[rng.integers(len(pairs))]
        pronoun = ("he" if a in MALE else "she") if rng.random() < 0.5 else None
        if pronoun is None:
            pronoun = "he" if b in MALE else "she"
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        out.append(pronoun_example(template, a, b, pronoun, VERBS[rng.integers(len(VERBS))]))
    return out


# --------------------------------------------------------------------------
# Batches.


def _examples(task: Task, rng: np.random.Generator, n: int, held_out: bool):
    if task.name == "dates":
        pairs = _sample_dates(rng, n, held_out)
        return [task.encode(s) for s, _ in pairs], [task.encode(t) for _, t in pairs]
    if task.name == "pronoun":
        index = {tok: i for i, tok in enumerate(task.vocab)}
        pairs = _sample_pronouns(rng, n, held_out)
        return [[index[w] for w in s] for s, _ in pairs], [[index[w] for w in t] for _, t in pairs]
    src = rng.integers(len(SPECIALS), task.vocab_size, size=(n, task.length))
    if task.name == "induction":
        # No source: the target is a random half of h symbols, then the same half again,
        # with h drawn from [length / 2, length] so that no fixed offset finds the copy.
        halves = rng.integers((task.length + 1) // 2, task.length + 1, size=n)
        return [[] for _ in range(n)], [np.tile(s[:h], 2) for s, h in zip(src, halves, strict=True)]
    if task.name == "copy":
        tgt = src
    elif task.name == "reverse":
        tgt = src[:, ::-1]
    else:
        tgt = np.sort(src, axis=1)
    return list(src), list(tgt)


def _pack(task: Task, sources, targets) -> dict[str, np.ndarray]:
    n = len(sources)
    src = np.full((n, task.src_len), PAD, np.int32)
    tgt = np.full((n, task.tgt_len), PAD, np.int32)
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
        src[i, : len(s)] = s
        tgt[i, : len(t)] = t
    return {
        "src": src,
        "src_lengths": np.array([len(s) for s in sources], np.int32),
        "tgt": tgt,
        "tgt_lengths": np.array([len(t) for t in targets], np.int32),
    }


def train_batch(task: Task, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """Training batch `step`: src `[B, Ls]`, src_lengths `[B]`, tgt `[B, Lt]`, tgt_lengths
    (an image task: images `[B, H, W]`, labels `[B]`)."""
    if task.image_size:
        return digits.train_batch(seed, step, batch_size, augment=task.augment)
    rng = np.random.default_rng([seed, step])
    if task.data_split:
        data = _scan_arrays(task, train=True)
        index = rng.integers(len(data["src"]), size=batch_size)
        return {k: v[index] for k, v in data.items()}
    return _pack(task, *_examples(task, rng, batch_size, held_out=False))


def eval_set(task: Task, seed: int, size: int) -> dict[str, np.ndarray]:
    """A held-out set from its own seed stream (and, for dates, held-out dates only);
    for the digits and SCAN, their whole fixed test split (`size` does not apply; with
    `task.validation`, SCAN's validation part)."""
    if task.image_size:
        return digits.eval_set()
    if task.data_split:
        return _scan_arrays(task, train=False)
    rng = np.random.default_rng([seed + EVAL_STREAM, 0])
    return _pack(task, *_examples(task, rng, size, held_out=True))


def eval_groups(task: Task, seed: int, size: int) -> dict[str, np.ndarray]:
    """Named parts of the held-out set (bool per row of `eval_set`) that evaluation
    reports apart: on SCAN's length splits, `scan.held_out_parts`; else none."""
    del seed, size  # SCAN's held-out set is its whole test split
    if not task.data_split or task.validation:
        return {}
    return scan.held_out_parts(task.data_split)


@functools.cache
def _scan_arrays(task: Task, *, train: bool) -> dict[str, np.ndarray]:
    """A SCAN split's train or test pairs, encoded and packed once."""
    pairs = scan.scan_split(task.data_split, validation=task.validation)[0 if train else 1]
    return _pack(task, [task.encode(c) for c, _ in pairs], [task.encode(a) for _, a in pairs])
