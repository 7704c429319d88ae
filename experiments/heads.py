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

With --pretrained=FOLDER (a Hugging Face GPT-2 or BERT checkpoint with its
tokenizer.json) instead of --workdir, the texts of --texts (a file, one text per line)
stand for the held-out data: the pattern scores average over them, and the metric is
the mean cross-entropy of each next token (GPT-2) or of each token at its own position
(BERT's masked-LM head, nothing masked), "loss". <out> defaults to ./heads.

    python experiments/heads.py --pretrained=path/to/gpt2 --texts=texts.txt
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from kit import hf, pretrained, tasks, training
from kit.analysis import heads
from kit.views import figures

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("metric", None, "Held-out metric to ablate against (default: the task's).")
flags.DEFINE_enum("mode", "zero", ["zero", "mean"], "How an ablated head is replaced.")
flags.DEFINE_integer("score_examples", 256, "Held-out examples the pattern scores average over.")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/heads).")
flags.DEFINE_string("pretrained", None, "A Hugging Face checkpoint folder (instead of --workdir).")
flags.DEFINE_string("texts", None, "With --pretrained: a file of texts, one per line.")


def _pretrained_result() -> dict:
    """Scores and ablations of --pretrained's heads over --texts."""
    if FLAGS.texts is None:
        raise ValueError("texts: --pretrained needs --texts, a file of texts (one per line)")
    if not os.path.isfile(FLAGS.texts):
        raise ValueError(f"texts: {FLAGS.texts} is not a file")
    if FLAGS.mode != "zero":
        raise ValueError("mode: --pretrained ablates by zeroing heads ('zero')")
    with open(FLAGS.texts, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    model = pretrained.load(FLAGS.pretrained)
    name = os.path.basename(os.path.normpath(FLAGS.pretrained))
    task = hf.TokenizerTask.for_model(model, name)
    tokens, mask = heads.text_batch(task, texts, model.cfg.max_len)
    measure = heads.text_loss(model, tokens, mask)
    shapes = model.attention_shapes()
    baseline = measure({n: np.ones(s, np.float32) for n, s in shapes.items()})
    scores = heads.text_pattern_scores(model, tokens, mask)
    sweep = heads.ablation_sweep(measure, shapes)
    return {
        "task": f"{name} on {len(texts)} texts",
        "metric": "loss",
        "higher_is_better": False,
        "mode": FLAGS.mode,
        "baseline": baseline,
        "sets": {n: {"scores": scores[n], "ablation": sweep[n]} for n in shapes},
    }


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    if (FLAGS.workdir is None) == (FLAGS.pretrained is None):
        sys.exit("error: workdir: give exactly one of --workdir and --pretrained")
    if FLAGS.pretrained is not None:
        out = FLAGS.out or "heads"
        if os.path.exists(out) and not os.path.isdir(out):
            sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
        try:
            result = _pretrained_result()
        except ValueError as error:
            sys.exit(f"error: {error}")
        return write(result, out)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "heads")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    if FLAGS.score_examples <= 0:
        sys.exit(f"error: score_examples: expected a positive int, got {FLAGS.score_examples}")
    try:
        config, setup, state = training.load_checkpoint(FLAGS.workdir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    task, kind, params = setup.task, setup.kind, state["params"]
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

    scores, sets, mb = heads.pattern_scores(model, batches[0][0], FLAGS.score_examples)
    sweep = heads.ablation_sweep(lambda mask: measure(mask)[metric], shapes)
    result = {
        "task": task.name,
        "metric": metric,
        "higher_is_better": not metric.startswith("eval/loss"),
        "mode": FLAGS.mode,
        "baseline": baseline,
        "sets": {name: {"scores": scores[name], "ablation": sweep[name]} for name in shapes},
    }
    if isinstance(task, tasks.pronoun.PronounTask):
        per_head = sweep["encoder"]["per_head"]
        result["antecedent"] = heads.antecedent_summary(sets, mb, task, per_head, baseline)
    write(result, out)


def write(result: dict, out: str) -> None:
    """heads.json, a PNG per attention set and the tables."""
    metric, baseline = result["metric"], result["baseline"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "heads.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for name, entry in result["sets"].items():
        print(heads.table(name, entry, metric, baseline))
        path = os.path.join(out, f"{name}.png")
        figures.plot_heads(name, entry, metric).savefig(path, dpi=120)
        print(f"wrote {path}")
    if "antecedent" in result:
        ablated = result["sets"]["encoder"]["ablation"]["per_head"]
        print(heads.antecedent_table(result["antecedent"], ablated, metric))
    print(f"wrote {os.path.join(out, 'heads.json')}")


if __name__ == "__main__":
    app.run(main)
