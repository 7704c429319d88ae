"""Train a toy transformer from an experiment config.

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy
    python experiments/train.py --config=configs/reverse.py --workdir=runs/reverse \\
        --config.model.num_heads=2
    python experiments/train.py --config=configs/copy.py:tiny --workdir=/tmp/tiny

Prints a short header (devices and mesh, task, model, workdir, resumed-from
step), a progress bar (a plain line per log step when stdout is not a terminal),
one line per evaluation and a summary; its last line is the summary as JSON,
with "timing": the command's wall seconds by phase (imports, setup, init,
compile, first_step, train, eval, checkpoint, other) and their "total".
Library logs (absl, orbax, jax) appear only with --verbosity=1 or higher.
Rerunning the same command with the same workdir resumes from its latest
checkpoint. Ctrl-C (SIGINT) or SIGTERM stops at the next step boundary, saves a
checkpoint of that step and prints one line, exiting with 130 or 143; a second
Ctrl-C stops at once, keeping the previous checkpoint. A second run on a workdir
in use fails at start-up, naming the process that holds it.

Several processes (hosts) run the same command, each with its --process_id
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or --distributed
to let jax detect SLURM, Open MPI or a TPU pod slice):

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy \\
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

import time

_START = time.perf_counter()  # before the imports, which take a good part of a short run

import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kit import sharding, training  # noqa: E402

# What the imports made lives as long as the process; frozen, it is left out of the
# collector's full passes (75 ms each with jax, flax and optax loaded, 0 after).
gc.freeze()
_IMPORTED = time.perf_counter()
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
        began = time.perf_counter()
        result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir, console=console)
    except training.Interrupted as stop:
        if jax.process_index() == 0:
            print(stop)
        _exit_now(stop.exit_code)
    except (ValueError, training.NonFiniteError, training.WriteError) as error:
        sys.exit(f"error: {error}")
    total = time.perf_counter() - _START
    # "start": reading the flags and the config file, jax.distributed, the console.
    timing = {"imports": _IMPORTED - _START, "start": began - _IMPORTED, **result["timing"]}
    timing["other"] = total - sum(timing.values())
    timing["total"] = total
    result["timing"] = timing
    if jax.process_index() == 0:
        held_out = ", ".join(
            f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and "/" in k
        )
        print(
            f"done: step {result['step']}, {held_out}; training {result['train_seconds']:.1f} s, "
            f"whole command {total:.1f} s"
        )
        print(json.dumps(_rounded(result)))
    _exit_now()


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _exit_now(code: int = 0) -> None:
    """Ends the process after its exit handlers (jax.distributed's shutdown, log
    flushing), skipping the interpreter's teardown of every loaded module: with
    jax, flax and orbax loaded that took 0.3 s of a 5 s run (docs/benchmarks.md)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(main)
