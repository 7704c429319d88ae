"""SCAN (Lake & Baroni, 2018): navigation commands to action sequences, from its grammar.

    jump around left twice         -> 8 x (I_TURN_LEFT I_JUMP)
    walk opposite right thrice after run
                                   -> I_RUN, then 3 x (I_TURN_RIGHT I_TURN_RIGHT I_WALK)

The grammar generates exactly 20,910 commands; `scan_pairs` enumerates them in
a fixed order (the grammar's productions, nested loops), and `scan_split`
rebuilds the published splits from them: nothing is downloaded.

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

References:
  Lake & Baroni, "Generalization without Systematicity: On the Compositional
  Skills of Sequence-to-Sequence Recurrent Networks", ICML 2018.
"""

from __future__ import annotations

import functools
import re

import numpy as np

PRIMITIVES = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURNS = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
COMMAND_WORDS = (
    *PRIMITIVES,
    "turn",
    *TURNS,
    "opposite",
    "around",
    "twice",
    "thrice",
    "and",
    "after",
)
ACTIONS = (*PRIMITIVES.values(), *TURNS.values())
SPLITS = ("simple", "length", "addprim_jump")
# The length split: train on action sequences of at most this many actions. A re-cut
# length split ("length_26", as Csordás et al. 2021 re-cut it) moves the cutoff.
LENGTH_CUTOFF = 22
# The cutoffs that leave both sides non-empty: the longest outputs have 48 actions.
CUTOFFS = range(1, 48)
# A conjunct that never occurs at or below the standard cutoff: "U around D thrice"
# (24 actions). 3,144 of the length split's 3,920 test commands have one; the other 776
# only recombine phrases seen in training.
AROUND_THRICE = re.compile(r"\b(walk|look|run|jump) around (left|right) thrice\b")
SIMPLE_TEST_SIZE = 4182
SPLIT_SEED = 0
# Validation (`scan_split(..., validation=True)`), drawn from a split's training part
# only, and cut as the split itself is: a length split's holds its last
# VALIDATION_SPAN training lengths (the split re-cut inside its training part);
# addprim_jump's holds every command with VALIDATION_PRIMITIVE but the lone one, which
# training repeats as it repeats "jump"; simple's is a seeded draw of
# VALIDATION_FRACTION of its training commands.
VALIDATION_SPAN = 4
VALIDATION_PRIMITIVE = "look"
VALIDATION_FRACTION = 0.1
JUMP_REPEATS = 1467  # the published addprim_jump train file's copies of "jump"


def _verbs() -> list[tuple[str, list[str]]]:
    """V: (command, actions) for every verb phrase, 34 of them."""
    out = []
    for u in (*PRIMITIVES, "turn"):
        act = [] if u == "turn" else [PRIMITIVES[u]]
        for direction, turn in TURNS.items():
            out.append((f"{u} opposite {direction}", [turn, turn, *act]))
            out.append((f"{u} around {direction}", [turn, *act] * 4))
            out.append((f"{u} {direction}", [turn, *act]))
    out += [(u, [a]) for u, a in PRIMITIVES.items()]
    return out


def _sentences() -> list[tuple[str, list[str]]]:
    """S: a verb phrase, twice or thrice: 102."""
    out = []
    for command, actions in _verbs():
        out += [(command, actions), (f"{command} twice", actions * 2)]
        out.append((f"{command} thrice", actions * 3))
    return out


@functools.cache
def scan_pairs() -> tuple[tuple[str, str], ...]:
    """All 20,910 (command, actions) pairs as space-separated words, in a fixed order."""
    sentences = _sentences()
    out = [(c, a) for c, a in sentences]
    for first, first_actions in sentences:
        for second, second_actions in sentences:
            out.append((f"{first} and {second}", first_actions + second_actions))
            out.append((f"{first} after {second}", second_actions + first_actions))
    return tuple((command, " ".join(actions)) for command, actions in out)


def length_cutoff(name: str) -> int | None:
    """The cutoff of a length split ("length": 22, "length_26": 26), else None.

    Raises:
      ValueError: naming `task.split` for a name that is not a split.
    """
    if name in SPLITS:
        return LENGTH_CUTOFF if name == "length" else None
    match = re.fullmatch(r"length_(\d+)", name)
    if match is None or int(match.group(1)) not in CUTOFFS:
        raise ValueError(
            f"task.split: expected one of {SPLITS} or 'length_<N>' with N in "
            f"[{CUTOFFS.start}, {CUTOFFS.stop - 1}], got {name!r}"
        )
    return int(match.group(1))


def around_thrice(command: str) -> bool:
    """Whether `command` has a conjunct "U around D thrice" (`AROUND_THRICE`)."""
    return AROUND_THRICE.search(command) is not None


def held_out_parts(name: str) -> dict[str, np.ndarray]:
    """Named parts of a length split's test set (bool per test pair, in order): the
    commands with an "around ... thrice" conjunct and the recombination-only rest;
    {} for the other splits."""
    if length_cutoff(name) is None:
        return {}
    around = np.array([around_thrice(command) for command, _ in scan_split(name)[1]])
    return {"around_thrice": around, "recombination": ~around}


@functools.cache
def scan_split(
    name: str, cutoff: int | None = None, validation: bool = False
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(train, test) pairs of a published split; with `validation`, (train, validation)
    pairs drawn from its training part alone, for choosing hyperparameters without
    the test split (see `VALIDATION_SPAN`).

    - "simple": a random 80/20 split with the published sizes, 16,728 / 4,182
      (a fixed seed; the published file's own draw is not reproduced).
    - "length": train on action sequences of at most 22 actions (16,990), test on
      the longer ones, 24 to 48 actions (3,920). `cutoff` (or the name
      "length_<N>") moves the 22.
    - "addprim_jump": train on the 13,203 commands without "jump" and on the lone
      command "jump", repeated 1,467 times as in the published train file
      (14,670 in all); test on every other command with "jump" (7,706).

    Raises:
      ValueError: naming `task.split` for an unknown split.
    """
    if validation:
        return _validation(name, scan_split(name, cutoff)[0], cutoff)
    name_cutoff = length_cutoff(name)
    if cutoff is not None and (name_cutoff is None or cutoff not in CUTOFFS):
        raise ValueError(
            f"cutoff: applies to a length split, with a value in [{CUTOFFS.start}, "
            f"{CUTOFFS.stop - 1}]; got split {name!r} and cutoff {cutoff!r}"
        )
    pairs = scan_pairs()
    if name == "simple":
        order = np.random.default_rng(SPLIT_SEED).permutation(len(pairs))
        test = set(order[:SIMPLE_TEST_SIZE].tolist())
        return _partition(pairs, lambda i, _: i not in test)
    if name_cutoff is not None:
        cut = name_cutoff if cutoff is None else cutoff
        return _partition(pairs, lambda _, pair: len(pair[1].split()) <= cut)
    train, test = _partition(pairs, lambda _, pair: "jump" not in pair[0].split())
    jump = next(pair for pair in test if pair[0] == "jump")
    test = tuple(pair for pair in test if pair is not jump)
    return train + (jump,) * JUMP_REPEATS, test


def _validation(name: str, train: tuple, cutoff: int | None) -> tuple[tuple, tuple]:
    cut = length_cutoff(name) if cutoff is None else cutoff
    if cut is not None:
        if cut <= VALIDATION_SPAN:
            raise ValueError(
                f"validation: a length split's validation holds its last {VALIDATION_SPAN} "
                f"training lengths, so it needs a cutoff above {VALIDATION_SPAN}, got {cut}"
            )
        return _partition(train, lambda _, pair: len(pair[1].split()) <= cut - VALIDATION_SPAN)
    if name == "addprim_jump":
        lone = (VALIDATION_PRIMITIVE, PRIMITIVES[VALIDATION_PRIMITIVE])
        inner, held = _partition(
            train, lambda _, pair: VALIDATION_PRIMITIVE not in pair[0].split() or pair == lone
        )
        return inner + (lone,) * (JUMP_REPEATS - 1), held
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    held = set(order[: round(VALIDATION_FRACTION * len(train))].tolist())
    return _partition(train, lambda i, _: i not in held)


def _partition(pairs, in_train) -> tuple[tuple, tuple]:
    train = tuple(pair for i, pair in enumerate(pairs) if in_train(i, pair))
    test = tuple(pair for i, pair in enumerate(pairs) if not in_train(i, pair))
    return train, test
