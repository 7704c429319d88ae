"""Test configuration: 8 simulated CPU devices, strict promotion, ranks must match.

XLA_FLAGS must be set before jax is first imported, so this runs at collection.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests build the same tiny models many times (a resumed run compiles what the
# first run compiled); a per-session persistent compilation cache compiles each once.
_CACHE = os.path.join(tempfile.gettempdir(), f"kit-jax-cache-{os.getppid()}")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
