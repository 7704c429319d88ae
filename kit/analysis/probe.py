"""Run a trained toy model on one text and collect what its attention did.

For a Vision Transformer, `read_image` runs one held-out image and
`write_image_views` draws where its class token looks (kit.views.patches).

`read_attention` decodes the text with the model (greedily where it decodes) and
returns the prediction with every attention map as `[L, N, T, S]`, the tokens
on both sides and the vectors the attention used (for the neuron view);
`write_views` draws them (kit.views.figures) as PNGs and offline HTML pages (kit.views);
`compare` reads two texts of the same length and gives every head's change;
`antecedent_attention` reads the pronoun probe: how much each layer and head
attends from a labelled position (the pronoun) to the name it predicted.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import models, tasks, views
from kit.analysis.record import AttentionSet
from kit.models.common import attention_pass
from kit.views import figures, patches


@dataclasses.dataclass(frozen=True)
class Reading:
    """A model's output on one text and its attention maps.

    Attributes:
      text: the input text.
      prediction: the decoded output text.
      labels: the predicted token at every input position (encoder-only models),
        else None.
      attention: set name ("encoder", "decoder", "cross") -> `AttentionSet`
        (`kit.analysis.record`): the weights `[L, N, T, S]`, the tokens on both
        sides, causal, and the vectors the attention used (q after RoPE, k and
        v repeated to the query heads, the value norms, the positions' bias).
        It reads as a mapping too, the form `kit.views.viewer.attention_html`
        takes.
    """

    text: str
    prediction: str
    labels: list[str] | None
    attention: dict[str, dict[str, Any]]


def read_attention(
    task: tasks.Task, graphdef: Any, params: Any, text: str, *, name: str = "text"
) -> Reading:
    """Runs the model `nnx.merge(graphdef, params)` on `text`, as its kind reads text
    (`TaskModel.read_text`).

    Encoder-only models label every position; encoder-decoder and decoder-only
    models decode greedily, then one teacher-forced pass over their own output
    gives the attention maps. Decoder queries are labelled with the token each
    position predicts, decoder keys with the token each position reads.

    Raises:
      ValueError: naming `text` (or `name`, the caller's word for it) when it holds
        tokens outside the task's vocabulary or is longer than the model's inputs.
    """
    ids = task.encode(text, name)
    if len(ids) > task.src_len:
        raise ValueError(
            f"{name}: {len(ids)} tokens, more than the {task.src_len} the {task.name} model reads"
        )
    model = nnx.merge(graphdef, params)
    prediction, labels, sets, tokens = model.read_text(task, ids, task.split(text))
    attention = {set_name: _set(sets, set_name, *pair) for set_name, pair in tokens.items()}
    return Reading(text, prediction, labels, attention)


def _set(aux, name, query_tokens, key_tokens) -> AttentionSet:
    """One example's set `name` of the model's attention (batch of 1).

    The "decoder" set is the causal self-attention; a probe's single example has
    no padding, so no other key is masked.
    """
    entry = {
        "weights": np.asarray(aux[name][0], np.float32),  # [L, N, T, S]
        "query_tokens": list(query_tokens),
        "key_tokens": list(key_tokens),
        "causal": name == "decoder",
    }
    vectors = aux.get("vectors", {}).get(name)
    if vectors is None:
        return AttentionSet(**entry)
    first = {k: np.asarray(v[0], np.float32) for k, v in vectors.items()}
    query = first["query"].transpose(0, 2, 1, 3)  # [L, T, N, H] -> [L, N, T, H]
    N = query.shape[1]

    def per_query_head(x):  # [L, S, K, H] -> [L, N, S, H]: head n reads kv head n // (N / K)
        x = x.transpose(0, 2, 1, 3)
        return np.repeat(x, N // x.shape[1], axis=1)

    return AttentionSet(
        **entry,
        query_vectors=query,
        key_vectors=per_query_head(first["key"]),
        value_vectors=per_query_head(first["value"]),
        value_norms=first["value_norms"],  # [L, N, S]
        bias=first.get("bias"),  # [L, N, T, S]
    )


def write_views(reading: Reading, directory: str) -> list[str]:
    """Under `directory`: `<set>.png` per attention set, `index.html` (opens in the head
    view), `model.html` (the model view) and, when the sets hold vectors,
    `neuron.html` (the neuron view); returns the paths. Each page has all views."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, entry in reading.attention.items():
        path = os.path.join(directory, f"{name}.png")
        figures.plot_attention(
            entry["weights"],
            entry["query_tokens"],
            entry["key_tokens"],
            title=f"{name} attention: {reading.text!r} -> {reading.prediction!r}",
            path=path,
        )
        paths.append(path)
    pages = {"index.html": views.head_view(reading), "model.html": views.model_view(reading)}
    with_vectors = [n for n, e in reading.attention.items() if "query_vectors" in e]
    if with_vectors:
        pages["neuron.html"] = views.neuron_view(reading, set_name=with_vectors[0])
    for file, view in pages.items():
        path = os.path.join(directory, file)
        view.save(path)
        paths.append(path)
    return paths


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A model's readings of two texts of equal token count and how its attention changed.

    Shows itself in notebooks as the diff view (`kit.views.diff_view`).

    Attributes:
      a, b: the readings of text_a and text_b; their predictions are
        `a.prediction` and `b.prediction`.
      differences: set name -> b's weights minus a's `[L, N, T, S]` (float32),
        for every set of equal shape in both (a decoder's sets drop out when the
        two predictions differ in length).
    """

    a: Reading
    b: Reading
    differences: dict[str, np.ndarray]

    def view(self) -> views.View:
        """The diff view page: every layer x head on a diverging scale, both predictions."""
        return views.diff_view(self.a, self.b, set_name=next(iter(self.differences)))

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    def save(self, path: str | os.PathLike) -> None:
        """Writes the diff view page (.html)."""
        self.view().save(path)

    def save_figure(self, path: str | os.PathLike, **kwargs: Any):
        """b - a as heatmaps centred on 0 (PNG or SVG); kwargs as `kit.views.View.save_figure`
        (set_name, layer, head)."""
        return self.view().save_figure(path, **kwargs)


def compare(
    task: tasks.Task,
    graphdef: Any,
    params: Any,
    text_a: str,
    text_b: str,
    *,
    names: tuple[str, str] = ("text_a", "text_b"),
) -> Comparison:
    """Reads `text_a` and `text_b` (e.g. one name swapped for another) with the same model.

    Returns:
      A `Comparison`: both readings (and predictions) and, per attention set
      of equal shape in both, b's weights minus a's `[L, N, T, S]`.

    Raises:
      ValueError: naming `text_a` or `text_b` (or `names`, the caller's words for
        them, e.g. a command's flags) as `read_attention` does, or the second
        when its token count differs from the first's (the positions would not
        align) or no set aligns (a decoder-only model whose two predictions
        differ in length).
    """
    name_a, name_b = names
    a = read_attention(task, graphdef, params, text_a, name=name_a)
    b = read_attention(task, graphdef, params, text_b, name=name_b)
    count_a, count_b = len(task.encode(text_a)), len(task.encode(text_b))
    if count_a != count_b:
        raise ValueError(
            f"{name_b}: {count_b} tokens where {name_a} has {count_a}; the texts must have "
            "the same number of tokens so that positions align"
        )
    differences = {
        name: b.attention[name]["weights"] - entry["weights"]
        for name, entry in a.attention.items()
        if entry["weights"].shape == b.attention[name]["weights"].shape
    }
    if not differences:  # a decoder-only model's one set spans input and output
        raise ValueError(
            f"{name_b}: its prediction {b.prediction!r} has another length than {name_a}'s "
            f"{a.prediction!r}, so no attention set aligns"
        )
    return Comparison(a, b, differences)


def write_comparison(comparison: Comparison, directory: str) -> list[str]:
    """`compare.html` (the diff view) and `compare_<set>.png` (b - a, every layer x head)
    under `directory`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    view = comparison.view()
    paths = []
    for name in comparison.differences:
        path = os.path.join(directory, f"compare_{name}.png")
        view.save_figure(path, set_name=name)
        paths.append(path)
    path = os.path.join(directory, "compare.html")
    view.save(path)
    return [*paths, path]


@dataclasses.dataclass(frozen=True)
class Antecedent:
    """The attention from a labelled position (a pronoun) to its predicted antecedent.

    Attributes:
      query: index of the labelled position; its token is `tokens[query]`.
      antecedent: the predicted label (a name) and `key`, its first position.
      weights: `[L, N, S]` attention from `query` to every token.
      tokens: the S input tokens.
      best: (layer, head) whose weight on `key` is the largest.
    """

    query: int
    antecedent: str
    key: int
    weights: np.ndarray
    tokens: list[str]
    best: tuple[int, int]


def antecedent_attention(reading: Reading, *, no_label: str = tasks.NO_LABEL) -> list[Antecedent]:
    """For each position labelled with a token of the text (the pronoun probe's names).

    Raises:
      ValueError: if the reading has no per-position labels (not an encoder-only model).
    """
    if reading.labels is None or "encoder" not in reading.attention:
        raise ValueError("reading: expected an encoder-only model's reading with labels")
    entry = reading.attention["encoder"]
    tokens = entry["key_tokens"]
    out = []
    for query, label in enumerate(reading.labels):
        if label == no_label or label not in tokens:
            continue
        key = tokens.index(label)
        weights = entry["weights"][:, :, query, :]  # [L, N, S]
        layer, head = np.unravel_index(int(np.argmax(weights[:, :, key])), weights.shape[:2])
        out.append(Antecedent(query, label, key, weights, tokens, (int(layer), int(head))))
    return out


def format_antecedent(a: Antecedent) -> str:
    """A table: one row per layer and head, the weight from the pronoun to each token."""
    width = max(6, *(len(t) for t in a.tokens))
    lines = [
        f"attention from {a.tokens[a.query]!r} (position {a.query}) to each token; "
        f"predicted antecedent {a.antecedent!r}",
        "layer/head " + " ".join(f"{t:>{width}}" for t in a.tokens),
    ]
    for layer in range(a.weights.shape[0]):
        for head in range(a.weights.shape[1]):
            row = " ".join(f"{w:>{width}.3f}" for w in a.weights[layer, head])
            lines.append(f"{layer:>5}/{head:<4} {row}")
    layer, head = a.best
    lines.append(
        f"{a.antecedent!r} gets the most attention from {a.tokens[a.query]!r} in layer {layer}, "
        f"head {head}: {a.weights[layer, head, a.key]:.3f}"
    )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ImageReading:
    """A Vision Transformer's output on one held-out image and its attention.

    Attributes:
      index: the image's index in the task's held-out split.
      image: `[H, W]` pixels.
      label: the true class; prediction: the model's.
      weights: self-attention `[L, N, T, T]`, token 0 the class token.
      patch_size: the model's patch side in pixels.
    """

    index: int
    image: np.ndarray
    label: str
    prediction: str
    weights: np.ndarray
    patch_size: int


def read_image(task: tasks.Task, graphdef: Any, params: Any, index: int) -> ImageReading:
    """Runs the Vision Transformer `nnx.merge(graphdef, params)` on held-out image `index`.

    Raises:
      ValueError: naming `image` for an index outside the held-out split or a model
        that has no class token over image patches (not a vision_transformer).
    """
    model = nnx.merge(graphdef, params)
    if not isinstance(model, models.VisionTransformer):
        raise ValueError(
            f"image: class-token maps need a vision_transformer with a class token, but "
            f"this workdir holds a {model.cfg.kind} model of task {task.name!r}; use --text"
        )
    data = task.eval_set(0, 0)  # an image task's fixed split: seed and size do not apply
    count = len(data["labels"])
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(
            f"image: expected an index in [0, {count}) of the held-out split, got {index!r}"
        )
    image = data["images"][index]
    logits, aux = jax.jit(lambda p, x: attention_pass(graphdef, p, x))(
        params, jnp.asarray(image[None])
    )
    return ImageReading(
        index=index,
        image=image,
        label=task.vocab[int(data["labels"][index])],
        prediction=task.vocab[int(jnp.argmax(logits[0]))],
        weights=np.asarray(aux["encoder"][0], np.float32),
        patch_size=model.cfg.patch_size,
    )


def write_image_views(reading: ImageReading, directory: str) -> list[str]:
    """`image_<index>.png` (every layer and head, and the rollout) and `index.html` under
    `directory`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    title = (
        f"held-out image {reading.index}: label {reading.label}, prediction {reading.prediction}"
    )
    png = os.path.join(directory, f"image_{reading.index}.png")
    figure = patches.plot_patch_attention(
        reading.image, reading.weights, reading.patch_size, title=title, path=png
    )
    page = os.path.join(directory, "index.html")
    caption = (
        "Attention from the class token to each patch, per layer and head, laid over "
        "the image; the last column is the attention rollout over all layers."
    )
    with open(page, "w", encoding="utf-8") as f:
        f.write(patches.patch_attention_html(figure, title=title, caption=caption))
    return [png, page]
