"""Induction heads (Olsson et al., 2022): a 2-layer attention-only decoder.

    python experiments/train.py --config=configs/induction.py --workdir=runs/induction
    python experiments/heads.py --workdir=runs/induction

Each sequence is a random half of h symbols out of 32, h drawn from 8..16 so that
no fixed offset finds the copy, then the same half again. The first half cannot
be predicted; the second can, after its first token, by an induction head:
attend to the token after the earlier copy of the current token (which a
previous-token head in layer 0 marks), and copy it. Evaluation logs
eval/loss_first (next-token loss over the first half) and eval/loss_repeat (over
the second half, after its first token). Measured on the 2-core CPU development
machine: eval/loss_repeat 0.063 against eval/loss_first 3.554 after 1,500 steps,
50.6 s for the whole command (2026-11-30); docs/interpretability.md.
"""

from kit import training


def get_config(variant: str | None = None):
    config = training.default_config()
    config.task.update(name="induction", length=16, num_symbols=32)
    config.model.update(
        kind="decoder_only", num_layers=2, num_heads=4, feed_forward=False, positions="rope"
    )
    config.train.update(steps=1500, log_every=50, eval_every=50, checkpoint_every=1500)
    return training.variant(config, variant)
