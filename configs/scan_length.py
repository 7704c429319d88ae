"""SCAN's length split: train on action sequences of at most 22 actions, test on 24-48.

    python experiments/train.py --config=configs/scan_length.py --workdir=runs/scan_length
    python experiments/scan_study.py --split=length   # model variants, 3 seeds each

The model of configs/scan_simple.py; evaluation also logs exact match per
target length (eval/exact_match_by_length in metrics.jsonl).

Measured on the 2-core CPU development machine (2026-11-30): 0.0% exact match on
the 3,920 held-out commands (79.4% of their tokens), 328 s for the whole command.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.split = "length"
    return training.variant(config, variant)
