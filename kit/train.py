"""The earlier import path of training: `from kit.train import train_and_evaluate`.

Training lives in `kit.training`, split by job; this module re-exports its API.
"""

from kit.training import *  # noqa: F403
from kit.training import __all__  # noqa: F401
