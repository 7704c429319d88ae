"""experiments/train.py that SIGKILLs itself at a chosen point (used by test_reliability.py).

    python tests/crash_run.py POINT:STEP [train.py flags ...]

POINT is one of
  batch       before training step STEP starts (between checkpoints);
  save        while saving the checkpoint of STEP: its files are written, the
              rename that commits them has not happened;
  after_save  right after the checkpoint of STEP is complete;
  metrics     in the middle of writing the metrics line of STEP;
  none        never (an uninterrupted run).
"""

import os
import runpy
import signal
import sys

from kit import checkpoint, metrics, tasks


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, at = sys.argv[1].split(":")
    at = int(at)
    if point == "batch":
        real_batch = tasks.train_batch

        def train_batch(task, seed, step, batch_size):
            if step == at - 1:  # the batch of 1-based step `at`
                die()
            return real_batch(task, seed, step, batch_size)

        tasks.train_batch = train_batch
    elif point == "save":
        from orbax.checkpoint._src.path import atomicity

        real_rename = atomicity.async_path.rename

        async def rename(src, dst):
            if os.path.basename(str(dst)) == str(at):
                die()
            return await real_rename(src, dst)

        atomicity.async_path.rename = rename
    elif point == "after_save":
        real_save = checkpoint.Checkpointer.save

        def save(self, step, state):
            real_save(self, step, state)
            if step == at:
                die()

        checkpoint.Checkpointer.save = save
    elif point == "metrics":
        real_write = metrics.MetricWriter.write

        def write(self, step, values):
            if step == at and "loss" in values:
                with open(self.path, "a") as f:
                    f.write(f'{{"step": {step}, "accur')
                    f.flush()
                die()
            real_write(self, step, values)

        metrics.MetricWriter.write = write
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(here), "experiments", "train.py")
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
