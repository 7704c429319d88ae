"""The pronoun probe: label each pronoun with its antecedent.

    python experiments/train.py --config=configs/pronoun.py --workdir=runs/pronoun
    python experiments/visualize.py --workdir=runs/pronoun \\
        --text="Mark told Sam that he was leaving."

Sentences like "Mark told Sam that he was leaving ." (8 templates, 12 verbs,
20 male and 20 female names); an encoder-only transformer predicts, at the
pronoun's own position, the name of matching gender, and the subject when both
match, and "_" at every other position. Held-out sentences use name pairs never
seen together in training (Mark and Sam among them). Result and time: see the
table in README.md (measured on a 2-core CPU).
"""

from kit.train import default_config


def get_config():
    config = default_config()
    config.task.name = "pronoun"
    config.task.eval_size = 2000
    config.model.kind = "encoder_only"
    config.model.d_model = 64
    config.model.num_heads = 4
    config.model.num_layers = 2
    config.model.d_ff = 128
    config.model.max_len = 16
    config.train.steps = 600
    config.train.batch_size = 128
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
