"""Plot metrics of a training run over its steps, from its metrics.jsonl.

    python experiments/plot_metrics.py --workdir=runs/induction \\
        --metrics=eval/loss_first,eval/loss_repeat --out=docs/induction_loss.png

One line per metric against the step (log scale with --log); a metric the run
never logged ends in one line naming it, and nothing is written.
"""

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (metrics.jsonl).")
flags.DEFINE_list("metrics", ["loss"], "Comma-separated metric names.")
flags.DEFINE_string("out", None, "The figure (.png or .svg).")
flags.DEFINE_bool("log", True, "Log-scale y axis.")
flags.DEFINE_string("title", None, "Figure title (default: the workdir).")
flags.mark_flags_as_required(["workdir", "out"])


def main(_):
    from matplotlib.figure import Figure

    from kit.views import figures

    path = os.path.join(FLAGS.workdir, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: workdir: no metrics.jsonl in {FLAGS.workdir!r}; train there first")
    try:
        fmt = figures.figure_format(FLAGS.out)
    except ValueError as error:
        sys.exit(f"error: out: {str(error).removeprefix('path: ')}")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    series = {m: [(r["step"], r[m]) for r in records if m in r] for m in FLAGS.metrics}
    missing = [m for m, points in series.items() if not points]
    if missing:
        logged = sorted({k for r in records for k in r if k != "step"})
        sys.exit(f"error: metrics: {missing} not in {path}; it has {logged}")
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker=".", label=name)
    if FLAGS.log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(FLAGS.title or FLAGS.workdir)
    fig.savefig(FLAGS.out, format=fmt, dpi=130)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
