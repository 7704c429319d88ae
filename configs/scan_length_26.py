"""SCAN's length split re-cut at 26 actions, as Csordás, Irie & Schmidhuber (2021) re-cut
it: train on action sequences of at most 26 actions, test on the longer ones (27-48).

    python experiments/train.py --config=configs/scan_length_26.py --workdir=runs/scan_length_26

configs/scan_length.py (randomized positions, the variant chosen on this split's own
validation cut, 3,000 steps in packed rows) on the re-cut split.

Measured: see docs/scan.md ("Results on the test splits"), where this configuration
is scan_study's variant "random" on the split length_26.
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_length.py"))
    config.task.split = "length_26"
    return training.variant(config, variant)
