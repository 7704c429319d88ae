"""Handwritten digits as a task: 8x8 images, one class each (scikit-learn's, kit.digits)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from kit import digits
from kit.tasks.base import Options, Task


@dataclasses.dataclass(frozen=True)
class DigitsTask(Task):
    """Images `[B, 8, 8]` and labels `[B]`; the held-out set is the fixed test split."""

    augment: bool = True  # one-pixel shifts of the training images
    image_size: ClassVar[int] = digits.IMAGE_SIZE

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        return digits.train_batch(seed, step, batch_size, augment=self.augment)

    def eval_set(self, seed: int, size: int) -> dict[str, np.ndarray]:
        del seed, size  # a fixed split
        return digits.eval_set()


def digits_task(o: Options) -> Task:
    digits.load()  # fails here, naming the extra, without scikit-learn
    size = digits.IMAGE_SIZE
    return DigitsTask("digits", digits.CLASSES, size * size, 1, augment=o.augment)
