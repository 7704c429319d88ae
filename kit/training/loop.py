"""The main job: train_and_evaluate(config, workdir).

Data batches are a pure function of (seed, step), so a run resumed from a
checkpoint ends with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from kit import checkpoint, metrics, sharding, tasks
from kit.training.report import Console
from kit.training.setup import Setup, rngs, setup
from kit.training.steps import eval_batches, evaluate, init_model, make_schedule, model_batch
from kit.training.workdir import check_workdir, write_config


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (train.skip_nonfinite is False)."""


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
      The final evaluation metrics with "step" and "train_seconds".

    Raises:
      ValueError: for an invalid config (naming the field) or a workdir that is
        not a folder or holds a checkpoint of an incompatible config; nothing
        is written then.
      NonFiniteError: for a non-finite loss or gradient, unless
        train.skip_nonfinite.
    """
    s = setup(config, devices)
    check_workdir(workdir, config)
    lead = jax.process_index() == 0
    if console is None or not lead:
        console = Console("auto" if progress and lead else "off")
    if lead:
        write_config(workdir, config)
    else:
        os.makedirs(workdir, exist_ok=True)

    t = config.train
    init_rng, dropout_rng = rngs(config.seed, s.replicated)
    _, params = init_model(s.mcfg, init_rng, s.state_shardings["params"])
    state = jax.jit(s.trainer.init_state, out_shardings=s.state_shardings)(params)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, state)
    writer = metrics.MetricWriter(
        os.path.join(workdir, "metrics.jsonl"), resume_step=start, enabled=lead
    )
    train_step = jax.jit(
        s.trainer.train_step,
        in_shardings=(s.state_shardings, s.batch_sharding, s.replicated),
        out_shardings=(s.state_shardings, s.replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        s.trainer.eval_step,
        in_shardings=(s.state_shardings["params"], s.batch_sharding),
        out_shardings=s.replicated,
    )
    batches = [
        (sharding.put_batch(mb, s.batch_sharding), pad)
        for mb, pad in eval_batches(s.task, s.mcfg.kind, config, s.mesh.shape["data"])
    ]
    schedule = make_schedule(t)
    held_out = sum(len(mb["targets"]) - pad for mb, pad in batches)
    console.header(_header(config, s, workdir, start, held_out))

    step = int(state["step"])
    result: dict[str, Any] = {}
    began = time.perf_counter()
    console.start(s.task.name, t.steps, step)
    try:
        unchecked: list[tuple[int, dict]] = []  # read at the next log/eval/save, not every step
        while step < t.steps:
            mb = model_batch(
                s.mcfg.kind, tasks.train_batch(s.task, config.seed, step, t.batch_size)
            )
            state, m = train_step(state, sharding.put_batch(mb, s.batch_sharding), dropout_rng)
            step += 1
            if not t.skip_nonfinite:
                unchecked.append((step, m))
            if step == t.steps or any(
                step % every == 0 for every in (t.log_every, t.eval_every, t.checkpoint_every)
            ):
                _stop_if_nonfinite(unchecked, ckpt)
                unchecked = []
            if step % t.log_every == 0 or step == t.steps:
                record = {name: float(value) for name, value in m.items() if name != "finite"}
                record["learning_rate"] = float(schedule(step - 1))
                writer.write(step, record)
                console.log_step(step, t.steps, record)
            if step % t.eval_every == 0 or step == t.steps:
                result = evaluate(
                    eval_step,
                    state["params"],
                    batches,
                    s.mcfg.kind,
                    by_length=s.task.by_length,
                    loss_spans=s.task.loss_spans,
                )
                writer.write(step, result)
                console.evaluation(step, result)
            if step % t.checkpoint_every == 0 or step == t.steps:
                ckpt.save(step, state)
    finally:
        console.stop()
    if not result:  # resumed at the end: evaluate what was restored
        result = evaluate(
            eval_step,
            state["params"],
            batches,
            s.mcfg.kind,
            by_length=s.task.by_length,
            loss_spans=s.task.loss_spans,
        )
    ckpt.close()
    return {**result, "step": step, "train_seconds": time.perf_counter() - began}


def _stop_if_nonfinite(steps: list[tuple[int, dict]], ckpt: checkpoint.Checkpointer) -> None:
    """Raises NonFiniteError naming the first step whose loss or gradients were not finite.

    That step's update was skipped (make_optimizer), and no checkpoint was saved
    after it, so the latest checkpoint holds finite parameters.
    """
    for step, m in steps:
        if not bool(m["finite"]):
            last = ckpt.latest_step()
            ckpt.close()
            raise NonFiniteError(
                f"step {step}: the loss ({float(m['loss'])}) or the gradient norm "
                f"({float(m['grad_norm'])}) is not finite; stopped. The latest checkpoint "
                f"({'none' if last is None else f'step {last}'}) is intact. Lower "
                f"config.train.learning_rate, or set config.train.skip_nonfinite=True to skip "
                f"such updates."
            )
