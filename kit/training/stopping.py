"""Stopping a run without losing it: signals as requests, one run per workdir, named write failures.

`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (a preempted machine, `kill`) into
a request that the training loop reads at its next step boundary, where it saves a
checkpoint and raises `Interrupted`; a second signal abandons at once (the
previous complete checkpoint stays: orbax commits a checkpoint by renaming it).
`lock_workdir` holds an `fcntl.flock` on the workdir for the run's lifetime; the
system drops it when the process dies, `kill -9` included, so no stale lock is
left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading

import jax
import numpy as np

LOCK_FILE = ".lock"


class Interrupted(Exception):
    """The run stopped on SIGINT or SIGTERM at a step boundary.

    Attributes:
      signum: the signal (signal.SIGINT or signal.SIGTERM).
      step: the last completed step.
      checkpoint: the step of the latest complete checkpoint (None if none).
      abandoned: a second signal cut the final save short.
    """

    def __init__(self, signum: int, step: int, checkpoint: int | None, abandoned: bool = False):
        self.signum, self.step, self.checkpoint, self.abandoned = (
            signum,
            step,
            checkpoint,
            abandoned,
        )
        name = signal.Signals(signum).name
        if abandoned:
            kept = "none" if checkpoint is None else f"step {checkpoint}"
            what = f"second {name} during the save: abandoned; latest checkpoint {kept}"
        elif checkpoint == step:
            what = "checkpoint saved" if step else "nothing trained yet"
        else:
            what = "no checkpoint"
        super().__init__(
            f"interrupted at step {step} ({name}): {what}; run the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process it ended: 130, 143."""
        return 128 + self.signum


class WriteError(RuntimeError):
    """A checkpoint or a metrics line could not be written (a full disk, say); the run stopped."""


class StopSignals:
    """While entered, SIGINT and SIGTERM set `requested` instead of ending the process.

    A second signal while one is pending raises KeyboardInterrupt at once (the
    caller abandons what it was doing). Handlers are installed only on the main
    thread (Python delivers signals there alone), and not over a signal that
    was ignored (a background job's SIGINT); the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        del frame
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def agreed(self) -> int | None:
        """The pending request, the same on every process: with several, the
        request (SIGTERM before SIGINT) is gathered from all, so each stops at
        the same step; the loop asks at log steps then, not at every step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        mine = np.int32(self.requested or 0)
        every = np.asarray(multihost_utils.process_allgather(mine))
        asked = [int(s) for s in every.ravel() if s]
        return max(asked) if asked else None


@contextlib.contextmanager
def lock_workdir(workdir: str, *, enabled: bool = True):
    """Holds `workdir/.lock` for the run: a second run there fails at once.

    Raises:
      ValueError: naming the workdir and the process that holds it.
    """
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"workdir: {os.path.abspath(workdir)} is in use by another run (process "
                f"{holder}); wait for it to finish or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
