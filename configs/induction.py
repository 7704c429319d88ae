"""Induction heads (Olsson et al., 2022): a 2-layer attention-only decoder.

    python experiments/train.py --config=configs/induction.py --workdir=runs/induction
    python experiments/heads.py --workdir=runs/induction

Each sequence is a random first half of 16 symbols out of 32, then the same half
again. The first half cannot be predicted; the second can, from its first token
on, by an induction head: attend to the token after the earlier copy of the
current token, and copy it. Evaluation logs eval/loss_first (next-token loss over
the first half) and eval/loss_repeat (over the second half, after its first
token).
"""

from kit import training


def get_config(variant: str | None = None):
    config = training.default_config()
    config.task.update(name="induction", length=16, num_symbols=32)
    config.model.update(
        kind="decoder_only", num_layers=2, num_heads=4, feed_forward=False, positions="rope"
    )
    config.train.update(
        steps=600, learning_rate=1e-3, log_every=25, eval_every=25, checkpoint_every=600
    )
    return training.variant(config, variant)
