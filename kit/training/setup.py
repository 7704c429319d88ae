"""Everything built from a config before training: task, model, optimizer, mesh, placement.

Nothing here compiles or writes; `setup` runs all the config checks first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import SingleDeviceSharding

from kit import models, sharding, tasks
from kit.attention import context
from kit.training.config import check_config, in_config_terms
from kit.training.steps import Trainer, make_optimizer, pack_widths


@in_config_terms
def make_mesh(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, devices=None):
    """The device mesh of `config.mesh`, checked against the devices, batch and heads.

    Raises:
      ValueError: naming config.mesh.data, config.mesh.seq or config.mesh.model, or
        what the sequence split does not take (model.kind, model.dropout_rate).
    """
    devices = jax.devices() if devices is None else devices
    mesh = sharding.make_mesh(
        config.mesh.data, config.mesh.model, seq=config.mesh.get("seq", 1), devices=devices
    )
    data, model = mesh.shape["data"], mesh.shape["model"]
    sharding.check_divides("data", data, {"train.batch_size": config.train.batch_size})
    if config.task.get("pack", False):
        rows = config.train.batch_size // config.task.pack_span
        sharding.check_divides("data", data, {"train.batch_size / task.pack_span": rows})
    sharding.check_divides(
        "model",
        model,
        {
            "model.num_heads": mcfg.num_heads,
            "model.num_kv_heads": mcfg.num_kv_heads or mcfg.num_heads,
            "model.d_ff": mcfg.d_ff,
        },
    )
    return mesh


@in_config_terms
def check_split(
    config: ml_collections.ConfigDict, task: tasks.Task, mcfg: models.ModelConfig, mesh
) -> context.SequenceSplit:
    """The split of training's sequences over the mesh's "seq" axis (context
    parallelism), checked against the config.

    Raises:
      ValueError: naming config.model.kind (a kind that does not split),
        config.model.dropout_rate, or config.model.max_len (fewer positions than
        the rows padded to whole shares of the split).
    """
    seq = mesh.shape["seq"]
    kind = models.MODELS[mcfg.kind]
    if not kind.SPLITS:
        raise ValueError(
            f"model.kind: {mcfg.kind} does not train with its sequence split over devices "
            f"(mesh.seq = {seq}); use decoder_only or encoder_decoder"
        )
    if mcfg.dropout_rate > 0:
        raise ValueError(
            f"model.dropout_rate: attention dropout does not run with the sequence split over "
            f"mesh.seq = {seq} devices (no weights are formed); use 0, got {mcfg.dropout_rate}"
        )
    widths = None
    if config.task.get("pack", False):
        widths = pack_widths(task, kind, config.seed, config.task.pack_span)
    split = context.SequenceSplit(
        mesh,
        config.model.context_strategy,
        balance=config.model.context_balance,
        head_groups=config.model.context_head_groups,
    )
    for name, (length, causal) in kind.split_lengths(task, widths).items():
        padded = split.padded(length, causal)
        if padded > mcfg.max_len:
            chunks = ", in zig-zag chunks" if split.balance and causal else ""
            raise ValueError(
                f"model.max_len: the sequence split pads the {name} sequence from {length} to "
                f"{padded} positions (whole shares of mesh.seq = {seq}{chunks}), more than "
                f"max_len = {mcfg.max_len}"
            )
    return split


@in_config_terms
def _check_backend_runs(dtype: str, mesh) -> None:
    """Compiles a tiny product in `dtype` for the mesh's backend (float32 always runs).

    Raises:
      ValueError: naming config.model.dtype, if the backend cannot compile it.
    """
    if dtype == "float32":
        return
    device = mesh.devices.flat[0]
    x = jax.ShapeDtypeStruct((8, 8), jnp.dtype(dtype), sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: jnp.tanh(a @ a)).lower(x).compile()
    except Exception as error:  # what a backend raises for a dtype it lacks varies
        raise ValueError(
            f"model.dtype: {dtype} does not run on this {device.platform} backend "
            f"({type(error).__name__}: {str(error)[:200]}); use 'float32'"
        ) from None


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything built from a config before training: task, model, optimizer, placement."""

    task: tasks.Task
    mcfg: models.ModelConfig
    trainer: Trainer
    mesh: Any
    abstract_state: dict[str, Any]
    state_shardings: dict[str, Any]
    batch_sharding: Any
    replicated: Any
    # How many devices there were to choose from; the mesh may use the first few only.
    available_devices: int

    @property
    def kind(self) -> type[models.TaskModel]:
        """The model kind's class (`models.MODELS`), which training passes on."""
        return models.MODELS[self.mcfg.kind]

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))

    def describe_devices(self) -> str:
        """E.g. "1 of 8 cpu devices (the first), mesh data=1 x model=1"."""
        used = self.mesh.devices.size
        platform = self.mesh.devices.flat[0].platform
        which = f"{used} of {self.available_devices}" if used < self.available_devices else used
        note = (
            " (the first; the mesh is smaller than the host)"
            if used < self.available_devices
            else ""
        )
        return (
            f"{which} {platform} device{'s' if self.available_devices > 1 else ''}{note}, "
            f"mesh data={self.mesh.shape['data']} x seq={self.mesh.shape['seq']} "
            f"x model={self.mesh.shape['model']}"
        )


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Checks the config and builds the trainer and the shardings; compiles nothing.

    Raises:
      ValueError: for an invalid config, naming the field.
    """
    task, mcfg = check_config(config)
    mesh = make_mesh(config, mcfg, devices)
    split = check_split(config, task, mcfg, mesh) if mesh.shape["seq"] > 1 else None
    _check_backend_runs(mcfg.dtype, mesh)
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: models.build(mcfg, jax.random.key(0, impl="rbg")))
    )
    t = config.train
    oracle = task.by_length and models.MODELS[mcfg.kind].ORACLE_LENGTH
    trainer = Trainer(
        graphdef,
        make_optimizer(t),
        float(t.label_smoothing),
        # randomized positions draw from the dropout key too
        mcfg.dropout_rate > 0 or mcfg.random_positions > 0,
        oracle,
        split=split,
    )
    abstract_state = jax.eval_shape(trainer.init_state, abstract_params)
    return Setup(
        task=task,
        mcfg=mcfg,
        trainer=trainer,
        mesh=mesh,
        abstract_state=abstract_state,
        state_shardings=sharding.state_shardings(trainer.tx, abstract_state, mesh),
        batch_sharding=sharding.batch_sharding(mesh),
        replicated=sharding.replicated(mesh),
        available_devices=len(jax.devices() if devices is None else devices),
    )
