"""The chunked kernel against PyTorch's scaled_dot_product_attention, in the same run.

    python experiments/bench_torch.py --torch_python=/tmp/torchenv/bin/python
    python experiments/bench_torch.py --torch_python=... --lengths=2048 --kv_heads=8

Issue 40, item 3: where users are. For each T in --lengths, causal and not, each K in
--kv_heads (K = N is multi-head, K < N grouped-query), forward and forward+backward, the
kit's `dot_product_attention(implementation="chunked")` and PyTorch's SDPA (on the CPU,
its flash kernel) on the same shapes: q `[B, T, N, H]`, k and v `[B, T, K, H]` (the kit's
layout; SDPA gets its own head-major layout), float32. Each row prints both medians, the
kit's speed-up over SDPA (SDPA's time over the kit's) and the kit's useful products as a
share of the matmul peak measured in the same run (the highest of the measurements
before, between and after the rows). FLOPs count 4 B N T^2 H for a forward (half of it
causal) and 3.5 times that for forward+backward.

PyTorch is never a dependency: it runs in its own environment (torch_sdpa_worker.py says
how to make one), started once as a subprocess that waits on its stdin while the kit
runs, so the two never share the cores. Each row alternates: the kit, then SDPA. Without
--torch_python the SDPA columns are empty. At T >= --long_from only causal rows with
K = N run (the others take minutes each), and B is 1 from --long_batch_from on.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchtools import Torch, cpu_model, matmul_peak, median_seconds

import kit
from kit.attention import cpu_kernels

FLAGS = flags.FLAGS
flags.DEFINE_string("torch_python", "", "Python of an environment with torch (no torch: '').")
flags.DEFINE_list("lengths", ["512", "2048", "8192", "32768"], "Sequence lengths T (= S).")
flags.DEFINE_list("kv_heads", ["8", "2"], "Key/value heads K (each divides N).")
flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
flags.DEFINE_integer("batch", 4, "B below --long_batch_from.")
flags.DEFINE_integer("long_batch_from", 8192, "From this T on, B = 1.")
flags.DEFINE_integer("long_from", 32768, "From this T on, only causal rows with K = N.")
flags.DEFINE_integer("heads", 8, "Query heads N.")
flags.DEFINE_integer("head_dim", 64, "H.")
flags.DEFINE_bool(
    "jax_kernel", True, "Also time the chunked path's jax.numpy kernel (flash_disabled)."
)
flags.DEFINE_integer("repeats", 5, "Timed runs per cell below T = 8192 (the median is given).")


def repeats_for(T: int) -> int:
    return FLAGS.repeats if T < 8192 else (3 if T < 32768 else 1)


def kit_seconds(B, T, N, K, H, causal, mode, repeats) -> float:
    """The median of `repeats` runs of the chunked path (after an untimed one)."""
    rng = np.random.default_rng(0)
    q = jax.device_put(rng.standard_normal((B, T, N, H), np.float32))
    k, v = (jax.device_put(rng.standard_normal((B, T, K, H), np.float32)) for _ in range(2))

    def forward(q, k, v):
        return kit.dot_product_attention(q, k, v, is_causal=causal, implementation="chunked")

    if mode == "fwd":
        run = jax.jit(forward)
    else:
        cotangent = jax.device_put(rng.standard_normal((B, T, N, H), np.float32))
        run = jax.jit(
            jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) * cotangent), argnums=(0, 1, 2))
        )
    return median_seconds(run, q, k, v, repeats=repeats)


def main(_):
    N, H = FLAGS.heads, FLAGS.head_dim
    kv_heads = [int(k) for k in FLAGS.kv_heads]
    for K in kv_heads:
        if K < 1 or N % K:
            raise SystemExit(f"--kv_heads: {K} does not divide --heads={N}")
    for mode in FLAGS.modes:
        if mode not in ("fwd", "fwd_bwd"):
            raise SystemExit(f"--modes: {mode!r} is neither fwd nor fwd_bwd")
    long_batch_from, long_from = FLAGS.long_batch_from, FLAGS.long_from
    torch = Torch(FLAGS.torch_python)
    peaks = [matmul_peak()]
    rows = []
    for T in (int(t) for t in FLAGS.lengths):
        long = long_from <= T
        B = 1 if long_batch_from <= T else FLAGS.batch
        for causal in (True, False):
            for K in kv_heads:
                if long and (not causal or K != N):
                    continue
                for mode in FLAGS.modes:
                    case = dict(B=B, T=T, N=N, K=K, H=H, causal=causal, mode=mode)
                    repeats = repeats_for(T)
                    ours = kit_seconds(**case, repeats=repeats)
                    plain = None
                    if FLAGS.jax_kernel:
                        with cpu_kernels.flash_disabled():
                            plain = kit_seconds(**case, repeats=repeats)
                    theirs = torch.seconds(**case, repeats=repeats)
                    theirs = None if theirs is None else float(np.median(theirs))
                    flops = 4 * B * N * T * T * H * (0.5 if causal else 1.0)
                    flops *= 3.5 if mode == "fwd_bwd" else 1.0
                    rows.append((case, ours, plain, theirs, flops))
                    print(f"  measured {case}: kit {ours * 1e3:.1f} ms", file=sys.stderr)
        peaks.append(matmul_peak())
    torch.close()
    peak = max(peaks)
    print(f"{cpu_model()}; {jax.__version__=}; {torch.version}")
    print(f"matmul peak {peak:.0f} GFLOP/s (measurements {', '.join(f'{p:.0f}' for p in peaks)})")
    print()
    print(
        "| B | T | causal | K | pass | kit chunked ms | % of peak | jax.numpy kernel ms "
        "| % of peak | SDPA ms | kit vs SDPA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case, ours, plain, theirs, flops in rows:
        share = 100 * flops / ours / 1e9 / peak
        sdpa = "" if theirs is None else f"{theirs * 1e3:.1f}"
        ratio = "" if theirs is None else f"{theirs / ours:.2f}x"
        jnp_ms = "" if plain is None else f"{plain * 1e3:.1f}"
        jnp_share = "" if plain is None else f"{100 * flops / plain / 1e9 / peak:.0f}%"
        print(
            f"| {case['B']} | {case['T']} | {case['causal']} | {case['K']} | {case['mode']} "
            f"| {ours * 1e3:.1f} | {share:.0f}% | {jnp_ms} | {jnp_share} | {sdpa} | {ratio} |"
        )


if __name__ == "__main__":
    app.run(main)
