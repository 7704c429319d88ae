"""The main job: train_and_evaluate(config, workdir).

Data batches are a pure function of (seed, step), so a run resumed from a
checkpoint ends with exactly the parameters of an uninterrupted run.

A run, in order: setup (the config checked, the model's shapes, the workdir
locked); `Programs`, which traces the steps here and compiles them on background
threads (kit.training.programs) while `init_or_restore` makes the train state;
then the steps, each followed by the periodic actions that are due (logging,
evaluation, checkpoints, with the deferred non-finite checks before them) and a
stop request read at the boundary (kit.training.actions). The result reports
where the seconds went ("timing", booked by a `Clock`).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from kit import checkpoint, metrics, sharding
from kit.training.actions import (
    Clock,
    Evaluate,
    Log,
    NonFiniteChecks,
    NonFiniteError,
    PeriodicAction,
    Save,
    Stop,
)
from kit.training.programs import Programs, lower_init, lower_train_step
from kit.training.report import Console
from kit.training.setup import Setup, setup
from kit.training.steps import evaluate, train_model_batch
from kit.training.stopping import StopSignals, lock_workdir
from kit.training.workdir import check_workdir, write_config

__all__ = ["NonFiniteError", "init_or_restore", "lower_train_step", "train_and_evaluate"]

# The initialization's tracing, by this name: tests/crash_run.py signals inside it.
_fresh_state = lower_init


def _header(
    config: ml_collections.ConfigDict, s: Setup, workdir: str, start, held_out: int
) -> dict[str, str]:
    m = s.mcfg
    layers = s.kind.layers_label(m)
    return {
        "devices": s.describe_devices(),
        "task": f"{s.task.name} (seed {config.seed}, {held_out:,} held out)",
        "model": (
            f"{m.kind}, {layers}, d={m.d_model}, {m.num_heads} heads, "
            f"{m.positions} positions, {s.num_params:,} parameters"
        ),
        "train": (
            f"{config.train.steps} steps of {config.train.batch_size}, "
            f"learning rate {config.train.learning_rate}"
        ),
        "workdir": os.path.abspath(workdir),
        "start": "fresh" if start is None else f"resumed from step {start}",
    }


def _train_batch(s: Setup, config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    span = config.task.pack_span if config.task.get("pack", False) else 0
    size = config.train.batch_size
    return train_model_batch(s.task, s.kind, config.seed, step, size, span)


def _open_workdir(
    workdir: str, config: ml_collections.ConfigDict, lead: bool
) -> checkpoint.Checkpointer:
    """Writes config.json (process 0; the others make the folder) and opens the
    checkpoints folder."""
    if lead:
        write_config(workdir, config)
    else:
        os.makedirs(workdir, exist_ok=True)
    directory = os.path.join(workdir, "checkpoints")
    return checkpoint.Checkpointer(directory, keep=config.train.keep_checkpoints)


def init_or_restore(
    programs: Programs, ckpt: checkpoint.Checkpointer, start: int | None
) -> tuple[dict[str, Any], jax.Array]:
    """The train state to train from, and the dropout key.

    Args:
      programs: the run's programs; `programs.init` makes a fresh state.
      ckpt: the run's checkpoints.
      start: the step of the checkpoint to resume from, or None to start afresh.

    Returns:
      (state, rng): a fresh state, or the checkpoint of `start` restored
      into its structure, dtypes and shardings; the dropout key comes from the seed.
    """
    if start is None:  # orbax saves later; a resumed run imported it here, to restore
        programs.in_background(checkpoint.import_orbax)
    state, rng = programs.init()
    if start is not None:
        state = ckpt.restore(start, state)
    return state, rng


def _held_out(
    s: Setup, config: ml_collections.ConfigDict, programs: Programs
) -> tuple[Callable[[Any], dict[str, Any]], int]:
    """The held-out evaluation, params -> metrics (kit.training.steps.evaluate), on the
    batches placed on the devices, and how many rows it holds."""
    batches = [(sharding.put_batch(mb, s.batch_sharding), pad) for mb, pad in programs.eval_batches]
    groups = s.task.eval_groups(config.seed, config.task.eval_size)

    def held_out(params):
        return evaluate(
            programs.eval_step,
            params,
            batches,
            s.kind,
            by_length=s.task.by_length,
            loss_spans=s.task.loss_spans,
            groups=groups,
        )

    return held_out, sum(len(mb["targets"]) - pad for mb, pad in programs.eval_batches)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    devices=None,
    console: Console | None = None,
):
    """Trains the configured model on its task; resumes from workdir's latest checkpoint.

    Writes workdir/config.json, workdir/metrics.jsonl and
    workdir/checkpoints/<step>/. With several processes (kit.sharding.initialize)
    every process runs this with the same arguments; only process 0 writes
    config.json, metrics and reports, and all take part in checkpoints.

    Args:
      config: the experiment config (see default_config).
      workdir: where outputs go; an existing run there is resumed.
      progress: report to stdout (a header, a progress bar or a line per log
        step, a line per evaluation); False reports nothing. Ignored when
        `console` is given.
      devices: the devices to build the mesh from (default: all devices of all
        processes); a mesh smaller than them uses the first ones.
      console: where to report (kit.training.report.Console).

    Returns:
      The final evaluation metrics with "step", "train_seconds" (from the first
      training step on) and "timing": wall seconds by phase, which add up to
      the time spent in this call but for freeing its compiled programs and
      arrays as it returns (about 0.05 s for configs/copy.py). "setup": config
      checks, model shapes and workdir; "init": tracing the steps, the
      parameters and a restored checkpoint; "compile": waiting for the train
      step's compile after that; "first_step": running it; "train": the other
      steps with their logging; "eval": evaluations (the first waits for the
      eval step's compile if it is still running); "checkpoint": saving and
      closing checkpoints. "compile_seconds" holds how long each compile took
      on its own thread.

    Stopping: on SIGINT (Ctrl-C) or SIGTERM the run stops at the next step
    boundary (after that step's logging, evaluation and save), saves a
    checkpoint of that step unless it has one, and raises Interrupted; a second
    signal abandons at once, leaving the previous complete checkpoint. The
    workdir is locked for the run (process 0 holds `workdir/.lock`).

    Raises:
      ValueError: for an invalid config (naming the field), a workdir that is
        not a folder, holds a checkpoint of an incompatible config, or is in
        use by another run; nothing is written then.
      NonFiniteError: for a non-finite loss or gradient, unless
        train.skip_nonfinite.
      Interrupted: on SIGINT or SIGTERM, as above (`exit_code` 130 or 143).
      WriteError: when a checkpoint or a metrics line cannot be written, naming
        the path; what was written before stays readable.
    """
    clock = Clock()
    s = setup(config, devices)
    check_workdir(workdir, config)
    lead = jax.process_index() == 0
    if console is None or not lead:
        console = Console("auto" if progress and lead else "off")
    t = config.train
    with lock_workdir(workdir, enabled=lead), StopSignals() as signals:
        ckpt = _open_workdir(workdir, config, lead)
        start = ckpt.latest_step()  # None: a fresh run
        step = 0 if start is None else start
        clock.lap("setup")
        # A step's batch; the first, made to trace the train step, is not made again.
        batch = functools.lru_cache(maxsize=1)(functools.partial(_train_batch, s, config))
        with Programs(s, config, _fresh_state(s, config.seed), batch, step) as programs:
            state, rng = init_or_restore(programs, ckpt, start)
            path = os.path.join(workdir, "metrics.jsonl")
            writer = metrics.MetricWriter(path, resume_step=start, enabled=lead)
            held_out, rows = _held_out(s, config, programs)
            console.header(_header(config, s, workdir, start, rows))
            evals = Evaluate(held_out, writer, console, clock, t.eval_every, t.steps)
            saves = Save(ckpt, clock, t.checkpoint_every, t.steps, saved=start)
            actions = [Log(writer, console, programs, t.log_every, t.steps), evals, saves]
            checks = NonFiniteChecks(ckpt, enabled=not t.skip_nonfinite)
            stop = Stop(signals, t.log_every, checks, saves)
            batches = (
                sharding.put_batch(batch(i), s.batch_sharding) for i in itertools.count(step)
            )
            jax.block_until_ready(state)
            clock.lap("init")
            console.start(s.task.name, t.steps, step)
            try:
                state, step, seconds = _train(
                    programs, batches, state, rng, step, t.steps, actions, checks, stop, clock
                )
            finally:
                console.stop()
            if not evals.result:  # resumed at the end: evaluate what was restored
                with clock.phase("eval"):
                    evals.result = held_out(state["params"])
        ckpt.close()
        clock.lap("checkpoint")
        return {
            **evals.result,
            "step": step,
            "train_seconds": seconds,
            "timing": clock.seconds,
            "compile_seconds": programs.compile_seconds,
        }


def _train(
    programs: Programs,
    batches: Iterator[dict[str, Any]],
    state: dict[str, Any],
    rng: jax.Array,
    step: int,
    last: int,
    actions: list[PeriodicAction],
    checks: NonFiniteChecks,
    stop: Stop,
    clock: Clock,
) -> tuple[dict[str, Any], int, float]:
    """Trains from `step` to `last`, running the due `actions` after each step.

    Args:
      programs: the run's programs (the train step).
      batches: the placed train batches of steps `step`, `step + 1`, ...
      state: the train state at `step` (donated to the train step).
      rng: the dropout key.
      step: the step the state is at.
      last: the step to train to.
      actions: what runs after a step when due, in order (after the non-finite checks).
      checks: the steps' deferred non-finite checks.
      stop: read at each step boundary, before the step.
      clock: books "compile" (waiting for the train step), "first_step" and "train".

    Returns:
      (state, step, seconds): the state at `last`, `last`, and the seconds from the
      first step on (0 when there was nothing to train).

    Raises:
      Interrupted: on SIGINT or SIGTERM (see train_and_evaluate).
      NonFiniteError: for a non-finite loss or gradient, unless train.skip_nonfinite.
    """
    if step >= last:
        return state, step, 0.0
    try:
        with clock.phase("compile"):
            train_step = programs.train_step
        began, first = time.perf_counter(), step
        with clock.phase("train"):
            while step < last:
                stop.at(step, state)
                state, m = train_step(state, next(batches), rng)
                step += 1
                if step == first + 1:  # the first step on its own
                    jax.block_until_ready(m)
                    clock.lap("first_step")
                checks.add(step, m)
                due = [action for action in actions if action.due(step)]
                if due:
                    checks.check()
                for action in due:
                    action.run(step, state, m)
        return state, step, time.perf_counter() - began
    except KeyboardInterrupt:
        if stop.requested is None:  # not one of ours: a handler someone else set
            raise
        raise stop.abandoned(step) from None
