"""SCAN's length split: train on action sequences of at most 22 actions, test on 24-48.

    python experiments/train.py --config=configs/scan_length.py --workdir=runs/scan_length
    python experiments/scan_positions.py   # every positional encoding, 3 seeds each

The model of configs/scan_simple.py; evaluation also logs exact match per
target length (eval/exact_match_by_length in metrics.jsonl).
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.split = "length"
    return training.variant(config, variant)
