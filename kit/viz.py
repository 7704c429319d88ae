"""Attention made visible: heatmaps, an offline HTML viewer, attention rollout.

Shape letters: L layers, B batch, N heads, T query length, S key length. Models
return attention weights in `aux` as `[L, B, N, T, S]`; the functions here show
one example at a time, so the caller picks it first (`aux["cross"][:, b]`).
Arrays may be jax or numpy; they are read once with `np.asarray`.

Tokens are any sequence of labels; a string is a sequence of characters, which
suits the character-level toy tasks. Whitespace-only tokens are drawn visibly
(" " as "␣", "\\n" as the two characters "\\n") so a space keeps a label.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

_FIGURE_FORMATS = (".png", ".svg")

# Weights are rounded to this many decimals in the HTML file: finer than the eye
# can see in a line's opacity, and it keeps the file small.
_HTML_DECIMALS = 4


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


def _check_figure_path(path: str | os.PathLike) -> str:
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
    cmap: str = "viridis",
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
      cmap: a matplotlib colour map name.
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
    fmt = None if path is None else _check_figure_path(path)

    # Each heatmap grows with its token counts, within bounds that keep labels
    # legible; the whole figure is capped so a big model still renders.
    cell_w = float(np.clip(0.28 * S + 1.0, 2.2, 6.0))
    cell_h = float(np.clip(0.28 * T + 0.8, 2.0, 6.0))
    size = (min(N * cell_w + 1.5, 24.0), min(L * cell_h + (0.6 if title else 0.2), 24.0))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(L, N, squeeze=False)
    vmax = float(w.max()) if w.size and w.max() > 0 else 1.0
    norm = Normalize(vmin=0.0, vmax=vmax)
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
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="attention weight")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, format=fmt, dpi=150)
    return fig


def attention_rollout(weights: Any, *, residual: bool = True) -> np.ndarray:
    """Attention rollout: how much each position draws on each input token.

    Heads are averaged per layer; with `residual`, the skip connection is
    modelled by mixing in the identity, and the layers are multiplied:

      Ā_l = mean_n A_{l,n}
      Â_l = rownorm(0.5 * Ā_l + 0.5 * I)      (Â_l = Ā_l if not residual)
      R   = Â_L @ ... @ Â_2 @ Â_1

    R[i, j] is the share of token j of the input in position i after the last
    layer; with `residual`, every row of R sums to 1.

    Args:
      weights: self-attention weights `[L, N, T, T]`, or `[L, B, N, T, T]` as
        models return them in `aux`.
      residual: model the residual connection (0.5 * A + 0.5 * I, rows
        renormalized), as in the paper.

    Returns:
      float64 `[T, T]`, or `[B, T, T]` for batched weights.

    Raises:
      ValueError: if `weights` is not rank 4 or 5, or its last two dimensions
        differ (rollout chains layers, so it needs self-attention).

    References:
      Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
      https://arxiv.org/abs/2005.00928
    """
    w = np.asarray(weights)
    if w.ndim not in (4, 5):
        raise ValueError(
            f"weights: expected rank 4 [L, N, T, T] or 5 [L, B, N, T, T], "
            f"given rank {w.ndim} with shape {w.shape}"
        )
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(
            f"weights: expected self-attention with T = S, given shape {w.shape} "
            f"(T={w.shape[-2]}, S={w.shape[-1]}); rollout does not apply to cross-attention"
        )
    a = w.astype(np.float64).mean(axis=-3)  # [L, (B,) T, T]
    if residual:
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        # Rows of a fully masked query sum to 0.5, not 1: renormalizing keeps R stochastic.
        a = a / a.sum(axis=-1, keepdims=True)
    rollout = a[0]
    for layer in a[1:]:
        rollout = layer @ rollout
    return rollout


# --------------------------------------------------------------------------
# The HTML viewer.


def _viewer_data(examples: Any, title: str) -> dict[str, Any]:
    if isinstance(examples, Mapping | str) or not isinstance(examples, Sequence) or not examples:
        given = "an empty list" if isinstance(examples, list) else type(examples).__name__
        raise ValueError(
            "examples: expected a non-empty list of dicts "
            f'{{"name": str, "attention": {{set_name: {{...}}}}}}, given {given}'
        )
    out = []
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise ValueError(f"examples[{i}]: expected a dict, given {type(example).__name__}")
        name = str(example.get("name", f"example {i}"))
        where = f"examples[{i}] ({name!r})"
        attention = example.get("attention")
        if not isinstance(attention, Mapping) or not attention:
            raise ValueError(
                f"{where}: attention: expected a non-empty dict {{set_name: {{'weights', "
                f"'query_tokens', 'key_tokens'}}}}, given {type(attention).__name__}"
            )
        sets = []
        for set_name, entry in attention.items():
            at = f"{where}, set {str(set_name)!r}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{at}: expected a dict, given {type(entry).__name__}")
            for field in ("weights", "query_tokens", "key_tokens"):
                if field not in entry:
                    raise ValueError(f"{at}: {field}: missing")
            w, _ = _as_layers_heads(entry["weights"], f"{at}: weights")
            shape = np.shape(entry["weights"])
            if not np.isfinite(w).all():
                raise ValueError(f"{at}: weights: expected finite values, given NaN or inf")
            T, S = w.shape[-2:]
            query = _check_tokens(entry["query_tokens"], T, "T", f"{at}: query_tokens", shape)
            key = _check_tokens(entry["key_tokens"], S, "S", f"{at}: key_tokens", shape)
            sets.append(
                {
                    "name": str(set_name),
                    "query_tokens": query,
                    "key_tokens": key,
                    "weights": np.round(w, _HTML_DECIMALS).tolist(),
                }
            )
        out.append({"name": name, "sets": sets})
    return {"title": title, "examples": out}


def attention_html(examples: Sequence[Mapping[str, Any]], *, title: str = "kit attention") -> str:
    """One self-contained HTML page that shows attention as lines between tokens.

    In the spirit of BertViz's head view: query tokens sit in a left column and
    key tokens in a right one, joined by one line per (head, query, key) whose
    opacity and width grow with the weight, one colour per head. The page has
    an example picker (when several examples are given), an attention-set
    picker (`#set`), a layer picker (`#layer`) and a checkbox per head
    (`.head-toggle[data-head="n"]`). Hovering a query token keeps only its lines
    and lists its weights over the keys, per visible head, in `#weights`;
    hovering a key token does the same for the weights into it.

    The page loads nothing: CSS, JavaScript and data are inline, and a
    Content-Security-Policy forbids any request, so it opens offline from disk.
    The data sit in a `<script type="application/json">` block with every "<"
    escaped, and tokens are set with `textContent`, so token text cannot inject
    markup. Weights are rounded to 4 decimals.

    Args:
      examples: a list of dicts, one per example:
        `{"name": str, "attention": {set_name: {"weights": [L, N, T, S],
        "query_tokens": T labels, "key_tokens": S labels}}}`; e.g. set names
        "encoder", "decoder" and "cross" with the query/key tokens that fit each
        (cross: target tokens over source tokens). "name" is optional; weights
        may also be `[N, T, S]` or `[T, S]`, and sets may differ in L, N, T, S.
      title: page title and heading.

    Returns:
      The HTML text.

    Raises:
      ValueError: if `examples` is not a non-empty list of such dicts, or a
        set's weights have the wrong rank, non-finite values, or a token list
        whose length does not match; the message names the example, the set
        and the field.
    """
    data = json.dumps(_viewer_data(examples, str(title)), ensure_ascii=False)
    # "<" as \u003c is still valid JSON, and no "</script>" or "<!--" in a token
    # can end the data block early.
    data = data.replace("<", "\\u003c")
    # One pass, so a title or token that spells a placeholder is left alone.
    parts = {"__TITLE__": html.escape(str(title)), "__DATA__": data}
    return re.sub("__TITLE__|__DATA__", lambda m: parts[m.group()], _TEMPLATE)


def write_attention_html(
    path: str | os.PathLike, examples: Sequence[Mapping[str, Any]], **kwargs: Any
) -> None:
    """Writes `attention_html(examples, **kwargs)` to `path` (UTF-8)."""
    text = attention_html(examples, **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 0.8rem; }
  #controls { display: flex; flex-wrap: wrap; gap: 0.6rem 1.4rem; align-items: center; }
  #controls label { font-size: 0.9rem; }
  select { font-size: 0.9rem; margin-left: 0.3rem; }
  #heads { display: flex; flex-wrap: wrap; gap: 0.3rem 0.7rem; align-items: center; }
  .head-label { display: inline-flex; align-items: center; gap: 0.25rem; cursor: pointer; }
  .swatch { display: inline-block; width: 0.9rem; height: 0.9rem; border-radius: 2px; }
  button { font-size: 0.8rem; padding: 0.1rem 0.4rem; }
  .hint { color: #666; font-size: 0.85rem; }
  #main { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; margin-top: 1rem; }
  #view .token { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px;
                 cursor: default; dominant-baseline: middle; }
  #view .token.active { font-weight: bold; fill: #c00; }
  #view .column-title { font-size: 12px; fill: #666; dominant-baseline: middle; }
  #view .attn.faded { visibility: hidden; }
  #weights table { border-collapse: collapse; font-size: 0.85rem; }
  #weights th, #weights td { padding: 0.1rem 0.5rem; border-bottom: 1px solid #eee; }
  #weights td { text-align: right; font-variant-numeric: tabular-nums; }
  #weights th.tok { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
  #weights caption { text-align: left; font-weight: bold; padding-bottom: 0.3rem; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="controls">
  <label id="example-label">example<select id="example"></select></label>
  <label>attention<select id="set"></select></label>
  <label>layer<select id="layer"></select></label>
  <div id="heads"></div>
  <button id="heads-all" type="button">all heads</button>
  <button id="heads-none" type="button">no heads</button>
</div>
<p class="hint">Line opacity and width show the attention weight, one colour per head.
Hover a token to see only its weights.</p>
<div id="main">
  <svg id="view" role="img" aria-label="attention lines"></svg>
  <div id="weights"></div>
</div>
<script type="application/json" id="attention-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
// Taken from the page rather than spelled out, so the file holds no URL at all.
const SVG_NS = document.getElementById("view").namespaceURI;
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
  [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34],
  [23, 190, 207]];
const ROW = 22, PAD = 10, GAP = 240, HEADER = 24;
// Lines this faint are invisible; skipping them keeps large views fast.
const MIN_WEIGHT = 0.005;
const HINT = "Hover a query (left) or key (right) token to list its weights.";
const state = { example: 0, set: 0, layer: 0, heads: [] };
const byId = (id) => document.getElementById(id);

function headColor(n, alpha = 1) {
  if (n < PALETTE.length) return `rgba(${PALETTE[n].join(",")},${alpha})`;
  // Past the palette, golden-angle hues stay apart for any head count.
  return `hsla(${(n * 137.508) % 360},60%,45%,${alpha})`;
}

function current() { return DATA.examples[state.example].sets[state.set]; }

function fillSelect(select, labels, selected) {
  select.replaceChildren(...labels.map((label, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = label;
    return option;
  }));
  select.value = String(selected);
}

function svgElement(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  return el;
}

function setExample(index) {
  const previous = DATA.examples[state.example].sets[state.set];
  state.example = index;
  const sets = DATA.examples[index].sets;
  // Stay on the same attention set (e.g. "cross") when the new example has it.
  const same = previous ? sets.findIndex((s) => s.name === previous.name) : -1;
  state.set = same >= 0 ? same : 0;
  fillSelect(byId("set"), sets.map((s) => s.name), state.set);
  setSet(state.set);
}

function setSet(index) {
  state.set = index;
  const set = current();
  const L = set.weights.length, N = set.weights[0].length;
  state.layer = Math.min(state.layer, L - 1);
  fillSelect(byId("layer"), set.weights.map((_, l) => `layer ${l}`), state.layer);
  state.heads = Array.from({ length: N }, (_, n) => state.heads[n] ?? true);
  const heads = byId("heads");
  heads.replaceChildren(...state.heads.map((on, n) => {
    const label = document.createElement("label");
    label.className = "head-label";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "head-toggle";
    box.dataset.head = String(n);
    box.checked = on;
    box.addEventListener("change", () => { state.heads[n] = box.checked; draw(); });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = headColor(n);
    label.append(box, swatch, document.createTextNode(`head ${n}`));
    return label;
  }));
  draw();
}

function setAllHeads(on) {
  state.heads = state.heads.map(() => on);
  for (const box of document.querySelectorAll(".head-toggle")) box.checked = on;
  draw();
}

function draw() {
  const set = current();
  const W = set.weights[state.layer];
  const svg = byId("view");
  svg.replaceChildren();
  const lines = svgElement("g", { id: "lines" });
  svg.append(lines);
  const columns = [["query", set.query_tokens], ["key", set.key_tokens]].map(([kind, tokens]) =>
    tokens.map((token, i) => {
      const text = svgElement("text", { class: `token ${kind}`, "data-index": i });
      text.textContent = token;
      text.addEventListener("mouseenter", () => focus(kind, i));
      text.addEventListener("mouseleave", unfocus);
      svg.append(text);
      return text;
    }));
  // Column widths are measured after the text is in the page, so any font fits.
  const width = (texts) => Math.max(40, ...texts.map((t) => t.getComputedTextLength()));
  const [qWidth, kWidth] = columns.map(width);
  const x0 = PAD + qWidth, x1 = x0 + 8, x2 = x1 + GAP, x3 = x2 + 8;
  const y = (i) => PAD + HEADER + ROW * (i + 0.5);
  columns[0].forEach((t, i) => { t.setAttribute("x", x0); t.setAttribute("y", y(i)); });
  columns[0].forEach((t) => t.setAttribute("text-anchor", "end"));
  columns[1].forEach((t, i) => { t.setAttribute("x", x3); t.setAttribute("y", y(i)); });
  const titles = [["queries", x0, "end"], ["keys", x3, "start"]];
  for (const [label, x, anchor] of titles) {
    const text = svgElement("text", { class: "column-title", x, y: PAD + HEADER / 2,
                                      "text-anchor": anchor });
    text.textContent = label;
    svg.append(text);
  }
  state.heads.forEach((on, n) => {
    if (!on) return;
    W[n].forEach((row, t) => row.forEach((w, s) => {
      if (w < MIN_WEIGHT) return;
      lines.append(svgElement("line", {
        class: "attn", x1, y1: y(t), x2, y2: y(s), stroke: headColor(n),
        "stroke-opacity": w, "stroke-width": 1 + 3 * w, "data-head": n, "data-query": t,
        "data-key": s, "data-weight": w,
      }));
    }));
  });
  const rows = Math.max(set.query_tokens.length, set.key_tokens.length);
  svg.setAttribute("width", x3 + kWidth + PAD);
  svg.setAttribute("height", 2 * PAD + HEADER + ROW * rows);
  showHint();
}

function focus(kind, index) {
  const attr = kind === "query" ? "query" : "key";
  for (const line of document.querySelectorAll("#lines .attn")) {
    line.classList.toggle("faded", line.dataset[attr] !== String(index));
  }
  for (const token of document.querySelectorAll(`#view .token.${kind}`)) {
    token.classList.toggle("active", token.dataset.index === String(index));
  }
  showWeights(kind, index);
}

function unfocus() {
  for (const el of document.querySelectorAll("#view .faded, #view .active")) {
    el.classList.remove("faded", "active");
  }
  showHint();
}

function showHint() {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = HINT;
  byId("weights").replaceChildren(p);
}

function showWeights(kind, index) {
  const set = current();
  const W = set.weights[state.layer];
  const isQuery = kind === "query";
  const own = isQuery ? set.query_tokens : set.key_tokens;
  const other = isQuery ? set.key_tokens : set.query_tokens;
  const heads = state.heads.flatMap((on, n) => (on ? [n] : []));
  const table = document.createElement("table");
  table.id = "weights-table";
  table.dataset.kind = kind;
  table.dataset.index = String(index);
  const caption = table.createCaption();
  caption.textContent = isQuery
    ? `query ${index} "${own[index]}" attends to`
    : `key ${index} "${own[index]}" is attended by`;
  const head = table.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.textContent = isQuery ? "key" : "query";
  head.append(corner);
  for (const n of heads) {
    const th = document.createElement("th");
    th.textContent = `head ${n}`;
    th.style.color = headColor(n);
    head.append(th);
  }
  const body = table.createTBody();
  other.forEach((token, j) => {
    const row = body.insertRow();
    row.dataset.index = String(j);
    const th = document.createElement("th");
    th.className = "tok";
    th.textContent = token;
    row.append(th);
    for (const n of heads) {
      const w = isQuery ? W[n][index][j] : W[n][j][index];
      const td = row.insertCell();
      td.dataset.head = String(n);
      td.textContent = w.toFixed(4);
      td.style.background = headColor(n, 0.6 * w);
    }
  });
  byId("weights").replaceChildren(table);
}

byId("example").addEventListener("change", (e) => setExample(Number(e.target.value)));
byId("set").addEventListener("change", (e) => setSet(Number(e.target.value)));
byId("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
byId("heads-all").addEventListener("click", () => setAllHeads(true));
byId("heads-none").addEventListener("click", () => setAllHeads(false));
fillSelect(byId("example"), DATA.examples.map((e) => e.name), 0);
byId("example-label").hidden = DATA.examples.length < 2;
setExample(0);
</script>
</body>
</html>
"""
