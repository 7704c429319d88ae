"""Activation patching in a trained run: which heads and positions carry the answer.

    python experiments/patch.py --workdir=runs/pronoun \
        --clean="Mark told Mary that he was leaving ." \
        --corrupt="Mark told Mary that she was leaving ."

Runs the clean and the corrupted text through the workdir's model (an encoder_only or
decoder_only kind: one prediction per position), reads the answer at the last position
where the two runs predict different tokens (or --position; --answers=RIGHT,WRONG names
the two answer tokens, default each run's prediction there, and without --position reads
them at the last position), and patches each head's output and the residual stream
before each layer at each position from the clean run into the corrupted one
(`kit.analysis.patching.patch_text`), beside attribution patching's one-backward-pass
estimate. Writes <out>/patching.json, <out>/patching.png (four heatmaps) and
<out>/index.html, the offline viewer opened at its patching view, with both runs'
attention in its other views (`kit.views.patching_view`); <out> defaults to
<workdir>/patch. A bad flag or text ends in one line naming it, and nothing is written.

With --pretrained=FOLDER (a Hugging Face checkpoint with its tokenizer.json; GPT-2 or
BERT, whose every position predicts) instead of --workdir:

    python experiments/patch.py --pretrained=path/to/gpt2 \
        --clean="When Mary and John went to the store, John gave a drink to" \
        --corrupt="When Mary and John went to the store, Mary gave a drink to" \
        --answers=ĠMary,ĠJohn  # the vocabulary's tokens for " Mary", " John"

Output goes to --out (default ./patch).
"""

import json
import os
import sys

from absl import app, flags
from flax import nnx

from kit import hf, pretrained, training, views
from kit.analysis import patching, probe

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("clean", None, "The text whose answer is patched back.")
flags.DEFINE_string("corrupt", None, "The same number of tokens, with another answer.")
flags.DEFINE_string("pretrained", None, "A Hugging Face checkpoint folder (instead of --workdir).")
flags.mark_flags_as_required(["clean", "corrupt"])
flags.DEFINE_integer("position", None, "Where to read the answer (default: see above).")
flags.DEFINE_list("answers", None, "RIGHT,WRONG: the two answer tokens (default: predictions).")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/patch).")


def _load():
    """(task, graphdef, params) of --workdir's latest checkpoint or of --pretrained."""
    if FLAGS.pretrained is None:
        _, setup, state = training.load_checkpoint(FLAGS.workdir)
        return setup.task, setup.trainer.graphdef, state["params"]
    model = pretrained.load(FLAGS.pretrained)
    task = hf.TokenizerTask.for_model(model, os.path.basename(os.path.normpath(FLAGS.pretrained)))
    return (task, *nnx.split(model))


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    if (FLAGS.workdir is None) == (FLAGS.pretrained is None):
        sys.exit("error: workdir: give exactly one of --workdir and --pretrained")
    out = FLAGS.out or ("patch" if FLAGS.workdir is None else os.path.join(FLAGS.workdir, "patch"))
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    try:
        task, graphdef, params = _load()
        if FLAGS.answers is not None and len(FLAGS.answers) != 2:
            raise ValueError(f"answers: expected RIGHT,WRONG, two tokens, got {FLAGS.answers}")
        answers = None if FLAGS.answers is None else tuple(FLAGS.answers)
        result = patching.patch_text(
            nnx.merge(graphdef, params),
            task,
            FLAGS.clean,
            FLAGS.corrupt,
            FLAGS.position,
            answers,
        )
        runs = [
            probe.read_attention(task, graphdef, params, getattr(FLAGS, name), name=name)
            for name in ("clean", "corrupt")
        ]
    except ValueError as error:
        sys.exit(f"error: {error}")
    os.makedirs(out, exist_ok=True)
    views.plot_patching(result).savefig(os.path.join(out, "patching.png"), dpi=110)
    views.patching_view(result, *runs).save(os.path.join(out, "index.html"))
    with open(os.path.join(out, "patching.json"), "w", encoding="utf-8") as f:
        json.dump(result.to_json(), f, indent=1)
    print(result.summary())
    print(f"wrote {out}/patching.json, patching.png, index.html")


if __name__ == "__main__":
    app.run(main)
