"""Training split by job: config (schema and checks), steps (loss, optimizer, train and
eval steps), setup (task, model, mesh, shardings), workdir (config.json, metrics,
checkpoints, load_checkpoint), report (what a run prints), stopping (signals, the
workdir lock, write failures), programs (the compiled programs, compiling on
background threads), actions (periodic logging, evaluation and checkpoints, the
deferred non-finite checks, the clock) and loop (train_and_evaluate). Imports run
one way: config <- steps <- setup <- workdir, programs <- loop; report, stopping <-
actions <- loop.
"""

from kit.training.config import check_config, default_config, from_file, tiny, variant
from kit.training.loop import NonFiniteError, train_and_evaluate
from kit.training.report import Console
from kit.training.setup import Setup, setup
from kit.training.steps import Trainer, init_model, loss_fn, make_optimizer, model_batch
from kit.training.stopping import Interrupted, WriteError
from kit.training.workdir import load_checkpoint

__all__ = [
    "Console",
    "Interrupted",
    "NonFiniteError",
    "Setup",
    "Trainer",
    "WriteError",
    "check_config",
    "default_config",
    "from_file",
    "init_model",
    "load_checkpoint",
    "loss_fn",
    "make_optimizer",
    "model_batch",
    "setup",
    "tiny",
    "train_and_evaluate",
    "variant",
]
