"""Copy a sequence of 20 symbols out of 10 through an encoder-decoder.

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy

The decoder sees the source only through cross-attention, so it must learn to
attend to source position i when writing output position i.
Result and time: see the table in README.md (measured on a 2-core CPU).
"""

from kit.train import default_config


def get_config():
    config = default_config()
    config.task.name = "copy"
    config.task.length = 20
    config.task.num_symbols = 10
    config.model.kind = "encoder_decoder"
    config.model.d_model = 64
    config.model.num_heads = 4
    config.model.num_layers = 1
    config.model.num_decoder_layers = 1
    config.model.d_ff = 128
    config.model.max_len = 24
    config.train.steps = 400
    config.train.batch_size = 128
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
