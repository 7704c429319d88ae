"""SCAN's length split re-cut at 26 actions, as Csordás, Irie & Schmidhuber (2021) re-cut
it: train on action sequences of at most 26 actions, test on the longer ones (28-48).

    python experiments/train.py --config=configs/scan_length_26.py --workdir=runs/scan_length_26

The model of configs/scan_length.py with T5 relative positions; evaluation logs exact
match per target length, on the "U around D thrice" commands and the others apart, and
decoding to the true length (eval/exact_match_oracle_length).

Measured on the 2-core CPU development machine (2026-12-05), one seed: 5.79% exact
match on the 2,624 held-out commands (5.88% of the 2,432 with "U around D thrice", 4.69%
of the 192 others), but 78.39% decoded to the true length: the model mostly fails at
where to stop. 449 s for the whole command (evaluation decodes twice).
"""

import os

from kit import training


def get_config(variant: str | None = None):
    config = training.from_file(os.path.join(os.path.dirname(__file__), "scan_length.py"))
    config.task.split = "length_26"
    config.model.positions = "t5"
    return training.variant(config, variant)
