"""The main job: train_and_evaluate(config, workdir).

Data batches are a pure function of (seed, step), so a run resumed from a
checkpoint ends with exactly the parameters of an uninterrupted run.

Start-up is arranged around compile time, which dominates short runs: the
train and eval steps are traced on the calling thread and compiled by XLA on
background threads (XLA releases the GIL), while the calling thread
initializes the parameters; the result reports where the seconds went
("timing").
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kit import checkpoint, metrics, models, sharding, tasks
from kit.training.report import Console
from kit.training.setup import Setup, setup
from kit.training.steps import eval_batches, evaluate, make_schedule, train_model_batch
from kit.training.stopping import Interrupted, StopSignals, WriteError, lock_workdir
from kit.training.workdir import check_workdir, write_config


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (train.skip_nonfinite is False)."""


class Clock:
    """Wall seconds of a run by phase; `lap(phase)` books the time since the last lap."""

    def __init__(self, began: float | None = None):
        self._last = time.perf_counter() if began is None else began
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def _header(
    config: ml_collections.ConfigDict, s: Setup, workdir: str, start, held_out: int
) -> dict[str, str]:
    m = s.mcfg
    layers = f"{m.num_layers}" + (f"+{m.num_decoder_layers}" if m.kind == "encoder_decoder" else "")
    layers += " layer" if layers == "1" else " layers"
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


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays, placed as `shardings` says."""
    return jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings
    )


# XLA options for a CPU program that runs once (the initialization): LLVM's
# optimizations take more time than they save. They halve its compile time (1.0 to
# 0.6 CPU seconds for configs/reverse.py); the values may differ from an optimized
# build's by one float32 ulp.
_RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def lower_train_step(s: Setup, batch: dict[str, Any]) -> jax.stages.Lowered:
    """The train step traced for `s`'s placement and `batch`'s shapes (the state
    donated), ready to compile; `.compile().as_text()` is the program a run executes."""
    rng = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))
    step = jax.jit(
        s.trainer.train_step,
        in_shardings=(s.state_shardings, s.batch_sharding, s.replicated),
        out_shardings=(s.state_shardings, s.replicated),
        donate_argnums=0,
    )
    return step.lower(
        _abstract(s.abstract_state, s.state_shardings),
        _abstract(batch, {name: s.batch_sharding for name in batch}),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=s.replicated),
    )


def _fresh_state(s: Setup, seed: int) -> jax.stages.Lowered:
    """The traced program of a fresh train state and the dropout key, in one compile.

    The parameters are `init_model(s.mcfg, init_rng)`'s (to within one ulp under
    _RUN_ONCE), where (init_rng, dropout_rng) = split(key(seed, impl="rbg")): RBG
    keys compile several times faster than threefry on CPU.
    """

    def init():
        init_rng, dropout_rng = jax.random.split(jax.random.key(seed, impl="rbg"))
        params = nnx.split(models.build(s.mcfg, init_rng))[1]
        return s.trainer.init_state(params), dropout_rng

    return jax.jit(init, out_shardings=(s.state_shardings, s.replicated)).lower()


def _train_batch(s, config, step: int):
    span = config.task.pack_span if config.task.get("pack", False) else 0
    kind, size = s.mcfg.kind, config.train.batch_size
    return train_model_batch(s.task, kind, config.seed, step, size, span)


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
      checks, model shapes and
      workdir; "init": tracing the steps, the parameters and a restored
      checkpoint; "compile": waiting for the train step's compile after that;
      "first_step": running it; "train": the other steps with their logging;
      "eval": evaluations (the first waits for the eval step's compile if it
      is still running); "checkpoint": saving and closing checkpoints.
      "compile_seconds" holds how long each compile took on its own thread.

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
    with lock_workdir(workdir, enabled=lead), StopSignals() as signals:
        return _train(config, workdir, s, clock, console, signals, lead)


def _train(config, workdir, s: Setup, clock: Clock, console: Console, signals, lead: bool):
    """train_and_evaluate once its config and workdir are checked and the workdir is
    locked; `signals` (StopSignals) says when to stop."""
    if lead:
        write_config(workdir, config)
    else:
        os.makedirs(workdir, exist_ok=True)
    t = config.train
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    step = 0 if start is None else start
    saved = start  # the latest complete checkpoint
    clock.lap("setup")

    compiled: dict[str, concurrent.futures.Future] = {}
    compile_seconds: dict[str, float] = {}

    def compile_in_background(name: str, lowered: jax.stages.Lowered, options=None) -> None:
        def run():
            began = time.perf_counter()
            out = lowered.compile(options)
            compile_seconds[name] = time.perf_counter() - began
            return out

        compiled[name] = pool.submit(run)

    # Tracing (Python) runs here, compiling (XLA, without the GIL) on two threads: the
    # initialization first, so that it compiles while the train step is traced.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="compile")
    try:
        run_once = _RUN_ONCE if s.mesh.devices.flat[0].platform == "cpu" else None
        compile_in_background("init", _fresh_state(s, config.seed), run_once)
        abstract_state = _abstract(s.abstract_state, s.state_shardings)
        batch = None
        if step < t.steps:
            batch = _train_batch(s, config, step)
            compile_in_background("train_step", lower_train_step(s, batch))
            # Evaluated op by op, the schedule would compile a dozen small programs at the
            # first log step (0.3 s).
            compile_in_background(
                "learning_rate",
                jax.jit(make_schedule(t)).lower(jax.ShapeDtypeStruct((), jnp.int32)),
            )
        host_batches = eval_batches(s.task, s.mcfg.kind, config, s.mesh.shape["data"])
        eval_step = jax.jit(
            s.trainer.eval_step,
            in_shardings=(s.state_shardings["params"], s.batch_sharding),
            out_shardings=s.replicated,
        )
        mb = host_batches[0][0]
        compile_in_background(
            "eval_step",
            eval_step.lower(
                abstract_state["params"], _abstract(mb, {name: s.batch_sharding for name in mb})
            ),
        )
        if start is None:  # a resumed run imports orbax on this thread, to restore
            pool.submit(checkpoint.import_orbax)
        init = compiled["init"].result()
        state, dropout_rng = init()
        if start is not None:
            state = ckpt.restore(start, state)
        writer = metrics.MetricWriter(
            os.path.join(workdir, "metrics.jsonl"), resume_step=start, enabled=lead
        )
        batches = [(sharding.put_batch(mb, s.batch_sharding), pad) for mb, pad in host_batches]

        groups = tasks.eval_groups(s.task, config.seed, config.task.eval_size)

        def evaluate_held_out(params):
            """The held-out metrics of `params` (kit.training.steps.evaluate)."""
            return evaluate(
                compiled["eval_step"].result(),
                params,
                batches,
                s.mcfg.kind,
                by_length=s.task.by_length,
                loss_spans=s.task.loss_spans,
                groups=groups,
            )

        held_out = sum(len(mb["targets"]) - pad for mb, pad in host_batches)
        console.header(_header(config, s, workdir, start, held_out))
        jax.block_until_ready(state)
        clock.lap("init")

        result: dict[str, Any] = {}
        console.start(s.task.name, t.steps, step)
        try:
            if batch is not None:
                run_train_step = compiled["train_step"].result()
                clock.lap("compile")
            began = time.perf_counter()
            unchecked: list[tuple[int, dict]] = []  # read at the next log/eval/save
            while step < t.steps:
                # At a step boundary; with several processes only at log steps, where
                # the loop waits for the host anyway (agreeing costs a collective).
                asked = jax.process_count() == 1 or step % t.log_every == 0
                if asked and (signum := signals.agreed()) is not None:
                    _stop_if_nonfinite(unchecked, ckpt)
                    if saved != step and step > 0:
                        _save(ckpt, step, state, saved)
                        saved = step
                    ckpt.close()
                    raise Interrupted(signum, step, saved)
                if batch is None:
                    batch = _train_batch(s, config, step)
                state, m = run_train_step(
                    state, sharding.put_batch(batch, s.batch_sharding), dropout_rng
                )
                batch = None
                step += 1
                if "first_step" not in clock.seconds:
                    jax.block_until_ready(m)
                    clock.lap("first_step")
                if not t.skip_nonfinite:
                    unchecked.append((step, m))
                log, save = step % t.log_every == 0, step % t.checkpoint_every == 0
                evaluate_now = step % t.eval_every == 0 or step == t.steps
                if step == t.steps or log or evaluate_now or save:
                    _stop_if_nonfinite(unchecked, ckpt)
                    unchecked = []
                if log or step == t.steps:
                    record = {
                        name: float(value)
                        for name, value in jax.device_get(m).items()
                        if name != "finite"
                    }
                    learning_rate = compiled["learning_rate"].result()
                    record["learning_rate"] = float(learning_rate(np.int32(step - 1)))
                    _write(writer, step, record)
                    console.log_step(step, t.steps, record)
                if evaluate_now:
                    jax.block_until_ready(state)
                    clock.lap("train")
                    result = evaluate_held_out(state["params"])
                    _write(writer, step, result)
                    console.evaluation(step, result)
                    clock.lap("eval")
                if save or step == t.steps:
                    jax.block_until_ready(state)
                    clock.lap("train")
                    _save(ckpt, step, state, saved)
                    saved = step
                    clock.lap("checkpoint")
            train_seconds = time.perf_counter() - began
        except KeyboardInterrupt:
            if signals.requested is None:  # not one of ours: a handler someone else set
                raise
            # A second signal: stop at once, keeping what is complete (a cut save is
            # an uncommitted temporary folder, removed when the workdir is next opened).
            raise Interrupted(signals.requested, step, saved, abandoned=True) from None
        finally:
            console.stop()
        if not result:  # resumed at the end: evaluate what was restored
            result = evaluate_held_out(state["params"])
            clock.lap("eval")
    finally:
        pool.shutdown(cancel_futures=True)
    ckpt.close()
    clock.lap("checkpoint")
    return {
        **result,
        "step": step,
        "train_seconds": train_seconds,
        "timing": clock.seconds,
        "compile_seconds": compile_seconds,
    }


def _save(ckpt: checkpoint.Checkpointer, step: int, state, saved: int | None) -> None:
    """Saves the checkpoint of `step`, or raises WriteError naming the folder."""
    try:
        ckpt.save(step, state)
    except Exception as error:  # a full disk, a lost mount: any failure to write
        kept = "none" if saved is None else f"step {saved}"
        raise WriteError(
            f"checkpoint: step {step} could not be written under {ckpt.directory} "
            f"({type(error).__name__}: {error}); the latest complete checkpoint ({kept}) "
            f"is intact: free space and run the same command to resume"
        ) from error


def _write(writer: metrics.MetricWriter, step: int, values: dict) -> None:
    """Appends a metrics line, or raises WriteError naming the file."""
    try:
        writer.write(step, values)
    except OSError as error:
        raise WriteError(
            f"metrics: step {step} could not be written to {writer.path} ({error}); the "
            f"lines before it and the latest complete checkpoint are intact: free space "
            f"and run the same command to resume"
        ) from error


def _stop_if_nonfinite(steps: list[tuple[int, dict]], ckpt: checkpoint.Checkpointer) -> None:
    """Raises NonFiniteError naming the first step whose loss or gradients were not finite.

    That step's update was skipped (make_optimizer), and no checkpoint was saved
    after it, so the latest checkpoint holds finite parameters. The flags of all
    `steps` come to the host in one transfer.
    """
    flags = jax.device_get([m["finite"] for _, m in steps])
    for (step, m), finite in zip(steps, flags, strict=True):
        if not finite:
            last = ckpt.latest_step()
            ckpt.close()
            raise NonFiniteError(
                f"step {step}: the loss ({float(m['loss'])}) or the gradient norm "
                f"({float(m['grad_norm'])}) is not finite; stopped. The latest checkpoint "
                f"({'none' if last is None else f'step {last}'}) is intact. Lower "
                f"config.train.learning_rate, or set config.train.skip_nonfinite=True to skip "
                f"such updates."
            )
