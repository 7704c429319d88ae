"""The chunked forward's causal diagonal in steps of DIAGONAL_KEYS keys against steps of
a whole key block, side by side in one process.

    python experiments/bench_diagonal.py
    python experiments/bench_diagonal.py --shapes=4x1024x8,4x2048x8 --modes=fwd

For each shape (B x T x K, T = S, N=8, H=64, causal, float32, default block sizes) the
kernel is traced twice: once as it is (`kit.attention.flash_forward.DIAGONAL_KEYS`, used
where `diagonal_keys` chooses it: one query block) and once with the diagonal's steps
as long as a key block (the constant set past any block size: the kernel before the
finer steps). Each is compiled once and run --repeats times, alternating (each first in
turn), after a warm-up;
the table gives each one's median and fastest run, its share of the highest matmul peak
measured before and after (B T^2 N H FLOPs, halved for causal; 3.5x for
forward+backward), the speed-up (block steps' time over finer steps'), and the largest
difference between the two results (float32 rounding: the steps add in another order).
"""

import functools

import jax
import numpy as np
from absl import app, flags
from benchtools import (
    alternating_times,
    compiled_pass,
    cpu_model,
    largest_difference,
    matmul_peak,
)

import kit
from kit.attention import flash_forward

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "shapes",
    ["4x256x8", "4x512x8", "4x512x2", "4x512x1", "16x512x8", "4x1024x8", "4x2048x8"],
    "B x T x K (key/value heads) shapes; N=8 query heads, H=64.",
)
flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "Forward and/or forward+backward.")
flags.DEFINE_integer("repeats", 9, "Timed runs of each variant (alternating).")

N, H = 8, 64
BLOCK_STEPS = 1 << 30  # past any block size: diagonal_keys falls back to block_k


def compiled(mode, diagonal_keys, q, k, v):
    """The pass, traced and compiled with DIAGONAL_KEYS = `diagonal_keys`."""
    saved = flash_forward.DIAGONAL_KEYS
    flash_forward.DIAGONAL_KEYS = diagonal_keys
    try:
        attend = functools.partial(kit.chunked_attention, is_causal=True)
        return compiled_pass(attend, mode, q, k, v)
    finally:
        flash_forward.DIAGONAL_KEYS = saved


def main(_):
    peak = matmul_peak(5)
    print(f"{cpu_model()}; N={N} H={H} causal, float32, default blocks; medians of {FLAGS.repeats}")
    print(
        "| B | T | K | pass | finer steps ms (fastest) | % of peak | block steps ms (fastest) "
        "| % of peak | speed-up (median, fastest) | max diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in FLAGS.shapes:
        B, T, K = map(int, shape.split("x"))
        rngs = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(rngs[0], (B, T, N, H))
        k, v = (jax.random.normal(r, (B, T, K, H)) for r in rngs[1:])
        for mode in FLAGS.modes:
            runs = {
                "finer": compiled(mode, flash_forward.DIAGONAL_KEYS, q, k, v),
                "block": compiled(mode, BLOCK_STEPS, q, k, v),
            }
            diff = largest_difference(runs["finer"](q, k, v), runs["block"](q, k, v))
            times = alternating_times(runs, q, k, v, repeats=FLAGS.repeats)
            rows.append((B, T, K, mode, times, diff))
    peak = max(peak, matmul_peak(5))
    for B, T, K, mode, times, diff in rows:
        work = 4 * B * N * T * T * H * 0.5 * (1 if mode == "fwd" else 3.5)
        med = {name: float(np.median(t)) for name, t in times.items()}
        low = {name: min(t) for name, t in times.items()}
        cells = [
            f"{med[name] * 1e3:.1f} ({low[name] * 1e3:.1f}) | {work / low[name] / 1e9 / peak:.0%}"
            for name in ("finer", "block")
        ]
        speedup = f"{med['block'] / med['finer']:.2f}x, {low['block'] / low['finer']:.2f}x"
        print(f"| {B} | {T} | {K} | {mode} | {' | '.join(cells)} | {speedup} | {diff:.1e} |")
    print(f"matmul peak {peak:.0f} GFLOP/s (the highest of two measurements)")


if __name__ == "__main__":
    app.run(main)
