"""Timing helpers the newer benchmarks share (bench_guard.py, bench_pretrained.py,
bench_context.py, profile_attention.py), the CPU's name, and PyTorch's SDPA in its own
process (bench_torch.py, bench_decode.py).

Imported as `benchtools` by scripts run from experiments/ (their folder is on sys.path).
"""

import json
import math
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np


def fastest_seconds(run, *args, tries: int = 10) -> float:
    """The fastest of `tries` runs after an untimed one: for peaks, not for medians."""
    jax.block_until_ready(run(*args))
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(tries: int = 10) -> float:
    """GFLOP/s of the fastest of `tries` runs of a 2048^3 float32 matmul."""
    a = jnp.ones((2048, 2048), jnp.float32)
    return 2 * 2048**3 / fastest_seconds(jax.jit(jnp.matmul), a, a, tries=tries) / 1e9


def median_seconds(run, *args, repeats: int) -> float:
    """The median of `repeats` timed runs after an untimed one."""
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compiled_pass(attend, mode: str, q, k, v):
    """`attend(q, k, v)` ("fwd") or the gradient of sum(attend(q, k, v) * q) in q, k, v
    ("fwd_bwd"), traced and compiled for these inputs."""
    if mode == "fwd":
        run = jax.jit(attend)
    else:
        run = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * q), argnums=(0, 1, 2)))
    return run.lower(q, k, v).compile()


def alternating_times(runs: dict, *args, repeats: int) -> dict:
    """Seconds of `repeats` runs of each of `runs` (name -> function of `args`) after an
    untimed one each: one run of each a round, each first in turn (the first of a round
    is slowed by what the round before left in the caches)."""
    names = list(runs)
    for name in names:
        jax.block_until_ready(runs[name](*args))
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(runs[name](*args))
            times[name].append(time.perf_counter() - start)
    return times


def largest_difference(a, b) -> float:
    """The largest absolute difference between two pytrees of arrays."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's elsewhere), with its widest
    vector extension: machines sold under one name ("AMD EPYC") come with and without
    AVX-512, and XLA's kernels, so the guard's ratios, differ between them."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return f"{name}, {label}"
    return name


class Torch:
    """PyTorch's SDPA timed by torch_sdpa_worker.py in a throwaway environment's
    `python` (a subprocess that waits on its stdin between cases), or nothing when no
    environment was given (`python` empty): then `seconds` returns None."""

    def __init__(self, python: str):
        self.proc = None
        self.version = "not run (no --torch_python)"
        if python:
            worker = os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "torch_sdpa_worker.py"
            )
            try:
                self.proc = subprocess.Popen(
                    [python, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            except OSError as error:
                raise SystemExit(f"--torch_python: cannot run {python!r}: {error}") from None
            line = self.proc.stdout.readline()
            if not line:  # torch missing there: the worker's traceback is on stderr
                raise SystemExit(
                    f"--torch_python: {python} did not start the worker "
                    f"(exit {self.proc.wait()}; is torch installed there?)"
                )
            hello = json.loads(line)
            self.version = f"torch {hello['torch']}, {hello['threads']} threads"

    def seconds(self, **case) -> list[float] | None:
        if self.proc is None:
            return None
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker stopped (exit {self.proc.wait()})")
        return json.loads(line)["seconds"]

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
