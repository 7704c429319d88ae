"""Show what a trained model attends to on a text of your own.

    python experiments/visualize.py --workdir=runs/dates --text="3rd of March 2021"
    python experiments/visualize.py --workdir=runs/pronoun \\
        --text="Mark told Sam that he was leaving."

Loads config.json and the latest checkpoint of the workdir, runs the model on
the text (greedy decoding where it decodes), writes workdir/attention/<set>.png
per attention set and workdir/attention/index.html (offline; open it in any
browser), and prints the prediction and the files. For a model that labels
positions (the pronoun probe), it also prints, per layer and head, the attention
from each labelled position to every token, and the head where the predicted
antecedent gets the most. Library logs (absl, orbax, jax) appear only with
--verbosity=1 or higher; a bad flag value ends in one line naming it.
"""

import os
import sys

from absl import app, flags

from kit import probe, training

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("text", None, "The input text.")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/attention).")
flags.mark_flags_as_required(["workdir", "text"])


def main(_):
    out = FLAGS.out or os.path.join(FLAGS.workdir, "attention")
    training.report.quiet_library_logs(FLAGS.verbosity)
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    try:
        _, setup, state = training.load_checkpoint(FLAGS.workdir)
        reading = probe.read_attention(
            setup.task, setup.trainer.graphdef, state["params"], FLAGS.text
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"input:      {FLAGS.text}")
    print(f"prediction: {reading.prediction}")
    if reading.labels is not None:
        for antecedent in probe.antecedent_attention(reading):
            print(probe.format_antecedent(antecedent))
    for path in probe.write_views(reading, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
