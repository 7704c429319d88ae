"""Activation patching in a trained run: which heads and positions carry the answer.

    python experiments/patch.py --workdir=runs/pronoun \
        --clean="Mark told Mary that he was leaving ." \
        --corrupt="Mark told Mary that she was leaving ."

Runs the clean and the corrupted text through the workdir's model (an
encoder_only or decoder_only kind: one prediction per position), reads the
answer at the last position where the two runs predict different tokens (or
--position; --right and --wrong name the answers, default each run's
prediction there), and patches each head's output and the residual stream before each
layer at each position from the clean run into the corrupted one
(`kit.analysis.patching.patch_text`), beside attribution patching's one-backward-pass
estimate. Writes <out>/patching.json, <out>/patching.png and <out>/index.html
(the figure and the table, offline); <out> defaults to <workdir>/patch. A bad
flag or text ends in one line naming it, and nothing is written.
"""

import io
import json
import os
import sys

from absl import app, flags
from flax import nnx

from kit import training
from kit.analysis import patching
from kit.views import figures

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("clean", None, "The text whose answer is patched back.")
flags.DEFINE_string("corrupt", None, "The same number of tokens, with another answer.")
flags.DEFINE_integer("position", None, "Where to read the answer (default: see above).")
flags.DEFINE_string("right", None, "The answer's token (default: the clean prediction).")
flags.DEFINE_string("wrong", None, "The wrong answer (default: the corrupted prediction).")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/patch).")
flags.mark_flags_as_required(["workdir", "clean", "corrupt"])


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "patch")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    try:
        _, setup, state = training.load_checkpoint(FLAGS.workdir)
        model = nnx.merge(setup.trainer.graphdef, state["params"])
        if (FLAGS.right is None) != (FLAGS.wrong is None):
            raise ValueError("right, wrong: give both answers or neither")
        answers = None if FLAGS.right is None else (FLAGS.right, FLAGS.wrong)
        result = patching.patch_text(
            model, setup.task, FLAGS.clean, FLAGS.corrupt, FLAGS.position, answers
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    os.makedirs(out, exist_ok=True)
    buffer = io.BytesIO()
    figures.plot_patching(result).savefig(buffer, format="png", dpi=110)
    with open(os.path.join(out, "patching.png"), "wb") as f:
        f.write(buffer.getvalue())
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(figures.patching_page(result, buffer.getvalue()))
    with open(os.path.join(out, "patching.json"), "w", encoding="utf-8") as f:
        json.dump(result.to_json(), f, indent=1)
    print(result.summary())
    print(f"wrote {out}/patching.json, patching.png, index.html")


if __name__ == "__main__":
    app.run(main)
