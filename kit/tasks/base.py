"""The Task interface every family implements, and what all tasks share.

A task owns its vocabulary, its training batches (a pure function of (seed,
step), so resuming needs no data state), its held-out set (from another seed
stream, or a fixed published split) and what evaluation reports on it (loss
spans, groups, the metric head ablation reads by default).

Token ids: 0 PAD, 1 BOS, 2 EOS, 3 SEP, then the task's symbols.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import ClassVar

import numpy as np

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EVAL_STREAM = 1_000_003  # seed offset of the held-out stream


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
    """A sequence-to-sequence task over a fixed vocabulary.

    A family subclasses it and defines `examples` (or overrides `train_batch`
    and `eval_set` for a fixed split); what evaluation reports on it are class
    attributes a family may set.

    Attributes:
      name: the name it is registered under.
      vocab: the token strings, `SPECIALS` first.
      src_len: the longest source.
      tgt_len: the longest target, without EOS.
      aligned: the target has the source's length (an encoder-only model can solve it).
      words: tokens are words and punctuation, not characters.
    """

    name: str
    vocab: tuple[str, ...]
    src_len: int
    tgt_len: int
    aligned: bool = False
    words: bool = False

    # eval/loss_<name> over parts of each row's target, e.g. induction's "first", "repeat"
    loss_spans: ClassVar[tuple[LossSpan, ...]] = ()
    # what head ablation (experiments/heads.py) measures by default
    metric: ClassVar[str] = "eval/exact_match"
    # evaluation also reports exact match per target length
    by_length: ClassVar[bool] = False
    # an image task: square images of this side, one class each (0: tokens)
    image_size: ClassVar[int] = 0

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        """Text -> token strings: characters, or words and punctuation marks."""
        return re.findall(r"\w+|[^\w\s]", text) if self.words else list(text)

    def encode(self, text: str, name: str = "text") -> list[int]:
        """Text -> ids; raises ValueError naming `name` (the caller's word for the
        text) and the tokens not in the vocabulary."""
        index = {tok: i for i, tok in enumerate(self.vocab)}
        tokens = self.split(text)
        unknown = sorted({t for t in tokens if t not in index or index[t] < len(SPECIALS)})
        if unknown:
            kind = "words" if self.words else "characters"
            raise ValueError(f"{name}: {kind} {unknown} are not in the {self.name} vocabulary")
        if not tokens:
            raise ValueError(f"{name}: expected at least one token, got an empty text")
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

    def examples(self, rng: np.random.Generator, n: int, held_out: bool):
        """`n` examples as (source id lists, target id lists), drawn with `rng` from the
        training distribution or, with `held_out`, the held-out one."""
        raise NotImplementedError(f"task {self.name!r} defines no examples")

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Training batch `step`: src `[B, Ls]`, src_lengths `[B]`, tgt `[B, Lt]`,
        tgt_lengths `[B]` (an image task: images `[B, H, W]`, labels `[B]`)."""
        rng = np.random.default_rng([seed, step])
        return self.pack(*self.examples(rng, batch_size, held_out=False))

    def eval_set(self, seed: int, size: int) -> dict[str, np.ndarray]:
        """A held-out set of `size` examples from its own seed stream."""
        rng = np.random.default_rng([seed + EVAL_STREAM, 0])
        return self.pack(*self.examples(rng, size, held_out=True))

    def eval_groups(self, seed: int, size: int) -> dict[str, np.ndarray]:
        """Named parts of the held-out set (bool per row of `eval_set`) that evaluation
        reports apart; none by default."""
        del seed, size
        return {}

    def pack(self, sources, targets) -> dict[str, np.ndarray]:
        """Id lists -> padded src `[n, src_len]`, tgt `[n, tgt_len]` and their lengths."""
        n = len(sources)
        src = np.full((n, self.src_len), PAD, np.int32)
        tgt = np.full((n, self.tgt_len), PAD, np.int32)
        for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
            src[i, : len(s)] = s
            tgt[i, : len(t)] = t
        return {
            "src": src,
            "src_lengths": np.array([len(s) for s in sources], np.int32),
            "tgt": tgt,
            "tgt_lengths": np.array([len(t) for t in targets], np.int32),
        }


@dataclasses.dataclass(frozen=True)
class Options:
    """The task options of a config (`config.task`), checked by `make_task`; each
    family's factory reads the ones it uses and names them in `reads`."""

    length: int = 16
    num_symbols: int = 10
    augment: bool = True
    split: str = "simple"
    validation: bool = False
