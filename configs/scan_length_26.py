"""SCAN's length split re-cut at 26 actions, as Csordás, Irie & Schmidhuber (2021) re-cut
it: train on action sequences of at most 26 actions, test on the longer ones (28-48).

    python experiments/train.py --config=configs/scan_length_26.py --workdir=runs/scan_length_26

The model of configs/scan_length.py with T5 relative positions; evaluation logs exact
match per target length, on the "U around D thrice" commands and the others apart, and
decoding to the true length (eval/exact_match_oracle_length).

RESULT_LINE
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_length.py"))
    config.task.split = "length_26"
    config.model.positions = "t5"
    return training.variant(config, variant)
