"""Run a trained toy model on one text and collect what its attention did.

For a Vision Transformer, `read_image` runs one held-out image and
`write_image_views` draws where its class token looks (kit.viz_patches).

`read_attention` decodes the text with the model (greedily where it decodes) and
returns the prediction with every attention map as `[L, N, T, S]` and the tokens
on both sides; `write_views` draws them (kit.viz) as PNGs and one offline HTML
page; `antecedent_attention` reads the pronoun probe: how much each layer and
head attends from a labelled position (the pronoun) to the name it predicted.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kit import decode, tasks, viz, viz_patches


@dataclasses.dataclass(frozen=True)
class Reading:
    """A model's output on one text and its attention maps.

    Attributes:
      text: the input text.
      prediction: the decoded output text.
      labels: the predicted token at every input position (encoder-only models),
        else None.
      attention: set name ("encoder", "decoder", "cross") -> {"weights":
        `[L, N, T, S]` numpy, "query_tokens": T labels, "key_tokens": S labels}.
    """

    text: str
    prediction: str
    labels: list[str] | None
    attention: dict[str, dict[str, Any]]


def read_attention(task: tasks.Task, graphdef: Any, params: Any, text: str) -> Reading:
    """Runs the model `nnx.merge(graphdef, params)` on `text`.

    Encoder-only models label every position; encoder-decoder and decoder-only
    models decode greedily, then one teacher-forced pass over their own output
    gives the attention maps. Decoder queries are labelled with the token each
    position predicts, decoder keys with the token each position reads.

    Raises:
      ValueError: naming `text` when it holds tokens outside the task's
        vocabulary or is longer than the model's inputs.
    """
    ids = task.encode(text)
    words = task.split(text)
    model = nnx.merge(graphdef, params)
    kind = model.cfg.kind
    if len(ids) > task.src_len:
        raise ValueError(
            f"text: {len(ids)} tokens, more than the {task.src_len} the {task.name} model reads"
        )
    src = jnp.asarray([ids], jnp.int32)
    lengths = jnp.asarray([len(ids)], jnp.int32)

    if kind == "encoder_only":
        logits, aux = jax.jit(lambda p, s, n: _call(graphdef, p, s, n))(params, src, lengths)
        labels = [task.vocab[i] for i in np.asarray(jnp.argmax(logits[0], axis=-1))]
        attention = {"encoder": _set(aux["encoder"], words, words)}
        joiner = " " if task.words else ""
        return Reading(text, joiner.join(labels), labels, attention)

    length = task.tgt_len + 1
    if kind == "encoder_decoder":
        out = jax.jit(
            lambda p, s, n: decode.greedy_encoder_decoder(
                nnx.merge(graphdef, p), s, n, bos=tasks.BOS, length=length
            )
        )(params, src, lengths)
        out_ids = _until_eos(out[0])
        tgt_in = jnp.asarray([[tasks.BOS, *out_ids]], jnp.int32)
        _, aux = jax.jit(lambda p, s, n, t: _call(graphdef, p, s, n, t))(
            params, src, lengths, tgt_in
        )
        produced = [*(task.vocab[i] for i in out_ids), "<eos>"]
        read = ["<bos>", *(task.vocab[i] for i in out_ids)]
        attention = {
            "encoder": _set(aux["encoder"], words, words),
            "decoder": _set(aux["decoder"], produced, read),
            "cross": _set(aux["cross"], produced, words),
        }
        return Reading(text, task.decode(out_ids), None, attention)

    prompt = jnp.asarray([[*ids, tasks.SEP]], jnp.int32)
    out = jax.jit(
        lambda p, t: decode.greedy_decoder_only(
            nnx.merge(graphdef, p), t, jnp.ones(t.shape, bool), length=length
        )
    )(params, prompt)
    out_ids = _until_eos(out[0])
    tokens = jnp.asarray([[*ids, tasks.SEP, *out_ids]], jnp.int32)
    _, aux = jax.jit(lambda p, t: _call(graphdef, p, t, jnp.ones(t.shape, bool)))(params, tokens)
    read = [*words, "<sep>", *(task.vocab[i] for i in out_ids)]
    # Position i predicts token i + 1; the last one predicts EOS.
    produced = [*read[1:], "<eos>"]
    attention = {"decoder": _set(aux["decoder"], produced, read)}
    return Reading(text, task.decode(out_ids), None, attention)


def _call(graphdef, params, *args):
    return nnx.merge(graphdef, params)(*args, return_weights=True)


def _until_eos(ids) -> list[int]:
    ids = [int(i) for i in np.asarray(ids)]
    return ids[: ids.index(tasks.EOS)] if tasks.EOS in ids else ids


def _set(weights, query_tokens, key_tokens) -> dict[str, Any]:
    """`[L, 1, N, T, S]` -> one example's set for kit.viz."""
    return {
        "weights": np.asarray(weights[:, 0], np.float32),
        "query_tokens": list(query_tokens),
        "key_tokens": list(key_tokens),
    }


def write_views(reading: Reading, directory: str) -> list[str]:
    """`<set>.png` per attention set and `index.html` under `directory`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, entry in reading.attention.items():
        path = os.path.join(directory, f"{name}.png")
        viz.plot_attention(
            entry["weights"],
            entry["query_tokens"],
            entry["key_tokens"],
            title=f"{name} attention: {reading.text!r} -> {reading.prediction!r}",
            path=path,
        )
        paths.append(path)
    path = os.path.join(directory, "index.html")
    viz.write_attention_html(
        path, [{"name": reading.text, "attention": reading.attention}], title=reading.text
    )
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
    if model.cfg.kind != "vision_transformer":
        raise ValueError(
            f"image: class-token maps need a vision_transformer with a class token, but "
            f"this workdir holds a {model.cfg.kind} model of task {task.name!r}; use --text"
        )
    data = tasks.eval_set(task, 0, 0)  # an image task's fixed split: seed and size do not apply
    count = len(data["labels"])
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(
            f"image: expected an index in [0, {count}) of the held-out split, got {index!r}"
        )
    image = data["images"][index]
    logits, aux = jax.jit(lambda p, x: _call(graphdef, p, x))(params, jnp.asarray(image[None]))
    return ImageReading(
        index=index,
        image=image,
        label=task.vocab[int(data["labels"][index])],
        prediction=task.vocab[int(jnp.argmax(logits[0]))],
        weights=np.asarray(aux["encoder"][:, 0], np.float32),
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
    figure = viz_patches.plot_patch_attention(
        reading.image, reading.weights, reading.patch_size, title=title, path=png
    )
    page = os.path.join(directory, "index.html")
    caption = (
        "Attention from the class token to each patch, per layer and head, laid over "
        "the image; the last column is the attention rollout over all layers."
    )
    with open(page, "w", encoding="utf-8") as f:
        f.write(viz_patches.patch_attention_html(figure, title=title, caption=caption))
    return [png, page]
