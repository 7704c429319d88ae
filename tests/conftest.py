"""Test configuration: 8 simulated CPU devices, strict promotion, ranks must match.

XLA_FLAGS must be set before jax is first imported, so this runs at collection.
"""

import fcntl
import gc
import hashlib
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest
from helpers import UNOPTIMIZED_OPTIONS, optimizations
from jax._src import compiler

# Tracing thousands of programs allocates many short-lived objects: with Python's
# default thresholds (700, 10, 10) the collector took 2.1 s of a 48 s run of three test
# files (test_decode, test_interp, test_hooks; timed with gc.callbacks), 0.4 s with these.
gc.set_threshold(10_000, 50, 100)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests' programs are tiny: XLA's optimization passes cost more than they save
# (the not-slow suite took 80 s with them, 52 s without), as flax's examples set for
# their smoke tests. Tests that read a compiled program (memory, collectives) or
# check numerics against jax.nn take the `optimized` fixture: what users run.
jax.config.update("jax_disable_most_optimizations", True)

# With them off, XLA's CPU fusion emitters still take half of each compile (a tiny
# train step: 1.9 s with them, 0.9 s without); the older emitters they replace take
# the same fused HLO. And XLA splits each program's machine-code generation into up to
# 32 parts for parallel threads: with both cores busy running tests, one part costs
# less (the same train step: 1.05-1.1 CPU-s split, 0.80-0.84 whole). jax has no public
# default for a compile option, so its compile options get these overrides while
# optimizations are off: the `optimized` fixture compiles exactly as users do. (A
# private jax function: if it is renamed, this import-time line fails with an
# AttributeError.) The options are helpers.UNOPTIMIZED_OPTIONS, which commands get as
# XLA_FLAGS (helpers.command_env).
_compile_options = compiler.get_compile_options


def _get_compile_options(*args, **kwargs):
    options = _compile_options(*args, **kwargs)
    if jax.config.read("jax_disable_most_optimizations"):
        overrides = [*options.env_option_overrides, *UNOPTIMIZED_OPTIONS.items()]
        options.env_option_overrides = overrides
    return options


compiler.get_compile_options = _get_compile_options

# Tests build the same tiny models many times (a resumed run compiles what the
# first run compiled); a per-session persistent compilation cache compiles each once.
# Programs that compile in under 0.1 s are not written from the tests' processes:
# nearly all of them compile once (the writes took 3.5 s of 85 for three test files,
# 1.9 s with this floor); the commands below, which rerun one config, write them all.
# The session's controller makes the folder and removes it when the session ends (a
# full suite leaves 43 MB there); xdist's workers inherit its name.
_CACHE = os.environ.get("KIT_TESTS_JAX_CACHE")
_OWN_CACHE = _CACHE is None
if _OWN_CACHE:
    _CACHE = tempfile.mkdtemp(prefix="kit-jax-cache-")
    os.environ["KIT_TESTS_JAX_CACHE"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The commands tests run in subprocesses (train.py, heads.py, patch.py, crash_run.py,
# the notebook's kernel) read the same settings from the environment: the same cache,
# so a command compiled once is loaded by the next run of it (a tiny train.py: 6.0 s
# cold, 3.2 s warm), and XLA's optimizations off (7.2 s with them, 5.7 s without).
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    JAX_DISABLE_MOST_OPTIMIZATIONS="true",
)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(name, **overrides)`: the workdir of a finished tiny training run.

    Each distinct run trains once per test session, in whichever xdist worker asks
    first (the other waits on a file lock), and is shared by every test that only
    reads it (loading, probing, visualizing, checkpoints). Tests that write copy it
    first.
    """
    from helpers import load_config

    from kit import training

    # Under xdist each worker has its own base folder; their parent is the session's.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent

    def get(name: str, **overrides) -> str:
        config = load_config(name, **overrides)
        digest = hashlib.sha256(config.to_json().encode()).hexdigest()[:16]
        workdir = shared / f"tiny-{name}-{digest}"
        with open(shared / f"tiny-{name}-{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (workdir / "done").exists():
                with jax.numpy_dtype_promotion("standard"):  # optax's Adam: see below
                    training.train_and_evaluate(config, str(workdir), progress=False)
                (workdir / "done").touch()
        return str(workdir)

    return get


@pytest.fixture
def optimized():
    """Compiles with XLA's full optimization passes inside the test."""
    with optimizations(True):
        yield


@pytest.fixture
def standard_promotion():
    """Standard dtype promotion for tests that train: optax's Adam bias correction
    (decay ** int count) is not strict-promotion clean. kit's own model code is
    checked under strict promotion in test_decode.py."""
    with jax.numpy_dtype_promotion("standard"):
        yield
