"""Reverse a sequence of 16 symbols out of 10 (the UvA tutorial's setup).

    python experiments/train.py --config=configs/reverse.py --workdir=runs/reverse

An encoder-only transformer predicts the reversed symbol at every position.
Measured on the 2-core CPU development machine: 100% exact match on 1,000 held-out
sequences after 400 steps, 13.3 s for the whole command.

Only what differs from kit.training.default_config() is set here. The
tests run the `tiny` variant: --config=configs/reverse.py:tiny.
"""

from kit import training


def get_config(variant: str | None = None):
    config = training.default_config()
    config.task.name = "reverse"
    config.model.kind = "encoder_only"
    config.model.num_layers = 1
    config.model.max_len = 16
    config.train.steps = 400
    config.train.eval_every = 400
    config.train.checkpoint_every = 400
    return training.variant(config, variant)
