"""scikit-learn's SVC() on the digits task's split: the anchor for a model on data this small.

    python experiments/digits_svc.py                      # SVC alone
    python experiments/digits_svc.py --workdir=runs/digits  # beside a trained ViT

Fits SVC() with its defaults on the 1,437 training images (flattened pixels in
[0, 1]) and prints its held-out accuracy on the 360 images the ViT is evaluated
on; with --workdir, also the ViT's last held-out accuracy from its metrics.jsonl.
"""

import os
import sys

from absl import app, flags
from sklearn.svm import SVC

from kit import digits, metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A digits training workdir, to print its accuracy beside.")


def main(_):
    images, labels = digits.load()
    train, held_out = digits.split()
    svc = SVC().fit(images[train].reshape(len(train), -1), labels[train])
    accuracy = svc.score(images[held_out].reshape(len(held_out), -1), labels[held_out])
    print(f"SVC():  {accuracy:.4f} held-out accuracy ({len(held_out)} images)")
    if FLAGS.workdir:
        evals = [
            line
            for line in metrics.read_metrics(os.path.join(FLAGS.workdir, "metrics.jsonl"))
            if "eval/accuracy" in line
        ]
        if not evals:
            sys.exit(f"error: workdir: no eval/accuracy in {FLAGS.workdir}/metrics.jsonl")
        print(f"ViT:    {evals[-1]['eval/accuracy']:.4f} (step {evals[-1]['step']})")


if __name__ == "__main__":
    app.run(main)
