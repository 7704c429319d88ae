"""What the training loop does besides stepping: periodic actions, deferred checks, timing.

After each step the loop asks each periodic action whether it is due (every N
steps, and at the last step) and runs the due ones in order: `Log` (a metrics
line and the console), `Evaluate` (the held-out set) and `Save` (a
checkpoint), in the manner of `clu.periodic_actions`. The steps' non-finite flags
stay on the device until one of them is due (`NonFiniteChecks`), so the host
does not wait for every step. `Clock` books the wall seconds of a run by phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from kit import checkpoint, metrics
from kit.training.report import Console
from kit.training.stopping import Interrupted, StopSignals, WriteError


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (train.skip_nonfinite is False)."""


class Clock:
    """Wall seconds of a run by phase; every second goes to one phase.

    `lap(phase)` books the seconds since the last booking to `phase`.
    `with clock.phase(name):` books its block to `name`, and pauses the phase it
    is opened in: that one's seconds so far are booked first (an evaluation
    inside the "train" phase books the steps before it to "train"). Seconds
    outside every phase go to the next phase booked.

    Args:
      began: the perf_counter time the clock starts from (default: now).
    """

    def __init__(self, began: float | None = None):
        self._last = time.perf_counter() if began is None else began
        self._open: list[str] = []
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._open:
            self.lap(self._open[-1])
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()
            self.lap(name)


def write_metrics(writer: metrics.MetricWriter, step: int, values: dict) -> None:
    """Appends a metrics line, or raises WriteError naming the file."""
    try:
        writer.write(step, values)
    except OSError as error:
        raise WriteError(
            f"metrics: step {step} could not be written to {writer.path} ({error}); the "
            f"lines before it and the latest complete checkpoint are intact: free space "
            f"and run the same command to resume"
        ) from error


class NonFiniteChecks:
    """The steps' `finite` flags, kept on the device until `check` reads them all in one
    transfer (the loop calls it before each log, evaluation and save, and before
    stopping), so the host need not wait for every step.

    Args:
      ckpt: the run's checkpoints (the error names the latest).
      enabled: False (train.skip_nonfinite) keeps nothing: a non-finite update is
        skipped silently.
    """

    def __init__(self, ckpt: checkpoint.Checkpointer, enabled: bool = True):
        self._ckpt, self._enabled = ckpt, enabled
        self._unchecked: list[tuple[int, dict]] = []

    def add(self, step: int, m: dict) -> None:
        """Keeps the metrics `m` of `step` (1-based) to check later."""
        if self._enabled:
            self._unchecked.append((step, m))

    def check(self) -> None:
        """Raises NonFiniteError naming the first step kept whose loss or gradients were
        not finite.

        That step's update was skipped (make_optimizer), and no checkpoint was saved
        after it, so the latest checkpoint holds finite parameters; it is closed.

        Raises:
          NonFiniteError: as above.
        """
        steps, self._unchecked = self._unchecked, []
        flags = jax.device_get([m["finite"] for _, m in steps])
        for (step, m), finite in zip(steps, flags, strict=True):
            if not finite:
                last = self._ckpt.latest_step()
                self._ckpt.close()
                raise NonFiniteError(
                    f"step {step}: the loss ({float(m['loss'])}) or the gradient norm "
                    f"({float(m['grad_norm'])}) is not finite; stopped. The latest checkpoint "
                    f"({'none' if last is None else f'step {last}'}) is intact. Lower "
                    f"config.train.learning_rate, or set config.train.skip_nonfinite=True to "
                    f"skip such updates."
                )


class PeriodicAction:
    """Runs every `every` steps and at step `last`; subclasses define `run`.

    Args:
      every: the period in steps.
      last: the run's last step.
    """

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def run(self, step: int, state: dict[str, Any], m: dict[str, Any]) -> None:
        """Acts after `step` (1-based), given the train state and that step's metrics."""
        raise NotImplementedError


class Log(PeriodicAction):
    """Writes the step's metrics and learning rate to metrics.jsonl and the console.

    Args:
      writer: metrics.jsonl.
      console: where the run reports.
      programs: the run's programs (kit.training.programs.Programs), whose
        `learning_rate` gives the rate of an int32 step (0-based).
      every: train.log_every.
      last: the run's last step.
    """

    def __init__(
        self, writer: metrics.MetricWriter, console: Console, programs: Any, every: int, last: int
    ):
        super().__init__(every, last)
        self.writer, self.console, self.programs = writer, console, programs

    def run(self, step, state, m):
        record = {name: float(v) for name, v in jax.device_get(m).items() if name != "finite"}
        record["learning_rate"] = float(self.programs.learning_rate(np.int32(step - 1)))
        write_metrics(self.writer, step, record)
        self.console.log_step(step, self.last, record)


class Evaluate(PeriodicAction):
    """Evaluates the parameters on the held-out set; `result` keeps the latest metrics.

    Args:
      held_out: params -> the held-out metrics.
      writer: metrics.jsonl.
      console: where the run reports.
      clock: the run's clock (the phase "eval").
      every: train.eval_every.
      last: the run's last step.
    """

    def __init__(
        self,
        held_out: Callable[[Any], dict[str, Any]],
        writer: metrics.MetricWriter,
        console: Console,
        clock: Clock,
        every: int,
        last: int,
    ):
        super().__init__(every, last)
        self.held_out, self.writer, self.console, self.clock = held_out, writer, console, clock
        self.result: dict[str, Any] = {}

    def run(self, step, state, m):
        jax.block_until_ready(state)  # the steps' seconds are the train phase's
        with self.clock.phase("eval"):
            self.result = self.held_out(state["params"])
            write_metrics(self.writer, step, self.result)
            self.console.evaluation(step, self.result)


class Save(PeriodicAction):
    """Saves a checkpoint of the train state; `saved` is the latest complete one's step.

    Args:
      ckpt: the run's checkpoints.
      clock: the run's clock (the phase "checkpoint").
      every: train.checkpoint_every.
      last: the run's last step.
      saved: the step of the latest complete checkpoint when the run starts (or None).
    """

    def __init__(
        self, ckpt: checkpoint.Checkpointer, clock: Clock, every: int, last: int, saved: int | None
    ):
        super().__init__(every, last)
        self.ckpt, self.clock, self.saved = ckpt, clock, saved

    def run(self, step, state, m):
        jax.block_until_ready(state)  # the steps' seconds are the train phase's
        with self.clock.phase("checkpoint"):
            self.save(step, state)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Saves the checkpoint of `step`.

        Raises:
          WriteError: naming the folder, when it cannot be written.
        """
        try:
            self.ckpt.save(step, state)
        except Exception as error:  # a full disk, a lost mount: any failure to write
            kept = "none" if self.saved is None else f"step {self.saved}"
            raise WriteError(
                f"checkpoint: step {step} could not be written under {self.ckpt.directory} "
                f"({type(error).__name__}: {error}); the latest complete checkpoint ({kept}) "
                f"is intact: free space and run the same command to resume"
            ) from error
        self.saved = step


class Stop:
    """Stops the loop at a step boundary on SIGINT or SIGTERM (`StopSignals`).

    Args:
      signals: the run's StopSignals.
      log_every: with several processes the request is read at log steps only,
        where the loop waits for the host anyway (agreeing costs a collective).
      checks: the run's NonFiniteChecks, read before stopping.
      save: the run's Save action, which saves the step stopped at.
    """

    def __init__(self, signals: StopSignals, log_every: int, checks: NonFiniteChecks, save: Save):
        self.signals, self.log_every, self.checks, self.save = signals, log_every, checks, save

    def at(self, step: int, state: dict[str, Any]) -> None:
        """At the boundary after `step`: when a stop is requested, checks the steps, saves
        a checkpoint of `step` unless it has one and raises Interrupted.

        Raises:
          Interrupted: as above.
          NonFiniteError: when a step before the boundary was not finite.
        """
        if jax.process_count() > 1 and step % self.log_every:
            return
        signum = self.signals.agreed()
        if signum is None:
            return
        self.checks.check()
        if self.save.saved != step and step > 0:
            self.save.save(step, state)
        self.save.ckpt.close()
        raise Interrupted(signum, step, self.save.saved)

    @property
    def requested(self) -> int | None:
        """The signal received, if any (a second one raises KeyboardInterrupt)."""
        return self.signals.requested

    def abandoned(self, step: int) -> Interrupted:
        """The error for a second signal at `step`: the loop stops at once, keeping what
        is complete (a save cut short is an uncommitted temporary folder, removed when
        the workdir is next opened)."""
        return Interrupted(self.signals.requested, step, self.save.saved, abandoned=True)
