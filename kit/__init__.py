"""kit: a JAX/Flax research kit for self-attention.

The public API is the pure attention functions of `kit.attention`; training,
models, probes and views are in their own modules (`kit.training`,
`kit.models`, `kit.probe`, `kit.viz`).
"""

from kit.attention import *  # noqa: F403
from kit.attention import __all__  # noqa: F401
