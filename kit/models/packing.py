"""Sequence packing: several examples in one row, kept apart by a document mask.

A padded batch spends most of its positions on padding when lengths vary (SCAN's
targets: 15 of 49 positions on average). A packed row holds examples one after
another; each token carries the index of its example in the row (its segment,
1, 2, ...; 0 for the padding at the end) and its position within the example,
which restarts at 0. Attention sees only its own example through a document
block mask (`kit.mods.documents`), and positions (absolute, RoPE, ALiBi, T5)
restart with each example, so a packed example's logits are those it gets
alone. The loss is the mean over target tokens either way.
"""

from __future__ import annotations

import numpy as np

from kit import tasks


def _place(lengths, widths, rows):
    """Next-fit: examples in order, each in the current row if all its sequences
    fit there, else in the next row; stops when `rows` rows are full. Returns the
    (row, start of each sequence) of each example placed, in order."""
    used = np.zeros((rows, len(widths)), np.int64)
    placed = []
    row = 0
    for i in range(len(lengths[0])):
        need = np.array([length[i] for length in lengths])
        if np.any(used[row] + need > widths):
            row += 1
            if row == rows:
                break
        placed.append((row, used[row].copy()))
        used[row] += need
    return placed


def _lengths(mb, sequences) -> list[np.ndarray]:
    out = []
    for name in sequences:
        field = mb[sequences[name][0]]
        out.append(field.sum(axis=1) if field.dtype == bool else field)
    return out


def row_widths(
    mb: dict[str, np.ndarray], sequences: dict[str, tuple[str, ...]], span: int
) -> tuple[int, ...]:
    """Per sequence, the width of a packed row that holds about `span` examples of
    the mean length in `mb` (a multiple of 8, and at least the padded width so any
    example fits)."""
    widths = []
    for name, lengths in zip(sequences, _lengths(mb, sequences), strict=True):
        padded = mb[sequences[name][1]].shape[1]
        widths.append(max(padded, -(-int(np.ceil(span * lengths.mean())) // 8) * 8))
    return tuple(widths)


def pack(
    mb: dict[str, np.ndarray],
    sequences: dict[str, tuple[str, ...]],
    rows: int,
    widths: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Packs a per-example model batch into `rows` rows of the given widths.

    Args:
      mb: a model batch with one example per row (`TaskModel.batch`).
      sequences: per sequence of an example (e.g. "src", "tgt"), its length
        field or array name and the names of the arrays laid out along it: e.g.
        {"src": ("src_lengths", "src"), "tgt": ("weights", "tgt_in", "targets",
        "weights")}; a length taken from a bool array is the count of its True.
      rows: the packed batch's rows.
      widths: per sequence, the packed row's width (`row_widths`).

    Returns:
      The packed batch: each array `[rows, width]` (padding PAD / False),
      and per sequence `{name}_segments` (1, 2, ... per example; 0 padding),
      `{name}_positions` (restarting at 0) and `{name}_lengths` (used width).
    """
    names = list(sequences)
    lengths = _lengths(mb, sequences)
    placed = _place(lengths, np.array(widths), rows)
    out: dict[str, np.ndarray] = {}
    for s, name in enumerate(names):
        width = int(widths[s])
        out[f"{name}_segments"] = np.zeros((rows, width), np.int32)
        out[f"{name}_positions"] = np.zeros((rows, width), np.int32)
        out[f"{name}_lengths"] = np.zeros((rows,), np.int32)
        for array in sequences[name][1:]:
            fill = False if mb[array].dtype == bool else tasks.PAD
            out[array] = np.full((rows, width), fill, mb[array].dtype)
    segment = np.zeros(rows, np.int32)
    for i, (row, starts) in enumerate(placed):
        segment[row] += 1
        for s, name in enumerate(names):
            n, start = int(lengths[s][i]), int(starts[s])
            for array in sequences[name][1:]:
                out[array][row, start : start + n] = mb[array][i, :n]
            out[f"{name}_segments"][row, start : start + n] = segment[row]
            out[f"{name}_positions"][row, start : start + n] = np.arange(n)
            out[f"{name}_lengths"][row] = start + n
    return out


def fields(mb: dict) -> dict | None:
    """A packed batch's positions and segments, or None for a batch that is not packed."""
    if "src_segments" not in mb:
        return None
    return {k: v for k, v in mb.items() if k.endswith(("_positions", "_segments"))}
