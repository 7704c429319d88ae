"""orbax-checkpoint wrappers: save, find the latest complete step, restore.

Saves are synchronous and atomic (orbax writes to a temporary folder and
renames it when complete), so a crash mid-save leaves the previous checkpoint
as the latest complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` checkpoints of a train state under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores `step` into the structure, shapes, dtypes and shardings of `like`.

        `like` holds arrays or jax.ShapeDtypeStructs (with `sharding` set to place
        the restored arrays across devices and processes).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
