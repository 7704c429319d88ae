"""The UCI handwritten digits that scikit-learn ships: 1,797 images of 8x8 pixels, 10 classes.

The data comes inside scikit-learn's package (`sklearn.datasets.load_digits`
reads a file it ships), so nothing is downloaded. The held-out split is fixed:
20% of every class (360 images; 1,437 for training), chosen with a fixed seed
by scikit-learn's stratified `train_test_split`, the same for every run and
config seed. Training batches are a pure function of (seed, step), drawn with
replacement from the training images, each shifted by at most one pixel in
each direction (zeros fill in) unless augmentation is off.

References:
  Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
  Learning Repository, 1998.
"""

from __future__ import annotations

import functools

import numpy as np

IMAGE_SIZE = 8
CLASSES = tuple("0123456789")
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@functools.cache
def load() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as float32 `[1797, 8, 8]` in [0, 1] and int32 labels `[1797]`.

    Raises:
      ValueError: naming `task.name` when scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError(
            "task.name: the 'digits' task reads scikit-learn's digits; install the "
            "vision extra: pip install -e '.[vision]'"
        ) from None
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


@functools.cache
def split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out images: stratified by class, fixed."""
    from sklearn.model_selection import train_test_split

    _, labels = load()
    train, held_out = train_test_split(
        np.arange(len(labels)),
        test_size=HELD_OUT_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return np.sort(train), np.sort(held_out)


def shift(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each image `[B, H, W]` moved by (dy, dx) pixels `[B]`, zeros filling in."""
    B, H, W = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    rows = (np.arange(H)[None, :] + 1 - dy[:, None])[:, :, None]
    cols = (np.arange(W)[None, :] + 1 - dx[:, None])[:, None, :]
    return padded[np.arange(B)[:, None, None], rows, cols]


def train_batch(seed: int, step: int, batch_size: int, *, augment: bool) -> dict[str, np.ndarray]:
    """Training batch `step`: images `[B, 8, 8]` float32, labels `[B]` int32."""
    images, labels = load()
    rng = np.random.default_rng([seed, step])
    index = rng.choice(split()[0], size=batch_size)
    batch = images[index]
    if augment:
        dy, dx = rng.integers(-1, 2, size=(2, batch_size))
        batch = shift(batch, dy, dx)
    return {"images": batch, "labels": labels[index]}


def eval_set() -> dict[str, np.ndarray]:
    """The whole held-out split: images `[360, 8, 8]`, labels `[360]`."""
    images, labels = load()
    index = split()[1]
    return {"images": images[index], "labels": labels[index]}
