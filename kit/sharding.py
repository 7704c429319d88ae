"""Meshes, shardings and multi-process start-up, on JAX's own runtime.

Training runs on a 3-D device mesh with axes ("data", "seq", "model"):

- batches are split along "data" (the leading B axis of every batch array);
- with context parallelism (mesh.seq > 1) every activation's sequence axis is
  split along "seq" and attention runs under `kit.attention.context`
  (all-gather or ring); parameters and optimizer state are replicated over it;
- attention heads are split along "model": the N (or K) axis of the Q/K/V
  projections `[D, N, H]` and of the output projection `[N, H, D]`;
- the feed-forward hidden axis F is split along "model" (`[D, F]`, `[F]`, `[F, D]`);
- everything else is replicated, and optimizer state is sharded like the
  parameter it belongs to.

The model code is unchanged: jit with these input and output shardings and
XLA's sharding propagation partitions the computation (kit.attention maps heads
with jax.vmap, so a head-sharded Q/K/V needs no communication inside attention).
Several processes (hosts) start with `initialize`, then see one global mesh;
each process places its own rows of every global batch on its own devices.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "seq", "model")

# (regular expression on the "/"-joined parameter path, PartitionSpec). First match wins;
# parameters matching none are replicated.
PARTITION_RULES = (
    (r"attention/(query|key|value)/kernel$", PartitionSpec(None, "model", None)),  # [D, N, H]
    (r"attention/(query|key|value)/bias$", PartitionSpec("model", None)),  # [N, H]
    (r"attention/out/kernel$", PartitionSpec("model", None, None)),  # [N, H, D]
    (r"feed_forward/up/kernel$", PartitionSpec(None, "model")),  # [D, F]
    (r"feed_forward/up/bias$", PartitionSpec("model")),  # [F]
    (r"feed_forward/down/kernel$", PartitionSpec("model", None)),  # [F, D]
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts jax.distributed when several processes take part; call before any jax work.

    Unset arguments fall back to the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. With none of them set, nothing is started
    (one process) unless `auto`, which lets jax detect the cluster (SLURM, Open MPI,
    Cloud TPU pod slices, ...). On CPU, collectives between processes go through gloo.

    Returns:
      Whether jax.distributed was started.

    Raises:
      ValueError: when some but not all of the three values are given.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(value is None for value in given.values()):
        if auto:
            jax.distributed.initialize()
        return auto
    missing = [name for name, value in given.items() if value is None]
    if missing and not auto:
        raise ValueError(
            f"{', '.join(missing)}: needed with the other distributed settings "
            f"(given {given}); set all three or use auto-detection"
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def mesh_shape(data: int, model: int, num_devices: int, seq: int = 1) -> tuple[int, int, int]:
    """(data, seq, model): resolves a -1 entry to fill the devices and checks the
    mesh fits on them.

    A mesh of explicit sizes may use fewer than `num_devices` devices (the
    first data x seq x model of them); one with a -1 uses them all.

    Raises:
      ValueError: naming `mesh.data`, `mesh.seq` or `mesh.model` when the shape does
        not divide `num_devices` (with -1) or needs more devices than there are.
    """
    sizes = {"data": data, "seq": seq, "model": model}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(f"mesh.{name}: expected a positive int or -1, got {value!r}")
    filled = [name for name, value in sizes.items() if value == -1]
    if len(filled) > 1:
        raise ValueError(
            f"mesh.{filled[0]}: at most one of mesh.data, mesh.seq and mesh.model may be -1"
        )
    if filled:
        given = {n: v for n, v in sizes.items() if n != filled[0]}
        known = math.prod(given.values())
        if num_devices % known:
            split = [n for n, v in given.items() if v > 1]
            if len(split) == 1:
                name, shown = split[0], str(known)
            else:
                name = split[-1]
                shown = " x ".join(f"mesh.{n}" for n in split) + f" = {known}"
            raise ValueError(f"mesh.{name}: {shown} does not divide the {num_devices} devices")
        sizes[filled[0]] = num_devices // known
    used = math.prod(sizes.values())
    if used > num_devices:
        shown = " x ".join(str(v) for v in sizes.values())
        raise ValueError(
            f"mesh.data: mesh.data x mesh.seq x mesh.model = {shown} = {used} "
            f"needs more than the {num_devices} devices there are"
        )
    return sizes["data"], sizes["seq"], sizes["model"]


def make_mesh(data: int = -1, model: int = 1, *, seq: int = 1, devices=None) -> Mesh:
    """A ("data", "seq", "model") mesh over the first data x seq x model of `devices`.

    `devices` defaults to all devices of all processes. With several processes
    the mesh must use every device (each process feeds its own).

    Raises:
      ValueError: naming `mesh.data`, `mesh.seq` or `mesh.model` (see `mesh_shape`).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, model, len(devices), seq)
    used = math.prod(shape)
    if used < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"mesh.data: mesh.data x mesh.seq x mesh.model = {used} must use all "
            f"{len(devices)} devices when {jax.process_count()} processes take part"
        )
    return jax.make_mesh(shape, AXES, (AxisType.Auto,) * 3, devices=devices[:used])


def _path_name(path) -> str:
    """ "encoder/layers/0/self_attention/query/kernel" from a pytree path.

    Attribute entries (the `.value` inside an nnx.Variable) are not part of the name.
    """
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
    return "/".join(parts)


def param_specs(params: Any) -> Any:
    """PartitionSpecs for a parameter pytree by PARTITION_RULES (others replicated)."""

    def spec(path, leaf):
        name = _path_name(path)
        for pattern, rule in PARTITION_RULES:
            if re.search(pattern, name) and len(rule) == np.ndim(leaf):
                return rule
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis along "data", the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params))


def state_shardings(
    tx: optax.GradientTransformation, abstract_state: dict[str, Any], mesh: Mesh
) -> dict[str, Any]:
    """Shardings of a train state {"step", "params", "opt_state"}.

    Optimizer moments take their parameter's sharding (optax.tree_map_params finds
    the parameter-shaped leaves); counts and other leaves are replicated.
    """
    params = param_shardings(abstract_state["params"], mesh)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state["opt_state"],
        params,
        transform_non_params=lambda _: replicated(mesh),
    )
    return {"step": replicated(mesh), "params": params, "opt_state": opt_state}


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from a host batch that every process holds whole.

    Each process copies only the rows of its own devices; a batch that is a pure
    function of (seed, step) is the same on every process, so nothing is sent
    between processes.
    """
    return {
        name: jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
        for name, value in batch.items()
    }


def check_divides(axis: str, size: int, dims: dict[str, int]) -> None:
    """Raises ValueError naming `mesh.<axis>` if `size` does not divide every one of `dims`."""
    for name, dim in dims.items():
        if dim % size:
            raise ValueError(f"mesh.{axis}: {size} does not divide {name} = {dim}")
