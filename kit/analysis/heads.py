"""What each head does in a trained run: pattern scores, ablation and, for the pronoun
probe, the attention and value-weighted norm of each pronoun -> antecedent edge
(`experiments/heads.py` is its command line; `kit.views.figures.plot_heads` draws it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from kit import tasks
from kit.analysis import interp


def pattern_scores(model, mb, count: int):
    """Pattern scores (`interp.head_scores`) of every head of `model` over the first
    `count` examples of model batch `mb`.

    Returns:
      set -> {score name: `[L, N]` lists, None where a score is undefined}, the
      attention by set (`model.attention_sets`) and the batch cut to `count`.
    """
    mb = {k: v[:count] for k, v in mb.items()}
    _, aux = jax.jit(lambda b: model.teacher_forced(b, hooks=model.attention_hooks()))(mb)
    aux = model.attention_sets(aux["activations"])
    out = {}
    tokens = model.attention_tokens(mb)
    for name in model.ATTENTION_SETS:
        weights = np.asarray(aux[name])  # [B, L, N, T, S]
        query, key = tokens[name]
        scores = interp.head_scores(weights, query, key, ignore=[tasks.PAD])
        out[name] = {k: _nan_to_none(v) for k, v in scores.items()}
    return out, aux, mb


def _nan_to_none(a: np.ndarray):
    return [[None if np.isnan(x) else float(x) for x in row] for row in a]


def antecedent_edges(sets, mb, task):
    """Pronoun probe: per head, mean attention from each pronoun to its antecedent's
    position, the mean value-weighted norm of that edge and its share of the pronoun's
    value-weighted mass, `[L, N]` each, from `sets` (`model.attention_sets`) of model
    batch `mb`."""
    weights = np.asarray(sets["encoder"])  # [B, L, N, T, S]
    norms = np.asarray(sets["vectors"]["encoder"]["value_norms"])  # [B, L, N, S]
    weighted = interp.value_weighted(weights, norms)  # [B, L, N, T, S]
    no_label = task.vocab.index(tasks.NO_LABEL)
    attention, value_weighted, share = [], [], []
    for b in range(weights.shape[0]):
        src, targets = mb["src"][b], mb["targets"][b]
        for t in np.flatnonzero((targets != no_label) & mb["weights"][b]):
            s = int(np.flatnonzero(src == targets[t])[0])  # the antecedent's position
            attention.append(weights[b, :, :, t, s])
            value_weighted.append(weighted[b, :, :, t, s])
            share.append(weighted[b, :, :, t, s] / weighted[b, :, :, t].sum(-1))
    return {
        "attention": np.mean(attention, axis=0),
        "value_weighted": np.mean(value_weighted, axis=0),
        "value_weighted_share": np.mean(share, axis=0),
        "edges": len(attention),
    }


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties)."""

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(np.ravel(x)), ranks(np.ravel(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def antecedent_summary(sets, mb, task, per_head: Any, baseline: float) -> dict[str, Any]:
    """`antecedent_edges` as lists, with Spearman's rho of the attention and of the
    value-weighted norm against the drop in the metric when each head is ablated
    (`per_head` `[L, N]`, `baseline` with every head)."""
    edges = antecedent_edges(sets, mb, task)
    drop = baseline - np.asarray(per_head)
    return {
        "attention": edges["attention"].tolist(),
        "value_weighted": edges["value_weighted"].tolist(),
        "value_weighted_share": edges["value_weighted_share"].tolist(),
        "edges": edges["edges"],
        "spearman_attention_vs_drop": rank_correlation(edges["attention"], drop),
        "spearman_value_weighted_vs_drop": rank_correlation(edges["value_weighted"], drop),
    }


def ablation_sweep(
    measure: Callable[[dict[str, np.ndarray]], float], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, dict[str, Any]]:
    """`measure(head mask)` with each head, each layer and each whole set ablated
    (`interp.ablation_mask`): set -> {"per_head": `[L, N]`, "per_layer": `[L]`, "all"}."""
    out = {}
    for name, (L, N) in shapes.items():

        def ablated(name=name, **where):
            return measure(interp.ablation_mask(shapes, name, **where))

        out[name] = {
            "per_head": [[ablated(layer=l, head=n) for n in range(N)] for l in range(L)],
            "per_layer": [ablated(layer=l) for l in range(L)],
            "all": ablated(),
        }
    return out


def table(name: str, entry: Mapping[str, Any], metric: str, baseline: float) -> str:
    """One set's scores and ablation as text, a row per head."""
    lines = [f"{name}: {metric} {baseline:.4f} with every head"]
    scores = entry["scores"]
    lines.append("layer/head  " + "  ".join(f"{s:>15}" for s in scores) + f"  {'ablated':>10}")
    per_head = entry["ablation"]["per_head"]
    for layer, row in enumerate(per_head):
        for head, ablated in enumerate(row):
            cells = []
            for s in scores.values():
                v = s[layer][head]
                cells.append(f"{'-' if v is None else f'{v:.3f}':>15}")
            lines.append(f"{layer:>5}/{head:<5} " + "  ".join(cells) + f"  {ablated:>10.4f}")
    for layer, v in enumerate(entry["ablation"]["per_layer"]):
        lines.append(f"layer {layer} ablated: {v:.4f}")
    lines.append(f"every {name} head ablated: {entry['ablation']['all']:.4f}")
    return "\n".join(lines)


def antecedent_table(antecedent: Mapping[str, Any], ablated: Any, metric: str) -> str:
    """The pronoun -> antecedent edges per head beside the head's ablation, as text."""
    a = antecedent
    lines = [
        f"pronoun -> antecedent over {a['edges']} held-out pronouns (layer/head: "
        f"attention, value-weighted norm, share of value-weighted mass, {metric} ablated)"
    ]
    for (layer, head), w in np.ndenumerate(np.asarray(a["attention"])):
        lines.append(
            f"{layer:>5}/{head:<5} {w:.3f}  {a['value_weighted'][layer][head]:.3f}  "
            f"{a['value_weighted_share'][layer][head]:.3f}  {ablated[layer][head]:.4f}"
        )
    lines.append(
        f"Spearman vs the drop in {metric}: attention "
        f"{a['spearman_attention_vs_drop']:.2f}, value-weighted "
        f"{a['spearman_value_weighted_vs_drop']:.2f}"
    )
    return "\n".join(lines)


def text_batch(task, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts through a pretrained model's tokenizer (`kit.hf.TokenizerTask`) as right-
    padded ids `[B, T]` (-1 at padding) and their mask.

    Raises:
      ValueError: naming `texts` when there are none or one passes `max_len` tokens."""
    if not texts:
        raise ValueError("texts: expected at least one text")
    ids = [task.encode(text, f"texts[{i}]") for i, text in enumerate(texts)]
    longest = max(map(len, ids))
    if longest > max_len:
        raise ValueError(f"texts: {longest} tokens in a text; the model has {max_len} positions")
    tokens = np.full((len(ids), longest), -1, np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
    return tokens, tokens >= 0


def text_loss(model, tokens: np.ndarray, mask: np.ndarray):
    """`loss(head mask)` of a pretrained text model over a text batch (`text_batch`): the
    mean cross-entropy of each next token (a decoder-only model) or of each token at its
    own position (an encoder-only model's masked-LM head, nothing masked), with the heads
    that the mask zeroes ablated (`model.head_ablation`). One compiled program for every
    mask.

    Raises:
      ValueError: naming `model.kind` for an encoder-decoder or vision model."""
    import jax.numpy as jnp
    from flax import nnx

    kind = model.cfg.kind
    if kind not in ("decoder_only", "encoder_only"):
        raise ValueError(
            f"model.kind: head ablation over texts reads a decoder_only or encoder_only "
            f"model's per-position predictions, not {kind}"
        )
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.where(mask, tokens, 0))
    live = jnp.asarray(mask)

    @jax.jit
    def loss(params, head_mask):
        m = nnx.merge(graphdef, params)
        hooks = m.head_ablation(head_mask)
        if kind == "decoder_only":
            logits, _ = m(ids, live, hooks=hooks)
            logits, targets, weights = logits[:, :-1], ids[:, 1:], live[:, 1:] & live[:, :-1]
        else:
            lengths = jnp.sum(live, axis=1, dtype=jnp.int32)
            logits, _ = m(ids, lengths, hooks=hooks)
            targets, weights = ids, live
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        weights = weights.astype(jnp.float32)
        return jnp.sum(nll * weights) / jnp.sum(weights)

    def measure(head_mask: Mapping[str, np.ndarray]) -> float:
        masks = {k: jnp.asarray(v, jnp.float32) for k, v in head_mask.items()}
        return float(loss(params, masks))

    return measure


def text_pattern_scores(model, tokens: np.ndarray, mask: np.ndarray):
    """Pattern scores (`interp.head_scores`) of every head of a pretrained text model
    over a text batch (`text_batch`), padding ignored: set -> {score: `[L, N]` lists}."""
    out = model(input_ids=np.where(mask, tokens, 0), attention_mask=mask, output_attentions=True)
    (name,) = model.ATTENTION_SETS
    weights = np.stack([np.asarray(a) for a in out.attentions], axis=1)  # [B, L, N, T, S]
    scores = interp.head_scores(weights, tokens, ignore=[-1])
    return {name: {k: _nan_to_none(v) for k, v in scores.items()}}
