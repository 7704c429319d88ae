"""A decode step: one query per example against a long KV cache, against reading the cache.

    python experiments/bench_decode.py
    python experiments/bench_decode.py --kv_heads=8 --lengths=32768 --queries=1,8

Issue 40 asks that a decode step (B=8, S=4096..32k) take at most 1.5x the time to read
its KV cache once from memory. Reading once is the cache's bytes (K and V) over the
memory bandwidth measured in the same run: the fastest of 10 sums of a 512 MiB float32
array (a streaming read; XLA's reduce of it runs on all cores), measured at the start and
again before each row, each row taking the highest so far (a busy machine only lowers
it: one start read 18.0 GB/s, another minutes before 25.5). Each path's time is the
median of --repeats runs after a warm-up, the paths' runs alternating, for q `[B, T, N,
H]` and k, v `[B, S, K, H]` (float32, no mask).

That floor is the best the machine gave at any moment of the run, and the machine's
neighbours move it (XLA's sum of a cache read 16-19 GB/s, median, in one hour; best-of-10
readings were 20-24 GB/s in others). So two more references read the same arrays once,
their runs alternating with the paths' own: `sum` is XLA's sum of k and of v, and `read`
(where the compiled kernels are built) is `kit.attention.cpu_kernels.cache_read`, the
same sum on the decode kernel's threads with four running sums each, which read faster
than XLA's (21-29 GB/s against 17-24 on 2026-12-08). The last two columns are the kit's
median over each.

The paths: the kit's `dot_product_attention` as dispatched (implementation=None: for so
few queries on a CPU, the compiled decode kernel of `kit.attention.cpu_kernels`), the
jax.numpy products in the cache's layout that None took before it
(`kit.attention.few_queries.products`), its xla path and its chunked path, and jax.nn's; the
largest error of any against jax.nn is printed. With --torch_python (an environment with
torch; experiments/torch_sdpa_worker.py says how to make one) a last column times PyTorch's
scaled_dot_product_attention on the same shapes in its own layout (q `[B, N, T, H]`, k
and v `[B, K, S, H]`), in a subprocess that waits while the kit runs.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchtools import Torch, alternating_times, cpu_model, largest_difference

import kit
from kit.attention import cpu_kernels, few_queries
from kit.attention.inputs import check_inputs

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "B.")
flags.DEFINE_integer("heads", 8, "Query heads N.")
flags.DEFINE_list("kv_heads", ["8", "2", "1"], "Key/value heads K (each divides N).")
flags.DEFINE_integer("head_dim", 64, "H.")
flags.DEFINE_list("lengths", ["4096", "16384", "32768"], "Cache lengths S.")
flags.DEFINE_list("queries", ["1"], "Queries per example T (1: a decode step).")
flags.DEFINE_integer("repeats", 9, "Timed runs per cell (the median is reported).")
flags.DEFINE_list("paths", [], "The kit and jax.nn paths to time (default: all of PATHS).")
flags.DEFINE_string(
    "torch_python", "", "Python of an environment with torch: adds PyTorch SDPA's column."
)


def memory_bandwidth() -> float:
    """GB/s of the fastest of 10 sums of a 512 MiB float32 array."""
    x = jnp.ones((128 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


PATHS = {
    "kit": lambda q, k, v: kit.dot_product_attention(q, k, v),
    # The jax.numpy products that None took before the compiled kernel (and takes where
    # the kernel is not built): kit.attention.few_queries.products.
    "kit_products": lambda q, k, v: few_queries.products(check_inputs(q, k, v))[0],
    "kit_xla": lambda q, k, v: kit.dot_product_attention(q, k, v, implementation="xla"),
    "kit_chunked": lambda q, k, v: kit.dot_product_attention(q, k, v, implementation="chunked"),
    "jax_nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
}


def main(_):
    B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
    torch = Torch(FLAGS.torch_python)
    bandwidth = memory_bandwidth()
    print(
        f"{cpu_model()}, {jax.device_count()} CPU device(s); memory bandwidth {bandwidth:.1f} GB/s "
        "at the start (a 512 MiB sum; each row: the highest so far); "
        f"B={B} N={N} H={H} float32; ms, median of {FLAGS.repeats}, "
        f"and x the time to read K and V once; {torch.version}; compiled decode kernel "
        f"{'loaded' if cpu_kernels.available() else 'NOT built: kit is the products path'}"
    )
    chosen = FLAGS.paths or list(PATHS)
    unknown = sorted(set(chosen) - set(PATHS))
    if unknown:
        raise app.UsageError(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
    names = chosen + (["torch_sdpa"] if torch.proc else [])
    reads = ["sum"] + (["read"] if cpu_kernels.available() else [])
    print(
        "| T | K | S | cache MB | GB/s | read once ms | "
        + " | ".join(f"{name} ms" for name in reads)
        + " | "
        + " | ".join(names)
        + " | max error | "
        + " | ".join(f"kit / {name}" for name in reads)
        + " |"
    )
    print("|---" * (7 + 2 * len(reads) + len(names)) + "|")
    for T in map(int, FLAGS.queries):
        for K in map(int, FLAGS.kv_heads):
            for S in map(int, FLAGS.lengths):
                rngs = jax.random.split(jax.random.key(0), 3)
                q = jax.random.normal(rngs[0], (B, T, N, H), jnp.float32)
                k, v = (jax.random.normal(r, (B, S, K, H), jnp.float32) for r in rngs[1:])
                cache = k.nbytes + v.nbytes
                bandwidth = max(bandwidth, memory_bandwidth())
                read = cache / bandwidth / 1e9
                want = jax.jit(PATHS["jax_nn"])(q, k, v)
                runs = {name: jax.jit(PATHS[name]) for name in chosen}
                error = max(largest_difference(run(q, k, v), want) for run in runs.values())
                # Each path's runs alternate with the others', each first in turn.
                read_runs = dict(runs, sum=jax.jit(lambda q, k, v: jnp.sum(k) + jnp.sum(v)))
                if "read" in reads:
                    read_runs["read"] = jax.jit(lambda q, k, v: cpu_kernels.cache_read(k, v))
                times = alternating_times(read_runs, q, k, v, repeats=FLAGS.repeats)
                medians = {name: float(np.median(times[name])) for name in read_runs}
                cells = []
                for name in runs:
                    cells.append(f"{medians[name] * 1e3:.2f} ({medians[name] / read:.2f}x)")
                kit_over = " | ".join(
                    f"{medians['kit'] / medians[name]:.2f}x" if "kit" in runs else "-"
                    for name in reads
                )
                if torch.proc:
                    case = dict(B=B, T=T, S=S, N=N, K=K, H=H, causal=False, mode="fwd")
                    seconds = float(np.median(torch.seconds(**case, repeats=FLAGS.repeats)))
                    cells.append(f"{seconds * 1e3:.2f} ({seconds / read:.2f}x)")
                print(
                    f"| {T} | {K} | {S} | {cache / 1e6:.0f} | {bandwidth:.1f} | {read * 1e3:.1f} | "
                    + " | ".join(f"{medians[name] * 1e3:.2f}" for name in reads)
                    + " | "
                    + " | ".join(cells)
                    + f" | {error:.1e} | {kit_over} |",
                    flush=True,
                )
    torch.close()


if __name__ == "__main__":
    app.run(main)
