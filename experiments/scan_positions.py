"""SCAN's length split with every positional encoding: which ones reach longer outputs?

    python experiments/scan_positions.py --steps=600 --seeds=3
    python experiments/scan_positions.py --positions=t5 --name=scan_length_t5   # one encoding

Trains configs/scan_length.py once per (positional encoding, seed) into
<out>/<positions>-<seed> (a finished run is read back, not retrained), then
writes a Markdown table (mean and min-max held-out exact match per encoding, and
mean exact match per target length; where evaluation logs them, exact match
decoded to the true length and on the "around ... thrice" and recombination-only
commands apart) and a plot of exact match against target length to docs/<name>.md
and .png.
"""

import json
import os

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from kit import metrics, models, training

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 600, "Training steps per run.")
flags.DEFINE_integer("seeds", 3, "Seeds per positional encoding (0, 1, ...).")
flags.DEFINE_string("out", "runs/scan_positions", "Where the runs' workdirs go.")
flags.DEFINE_string("docs", "docs", "Where the table and the plot go.")
flags.DEFINE_list("positions", list(models.POSITIONS), "The positional encodings to train.")
flags.DEFINE_string("name", "scan_length_positions", "The table's and the plot's file name.")

EXTRA = {  # optional columns: metric -> header
    "eval/exact_match_oracle_length": "at the true length",
    "eval/exact_match_around_thrice": "around ... thrice",
    "eval/exact_match_recombination": "recombination only",
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_eval(workdir: str) -> dict:
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [line for line in lines if "eval/exact_match" in line][-1]


def run(positions: str, seed: int) -> dict:
    workdir = os.path.join(FLAGS.out, f"{positions}-{seed}")
    config = training.from_file(os.path.join(ROOT, "configs", "scan_length.py"))
    config.model.positions = positions
    config.seed = seed
    config.train.update(steps=FLAGS.steps, eval_every=FLAGS.steps, checkpoint_every=FLAGS.steps)
    if not os.path.exists(os.path.join(workdir, "checkpoints", str(FLAGS.steps))):
        training.train_and_evaluate(config, workdir, console=training.Console("quiet"))
    return final_eval(workdir)


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    results = {p: [run(p, seed) for seed in range(FLAGS.seeds)] for p in FLAGS.positions}
    extra = [m for m in EXTRA if all(m in e for r in results.values() for e in r)]
    lengths = sorted(
        {int(n) for r in results.values() for e in r for n in e["eval/exact_match_by_length"]}
    )
    rows = [
        "| positions | exact match, mean (min-max) | token accuracy, mean | "
        + "".join(f"{EXTRA[m]}, mean | " for m in extra)
        + " | ".join(f"len {n}" for n in lengths)
        + " |",
        "|---|---|---|" + "---|" * (len(extra) + len(lengths)),
    ]
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for positions, evals in results.items():
        exact = [e["eval/exact_match"] for e in evals]
        by_length = np.mean(
            [[e["eval/exact_match_by_length"][str(n)] for n in lengths] for e in evals], axis=0
        )
        token = np.mean([e["eval/token_accuracy"] for e in evals])
        spread = f"{np.mean(exact):.3f} ({min(exact):.3f}-{max(exact):.3f})"
        cells = "".join(f"{np.mean([e[m] for e in evals]):.3f} | " for m in extra)
        cells += " | ".join(f"{v:.2f}" for v in by_length)
        rows.append(f"| {positions} | {spread} | {token:.3f} | {cells} |")
        ax.plot(lengths, by_length, marker="o", label=positions)
    ax.set_xlabel("target length (actions)")
    ax.set_ylabel(f"exact match, mean of {FLAGS.seeds} seeds")
    ax.set_title(f"SCAN length split, {FLAGS.steps} steps per run")
    ax.legend()
    os.makedirs(FLAGS.docs, exist_ok=True)
    figure.savefig(os.path.join(FLAGS.docs, f"{FLAGS.name}.png"), dpi=110)
    table = "\n".join(rows) + "\n"
    with open(os.path.join(FLAGS.docs, f"{FLAGS.name}.md"), "w") as f:
        f.write(table)
    print(table)
    print(json.dumps({p: [e["eval/exact_match"] for e in r] for p, r in results.items()}))


if __name__ == "__main__":
    app.run(main)
