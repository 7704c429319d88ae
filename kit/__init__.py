"""kit: a JAX/Flax research kit for self-attention.

The public API is the pure attention functions of `kit.attention`; training,
models, hook points, probes and views are in their own modules (`kit.training`,
`kit.models`, `kit.hooks`, `kit.patching`, `kit.probe`, `kit.viz`).
"""

from importlib import metadata as _metadata

from kit.attention import *  # noqa: F403
from kit.attention import __all__  # noqa: F401

try:
    __version__ = _metadata.version("jax-attention-kit")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
