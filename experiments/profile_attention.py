"""Where the chunked kernel's time goes: XLA's operations, timed by jax's profiler.

    python experiments/profile_attention.py                     # forward, B=4 T=2048 causal
    python experiments/profile_attention.py --pass=fwd_bwd
    python experiments/profile_attention.py --T=8192 --causal=false --top=30

Compiles `kit.chunked_attention` (the forward, or forward+backward of a loss that
weighs the output by q), runs it once untimed, then --repeats times under
`jax.profiler.trace`, and prints per call: the wall time, the matmul peak measured
in the same process, and a table of XLA's operations (thunks) by total time, each
with what it computes (the jax operation XLA's metadata names: an einsum's
subscripts, exp, a transpose) and, for products, its GFLOP/s and % of the peak.

Caveat: XLA:CPU runs independent operations of one program concurrently (the
backward's products of one block do not depend on each other), so operation times
can overlap and add up to more than the wall time.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchtools import matmul_peak, median_seconds

import kit

FLAGS = flags.FLAGS
flags.DEFINE_enum("pass", "fwd", ["fwd", "fwd_bwd"], "The forward, or forward+backward.")
flags.DEFINE_integer("B", 4, "Batch.")
flags.DEFINE_integer("T", 2048, "Length T = S.")
flags.DEFINE_integer("N", 8, "Heads (N = K).")
flags.DEFINE_integer("H", 64, "Head dim.")
flags.DEFINE_bool("causal", True, "Causal attention.")
flags.DEFINE_integer("repeats", 3, "Profiled calls.")
flags.DEFINE_integer("top", 20, "Operations shown.")


def _operations(hlo: str) -> dict[str, tuple[str, float]]:
    """Operation name -> (the jax operation its metadata names, its FLOPs if a
    product), from the optimized HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*%?([\w.\-]+) = (\S+) ", line)
        if not m:
            continue
        name = m.group(1)
        op = re.search(r'op_name="([^"]*)"', line)
        what = op.group(1).rsplit("/", 2)[-2:] if op else ["?"]
        what = "/".join(w for w in what if w)
        out[name] = (what, 0.0)
    # products: FLOPs from the fused dot's operand and result shapes
    for m in re.finditer(
        r"%(fused_computation[\w.]*) \(([^)]*)\) -> (\w+)\[([\d,]*)\][^{]*\{(.*?)\n\}", hlo, re.S
    ):
        body = m.group(5)
        dot = re.search(r"dot\(.*lhs_contracting_dims=\{(\d+)\}", body)
        if not dot:
            continue
        params = re.findall(r"\w+\[([\d,]*)\]", m.group(2))
        if not params:
            continue
        lhs = [int(d) for d in params[0].split(",") if d]
        result = [int(d) for d in m.group(4).split(",") if d]
        flops = 2 * np.prod(result) * lhs[int(dot.group(1))]
        for caller in re.finditer(rf"%([\w.\-]+) = [^\n]*calls=%{re.escape(m.group(1))}\b", hlo):
            what = out.get(caller.group(1), ("?", 0.0))[0]
            if what.endswith("dot_general"):
                out[caller.group(1)] = (what, float(flops))
    return out


def main(_):
    B, T, N, H = FLAGS.B, FLAGS.T, FLAGS.N, FLAGS.H
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)

    def forward(q, k, v):
        return kit.chunked_attention(q, k, v, is_causal=FLAGS.causal)

    if FLAGS["pass"].value == "fwd":
        fn = forward
    else:
        fn = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) * q), argnums=(0, 1, 2))
    compiled = jax.jit(fn).lower(q, k, v).compile()
    operations = _operations(compiled.as_text())
    jax.block_until_ready(compiled(q, k, v))
    peak = matmul_peak()
    wall = median_seconds(compiled, q, k, v, repeats=FLAGS.repeats)
    folder = tempfile.mkdtemp(prefix="kit-profile-")
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(FLAGS.repeats):
            jax.block_until_ready(compiled(q, k, v))
    (trace,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in operations:
            total[e["name"]] += e.get("dur", 0) / 1e3 / FLAGS.repeats  # ms per call
            count[e["name"]] += 1 / FLAGS.repeats
    useful = 4 * B * N * H * T * T * (0.5 if FLAGS.causal else 1.0)
    useful *= 1 if FLAGS["pass"].value == "fwd" else 3.5  # backward: 5 products, fwd: 2
    print(
        f"{FLAGS['pass'].value} B={B} T={T} N=K={N} H={H} causal={FLAGS.causal} float32: "
        f"{wall * 1e3:.1f} ms a call (median of {FLAGS.repeats}), "
        f"{useful / wall / 1e9:.0f} GFLOP/s of useful products = "
        f"{100 * useful / wall / 1e9 / peak:.0f}% of the matmul peak {peak:.0f} GFLOP/s\n"
    )
    print("| operation | computes | calls | ms a call | GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|")
    products = 0.0
    for name, ms in total.most_common(FLAGS.top):
        what, flops = operations[name]
        rate = ""
        if flops:
            gflops = flops * count[name] / (ms / 1e3) / 1e9
            rate = f"{gflops:.0f} ({100 * gflops / peak:.0f}%)"
        print(f"| {name} | {what} | {count[name]:.0f} | {ms:.1f} | {rate} |")
    for name, ms in total.items():
        products += ms if operations[name][1] else 0.0
    print(
        f"\nProducts in all: {products:.1f} ms a call of {wall * 1e3:.1f} "
        "(concurrent operations overlap: see the module docstring)"
    )


if __name__ == "__main__":
    app.run(main)
