"""Sort a sequence of 16 symbols out of 10 through an encoder-decoder.

    python experiments/train.py --config=configs/sort.py --workdir=runs/sort

The decoder writes the symbols in ascending order, attending to the source to
find the next one.
Measured on the 2-core CPU development machine: 99.9% exact match on 1,000 held-out
sequences after 1,000 steps, 25.0 s for the whole command
(2026-11-30).
"""

from kit import training


def get_config(variant: str | None = None):
    config = training.default_config()
    config.task.update(name="sort")
    config.model.update(num_layers=1, num_decoder_layers=1, max_len=20)
    return training.variant(config, variant)
