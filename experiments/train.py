"""Train a toy transformer from an experiment config.

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy
    python experiments/train.py --config=configs/reverse.py --workdir=runs/reverse \\
        --config.model.num_heads=2

Rerunning the same command with the same workdir resumes from its latest
checkpoint. Prints the final held-out metrics.
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

from kit import train

_START = time.perf_counter()
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and config.json go.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    result["command_seconds"] = time.perf_counter() - _START
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    app.run(main)
