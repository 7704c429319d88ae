"""SCAN's addprim_jump split: "jump" is seen only alone; test on every other command with it.

    python experiments/train.py --config=configs/scan_jump.py --workdir=runs/scan_jump

The model of configs/scan_simple.py, 3,000 steps in packed rows; on the split's
validation cut ("look" in jump's part) no variant tried beat its sinusoidal positions
(docs/scan.md).

Measured: see docs/scan.md ("Results on the test splits"), where this configuration
is scan_study's variant "sinusoidal" on the split addprim_jump.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.update(split="addprim_jump", pack=True)
    config.train.update(steps=3000, eval_every=1000, checkpoint_every=1000)
    return training.variant(config, variant)
