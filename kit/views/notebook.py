"""Attention views for notebooks: inline in Jupyter and Colab, saved as HTML, PNG or SVG.

A `View` holds one offline viewer page (`kit.views.viewer.attention_html`) and the
attention it shows. In a notebook its `_repr_html_` puts the page in an
`<iframe srcdoc="...">`: the page keeps its own ids, CSS and JavaScript, so
several views on one notebook page cannot clash, and nothing is loaded from the
network (no RequireJS, no CDN), as folium shows its maps. `save` writes the page
and `save_figure` draws one head, one layer's heads or every layer x head
through matplotlib (`kit.figures.plot_attention`).

    from kit import probe, views
    reading = probe.read_attention(task, graphdef, params, "Mark told Sam that he was leaving.")
    views.model_view(reading)            # shows itself as a notebook cell's result
    views.neuron_view(reading, layer=0, head=3, query=4).save("neuron.html")
    views.head_view(reading).save_figure("layer0.svg", layer=0)

A source is a `kit.analysis.probe.Reading` (anything with `.text`, `.prediction` and
`.attention`), a list of example dicts as `attention_html` takes them, or, as
BertViz takes it, your own model's weights with their tokens:
`views.head_view(weights, tokens)` (`from_arrays`). This
module draws only: it imports numpy, matplotlib and `kit.views.figures`, not the models.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kit.analysis.record import AttentionSet
from kit.views import figures, viewer


def from_arrays(
    attention: Any, tokens: Sequence[Any], key_tokens: Sequence[Any] | None = None
) -> list[Mapping[str, Any]]:
    """One example's attention from arrays, as BertViz takes it: `attention` is
    `[L, N, T, S]`, `[N, T, S]` or `[T, S]`, or a sequence of per-layer `[N, T, S]`
    or `[1, N, T, S]` arrays (a transformers model's `output_attentions`);
    `tokens` label the T queries and `key_tokens` the S keys (default: `tokens`,
    self-attention). Returns the example list the views and the viewer take."""
    if isinstance(attention, Sequence) and not isinstance(attention, str):
        layers = [np.asarray(a) for a in attention]
        layers = [a[0] if a.ndim == 4 and a.shape[0] == 1 else a for a in layers]
        if any(a.ndim != 3 for a in layers):
            shapes = [a.shape for a in layers]
            raise ValueError(
                f"attention: expected per-layer [N, T, S] or [1, N, T, S] arrays, given {shapes}"
            )
        attention = np.stack(layers)
    weights = np.asarray(attention)
    tokens = [str(t) for t in tokens]
    keys = tokens if key_tokens is None else [str(t) for t in key_tokens]
    entry = AttentionSet(weights, tokens, keys)
    return [{"name": " ".join(tokens), "attention": {"attention": entry}}]


def _examples(source: Any, name: str, tokens=None, key_tokens=None) -> list[Mapping[str, Any]]:
    """A Reading (duck-typed), a list of example dicts, or arrays with `tokens`
    (`from_arrays`) -> the list of example dicts."""
    if tokens is not None:
        return from_arrays(source, tokens, key_tokens)
    if all(hasattr(source, field) for field in ("text", "prediction", "attention")):
        return [
            {"name": source.text, "prediction": source.prediction, "attention": source.attention}
        ]
    if isinstance(source, Sequence) and not isinstance(source, str):
        return list(source)
    raise ValueError(
        f"{name}: expected a kit.analysis.probe.Reading or a list of example dicts, "
        f"given {type(source).__name__}"
    )


class View:
    """One attention page, shown inline in notebooks and exported as HTML or figures.

    Args:
      examples: a list of example dicts as `kit.views.viewer.attention_html` takes them.
      height: the inline frame's height in pixels; by default from the token
        and layer counts.
      **options: what the page shows first, as `kit.views.viewer.attention_html`
        takes them: `title`, `view`, `set_name`, `layer`, `head`, `query`,
        `compare` and `patching`.

    Raises:
      ValueError: as `kit.views.viewer.attention_html` does, naming the argument; or
        naming `height` if it is not a positive integer.
    """

    def __init__(
        self, examples: Sequence[Mapping[str, Any]], *, height: int | None = None, **options: Any
    ):
        self.page = viewer.attention_html(examples, **options)
        self.examples = list(examples)
        compare = options.get("compare")
        self.compare = None if compare is None else (int(compare[0]), int(compare[1]))
        self.set_name = options.get("set_name")
        if height is None:
            height = self._default_height()
        elif isinstance(height, bool) or not isinstance(height, int) or height <= 0:
            raise ValueError(f"height: expected a positive number of pixels, given {height!r}")
        self.height = height

    def _default_height(self) -> int:
        rows = 0
        for example in self.examples:
            for entry in example["attention"].values():
                w = np.shape(entry["weights"])
                layers = w[0] if len(w) == 4 else 1
                rows = max(rows, 22 * max(w[-2:]) + 120, 110 * layers)
        return int(np.clip(rows + 260, 420, 1200))

    def html(self) -> str:
        """The self-contained page."""
        return self.page

    def _repr_html_(self) -> str:
        """The page in a sandboxed `<iframe srcdoc>`: scripts run, but isolated from the
        notebook and from other views, and it needs no network or RequireJS."""
        return (
            f'<iframe srcdoc="{html.escape(self.page, quote=True)}" '
            f'sandbox="allow-scripts" title="attention view" '
            f'style="width: 100%; height: {self.height}px; border: 1px solid #ddd"></iframe>'
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the page to `path` (.html or .htm), UTF-8.

        Raises:
          ValueError: naming `path` for another suffix.
        """
        if os.path.splitext(os.fspath(path))[1].lower() not in (".html", ".htm"):
            raise ValueError(
                f"path: expected a file name ending in .html, given {os.fspath(path)!r}"
            )
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.page)

    def save_figure(
        self,
        path: str | os.PathLike,
        *,
        example: int = 0,
        set_name: str | None = None,
        layer: int | None = None,
        head: int | None = None,
    ) -> Figure:
        """Draws one head, one layer's heads or every layer x head, saved as PNG or SVG.

        A comparison view (with `compare=(a, b)`) draws b - a on a diverging
        colour scale centred on 0 (RdBu_r); others draw the weights.

        Args:
          path: the file; its suffix (.png or .svg) picks the format.
          example: which example (ignored by a comparison view).
          set_name: which attention set; default the one the page opens with,
            else the example's first.
          layer: one layer (`[N, T, S]`: a row of heads); default every layer.
          head: with `layer`, one head (`[T, S]`).

        Returns:
          The matplotlib Figure.

        Raises:
          ValueError: naming `path`, `example`, `set_name`, `layer` or `head`
            when out of range (`head` also when given without `layer`).
        """
        figures.figure_format(path)
        if self.compare is None:
            index = viewer._index(example, len(self.examples), "example", "valid")
            chosen = self.examples[index]
            name, entry = _pick_set(chosen["attention"], set_name or self.set_name)
            weights = _layers_heads(entry["weights"])
            what = f"{name} attention"
            if "name" in chosen:
                what += f": {chosen['name']}"
        else:
            a, b = (self.examples[i]["attention"] for i in self.compare)
            name, entry = _pick_set(a, set_name or self.set_name, aligned_with=b)
            weights = _layers_heads(b[name]["weights"]) - _layers_heads(entry["weights"])
            what = f"{name} attention, b - a"
        L, N = weights.shape[:2]
        title = what
        if head is not None and layer is None:
            raise ValueError("head: give layer too (one head of one layer)")
        if layer is not None:
            layer = viewer._index(layer, L, "layer", "valid")
            weights = weights[layer]
            title += f", layer {layer}"
            if head is not None:
                head = viewer._index(head, N, "head", "valid")
                weights = weights[head]
                title += f", head {head}"
        return figures.plot_attention(
            weights,
            entry["query_tokens"],
            entry["key_tokens"],
            title=title,
            diverging=self.compare is not None,
            path=path,
        )


def _layers_heads(weights: Any) -> np.ndarray:
    """Checked weights `[T, S]`, `[N, T, S]` or `[L, N, T, S]` -> float64 `[L, N, T, S]`."""
    weights = np.asarray(weights, np.float64)
    return weights.reshape((1,) * (4 - weights.ndim) + weights.shape)


def _pick_set(
    attention: Mapping[str, Any], name: str | None, *, aligned_with: Mapping | None = None
) -> tuple[str, Mapping[str, Any]]:
    names = [
        n
        for n in attention
        if aligned_with is None
        or (
            n in aligned_with
            and np.shape(attention[n]["weights"]) == np.shape(aligned_with[n]["weights"])
        )
    ]
    if name is None:
        name = names[0] if names else None
    if name not in names:
        raise ValueError(f"set_name: expected one of {names}, given {name!r}")
    return name, attention[name]


def head_view(
    source: Any,
    tokens: Sequence[Any] | None = None,
    *,
    key_tokens: Sequence[Any] | None = None,
    set_name: str | None = None,
    layer: int = 0,
    head: int | None = None,
    title: str | None = None,
) -> View:
    """Lines from query to key tokens, one colour per head (all heads, or only `head`).

    `source` is a `kit.analysis.probe.Reading`, a list of example dicts, or, with `tokens`,
    attention arrays of your own model (`from_arrays`): `head_view(weights, tokens)`.
    """
    examples = _examples(source, "source", tokens, key_tokens)
    return View(
        examples, title=title or _title(examples), set_name=set_name, layer=layer, head=head
    )


def model_view(
    source: Any,
    tokens: Sequence[Any] | None = None,
    *,
    key_tokens: Sequence[Any] | None = None,
    set_name: str | None = None,
    title: str | None = None,
) -> View:
    """A thumbnail of every layer x head; clicking one opens it in the head view.
    `source` and `tokens` as in `head_view`."""
    examples = _examples(source, "source", tokens, key_tokens)
    return View(examples, title=title or _title(examples), view="model", set_name=set_name)


def neuron_view(
    source: Any,
    *,
    set_name: str | None = None,
    layer: int = 0,
    head: int = 0,
    query: int = 0,
    title: str | None = None,
) -> View:
    """How one head's weights for one query token arise from q, k and v (the set needs vectors)."""
    examples = _examples(source, "source")
    return View(
        examples,
        title=title or _title(examples),
        view="neuron",
        set_name=set_name,
        layer=layer,
        head=head,
        query=query,
    )


def diff_view(a: Any, b: Any, *, set_name: str | None = None, title: str | None = None) -> View:
    """b's attention minus a's, every layer x head, on a diverging scale; both predictions."""
    (first,), (second,) = _examples_one(a, "a"), _examples_one(b, "b")
    return View(
        [first, second],
        title=title or f"{first.get('name', 'a')} vs {second.get('name', 'b')}",
        view="diff",
        set_name=set_name,
        compare=(0, 1),
    )


def patching_view(result: Any, clean: Any, corrupt: Any, *, title: str | None = None) -> View:
    """Activation and attribution patching (`result`, a `kit.analysis.patching.TextPatching`)
    as heatmaps, with the clean and the corrupted run's attention beside it (readings
    or one-example lists, shown as examples 0 and 1 in the other views)."""
    (first,), (second,) = _examples_one(clean, "clean"), _examples_one(corrupt, "corrupt")
    names = first.get("name", "clean"), second.get("name", "corrupt")
    title = title or f"patching {names[0]} into {names[1]}"
    return View([first, second], title=title, view="patching", patching=result)


def _examples_one(source: Any, name: str) -> list[Mapping[str, Any]]:
    examples = _examples(source, name)
    if len(examples) != 1:
        raise ValueError(f"{name}: expected one example, given {len(examples)}")
    return examples


def _title(examples: Sequence[Mapping[str, Any]]) -> str:
    return str(examples[0].get("name", "kit attention")) if len(examples) == 1 else "kit attention"
