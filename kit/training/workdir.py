"""A run's folder: config.json, metrics.jsonl and checkpoints/<step>, and loading them back.

Nothing in a workdir is unpickled: config.json is plain JSON and checkpoints are
orbax (tensorstore arrays, JSON metadata).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from kit import checkpoint
from kit.training.config import default_config
from kit.training.setup import setup


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that is not a folder, or whose checkpoint came from another
    task or model.

    Raises:
      ValueError: naming `workdir`.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir: {workdir} exists and is not a folder; use another --workdir")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"workdir: {parent} is a file, so {workdir} cannot be made there")
    _check_compatible(workdir, config)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


# How a run computes, not what it learns: a checkpoint resumes under either value.
_NOT_IN_CHECKPOINT = (
    "model.context_strategy",
    "model.context_balance",
    "model.context_head_groups",
)


def _check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose checkpoint came from another task or model."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    saved = _read_json(path)
    current = json.loads(config.to_json_best_effort())
    # A key newer than the saved config stands at its default there.
    defaults = json.loads(default_config().to_json_best_effort())
    diffs = [
        f"{section}.{key}: saved {was!r}, now {value!r}"
        for section in ("task", "model")
        for key, value in current[section].items()
        if (was := saved.get(section, {}).get(key, defaults[section].get(key))) != value
        and f"{section}.{key}" not in _NOT_IN_CHECKPOINT
    ]
    if saved.get("seed") != current["seed"]:
        diffs.append(f"seed: saved {saved.get('seed')!r}, now {current['seed']!r}")
    has_checkpoint = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if diffs and has_checkpoint:
        raise ValueError(
            f"workdir: {workdir} holds a checkpoint of an incompatible config ("
            + "; ".join(diffs)
            + "); use another --workdir"
        )


def load_checkpoint(workdir: str, *, step: int | None = None, device=None):
    """The config and train state saved in `workdir` (its latest checkpoint by default).

    The state is restored onto one device (`device`, default the first), whatever
    mesh trained it: orbax reads each array's shards into the new placement.

    Returns:
      (config, setup, state): the ConfigDict from workdir/config.json, its Setup,
      and the state {"step", "params", "opt_state"}; `nnx.merge(setup.trainer.graphdef,
      state["params"])` is the model.

    Raises:
      ValueError: if the workdir has no config.json or no checkpoint.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir: no config.json in {workdir!r}; train there first")
    config = default_config()
    try:
        config.lock().update(_read_json(path))  # nested dicts merge; unknown keys raise
    except (KeyError, TypeError) as error:
        raise ValueError(f"workdir: {path} does not fit this version's config ({error})") from None
    one_device = config.copy_and_resolve_references()
    one_device.mesh.update({"data": 1, "seq": 1, "model": 1})
    s = setup(one_device, [jax.devices()[0] if device is None else device])
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1 << 30)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ValueError(
            f"workdir: no complete checkpoint in {os.path.join(workdir, 'checkpoints')!r}"
        )
    abstract = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state,
        s.state_shardings,
    )
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return config, s, state


def _read_json(path: str) -> dict[str, Any]:
    """A workdir's config.json; plain JSON only (nothing in a workdir is unpickled)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"workdir: {path} is not a JSON config ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"workdir: {path} is not a JSON config (top level is not an object)")
    return data
