"""Copy a sequence of 20 symbols out of 10 through an encoder-decoder.

    python experiments/train.py --config=configs/copy.py --workdir=runs/copy

The decoder sees the source only through cross-attention, so it must learn to
attend to source position i when writing output position i.
Measured on the 2-core CPU development machine: 100% exact match on 1,000 held-out
sequences after 400 steps, 15.8 s for the whole command (17.3 s on a second run;
2026-11-30).
"""

from kit import training


def get_config(variant: str | None = None):
    config = training.default_config()
    config.task.update(name="copy", length=20)
    config.model.update(num_layers=1, num_decoder_layers=1, max_len=24)
    config.train.update(steps=400, eval_every=200, checkpoint_every=200)
    return training.variant(config, variant)
