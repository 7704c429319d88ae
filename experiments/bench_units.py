"""Examples per loop step of the chunked kernel: one example against batches of them.

    python experiments/bench_units.py                    # K = 1, 2, 4, 8 key/value heads
    python experiments/bench_units.py --kv_heads=2 --units=2,8 --modes=fwd_bwd

`units_per_step` sets how many (example, key/value head) pairs a loop step of the
chunked kernel takes: max(1, units // K) whole examples, batched by lax.map's vmap.
For each K, one process compiles the kernel once per setting and times them side by
side: --rounds rounds, each setting run 3 times a round, alternating, after a warm-up;
each setting's fastest run, as the share of the highest matmul peak measured between
rounds (B T^2 N H FLOPs, halved when causal; 3.5x for forward+backward) and as its
time over one example per step's.
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from benchtools import cpu_model, matmul_peak

import kit

FLAGS = flags.FLAGS
flags.DEFINE_integer("B", 4, "Batch.")
flags.DEFINE_integer("T", 2048, "Length T = S.")
flags.DEFINE_integer("N", 8, "Query heads.")
flags.DEFINE_list("kv_heads", ["1", "2", "4", "8"], "Key/value heads K (each divides N).")
flags.DEFINE_integer("H", 64, "Head dim.")
flags.DEFINE_bool("causal", True, "Causal attention.")
flags.DEFINE_list("units", ["0", "8"], "units_per_step settings; 0: K (one example a step).")
flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "Forward and/or forward+backward.")
flags.DEFINE_integer("rounds", 3, "Rounds of alternating runs.")


def main(_):
    B, T, N, H = FLAGS.B, FLAGS.T, FLAGS.N, FLAGS.H
    print(f"{cpu_model()}; B={B} T={T} N={N} H={H} causal={FLAGS.causal}, float32")
    flops = 4 * B * N * T * T * H * (0.5 if FLAGS.causal else 1)
    for K in map(int, FLAGS.kv_heads):
        rngs = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(rngs[0], (B, T, N, H))
        k, v = (jax.random.normal(r, (B, T, K, H)) for r in rngs[1:])
        for mode in FLAGS.modes:
            runs = {}
            for units in map(int, FLAGS.units):
                units = units or K

                def attend(q, k, v, units=units):
                    return kit.chunked_attention(
                        q, k, v, is_causal=FLAGS.causal, units_per_step=units
                    )

                if mode == "fwd":
                    runs[units] = jax.jit(attend)
                else:
                    loss = lambda q, k, v, f=attend: jnp.sum(f(q, k, v) * q)  # noqa: E731
                    runs[units] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                jax.block_until_ready(runs[units](q, k, v))
            best = dict.fromkeys(runs, float("inf"))
            peak = 0.0
            for _ in range(FLAGS.rounds):
                peak = max(peak, matmul_peak())
                for units, run in runs.items():
                    for _ in range(3):
                        start = time.perf_counter()
                        jax.block_until_ready(run(q, k, v))
                        best[units] = min(best[units], time.perf_counter() - start)
            work = flops * (1 if mode == "fwd" else 3.5)
            cells = [
                f"units {u} ({max(1, u // K)} ex.): {t * 1e3:.0f} ms, "
                f"{work / t / 1e9 / peak:.0%} of peak, {t / best[K]:.2f}x"
                for u, t in best.items()
            ]
            print(f"K={K} {mode} (peak {peak:.0f} GFLOP/s): " + " | ".join(cells))


if __name__ == "__main__":
    app.run(main)
