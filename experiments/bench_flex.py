"""Programmable attention's cost, side by side in one run: kit.flex_attention against
the built-in masks and against a dense bias.

    python experiments/bench_flex.py --out=docs/flex.md      # all tables
    python experiments/bench_flex.py --tables=cost --length=1024 --repeats=2   # a quick look

Tables (B=4, N=8, H=64 float32 unless said; medians of 2 x --repeats runs, each
path timed in a block of consecutive runs after an untimed one, in two rounds of
opposite order; ratios are against the first row of the table, measured in the
same run):

- cost: T=--length, causal; forward and forward+backward of the built-in
  `is_causal=True`, causal as a block mask, ALiBi and softcap as score functions
  on it, and ALiBi as the dense `[1, N, T, T]` bias the models used before;
- sparsity: T=--sparse_length, B=1, causal alone against causal and 8 documents
  (a block mask from segment ids), forward and forward+backward;
- memory: T=--long_length, B=1, causal + 8 documents + ALiBi forward+backward in
  a child process: its peak resident memory (VmHWM) and XLA's plan;
- peak: the matmul peak of this machine (the fastest of 10 runs of a 2048^3
  matmul) and the built-in causal forward+backward at T=--length as a share of it
  (FLOPs: 4 B N T^2 H forward, 3.5x for forward+backward, causal counting half).
"""

import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kit
from kit import mods

FLAGS = flags.FLAGS
flags.DEFINE_list("tables", ["peak", "cost", "sparsity", "memory"], "Tables to run.")
flags.DEFINE_integer("length", 2048, "T for the cost and peak tables.")
flags.DEFINE_integer("sparse_length", 8192, "T for the sparsity table.")
flags.DEFINE_integer("long_length", 32768, "T for the memory table.")
flags.DEFINE_integer("documents", 8, "Documents per row in the sparsity and memory tables.")
flags.DEFINE_integer("repeats", 3, "Timed runs per path and round.")
flags.DEFINE_string("out", None, "Also write the markdown tables to this file.")
flags.DEFINE_bool("child", False, "Internal: run the memory case and print its figures.")

N, H = 8, 64


def inputs(B, T):
    rngs = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(r, (B, T, N, H), jnp.float32) for r in rngs)


def documents_mask(B, T, docs):
    segments = jnp.broadcast_to(jnp.arange(T) // (T // docs), (B, T))
    return kit.and_masks(mods.causal, mods.documents(segments))


def paths(B, T):
    """name -> f(q, k, v): the variants of the cost table."""
    causal = kit.create_block_mask(mods.causal, None, None, T, T)
    slopes = kit.positional.alibi_slopes(N)
    dense_alibi = kit.positional.alibi_bias(N, T, T)[None]  # [1, N, T, T]
    return {
        "built-in is_causal": lambda q, k, v: kit.dot_product_attention(
            q, k, v, is_causal=True, implementation="chunked"
        ),
        "causal block mask": lambda q, k, v: kit.flex_attention(
            q, k, v, None, causal, implementation="chunked"
        ),
        "+ ALiBi score_mod": lambda q, k, v: kit.flex_attention(
            q, k, v, mods.alibi(slopes), causal, implementation="chunked"
        ),
        "+ softcap score_mod": lambda q, k, v: kit.flex_attention(
            q, k, v, mods.softcap(20.0), causal, implementation="chunked"
        ),
        "built-in causal + ALiBi dense bias": lambda q, k, v: kit.dot_product_attention(
            q, k, v, dense_alibi, is_causal=True, implementation="chunked"
        ),
    }


def compiled(fn, mode, args):
    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(fn if mode == "fwd" else fwd_bwd).lower(*args).compile()


def median_times(runs, args):
    """Median seconds per run of each compiled function, as the module docstring says."""
    times = {name: [] for name in runs}
    for order in (list(runs), list(runs)[::-1]):
        for name in order:
            jax.block_until_ready(runs[name](*args))
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                jax.block_until_ready(runs[name](*args))
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def temp_mib(run):
    return run.memory_analysis().temp_size_in_bytes / 2**20


def table(title, header, variants, args, modes):
    lines = [f"### {title}", "", header, "|---" * (header.count("|") - 1) + "|"]
    for mode in modes:
        runs = {name: compiled(fn, mode, args) for name, fn in variants.items()}
        seconds = median_times(runs, args)
        base = seconds[next(iter(runs))]
        for name, run in runs.items():
            lines.append(
                f"| {name} | {mode} | {seconds[name] * 1e3:.0f} | "
                f"{seconds[name] / base:.2f}x | {temp_mib(run):.0f} |"
            )
        print("\n".join(lines[-len(runs) :]), flush=True)
    return lines


def peak_table():
    a = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    best = min(_timed(matmul, a, a) for _ in range(10))
    peak = 2 * 2048**3 / best / 1e9
    T = FLAGS.length
    args = inputs(4, T)
    fn = paths(4, T)["built-in is_causal"]
    run = compiled(fn, "fwd+bwd", args)
    seconds = median_times({"causal": run}, args)["causal"]
    flops = 4 * 4 * N * T * T * H * 0.5 * 3.5
    rate = flops / seconds / 1e9
    return [
        "### The built-in path against this machine's matmul peak",
        "",
        "| matmul peak GFLOP/s | T | causal fwd+bwd ms | GFLOP/s | % of peak |",
        "|---|---|---|---|---|",
        f"| {peak:.0f} | {T} | {seconds * 1e3:.0f} | {rate:.0f} | {100 * rate / peak:.0f}% |",
    ]


def _timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def sparsity_table():
    T = FLAGS.sparse_length
    causal = kit.create_block_mask(mods.causal, None, None, T, T)
    docs = kit.create_block_mask(documents_mask(1, T, FLAGS.documents), None, None, T, T)
    variants = {
        "causal (block mask)": lambda q, k, v: kit.flex_attention(
            q, k, v, None, causal, implementation="chunked"
        ),
        f"causal + {FLAGS.documents} documents": lambda q, k, v: kit.flex_attention(
            q, k, v, None, docs, implementation="chunked"
        ),
        "built-in is_causal": lambda q, k, v: kit.dot_product_attention(
            q, k, v, is_causal=True, implementation="chunked"
        ),
    }
    header = "| variant | mode | median ms | vs first | XLA temp MiB |"
    title = f"Block sparsity: B=1, T={T}, N={N}, H={H}"
    return table(title, header, variants, inputs(1, T), ["fwd", "fwd+bwd"])


def memory_child():
    T = FLAGS.long_length
    slopes = kit.positional.alibi_slopes(N)

    @jax.jit
    def step(q, k, v):
        segments = (jnp.arange(T) // (T // FLAGS.documents))[None]
        mask = kit.and_masks(mods.causal, mods.documents(segments))
        block_mask = kit.create_block_mask(mask, None, None, T, T)

        def loss(q, k, v, slopes):
            out = kit.flex_attention(
                q, k, v, mods.alibi(slopes), block_mask, implementation="chunked"
            )
            return jnp.sum(out)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, slopes)

    args = inputs(1, T)
    run = step.lower(*args).compile()
    start = time.perf_counter()
    jax.block_until_ready(run(*args))
    seconds = time.perf_counter() - start
    print(f"RESULT {seconds:.1f} {peak_gib():.2f} {temp_mib(run):.0f}")


def peak_gib():
    """This process's peak resident memory: VmHWM, which starts anew at exec (ru_maxrss
    keeps the parent's peak at the fork that started this process)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_table():
    T = FLAGS.long_length
    command = [sys.executable, __file__, "--child", f"--long_length={T}"]
    command.append(f"--documents={FLAGS.documents}")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    seconds, rss, temp = line.split()[1:]
    inputs_mib = 3 * T * N * H * 4 / 2**20
    return [
        f"### Memory: B=1, T={T}, N={N}, H={H}, causal + {FLAGS.documents} documents + ALiBi",
        "",
        "| fwd+bwd s (one run) | peak process memory GiB | XLA temp MiB | q, k, v MiB |",
        "|---|---|---|---|",
        f"| {seconds} | {rss} | {temp} | {inputs_mib:.0f} |",
    ]


def main(_):
    if FLAGS.child:
        memory_child()
        return
    device = jax.devices()[0].device_kind
    lines = [f"Device: {device}, {jax.device_count()} device(s), jax {jax.__version__}", ""]
    print(lines[0], flush=True)
    if "peak" in FLAGS.tables:
        lines += [*peak_table(), ""]
        print("\n".join(lines[-3:]), flush=True)
    if "cost" in FLAGS.tables:
        T = FLAGS.length
        header = "| variant | mode | median ms | vs first | XLA temp MiB |"
        title = f"The cost of programming: B=4, T={T}, N={N}, H={H}, causal"
        lines += [*table(title, header, paths(4, T), inputs(4, T), ["fwd", "fwd+bwd"]), ""]
    if "sparsity" in FLAGS.tables:
        lines += [*sparsity_table(), ""]
    if "memory" in FLAGS.tables:
        lines += [*memory_table(), ""]
        print("\n".join(lines[-6:]), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
