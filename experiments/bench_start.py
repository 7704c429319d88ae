"""The whole reverse command against a stock Flax NNX program of the same task, side by side.

    python experiments/bench_start.py --anchor=PATH/TO/reverse_nnx.py --runs=5

Alternates `python experiments/train.py --config=configs/reverse.py` (a fresh
workdir each run) with `python <anchor> --config small` (1 layer, 1 head, d=32,
feed-forward 64, trained until 100% exact match: the same model size as
configs/reverse.py), timing each whole process from outside, and prints every
run, the kit's `timing` phases (medians), the medians and their ratio. The
anchor is not part of the kit; pass its path.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("anchor", None, "Path of the anchor program (reverse_nnx.py).")
flags.DEFINE_integer("runs", 5, "Alternating runs of each.")
flags.DEFINE_string("config", "configs/reverse.py", "The kit's config.")
flags.DEFINE_float("pause", 1.0, "Seconds of idle before each run.")
flags.mark_flags_as_required(["anchor"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(command, cwd=ROOT):
    time.sleep(FLAGS.pause)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def main(_):
    if not os.path.isfile(FLAGS.anchor):
        sys.exit(f"error: anchor: no such file {FLAGS.anchor!r}")
    if FLAGS.runs <= 0:
        sys.exit(f"error: runs: expected a positive int, got {FLAGS.runs}")
    kit, anchor, phases = [], [], []
    for run in range(FLAGS.runs):
        workdir = tempfile.mkdtemp(prefix="bench-start-")
        try:
            seconds, out = timed(
                [sys.executable, "experiments/train.py", f"--config={FLAGS.config}",
                 f"--workdir={workdir}"]
            )  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        summary = json.loads(out.splitlines()[-1])
        kit.append(seconds)
        phases.append(summary["timing"])
        with tempfile.TemporaryDirectory() as scratch:  # the anchor writes its results there
            anchor_path = os.path.abspath(FLAGS.anchor)
            seconds, out = timed([sys.executable, anchor_path, "--config", "small"], cwd=scratch)
        anchor.append(seconds)
        result = next(
            (json.loads(line[len("RESULT ") :]) for line in out.splitlines()
             if line.startswith("RESULT ")),
            {},
        )  # fmt: skip
        print(
            f"run {run + 1}: kit {kit[-1]:.2f} s (exact match "
            f"{summary['eval/exact_match']:.3f} at step {summary['step']}), anchor "
            f"{anchor[-1]:.2f} s (100% at step {result.get('steps_to_100', '?')})",
            flush=True,
        )
    median = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    print("kit timing, median s: " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    mk, ma = statistics.median(kit), statistics.median(anchor)
    print(f"median: kit {mk:.2f} s, anchor {ma:.2f} s, kit / anchor {mk / ma:.3f}")


if __name__ == "__main__":
    app.run(main)
