"""Reverse a sequence of 16 symbols out of 10 (the UvA tutorial's setup).

    python experiments/train.py --config=configs/reverse.py --workdir=runs/reverse

An encoder-only transformer predicts the reversed symbol at every position.
Result and time: see the table in README.md (measured on a 2-core CPU).
"""

from kit.train import default_config


def get_config():
    config = default_config()
    config.task.name = "reverse"
    config.task.length = 16
    config.task.num_symbols = 10
    config.model.kind = "encoder_only"
    config.model.d_model = 64
    config.model.num_heads = 4
    config.model.num_layers = 1
    config.model.d_ff = 128
    config.model.max_len = 16
    config.train.steps = 400
    config.train.batch_size = 128
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.log_every = 50
    config.train.eval_every = 400
    config.train.checkpoint_every = 400
    return config
