"""Show what a trained model attends to: on a text of your own, or on a held-out image.

    python experiments/visualize.py --workdir=runs/dates --text="3rd of March 2021"
    python experiments/visualize.py --workdir=runs/pronoun \\
        --text="Mark told Sam that he was leaving."
    python experiments/visualize.py --workdir=runs/pronoun \
        --text="Mark told Sam that he was leaving." --compare="Mark told Anna that he was leaving."
    python experiments/visualize.py --workdir=runs/digits --image=0
    python experiments/visualize.py --pretrained=path/to/bert-base-uncased \
        --text="Mark told Sam that he was leaving."

Loads config.json and the latest checkpoint of the workdir. With --text it runs
the model on the text (greedy decoding where it decodes), writes
workdir/attention/<set>.png per attention set and the offline pages (open them
in any browser; each has the head, model and neuron views): index.html opens in
the head view, model.html in the model view, neuron.html in the neuron view; it
prints the prediction and the files. With --compare="another text" of as many
tokens, it also reads that text and writes compare.html (the diff view: how
every head's attention and the prediction change) and compare_<set>.png. For
a model that labels positions (the pronoun probe), it also prints, per layer and
head, the attention from each labelled position to every token, and the head
where the predicted antecedent gets the most. With --image (a Vision
Transformer), it draws the held-out image under every layer and head's
attention from the class token and under the attention rollout. Library logs
(absl, orbax, jax) appear only with --verbosity=1 or higher; a bad flag value
ends in one line naming it.

With --pretrained=FOLDER (a Hugging Face checkpoint, `kit.pretrained.load`; its
tokenizer.json reads the text) instead of --workdir: the same views with the model's
own tokens; a decoder (GPT-2, T5) first continues the text by --new_tokens greedily.
Output goes to --out (default ./attention).
"""

import os
import sys

from absl import app, flags
from flax import nnx

from kit import hf, pretrained, training
from kit.analysis import probe

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
flags.DEFINE_string("text", None, "The input text.")
flags.DEFINE_string(
    "compare", None, "With --text: a second text of as many tokens, for the diff view."
)
flags.DEFINE_integer("image", None, "Index of a held-out image (Vision Transformer).")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/attention).")
flags.DEFINE_string("pretrained", None, "A Hugging Face checkpoint folder (instead of --workdir).")
flags.DEFINE_integer("new_tokens", 8, "With --pretrained: tokens a decoder generates first.")


def _load(image: bool):
    """(task, graphdef, params) of --workdir's latest checkpoint or of --pretrained."""
    if FLAGS.pretrained is None:
        _, setup, state = training.load_checkpoint(FLAGS.workdir)
        return setup.task, setup.trainer.graphdef, state["params"]
    if image:
        raise ValueError("image: --image reads a workdir's held-out images; use --text")
    model = pretrained.load(FLAGS.pretrained)
    name = os.path.basename(os.path.normpath(FLAGS.pretrained))
    task = hf.TokenizerTask.for_model(model, name, FLAGS.new_tokens)
    graphdef, params = nnx.split(model)
    return task, graphdef, params


def main(_):
    if (FLAGS.workdir is None) == (FLAGS.pretrained is None):
        sys.exit("error: workdir: give exactly one of --workdir and --pretrained")
    default = "attention" if FLAGS.workdir is None else os.path.join(FLAGS.workdir, "attention")
    out = FLAGS.out or default
    training.report.quiet_library_logs(FLAGS.verbosity)
    if (FLAGS.text is None) == (FLAGS.image is None):
        sys.exit("error: text: give exactly one of --text and --image")
    if FLAGS.compare is not None and FLAGS.text is None:
        sys.exit("error: compare: needs --text, the text to compare with")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: out: {out} exists and is not a folder; use another --out")
    try:
        task, graphdef, params = _load(FLAGS.image is not None)
        if FLAGS.image is not None:
            reading = probe.read_image(task, graphdef, params, FLAGS.image)
        elif FLAGS.compare is not None:
            comparison = probe.compare(
                task, graphdef, params, FLAGS.text, FLAGS.compare, names=("text", "compare")
            )
            reading = comparison.a
        else:
            reading = probe.read_attention(task, graphdef, params, FLAGS.text)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if FLAGS.image is not None:
        print(f"image {reading.index}: label {reading.label}, prediction {reading.prediction}")
        paths = probe.write_image_views(reading, out)
    else:
        print(f"input:      {FLAGS.text}")
        print(f"prediction: {reading.prediction}")
        if reading.labels is not None:
            for antecedent in probe.antecedent_attention(reading):
                print(probe.format_antecedent(antecedent))
        paths = probe.write_views(reading, out)
        if FLAGS.compare is not None:
            print(f"compare:    {FLAGS.compare}")
            print(f"prediction: {comparison.b.prediction}")
            paths += probe.write_comparison(comparison, out)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
