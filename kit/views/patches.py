"""Where a Vision Transformer looks: class-token attention laid over the image's pixels.

A ViT's tokens are a class token and the image's p x p patches in row-major
order; `patch_map` spreads one weight per patch over that patch's pixels, and
`plot_patch_attention` draws the image under every layer and head's attention
from the class token, and under the attention rollout (Abnar & Zuidema, 2020).
`patch_attention_html` wraps the figure in an offline page.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kit.analysis import interp
from kit.views import figures


def patch_map(weights: Any, patch_size: int, image_size: int) -> np.ndarray:
    """One weight per patch `[P]` (row-major) -> a pixel map `[H, W]`, each patch's
    pixels carrying its weight.

    Raises:
      ValueError: naming `weights` when P is not (image_size / patch_size)^2, or
        `patch_size` when it does not divide `image_size`.
    """
    weights = np.asarray(weights, np.float64)
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch_size: must divide the image size {image_size}, got {patch_size}")
    grid = image_size // patch_size
    if weights.shape != (grid * grid,):
        raise ValueError(
            f"weights: expected one per patch, shape ({grid * grid},), got {weights.shape}"
        )
    return np.kron(weights.reshape(grid, grid), np.ones((patch_size, patch_size)))


def class_token_maps(weights: Any) -> tuple[np.ndarray, np.ndarray]:
    """From one image's self-attention `[L, N, T, T]` (token 0 the class token):
    each layer and head's attention from the class token to the patches `[L, N, T - 1]`,
    and the rollout's class-token row over the patches `[T - 1]`."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights: expected self-attention [L, N, T, T], got {weights.shape}")
    return weights[:, :, 0, 1:], interp.attention_rollout(weights)[0, 1:]


def plot_patch_attention(
    image: Any,
    weights: Any,
    patch_size: int,
    *,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """The image under each layer and head's class-token attention, and under the rollout.

    Args:
      image: `[H, W]` pixels (any range).
      weights: one image's self-attention `[L, N, T, T]`, token 0 the class token.
      patch_size: p; T - 1 = (H / p)^2 patches.
      title: the figure's title.
      path: if given, the figure is saved there (.png or .svg).

    Returns:
      A matplotlib Figure: L rows of N heads and, in the last column, the rollout.
    """
    image = np.asarray(image, np.float64)
    heads, rollout = class_token_maps(weights)
    L, N, _ = heads.shape
    figure = Figure(figsize=(1.6 * (N + 1), 1.7 * L + 0.5), layout="constrained")
    axes = figure.subplots(L, N + 1, squeeze=False)
    for layer in range(L):
        for column in range(N + 1):
            ax = axes[layer, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column == N and layer:  # the rollout is drawn once, in the first row
                ax.axis("off")
                continue
            cells = rollout if column == N else heads[layer, column]
            ax.imshow(image, cmap="gray_r")
            ax.imshow(_red_overlay(patch_map(cells, patch_size, image.shape[0])))
            label = "rollout, all layers" if column == N else f"layer {layer} head {column}"
            ax.set_title(label, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    if path is not None:
        figure.savefig(path, format=figures.figure_format(path), dpi=120)
    return figure


def _red_overlay(pixels: np.ndarray) -> np.ndarray:
    """RGBA `[H, W, 4]`: red whose opacity grows with the weight (the largest at 0.85),
    so that the digit shows through where the head does not look."""
    rgba = np.zeros((*pixels.shape, 4))
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.85 * pixels / max(float(pixels.max()), 1e-12)
    return rgba


def patch_attention_html(figure: Figure, *, title: str, caption: str) -> str:
    """An offline page showing `figure` (embedded as PNG) with a caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<section><h1>{html.escape(title)}</h1><p>{html.escape(caption)}</p>"
        f"<img alt='class-token attention' src='data:image/png;base64,{data}'></section>"
        "</body></html>\n"
    )
