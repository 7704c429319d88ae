"""SCAN's addprim_jump split: "jump" is seen only alone; test on every other command with it.

    python experiments/train.py --config=configs/scan_jump.py --workdir=runs/scan_jump

The model of configs/scan_simple.py.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.split = "addprim_jump"
    return training.variant(config, variant)
