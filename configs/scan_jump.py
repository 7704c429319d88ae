"""SCAN's addprim_jump split: "jump" is seen only alone; test on every other command with it.

    python experiments/train.py --config=configs/scan_jump.py --workdir=runs/scan_jump

The model of configs/scan_simple.py.

Measured on the 2-core CPU development machine (2026-11-30): 0.05% exact match
(4 of 7,706 commands; 59.3% of their tokens), 351 s for the whole command.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.split = "addprim_jump"
    return training.variant(config, variant)
