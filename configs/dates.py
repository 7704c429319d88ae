"""Translate human-readable dates ("3rd of March 2021", "Mar 3, 2021", "03.03.21",
"Wednesday, March 3, 2021", ...) to ISO 2021-03-03, character by character.

    python experiments/train.py --config=configs/dates.py --workdir=runs/dates

An encoder-decoder whose cross-attention has to reorder: the year comes first
in the output but last in most inputs. Held-out dates are never trained on.
Result and time: see the table in README.md (measured on a 2-core CPU).
"""

from kit.train import default_config


def get_config():
    config = default_config()
    config.task.name = "dates"
    config.task.eval_size = 2000
    config.model.kind = "encoder_decoder"
    config.model.d_model = 64
    config.model.num_heads = 4
    config.model.num_layers = 2
    config.model.num_decoder_layers = 1
    config.model.d_ff = 128
    config.model.max_len = 32
    config.train.steps = 1000
    config.train.batch_size = 128
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.eval_batch_size = 1000
    return config
