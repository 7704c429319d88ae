"""orbax-checkpoint wrappers: save, find the latest complete step, restore.

Saves are synchronous and atomic (orbax writes to a temporary folder and
renames it when complete), so a crash mid-save leaves the previous checkpoint
as the latest complete one. Nothing is unpickled: orbax stores arrays with
tensorstore (OCDBT/zarr) and metadata as JSON, and restore reads only those.
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
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=False,
                # A save cut short by a crash leaves a temporary folder; it is never
                # read as a checkpoint, and it is removed when training starts again.
                cleanup_tmp_directories=True,
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
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # any reader failure: say which checkpoint, keep the cause
            raise ValueError(
                f"checkpoint: step {step} under {self.manager.directory} cannot be restored "
                f"({type(error).__name__}: {str(error)[:300]}); it is corrupt or from another "
                f"model"
            ) from error

    def close(self) -> None:
        self.manager.close()
