"""experiments/train.py that signals itself at chosen points (used by test_reliability.py),
as a command or, through `faults_at`, in the test's own process.

    python tests/crash_run.py POINT:STEP[:SIGNAL][,POINT:STEP[:SIGNAL] ...] [train.py flags ...]

SIGNAL is KILL (the default), INT or TERM; the process sends it to itself, so it
arrives at exactly that point. SIGINT is handled as in a terminal's foreground
process (KeyboardInterrupt) even if the parent ignored it, as a shell's background
jobs do. POINT is one of
  init        while the programs compile and the state initializes (STEP unused);
  batch       before training step STEP starts (between checkpoints);
  eval        in the middle of the evaluation at step STEP;
  in_save     as the checkpoint of STEP starts to be saved;
  save        while saving the checkpoint of STEP: its files are written, the
              rename that commits them has not happened;
  after_save  right after the checkpoint of STEP is complete;
  metrics     in the middle of writing the metrics line of STEP (KILL only);
  none        never (an uninterrupted run).
"""

import contextlib
import os
import runpy
import signal
import sys

from kit import checkpoint, metrics, tasks
from kit.training import loop

POINTS = {"init", "batch", "eval", "in_save", "save", "after_save", "metrics", "none"}


def parse(spec: str) -> dict[str, list[tuple[int, int]]]:
    """ "POINT:STEP[:SIGNAL],..." -> {point: [(step, signal number), ...]}."""
    faults = {}
    for part in spec.split(","):
        point, at, *name = part.split(":")
        signum = getattr(signal, "SIG" + (name[0] if name else "KILL"))
        faults.setdefault(point, []).append((int(at), signum))
    unknown = set(faults) - POINTS
    if unknown:
        raise SystemExit(f"unknown fault point(s) {sorted(unknown)}")
    return faults


@contextlib.contextmanager
def faults_at(spec: str):
    """While entered, a run in this process signals itself at the points `spec` names
    (the module docstring's syntax), with SIGINT handled as in a terminal."""
    faults = parse(spec)

    def fire(point, step):
        for at, signum in faults.get(point, []):
            if at == step or point == "init":
                os.kill(os.getpid(), signum)

    real_batch, real_evaluate = tasks.Task.train_batch, loop.evaluate
    real_save, real_fresh = checkpoint.Checkpointer.save, loop._fresh_state
    real_write = metrics.MetricWriter.write
    current = [0]  # the training step under way (1-based)

    def train_batch(task, seed, step, batch_size):
        current[0] = step + 1
        fire("batch", step + 1)
        return real_batch(task, seed, step, batch_size)

    def evaluate(*args, **kwargs):
        fire("eval", current[0])
        return real_evaluate(*args, **kwargs)

    def save(self, step, state):
        fire("in_save", step)
        real_save(self, step, state)
        fire("after_save", step)

    def fresh_state(*args):
        fire("init", 0)
        return real_fresh(*args)

    def write(self, step, values):
        if any(at == step for at, _ in faults.get("metrics", [])) and "loss" in values:
            with open(self.path, "a") as f:
                f.write(f'{{"step": {step}, "accur')
                f.flush()
            fire("metrics", step)
        real_write(self, step, values)

    patches = [
        (tasks.Task, "train_batch", train_batch),
        (loop, "evaluate", evaluate),
        (loop, "_fresh_state", fresh_state),
        (checkpoint.Checkpointer, "save", save),
        (metrics.MetricWriter, "write", write),
    ]
    if "save" in faults:
        from orbax.checkpoint._src.path import atomicity

        real_rename = atomicity.async_path.rename

        async def rename(src, dst):
            name = os.path.basename(str(dst))
            fire("save", int(name) if name.isdigit() else -1)
            return await real_rename(src, dst)

        patches.append((atomicity.async_path, "rename", rename))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for owner, name, patched in patches:
            setattr(owner, name, patched)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        signal.signal(signal.SIGINT, previous)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(here), "experiments", "train.py")
    with faults_at(sys.argv[1]):
        sys.argv = [script, *sys.argv[2:]]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
