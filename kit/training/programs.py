"""The compiled programs of a run behind one object, compiling while the state initializes.

Compile time dominates short runs. `Programs` traces the initialization, the
train and eval steps and the learning-rate schedule on the calling thread and
has XLA compile each on one of two background threads (XLA releases the GIL),
so the calling thread goes on, to initialize the parameters, while the train
step compiles. Each program is a property that waits for its compile on first
use; `compile_seconds` says how long each took on its thread.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kit import models
from kit.training.setup import Setup
from kit.training.steps import eval_batches, make_schedule

# XLA options for a CPU program that runs once (the initialization): LLVM's
# optimizations take more time than they save. They halve its compile time (1.0 to
# 0.6 CPU seconds for configs/reverse.py); the values may differ from an optimized
# build's by one float32 ulp.
_RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _Program:
    """A compiled program of `Programs` (a `jax.stages.Compiled`), read as an attribute
    named as the program; reading it waits for its compile."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, programs: Any, owner: type | None = None) -> Any:
        return self if programs is None else programs._compiled[self.name].result()


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays, placed as `shardings` says."""
    return jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings
    )


def _abstract_batch(s: Setup, batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    return _abstract(batch, {name: s.batch_sharding for name in batch})


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
        _abstract_batch(s, batch),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=s.replicated),
    )


def lower_init(s: Setup, seed: int) -> jax.stages.Lowered:
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


class Programs:
    """A run's compiled programs; the compiles start on construction.

    Construction traces the programs and starts their compiles, the
    initialization first (so it compiles while the train step is traced); each
    property below waits for its program's compile. Use it as a context manager:
    leaving it stops the compile threads (dropping compiles not yet started).

    Args:
      s: the run's setup (kit.training.setup.setup).
      config: the experiment config.
      init: the traced initialization (`lower_init`); on CPU it compiles without
        LLVM's optimizations, as it runs once.
      train_batch: the train batch of a step (a function of it).
      step: the first step to train; from config.train.steps on there is nothing
        to train, and neither the train step nor the schedule is compiled.

    Attributes:
      eval_batches: the held-out set on the host as (batch, padding rows) pairs
        (kit.training.steps.eval_batches), made while the initialization compiles.
      compile_seconds: program name -> seconds its compile took on its thread.
    """

    def __init__(
        self,
        s: Setup,
        config: ml_collections.ConfigDict,
        init: jax.stages.Lowered,
        train_batch: Callable[[int], dict[str, Any]],
        step: int,
    ):
        self.compile_seconds: dict[str, float] = {}
        self._compiled: dict[str, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
        try:
            cpu = s.mesh.devices.flat[0].platform == "cpu"
            self._compile("init", init, _RUN_ONCE if cpu else None)
            if step < config.train.steps:
                self._compile("train_step", lower_train_step(s, train_batch(step)))
                # Evaluated op by op, the schedule would compile a dozen small programs
                # at the first log step (0.3 s).
                schedule = jax.jit(make_schedule(config.train))
                self._compile("learning_rate", schedule.lower(jax.ShapeDtypeStruct((), jnp.int32)))
            self.eval_batches = eval_batches(s.task, s.kind, config, s.mesh.shape["data"])
            eval_step = jax.jit(
                s.trainer.eval_step,
                in_shardings=(s.state_shardings["params"], s.batch_sharding),
                out_shardings=s.replicated,
            )
            params = _abstract(s.abstract_state, s.state_shardings)["params"]
            example = _abstract_batch(s, self.eval_batches[0][0])
            self._compile("eval_step", eval_step.lower(params, example))
        except BaseException:
            self.close()
            raise

    def _compile(self, name: str, lowered: jax.stages.Lowered, options=None) -> None:
        def run():
            began = time.perf_counter()
            out = lowered.compile(options)
            self.compile_seconds[name] = time.perf_counter() - began
            return out

        self._compiled[name] = self._pool.submit(run)

    def in_background(self, fn: Callable[[], Any]) -> None:
        """Runs `fn` on a compile thread once one is free (its result is dropped)."""
        self._pool.submit(fn)

    init = _Program("() -> (a fresh train state, the dropout key).")
    train_step = _Program(
        "(state, batch, dropout key) -> (state, step metrics); the state is donated."
    )
    learning_rate = _Program(
        "The schedule: an int32 step (0-based) -> the learning rate of that step."
    )
    eval_step = _Program("(params, batch) -> the batch's eval sums and per-row results.")

    def close(self) -> None:
        """Stops the compile threads, dropping the compiles that have not started."""
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Programs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
