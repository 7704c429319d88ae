"""Packed against padded training, side by side in one run: tokens per second and the
time to a target held-out exact match.

    python experiments/bench_packing.py --out=docs/packing.md     # configs/scan_simple.py

Trains the config twice from the same seed, padded and with config.task.pack
(about --span examples per row, batch_size / span rows), evaluating every
--eval_every steps. Reports per run: seconds per train step (the run's
train_seconds over its steps; evaluation excluded), useful tokens per second
(source and target tokens that are not padding, counted on the run's own
batches), the held-out exact match at each evaluation, and the time to the
first evaluation at or above --target (steps x seconds per step).
"""

import json
import os
import tempfile

import numpy as np
from absl import app, flags

from kit import metrics, models, training
from kit.training.steps import train_model_batch

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/scan_simple.py", "The experiment config.")
flags.DEFINE_integer("span", 4, "config.task.pack_span: about this many examples per row.")
flags.DEFINE_integer("eval_every", 250, "Evaluate every this many steps.")
flags.DEFINE_float("target", 0.99, "Held-out exact match to reach.")
flags.DEFINE_integer("steps", None, "Override config.train.steps (a quick look).")
flags.DEFINE_string("out", None, "Also write the markdown table to this file.")


def useful_tokens(config, task, kind, span, batches=20):
    """Mean non-padding source and target tokens per training batch."""
    total = 0
    for step in range(batches):
        mb = train_model_batch(task, kind, config.seed, step, config.train.batch_size, span)
        total += int(np.sum(mb["weights"])) + int(np.sum(mb["src_lengths"]))
    return total / batches


def run(pack: bool):
    config = training.from_file(FLAGS.config)
    config.train.eval_every = FLAGS.eval_every
    if FLAGS.steps:
        config.train.steps = FLAGS.steps
    config.task.pack = pack
    config.task.pack_span = FLAGS.span
    task, mcfg = training.check_config(config)
    with tempfile.TemporaryDirectory() as workdir:
        result = training.train_and_evaluate(config, workdir, progress=False)
        lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    evals = [(x["step"], x["eval/exact_match"]) for x in lines if "eval/exact_match" in x]
    per_step = result["train_seconds"] / result["step"]
    span = FLAGS.span if pack else 0
    tokens = useful_tokens(config, task, models.MODELS[mcfg.kind], span)
    reached = next((step for step, exact in evals if exact >= FLAGS.target), None)
    return {
        "per_step": per_step,
        "tokens_per_second": tokens / per_step,
        "tokens_per_step": tokens,
        "evals": evals,
        "time_to_target": None if reached is None else reached * per_step,
        "reached": reached,
    }


def main(_):
    results = {"padded": run(False), f"packed (span {FLAGS.span})": run(True)}
    lines = [
        f"Config {FLAGS.config}; target held-out exact match {FLAGS.target:.0%}.",
        "",
        "| run | s / step | useful tokens / step | tokens / s | first step at target "
        "| time to target (s) | exact match by step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        when = "-" if r["reached"] is None else str(r["reached"])
        seconds = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.0f}"
        curve = ", ".join(f"{step}: {exact:.2%}" for step, exact in r["evals"])
        lines.append(
            f"| {name} | {r['per_step']:.3f} | {r['tokens_per_step']:.0f} "
            f"| {r['tokens_per_second']:.0f} | {when} | {seconds} | {curve} |"
        )
    print("\n".join(lines))
    print(json.dumps(results))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
