"""Train a toy transformer from an experiment config.

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy
    python experiments/train.py --config=configs/reverse.py --workdir=runs/reverse \\
        --config.model.num_heads=2
    python experiments/train.py --config=configs/copy.py:tiny --workdir=/tmp/tiny

Prints a short header (devices and mesh, task, model, workdir, resumed-from
step), a progress bar (a plain line per log step when stdout is not a terminal),
one line per evaluation and a summary; its last line is the summary as JSON.
Library logs (absl, orbax, jax) appear only with --verbosity=1 or higher.
Rerunning the same command with the same workdir resumes from its latest
checkpoint.

Several processes (hosts) run the same command, each with its --process_id
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or --distributed
to let jax detect SLURM, Open MPI or a TPU pod slice):

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy \\
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

import json
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from kit import sharding, training

_START = time.perf_counter()
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and config.json go.")
flags.DEFINE_bool("progress", True, "Show a progress bar (or a line per log step).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several processes).")
flags.DEFINE_integer("num_processes", None, "How many processes take part.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.DEFINE_bool("distributed", False, "Start jax.distributed with cluster auto-detection.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    training.report.quiet_library_logs(FLAGS.verbosity)
    try:
        sharding.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            auto=FLAGS.distributed,
        )
        console = training.Console("auto" if FLAGS.progress else "quiet")
        result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir, console=console)
    except (ValueError, training.NonFiniteError) as error:
        sys.exit(f"error: {error}")
    result["command_seconds"] = time.perf_counter() - _START
    if jax.process_index() == 0:
        held_out = ", ".join(
            f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and "/" in k
        )
        print(
            f"done: step {result['step']}, {held_out}; training {result['train_seconds']:.1f} s, "
            f"whole command {result['command_seconds']:.1f} s"
        )
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
        )


if __name__ == "__main__":
    app.run(main)
