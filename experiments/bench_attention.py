"""Attention speed and memory, side by side in one run: kit chunked, kit xla, jax.nn, flax.nnx.

    python experiments/bench_attention.py                      # the README table
    python experiments/bench_attention.py --lengths=4096,8192 --dtype=bfloat16
    python experiments/bench_attention.py --long_context=32768  # peak RSS of one long run

Prints a markdown table: the median milliseconds of 2 x --repeats runs,
speed-up against jax.nn.dot_product_attention (implementation="xla"), effective
GFLOP/s (4 B N T S H for the forward pass, 3.5x that for forward+backward,
causal counting half), the percentage of this machine's matmul peak (the
fastest of 10 runs of a 2048^3 matmul in --dtype), and the memory XLA plans for
the compiled program (arguments + outputs + scratch). Each path is timed in
blocks of consecutive runs after an untimed one (its steady state, as in a
training loop), in two rounds of opposite order so that the machine's drift
evens out between paths; interleaving single runs instead would charge the
chunked path for re-faulting the memory a materialized path just released
(measured here: ~280 ms in a block, ~380 ms interleaved with jax.nn, at
T=2048 causal forward). The header also gives the rate of the chunked
forward's own block products, a ceiling for blocked attention built on XLA's
dots here.
Materialized paths whose [B, N, T, S] scores would exceed --max_scores_gib are
skipped.
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import kit
from kit.attention import blocks

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "Lengths T = S.")
flags.DEFINE_list("impls", ["kit_chunked", "kit_xla", "jax_nn", "flax_nnx"], "Paths to time.")
flags.DEFINE_list("causal", ["true", "false"], "Causal settings to run.")
flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "Forward only and/or forward+backward.")
flags.DEFINE_integer("batch", 4, "B.")
flags.DEFINE_integer("heads", 8, "N (= K).")
flags.DEFINE_integer("head_dim", 64, "H.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
flags.DEFINE_integer("repeats", 3, "Timed runs per cell (the median is reported).")
flags.DEFINE_float("max_scores_gib", 4.0, "Skip materialized paths above this score size.")
flags.DEFINE_string("out", None, "Also write the markdown table to this file.")
flags.DEFINE_string("plot", None, "Also write a PNG plot of time against T to this file.")
flags.DEFINE_integer("long_context", None, "Only run B=1 causal fwd+bwd chunked at this T.")

PATHS = {
    "kit_chunked": lambda q, k, v, c: kit.dot_product_attention(
        q, k, v, is_causal=c, implementation="chunked"
    ),
    "kit_xla": lambda q, k, v, c: kit.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"
    ),
    "jax_nn": lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"
    ),
    "flax_nnx": lambda q, k, v, c: nnx.dot_product_attention(q, k, v, is_causal=c),
}


def compiled(fn, mode, causal, args):
    def fwd(q, k, v):
        return fn(q, k, v, causal)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(fwd if mode == "fwd" else fwd_bwd).lower(*args).compile()


def fastest_seconds(run, *args, tries=10):
    """The fastest of `tries` runs after a warm-up: for peaks, not for medians."""
    jax.block_until_ready(run(*args))
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype):
    """GFLOP/s of the fastest of 10 runs of a 2048^3 matmul."""
    a = jnp.ones((2048, 2048), dtype)
    return 2 * 2048**3 / fastest_seconds(jax.jit(jnp.matmul), a, a) / 1e9


# The chunked forward's block shape at long lengths: units per step (one example's
# key/value heads at the default --heads=8, K = N), block_q, block_k.
BLOCKS = (8, *blocks.default_block_sizes(8192, 8192))


def block_matmul_rate(dtype, iterations=32):
    """GFLOP/s of the chunked forward's own block products, chained in a loop.

    Per step, the scores [units, block_q, H] x [units, block_k, H] -> [units,
    block_q, block_k] and the weighted sum [units, block_q, block_k] x [units,
    block_k, H] -> [units, block_q, H]: a ceiling for any blocked attention
    built on XLA's dots here, below the large-matmul peak because the
    contraction (H = 64) or the output (H wide) is small. The best of 10 runs.
    """
    H = FLAGS.head_dim
    units, block_q, block_k = BLOCKS
    rngs = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(rngs[0], (units, block_q, H), dtype)
    k = jax.random.normal(rngs[1], (units, block_k, H), dtype)
    v = jax.random.normal(rngs[2], (units, block_k, H), dtype)

    def step(_, x):
        s = jnp.einsum("uqh,ush->uqs", x, k, preferred_element_type=jnp.float32)
        return jnp.einsum("uqs,ush->uqh", s.astype(dtype), v, preferred_element_type=jnp.float32)

    run = jax.jit(
        lambda x: jax.lax.fori_loop(0, iterations, lambda i, x: step(i, x).astype(dtype), x)
    )
    flops = 2 * 2 * units * block_q * block_k * H * iterations
    return flops / fastest_seconds(run, q) / 1e9


def inputs(B, T, dtype):
    rngs = jax.random.split(jax.random.key(0), 3)
    shape = (B, T, FLAGS.heads, FLAGS.head_dim)
    return tuple(jax.random.normal(r, shape, jnp.float32).astype(dtype) for r in rngs)


def main(_):
    dtype = jnp.dtype(FLAGS.dtype)
    if FLAGS.long_context:
        args = inputs(1, FLAGS.long_context, dtype)
        run = compiled(PATHS["kit_chunked"], "fwd+bwd", True, args)
        start = time.perf_counter()  # compiled already: one run is the measurement
        jax.block_until_ready(run(*args))
        seconds = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"B=1 T={FLAGS.long_context} N={FLAGS.heads} H={FLAGS.head_dim} {FLAGS.dtype} causal "
            f"fwd+bwd chunked: {seconds:.1f} s, peak process memory {peak_gib:.2f} GiB"
        )
        return
    peak = matmul_peak(dtype)
    blocks = block_matmul_rate(dtype)
    (units, bq, bk), H = BLOCKS, FLAGS.head_dim
    lines = [
        f"{jax.devices()[0].device_kind}, matmul peak {peak:.0f} GFLOP/s ({FLAGS.dtype}); "
        f"B={FLAGS.batch} N={FLAGS.heads} H={FLAGS.head_dim}; the chunked forward's block "
        f"products ({units} x [{bq}, {H}] x [{H}, {bk}], then x [{bk}, {H}]) run at "
        f"{blocks:.0f} GFLOP/s ({100 * blocks / peak:.0f}% of peak)",
        "",
        "| T | causal | mode | path | median ms | vs jax.nn | GFLOP/s | % peak | XLA MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    results = []
    for T in map(int, FLAGS.lengths):
        args = inputs(FLAGS.batch, T, dtype)
        scores_gib = FLAGS.batch * FLAGS.heads * T * T * 4 / 2**30
        for causal in (c == "true" for c in FLAGS.causal):
            for mode in FLAGS.modes:
                flops = 4 * FLAGS.batch * FLAGS.heads * T * T * FLAGS.head_dim
                flops *= (0.5 if causal else 1.0) * (3.5 if mode == "fwd+bwd" else 1.0)
                # Compile every path first, then time each in a block of consecutive runs
                # (a steady state, as in a training loop) after one untimed run; two
                # rounds in opposite orders even out the machine's drift between paths.
                runs, rows = {}, {}
                for name in sorted(FLAGS.impls, key=lambda n: n != "jax_nn"):
                    if name != "kit_chunked" and scores_gib > FLAGS.max_scores_gib:
                        skip = f"skipped: {scores_gib:.0f} GiB scores"
                        rows[name] = f"| {T} | {causal} | {mode} | {name} | {skip}"
                    else:
                        runs[name] = compiled(PATHS[name], mode, causal, args)
                times = {name: [] for name in runs}
                for order in (list(runs), list(runs)[::-1]):
                    for name in order:
                        jax.block_until_ready(runs[name](*args))  # untimed
                        for _ in range(FLAGS.repeats):
                            start = time.perf_counter()
                            jax.block_until_ready(runs[name](*args))
                            times[name].append(time.perf_counter() - start)
                seconds = {name: float(np.median(t)) for name, t in times.items()}
                base = seconds.get("jax_nn")
                for name, run in runs.items():
                    memory = run.memory_analysis()
                    mib = (
                        memory.temp_size_in_bytes
                        + memory.argument_size_in_bytes
                        + memory.output_size_in_bytes
                    ) / 2**20
                    ratio = f"{base / seconds[name]:.2f}x" if base else "-"
                    gflops = flops / seconds[name] / 1e9
                    results.append((T, causal, mode, name, seconds[name]))
                    rows[name] = (
                        f"| {T} | {causal} | {mode} | {name} | {seconds[name] * 1e3:.0f} | {ratio} "
                        f"| {gflops:.1f} | {100 * gflops / peak:.0f}% | {mib:.0f} |"
                    )
                for name in sorted(rows, key=lambda n: n != "jax_nn"):
                    lines.append(rows[name])
                    print(rows[name], flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if FLAGS.plot:
        plot(results)


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for name in FLAGS.impls:
            for causal, style in ((True, "-"), (False, "--")):
                pts = [
                    (T, s * 1e3) for T, c, m, n, s in results if (c, m, n) == (causal, mode, name)
                ]
                if pts:
                    ax.loglog(
                        *zip(*pts, strict=True), style, marker="o", label=f"{name} causal={causal}"
                    )
        lengths = sorted({T for T, *_ in results})
        ax.set_xticks(lengths, [str(T) for T in lengths])
        ax.minorticks_off()
        ax.set(title=mode, xlabel="T", ylabel="median ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FLAGS.plot, dpi=100)


if __name__ == "__main__":
    app.run(main)
