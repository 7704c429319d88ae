"""The pronoun probe: "Mark told Sam that he was leaving ." -> the label "Mark" at
"he" and "_" everywhere else. Held-out sets use only name pairs that training
never puts together (and the article's own pair)."""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np

from kit.tasks.base import SPECIALS, Options, Task

# The antecedent is the name whose gender matches
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


@dataclasses.dataclass(frozen=True)
class PronounTask(Task):
    def examples(self, rng, n, held_out):
        index = {tok: i for i, tok in enumerate(self.vocab)}
        pairs = _sample_pronouns(rng, n, held_out)
        return [[index[w] for w in s] for s, _ in pairs], [[index[w] for w in t] for _, t in pairs]


def pronoun_task(o: Options) -> Task:
    del o  # no options
    return PronounTask("pronoun", PRONOUN_VOCAB, PRONOUN_LEN, PRONOUN_LEN, aligned=True, words=True)
