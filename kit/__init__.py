"""kit: a JAX/Flax research kit for self-attention.

The public API is the pure attention functions of `kit.attention`; the rest is in
its own modules: `kit.models` and `kit.training` (toy transformers and their
training), `kit.tasks`, `kit.hooks` (named activations to read and write),
`kit.analysis` (reading, scoring, patching) and `kit.views` (figures, the offline
viewer, notebook views).
"""

from importlib import metadata as _metadata

from kit.attention import *  # noqa: F403
from kit.attention import __all__  # noqa: F401

try:
    __version__ = _metadata.version("jax-attention-kit")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
