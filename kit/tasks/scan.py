"""SCAN (Lake & Baroni, 2018) as a task: its published splits (kit.scan), shipped."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kit import scan
from kit.tasks.base import SPECIALS, Options, Task


@dataclasses.dataclass(frozen=True)
class ScanTask(Task):
    """A SCAN split: training batches sample its training pairs; the held-out set is
    its whole test split (with `validation`, the validation part of its training
    pairs, `scan.scan_split`)."""

    data_split: str = "simple"
    validation: bool = False

    @property
    def by_length(self) -> bool:  # the length splits report exact match per length
        return scan.length_cutoff(self.data_split) is not None

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        data = self._arrays(train=True)
        index = np.random.default_rng([seed, step]).integers(len(data["src"]), size=batch_size)
        return {k: v[index] for k, v in data.items()}

    def eval_set(self, seed: int, size: int) -> dict[str, np.ndarray]:
        del seed, size  # a fixed split
        return self._arrays(train=False)

    def eval_groups(self, seed: int, size: int) -> dict[str, np.ndarray]:
        """On the length splits' test part, `scan.held_out_parts`; else none."""
        del seed, size
        return {} if self.validation else scan.held_out_parts(self.data_split)

    @functools.cache  # noqa: B019 (a frozen task, a few of them per process)
    def _arrays(self, *, train: bool) -> dict[str, np.ndarray]:
        """The split's train or test pairs, encoded and packed once."""
        split = scan.scan_split(self.data_split, validation=self.validation)
        pairs = split[0 if train else 1]
        return self.pack([self.encode(c) for c, _ in pairs], [self.encode(a) for _, a in pairs])


def scan_task(o: Options) -> Task:
    vocab = SPECIALS + scan.COMMAND_WORDS + scan.ACTIONS
    longest = max(len(a.split()) for _, a in scan.scan_pairs())
    return ScanTask(
        "scan", vocab, 9, longest, words=True, data_split=o.split, validation=o.validation
    )
