"""Test what each attention head of a trained run does: pattern scores and ablation.

    python experiments/heads.py --workdir=runs/induction
    python experiments/heads.py --workdir=runs/pronoun --metric=eval/exact_match

Loads config.json and the latest checkpoint of the workdir and the task's
held-out data. For every attention set ("encoder", "decoder", "cross") it
scores each layer and head on four patterns (previous token, duplicate token,
induction, first token; kit.analysis.interp) over the held-out examples, then ablates
each head, each layer and the whole set (`model.head_ablation`, zeroing the head's
output, or `--mode=mean` for its batch mean) and measures the held-out metric
(default: the task's, e.g. eval/exact_match, or eval/loss_repeat for the
induction task). For the pronoun probe it also measures, per head, the
attention from each pronoun to its antecedent and the value-weighted norm of
that edge (Kobayashi et al., 2020), and how well each predicts the ablation.

Writes <out>/heads.json, one PNG per attention set (<out>/<set>.png) and
prints a table; <out> defaults to <workdir>/heads. A bad flag or a workdir
without a checkpoint ends in one line naming it, and nothing is written.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from kit import tasks, training
from kit.analysis import interp

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("metric", None, "Held-out metric to ablate against (default: the task's).")
flags.DEFINE_enum("mode", "zero", ["zero", "mean"], "How an ablated head is replaced.")
flags.DEFINE_integer("score_examples", 256, "Held-out examples the pattern scores average over.")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/heads).")
flags.mark_flags_as_required(["workdir"])


def pattern_scores(model, kind, mb, count):
    """Set -> {score name: [L, N]} over the first `count` examples of batch `mb`."""
    mb = {k: v[:count] for k, v in mb.items()}
    _, aux = jax.jit(lambda b: model.teacher_forced(b, hooks=model.attention_hooks()))(mb)
    aux = model.attention_sets(aux["activations"])
    out = {}
    tokens = model.attention_tokens(mb)
    for name in model.ATTENTION_SETS:
        weights = interp.batch_first(aux[name])
        query, key = tokens[name]
        scores = interp.head_scores(weights, query, key, ignore=[tasks.PAD])
        out[name] = {k: _nan_to_none(v) for k, v in scores.items()}
    return out, aux, mb


def _nan_to_none(a: np.ndarray):
    return [[None if np.isnan(x) else float(x) for x in row] for row in a]


def antecedent_edges(aux, mb, task):
    """Pronoun probe: per head, mean attention from each pronoun to its antecedent's
    position, and the mean value-weighted norm of that edge, `[L, N]` each."""
    weights = interp.batch_first(aux["encoder"])  # [B, L, N, T, S]
    norms = np.moveaxis(np.asarray(aux["vectors"]["encoder"]["value_norms"]), 1, 0)
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


def plot(name, entry, path, metric):
    from matplotlib.figure import Figure

    panels = [*entry["scores"].items(), (f"{metric} ablated", entry["ablation"]["per_head"])]
    fig = Figure(figsize=(3.2 * len(panels), 2.6), layout="constrained")
    for ax, (title, values) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        a = np.array([[np.nan if v is None else v for v in row] for row in values], float)
        score = title in interp.SCORES
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
    fig.savefig(path, dpi=120)


def table(name, entry, metric, baseline):
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


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "heads")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    if FLAGS.score_examples <= 0:
        sys.exit(f"error: score_examples: expected a positive int, got {FLAGS.score_examples}")
    try:
        config, setup, state = training.load_checkpoint(FLAGS.workdir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    task, kind, params = setup.task, setup.mcfg.kind, state["params"]
    model = nnx.merge(setup.trainer.graphdef, params)
    batches = training.steps.eval_batches(task, kind, config)
    eval_step = jax.jit(setup.trainer.eval_step)
    shapes = model.attention_shapes()

    def measure(mask):
        return training.steps.evaluate(
            eval_step,
            params,
            batches,
            kind,
            by_length=task.by_length,
            loss_spans=task.loss_spans,
            hooks=model.head_ablation({k: jnp.asarray(v) for k, v in mask.items()}, FLAGS.mode),
        )

    ones = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    everything = measure(ones)
    metric = FLAGS.metric or task.metric
    if metric not in everything or not isinstance(everything[metric], float):
        names = sorted(k for k, v in everything.items() if isinstance(v, float))
        sys.exit(f"error: metric: expected one of {names}, got {metric!r}")
    baseline = everything[metric]

    scores, aux, mb = pattern_scores(model, kind, batches[0][0], FLAGS.score_examples)
    result = {
        "task": task.name,
        "metric": metric,
        "higher_is_better": not metric.startswith("eval/loss"),
        "mode": FLAGS.mode,
        "baseline": baseline,
        "sets": {},
    }
    for name, (L, N) in shapes.items():
        per_head = [
            [measure(interp.ablation_mask(shapes, name, layer=l, head=n))[metric] for n in range(N)]
            for l in range(L)
        ]
        per_layer = [measure(interp.ablation_mask(shapes, name, layer=l))[metric] for l in range(L)]
        result["sets"][name] = {
            "scores": scores[name],
            "ablation": {
                "per_head": per_head,
                "per_layer": per_layer,
                "all": measure(interp.ablation_mask(shapes, name))[metric],
            },
        }
    if task.name == "pronoun":
        edges = antecedent_edges(aux, mb, task)
        drop = baseline - np.asarray(result["sets"]["encoder"]["ablation"]["per_head"])
        result["antecedent"] = {
            "attention": edges["attention"].tolist(),
            "value_weighted": edges["value_weighted"].tolist(),
            "value_weighted_share": edges["value_weighted_share"].tolist(),
            "edges": edges["edges"],
            "spearman_attention_vs_drop": rank_correlation(edges["attention"], drop),
            "spearman_value_weighted_vs_drop": rank_correlation(edges["value_weighted"], drop),
        }

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "heads.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for name, entry in result["sets"].items():
        print(table(name, entry, metric, baseline))
        plot(name, entry, os.path.join(out, f"{name}.png"), metric)
        print(f"wrote {os.path.join(out, name + '.png')}")
    if "antecedent" in result:
        a = result["antecedent"]
        print(
            f"pronoun -> antecedent over {a['edges']} held-out pronouns (layer/head: "
            "attention, value-weighted norm, share of value-weighted mass, "
            f"{metric} ablated)"
        )
        ablated = result["sets"]["encoder"]["ablation"]["per_head"]
        for (layer, head), w in np.ndenumerate(np.asarray(a["attention"])):
            print(
                f"{layer:>5}/{head:<5} {w:.3f}  {a['value_weighted'][layer][head]:.3f}  "
                f"{a['value_weighted_share'][layer][head]:.3f}  {ablated[layer][head]:.4f}"
            )
        print(
            f"Spearman vs the drop in {metric}: attention "
            f"{a['spearman_attention_vs_drop']:.2f}, value-weighted "
            f"{a['spearman_value_weighted_vs_drop']:.2f}"
        )
    print(f"wrote {os.path.join(out, 'heads.json')}")


if __name__ == "__main__":
    app.run(main)
