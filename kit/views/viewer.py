"""The offline HTML viewer: one self-contained page with four views of attention and
one of activation patching.

`attention_html(examples, ...)` validates every field and builds the page from
the package data files `kit/views/assets/viewer.{html,css,js}`; the page loads
nothing and trusts its data. `kit.views` wraps it for notebooks; `kit.views.figures`
draws the same attention as matplotlib figures. Tokens are labelled as
`kit.views.figures` labels them, and weights are read as `[L, N, T, S]`
(or `[N, T, S]`, `[T, S]`) of one example.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kit.views.figures import (  # kit-internal: one reading of weights and tokens
    _as_layers_heads,
    _check_tokens,
    patching_data,
)

# Weights are rounded to this many decimals in the HTML file: finer than the eye
# can see in a line's opacity, and it keeps the file small.
_HTML_DECIMALS = 4


@functools.cache
def _viewer_assets() -> tuple[str, str, str]:
    """The viewer's page skeleton, CSS and JavaScript, read once from `kit/views/assets`.

    The skeleton holds the placeholders `__TITLE__`, `__STYLE__`, `__DATA__` and
    `__SCRIPT__`, each on its own line where a whole file goes in; the CSS and
    JavaScript are inlined without their final newline, so the page reads as if
    the files were written into it.
    """
    assets = importlib.resources.files("kit.views") / "assets"
    page, style, script = (
        (assets / name).read_text(encoding="utf-8")
        for name in ("viewer.html", "viewer.css", "viewer.js")
    )
    style, script = style.removesuffix("\n"), script.removesuffix("\n")
    # Inline, a "</style" or "</script" would end its element early (and "<!--"
    # in a script can hide the end tag); the data get "<" escaped, these may not.
    for name, text, forbidden in (
        ("viewer.css", style, ("</style",)),
        ("viewer.js", script, ("</script", "<!--")),
    ):
        for bad in forbidden:
            if bad in text.lower():
                raise RuntimeError(
                    f"kit/views/assets/{name}: {bad!r} cannot be inlined in the page"
                )
    return page, style, script


# The viewer's views; "neuron" needs a set's vectors, "diff" a `compare` pair,
# "patching" a patching result.
VIEWS = ("head", "model", "neuron", "diff", "patching")


def _check_optional(
    entry: Mapping, field: str, expected: tuple, rank: int, at: str
) -> np.ndarray | None:
    """A set's optional array field as float64 of `rank` (leading ones added), or None.

    `expected` is the field's shape with the weights' leading dimensions as
    given, None where any size (a head dimension) fits.
    """
    if field not in entry or entry[field] is None:
        return None
    value = np.asarray(entry[field])
    if value.ndim != len(expected) or any(
        e is not None and e != g for e, g in zip(expected, value.shape, strict=True)
    ):
        want = "[" + ", ".join("H" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{at}: {field}: expected shape {want}, given {value.shape}")
    if not np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_:
        raise ValueError(f"{at}: {field}: expected numbers, given dtype {value.dtype}")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        raise ValueError(f"{at}: {field}: expected finite values, given NaN or inf")
    if value.shape and value.shape[-1] == 0:
        raise ValueError(f"{at}: {field}: expected a non-empty last dimension, given {value.shape}")
    return value.reshape((1,) * (rank - len(expected)) + value.shape)


def _set_data(entry: Mapping, at: str) -> dict[str, Any]:
    """One attention set checked and made ready for the page's JSON."""
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
    out: dict[str, Any] = {
        "query_tokens": _check_tokens(entry["query_tokens"], T, "T", f"{at}: query_tokens", shape),
        "key_tokens": _check_tokens(entry["key_tokens"], S, "S", f"{at}: key_tokens", shape),
        "weights": np.round(w, _HTML_DECIMALS).tolist(),
    }
    lead = shape[:-2]  # (), (N,) or (L, N) as given
    vectors = {
        "query_vectors": _check_optional(entry, "query_vectors", (*lead, T, None), 4, at),
        "key_vectors": _check_optional(entry, "key_vectors", (*lead, S, None), 4, at),
        "value_vectors": _check_optional(entry, "value_vectors", (*lead, S, None), 4, at),
    }
    given = [name for name, v in vectors.items() if v is not None]
    if given and len(given) != 3:
        missing = sorted(set(vectors) - set(given))
        raise ValueError(
            f"{at}: {missing[0]}: missing; the neuron view needs query_vectors, "
            f"key_vectors and value_vectors together (given {', '.join(given)})"
        )
    if given:
        q, k = vectors["query_vectors"], vectors["key_vectors"]
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"{at}: key_vectors: expected head dim H={q.shape[-1]} as query_vectors, "
                f"given {k.shape[-1]}"
            )
        # Full precision: the neuron view recomputes the weights from these.
        out.update({name: v.tolist() for name, v in vectors.items()})
    bias = _check_optional(entry, "bias", shape, 4, at)
    if bias is not None:
        if not given:
            raise ValueError(
                f"{at}: bias: given without query_vectors, key_vectors and value_vectors"
            )
        out["bias"] = bias.tolist()
    causal = entry.get("causal", False)
    if not isinstance(causal, bool | np.bool_):
        raise ValueError(f"{at}: causal: expected True or False, given {causal!r}")
    if causal and T != S:
        raise ValueError(f"{at}: causal: needs self-attention with T = S, given T={T}, S={S}")
    out["causal"] = bool(causal)
    norms = _check_optional(entry, "value_norms", (*lead, S), 3, at)
    if norms is not None:
        if (norms < 0).any():
            raise ValueError(f"{at}: value_norms: expected norms >= 0, given a negative value")
        out["value_norms"] = norms.tolist()
    return out


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
        sets = [
            {"name": str(set_name), **_set_data(entry, f"{where}, set {str(set_name)!r}")}
            for set_name, entry in attention.items()
        ]
        prediction = example.get("prediction")
        out.append(
            {
                "name": name,
                "prediction": None if prediction is None else str(prediction),
                "sets": sets,
            }
        )
    return {"title": title, "examples": out}


def _index(value: Any, count: int, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: expected an integer index, given {value!r}")
    if not 0 <= value < count:
        raise ValueError(f"{name}: expected a {what} index in [0, {count}), given {value}")
    return int(value)


def _start(
    data: dict[str, Any],
    view: str,
    set_name: str | None,
    layer: int,
    head: int | None,
    query: int,
    compare: Any,
) -> dict[str, Any]:
    """What the page shows first, checked against the data: {"view", "set", "layer", ...}."""
    if view not in VIEWS:
        raise ValueError(f"view: expected one of {', '.join(VIEWS)}, given {view!r}")
    sets = data["examples"][0]["sets"]
    names = [s["name"] for s in sets]
    if set_name is None:
        index = 0
    elif set_name in names:
        index = names.index(set_name)
    else:
        raise ValueError(
            f"set_name: expected one of {names} (the first example's sets), given {set_name!r}"
        )
    chosen = sets[index]
    L, N = len(chosen["weights"]), len(chosen["weights"][0])
    start = {
        "view": view,
        "set": index,
        "layer": _index(layer, L, "layer", f"layer (set {names[index]!r} has L={L})"),
        "head": None if head is None else _index(head, N, "head", f"head (N={N})"),
        "query": _index(query, len(chosen["query_tokens"]), "query", "query token"),
    }
    if view == "neuron" and "query_vectors" not in chosen:
        raise ValueError(
            f"view: 'neuron' needs the set's query_vectors, key_vectors and value_vectors; "
            f"set {names[index]!r} has none"
        )
    if compare is not None:
        examples = data["examples"]
        if not isinstance(compare, Sequence) or isinstance(compare, str) or len(compare) != 2:
            raise ValueError(f"compare: expected two example indices (a, b), given {compare!r}")
        a, b = (_index(c, len(examples), "compare", "example") for c in compare)
        if a == b:
            raise ValueError(f"compare: expected two different examples, given ({a}, {b})")
        sets_b = {s["name"]: s for s in examples[b]["sets"]}
        aligned = [
            s["name"]
            for s in examples[a]["sets"]
            if s["name"] in sets_b
            and np.shape(s["weights"]) == np.shape(sets_b[s["name"]]["weights"])
        ]
        if not aligned:
            raise ValueError(
                f"compare: examples {a} and {b} share no attention set of the same shape; "
                "the positions must align"
            )
        data["compare"] = {"a": a, "b": b}
    elif view == "diff":
        raise ValueError("view: 'diff' needs compare=(a, b), two examples to compare")
    if view == "patching" and "patching" not in data:
        raise ValueError("view: 'patching' needs patching=, a TextPatching to show")
    return start


def attention_html(
    examples: Sequence[Mapping[str, Any]],
    *,
    title: str = "kit attention",
    view: str = "head",
    set_name: str | None = None,
    layer: int = 0,
    head: int | None = None,
    query: int = 0,
    compare: Sequence[int] | None = None,
    patching: Any = None,
) -> str:
    """One self-contained HTML page with four views of attention, and a fifth of
    activation patching.

    - head view (`#head-view`), in the spirit of BertViz's: query tokens sit in
      a left column and key tokens in a right one, joined by one line per
      (head, query, key) whose opacity and width grow with the weight, one
      colour per head. Hovering a query token keeps only its lines and lists
      its weights over the keys, per visible head, in `#weights`; hovering a
      key token does the same for the weights into it. Clicking a token pins
      it: attention *from* a query token or *to* a key token, and the
      `#threshold` slider (0.5 to 1) keeps, per head, only the strongest edges
      whose weights reach that share of the token's attention mass (for "to",
      the weights into the key, normalized by their sum). With "value_norms",
      `#value-weighted` shows α_ts·||f(x_s)|| per row, normalized to sum 1
      (Kobayashi et al., 2020) in the head and model views.
    - model view (`#model-view`): a thumbnail heatmap of every layer x head;
      clicking one opens the head view at that layer with only that head.
    - neuron view (`#neuron-view`, for sets with vectors): for one layer, head
      and query token t, the query vector q_t, each key vector k_s, their
      elementwise product q_t⊙k_s and dot product, the scaling by 1/sqrt(H),
      the bias (if any), the softmax over the keys the query sees (causal sets
      exclude s > t), and the output Σ_s α_ts v_s, all computed in the page
      from the given vectors in double precision, next to the model's weights.
    - diff view (`#diff-view`, with `compare=(a, b)`): example b's weights minus
      example a's for every layer x head of a set on a diverging colour scale
      centred on 0 (blue less, red more attention in b), and both predictions.
    - patching view (`#patching-view`, with `patching=`): four heatmaps of a
      `kit.analysis.patching.TextPatching`, as `kit.views.figures.plot_patching`
      draws them: each head's output `[L, N]` and the residual stream at each
      position `[L, T]`, by activation and by attribution patching, on one
      diverging scale; hovering a cell gives both numbers.

    Pickers: the example (`#example`, when several are given), the attention
    set (`#set`), the layer (`#layer`), the view (`#view`) and a checkbox per
    head (`.head-toggle[data-head="n"]`).

    The page loads nothing: CSS, JavaScript and data are inline, and a
    Content-Security-Policy forbids any request, so it opens offline from disk.
    The data sit in a `<script type="application/json">` block with every "<"
    escaped, and tokens are set with `textContent`, so token text cannot inject
    markup. Weights are rounded to 4 decimals; vectors, bias and value norms
    keep full precision.

    Args:
      examples: a list of dicts, one per example:
        `{"name": str, "prediction": str, "attention": {set_name: {"weights":
        [L, N, T, S], "query_tokens": T labels, "key_tokens": S labels}}}`;
        e.g. set names "encoder", "decoder" and "cross" with the query/key
        tokens that fit each (cross: target tokens over source tokens). "name"
        and "prediction" are optional; weights may also be `[N, T, S]` or
        `[T, S]`, and sets may differ in L, N, T, S. A set may also hold (with
        the weights' leading dimensions) "query_vectors" `[L, N, T, H]`,
        "key_vectors" and "value_vectors" `[L, N, S, H]` (all three, or none;
        key/value repeated to the N query heads), "bias" `[L, N, T, S]` (added
        to the scaled scores), "causal" (bool: query t sees keys s <= t) and
        "value_norms" `[L, N, S]` (||f(x_s)||, each value through its head's
        slice of the output projection).
      title: page title and heading.
      view: the view shown first: "head", "model", "neuron", "diff" or "patching".
      set_name: the name of the set shown first (default: the first example's first).
      layer: the layer shown first.
      head: show only this head in the head view (default: all), and pick it
        in the neuron view.
      query: the query token the neuron view shows first.
      compare: `(a, b)`, two example indices for the diff view (b - a), of
        the sets they share with equal weights shapes (at least one).
      patching: a `kit.analysis.patching.TextPatching` (or its `to_json()`
        dict) for the patching view (`kit.views.figures.patching_data`).

    Returns:
      The HTML text.

    Raises:
      ValueError: if `examples` is not a non-empty list of such dicts, or a
        set's weights have the wrong rank, non-finite values, or a token list
        or optional field whose shape does not match (the message names the
        example, the set and the field); or if `view`, `set_name`, `layer`, `head`,
        `query` or `compare` is out of range for the data, or `patching` does
        not hold a patching result (the message names the argument).

    References:
      Vig, "A Multiscale Visualization of Attention in the Transformer Model",
      ACL 2019 demos (head, model and neuron views). https://arxiv.org/abs/1906.05714
      Kobayashi et al., "Attention is Not Only a Weight: Analyzing Transformers
      with Vector Norms", EMNLP 2020. https://arxiv.org/abs/2004.10102
    """
    data = _viewer_data(examples, str(title))
    if patching is not None:
        data["patching"] = patching_data(patching)
    data["start"] = _start(data, view, set_name, layer, head, query, compare)
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    # "<" as \u003c is still valid JSON, and no "</script>" or "<!--" in a token
    # can end the data block early.
    text = text.replace("<", "\\u003c")
    page, style, script = _viewer_assets()
    # One pass over the page skeleton, so a title or token that spells a
    # placeholder is left alone, and the CSS and JavaScript are not searched.
    parts = {
        "__TITLE__": html.escape(str(title)),
        "__DATA__": text,
        "__STYLE__": style,
        "__SCRIPT__": script,
    }
    return re.sub("__TITLE__|__DATA__|__STYLE__|__SCRIPT__", lambda m: parts[m.group()], page)


def write_attention_html(
    path: str | os.PathLike, examples: Sequence[Mapping[str, Any]], **kwargs: Any
) -> None:
    """Writes `attention_html(examples, **kwargs)` to `path` (UTF-8)."""
    text = attention_html(examples, **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
