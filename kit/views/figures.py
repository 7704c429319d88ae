"""Attention made visible as figures: heatmaps (matplotlib), patching maps.

The offline HTML viewer is `kit.views.viewer`; notebook views are `kit.views`.

Shape letters: L layers, B batch, N heads, T query length, S key length.
`model.attention_sets` gives weights as `[B, L, N, T, S]`; the functions here show
one example at a time, so the caller picks it first (`sets["cross"][b]`).
Arrays may be jax or numpy; they are read once with `np.asarray`.

Tokens are any sequence of labels; a string is a sequence of characters, which
suits the character-level toy tasks. Whitespace-only tokens are drawn visibly
(" " as "␣", "\\n" as the two characters "\\n") so a space keeps a label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

_FIGURE_FORMATS = (".png", ".svg")


def _label(token: Any) -> str:
    token = str(token)
    if token and token.isspace():
        return repr(token)[1:-1].replace(" ", "␣")
    return token


def _as_layers_heads(weights: Any, name: str) -> tuple[np.ndarray, int]:
    """`[T, S]`, `[N, T, S]` or `[L, N, T, S]` -> float64 `[L, N, T, S]` and the given rank."""
    weights = np.asarray(weights)
    rank = weights.ndim
    if rank not in (2, 3, 4):
        hint = ""
        if rank == 5:
            hint = (
                "; a batch dimension is not accepted: pick one example first, "
                "e.g. aux['decoder'][:, b] for weights [L, B, N, T, S]"
            )
        raise ValueError(
            f"{name}: expected rank 2 [T, S], 3 [N, T, S] or 4 [L, N, T, S], "
            f"given rank {rank} with shape {weights.shape}{hint}"
        )
    weights = weights.astype(np.float64).reshape((1,) * (4 - rank) + weights.shape)
    return weights, rank


def _check_tokens(tokens: Any, length: int, letter: str, name: str, shape: tuple) -> list[str]:
    labels = [_label(t) for t in tokens]
    if len(labels) != length:
        raise ValueError(
            f"{name}: expected {letter}={length} tokens (weights shape {shape}), "
            f"given {len(labels)}"
        )
    return labels


def figure_format(path: str | os.PathLike) -> str:
    """ "png" or "svg" from a figure path's suffix; raises ValueError naming `path`."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in _FIGURE_FORMATS:
        raise ValueError(
            f"path: expected a file name ending in {' or '.join(_FIGURE_FORMATS)}, "
            f"given {os.fspath(path)!r}"
        )
    return suffix[1:]


def plot_attention(
    weights: Any,
    query_tokens: Sequence[Any],
    key_tokens: Sequence[Any],
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str | None = None,
    diverging: bool = False,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Attention heatmaps, one per head, with token labels and a shared colour bar.

    Queries run down the y axis and keys along the x axis, so row t of a heatmap
    is the softmax distribution of query t over the keys. Works for self-
    attention (T = S) and cross-attention (T != S) alike. All heads share one
    colour scale, from 0 to the largest weight shown, so heads are comparable.

    Args:
      weights: attention weights of one example: `[T, S]` (one head),
        `[N, T, S]` (one layer: a row of heads) or `[L, N, T, S]` (a grid of
        layers by heads).
      query_tokens: T labels for the y axis.
      key_tokens: S labels for the x axis.
      layer_names: optional L row names (e.g. `["encoder 0", "encoder 1"]`);
        by default rows are "layer l" for `[L, N, T, S]` and unnamed otherwise.
      title: optional figure title.
      cmap: a matplotlib colour map name; default "viridis", or "RdBu_r" when
        `diverging`.
      diverging: for signed values such as a difference of two maps: the
        colour scale runs from -m to m, m the largest magnitude shown, so 0
        sits in the middle (white in RdBu_r).
      path: if given, the figure is also saved there; the suffix (.png or .svg)
        picks the format.

    Returns:
      The matplotlib `Figure` (not registered with pyplot, so it needs no
      closing and works without a display).

    Raises:
      ValueError: if `weights` is not rank 2 to 4 (a batch dimension included),
        if `query_tokens` is not T long or `key_tokens` not S long, if
        `layer_names` is not L long, or if `path` has another suffix.
    """
    w, rank = _as_layers_heads(weights, "weights")
    L, N, T, S = w.shape
    shape = np.shape(weights)
    y_labels = _check_tokens(query_tokens, T, "T", "query_tokens", shape)
    x_labels = _check_tokens(key_tokens, S, "S", "key_tokens", shape)
    if layer_names is not None and len(layer_names) != L:
        raise ValueError(
            f"layer_names: expected L={L} names (weights shape {shape}), given {len(layer_names)}"
        )
    fmt = None if path is None else figure_format(path)

    # Each heatmap grows with its token counts, within bounds that keep labels
    # legible; the whole figure is capped so a big model still renders.
    cell_w = float(np.clip(0.28 * S + 1.0, 2.2, 6.0))
    cell_h = float(np.clip(0.28 * T + 0.8, 2.0, 6.0))
    size = (min(N * cell_w + 1.5, 24.0), min(L * cell_h + (0.6 if title else 0.2), 24.0))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(L, N, squeeze=False)
    if diverging:
        vmax = float(np.abs(w).max()) if w.size and np.abs(w).max() > 0 else 1.0
        norm = Normalize(vmin=-vmax, vmax=vmax)
    else:
        vmax = float(w.max()) if w.size and w.max() > 0 else 1.0
        norm = Normalize(vmin=0.0, vmax=vmax)
    cmap = cmap or ("RdBu_r" if diverging else "viridis")
    fontsize = 9 if max(T, S) <= 24 else 6

    image = None
    for l in range(L):
        row = layer_names[l] if layer_names is not None else (f"layer {l}" if rank == 4 else None)
        for n in range(N):
            ax = axes[l, n]
            image = ax.imshow(w[l, n], cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            head = f"head {n}" if rank >= 3 else None
            ax.set_title(" / ".join(p for p in (row, head) if p), fontsize=10)
            # Labels on the outer edge only: every cell of the grid has the same tokens.
            ax.set_yticks(range(T), labels=y_labels if n == 0 else [], fontsize=fontsize)
            ax.set_xticks(
                range(S), labels=x_labels if l == L - 1 else [], fontsize=fontsize, rotation=90
            )
            ax.tick_params(length=2)
    label = "difference in attention weight" if diverging else "attention weight"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label=label)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, format=fmt, dpi=150)
    return fig


def plot_patching(result: Any) -> Figure:
    """Four heatmaps of a `kit.analysis.patching.TextPatching`: each head's output and the
    residual stream at each position, patched from the clean run into the corrupted
    one (activation patching) and estimated from one backward pass (attribution
    patching), as the share of the clean answer's logit difference that comes back."""
    panels = [
        ("heads: activation patching", result.heads, "head", None),
        ("heads: attribution patching", result.heads_attribution, "head", None),
        ("residual stream: activation patching", result.positions, "position", True),
        ("residual stream: attribution patching", result.positions_attribution, "position", True),
    ]
    T = len(result.clean_tokens)
    fig = Figure(figsize=(max(9.0, 0.5 * T * 2 + 3), 6.4), layout="constrained")
    limit = max(1.0, *(float(np.nanmax(np.abs(p[1]))) for p in panels))
    for ax, (title, values, across, by_token) in zip(
        fig.subplots(2, 2).ravel(), panels, strict=True
    ):
        values = np.asarray(values, float)
        im = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for (row, col), v in np.ndenumerate(values):
            color = "w" if abs(v) > 0.6 * limit else "k"
            ax.text(col, row, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(values.shape[0]))
        ax.set_xticks(range(values.shape[1]))
        if by_token:
            labels = [
                _label(c) if c == r else f"{_label(c)}/{_label(r)}"
                for c, r in zip(result.clean_tokens, result.corrupt_tokens, strict=True)
            ]
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(across)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"patching clean into corrupted at position {result.position}: logit "
        f"'{result.right}' - '{result.wrong}' ({result.clean:.2f} clean, "
        f"{result.corrupt:.2f} corrupted); 1 = all of it comes back",
        fontsize=9,
    )
    return fig


def patching_data(result: Any) -> dict[str, Any]:
    """A `kit.analysis.patching.TextPatching` (or its `to_json()` mapping) checked and made
    plain for a page's JSON (the viewer's patching view).

    Raises:
      ValueError: naming `patching` and the field that is missing or whose shape,
        tokens or values do not fit the others.
    """

    def field(name):
        if isinstance(result, Mapping):
            if name not in result:
                raise ValueError(f"patching: {name}: missing")
            return result[name]
        if not hasattr(result, name):
            raise ValueError(
                f"patching: expected a TextPatching or its to_json() dict, given "
                f"{type(result).__name__} without {name!r}"
            )
        return getattr(result, name)

    tokens = [[_label(t) for t in field(name)] for name in ("clean_tokens", "corrupt_tokens")]
    T = len(tokens[0])
    if len(tokens[1]) != T or T == 0:
        raise ValueError(f"patching: corrupt_tokens: {len(tokens[1])} tokens, clean_tokens {T}")
    out = {"clean_tokens": tokens[0], "corrupt_tokens": tokens[1]}
    for grid, points, columns in (
        ("heads", "head_points", None),
        ("positions", "position_points", T),
    ):
        out[points] = [str(p) for p in field(points)]
        rows = len(out[points])
        if rows == 0:
            raise ValueError(f"patching: {points}: expected at least one patched point, given none")
        for name in (grid, f"{grid}_attribution"):
            values = np.asarray(field(name), np.float64)
            want = f"[{rows}, {'N' if columns is None else columns}]"
            if values.ndim == 2 and columns is None:  # heads: N from the first grid
                columns = values.shape[1]
            if values.ndim != 2 or values.shape != (rows, columns):
                raise ValueError(f"patching: {name}: expected shape {want}, given {values.shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"patching: {name}: expected finite values, given NaN or inf")
            out[name] = values.tolist()
    position = field("position")
    if (
        isinstance(position, bool)
        or not isinstance(position, int | np.integer)
        or not 0 <= position < T
    ):
        raise ValueError(
            f"patching: position: expected a token index in [0, {T}), given {position!r}"
        )
    out["position"] = int(position)
    out.update(right=str(field("right")), wrong=str(field("wrong")))
    out.update(clean=float(field("clean")), corrupt=float(field("corrupt")))
    return out


def plot_heads(name: str, entry: Any, metric: str) -> Figure:
    """One attention set's pattern scores and per-head ablation (`kit.analysis.heads`),
    a heatmap each, layer by head."""
    from kit.analysis.interp import SCORES

    panels = [*entry["scores"].items(), (f"{metric} ablated", entry["ablation"]["per_head"])]
    fig = Figure(figsize=(3.2 * len(panels), 2.6), layout="constrained")
    for ax, (title, values) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        a = np.array([[np.nan if v is None else v for v in row] for row in values], float)
        score = title in SCORES
        im = ax.imshow(
            a,
            cmap="viridis" if score else "magma",
            vmin=0 if score else None,
            vmax=1 if score else None,
            aspect="auto",
        )
        for (layer, head), v in np.ndenumerate(a):
            ax.text(
                head,
                layer,
                "-" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="w" if np.isnan(v) or v < np.nanmean(a) else "k",
                fontsize=8,
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{name} attention: pattern scores and ablation", fontsize=10)
    return fig
