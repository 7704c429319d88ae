"""SCAN's length split: train on action sequences of at most 22 actions, test on 24-48.

    python experiments/train.py --config=configs/scan_length.py --workdir=runs/scan_length
    python experiments/scan_study.py --split=length --variants=random   # 3 seeds

The model of configs/scan_simple.py with randomized positions (Ruoss et al., 2023:
model.random_positions), the variant chosen on the split's validation cut
(docs/scan.md), trained 3,000 steps in packed rows. Evaluation also logs exact match per
target length, on the "U around D thrice" commands and the others apart, and decoded to
the true length (eval/exact_match_oracle_length).

Measured: see docs/scan.md ("Results on the test splits"), where this configuration
is scan_study's variant "random" on the length split.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_simple.py"))
    config.task.update(split="length", pack=True)
    config.model.random_positions = 256
    config.train.update(steps=3000, eval_every=1000, checkpoint_every=1000)
    return training.variant(config, variant)
