"""The chunked path's default block sizes at lengths that are not multiples of 512,
against the sizes chosen before, side by side in one process.

    python experiments/bench_blocks.py
    python experiments/bench_blocks.py --lengths=520,768 --causal=true --modes=fwd

Before, each pass took `(min(512, T8), min(256, S8))` (forward) and
`(min(256, T8), min(512, S8))` (backward), T8 the length rounded up to a multiple of 8,
and the padded length was a multiple of both passes' sizes: T = 384 ran padded to 768,
T = 513..1023 to 1024, with every block masked (padding ended the structural path).
Now lengths up to 768 that are not multiples of 512 are one block where a pass keeps
that axis whole (`kit.attention.blocks.default_block_sizes`), and causal attention with
T == S keeps its structural path when padded (`kit.attention.chunked.padding_is_unseen`).

For each length (B=4, N=8, H=64, float32, T = S) the script compiles the chunked path
with the default sizes ("now"), with the earlier rule's sizes and padding rule ("before":
the sizes passed explicitly, `padding_is_unseen` off while tracing), and kit's xla path,
and runs them --repeats times, alternating (each first in turn), after a warm-up. The
table gives medians (fastest), the speed-up of now over before, now's share of the
matmul peak measured before and after (B T^2 N H FLOPs, halved for causal, 3.5x for
forward+backward), and the largest difference between now's and before's results.
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
from kit.attention import chunked

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["300", "384", "520", "640", "768", "1000"], "Lengths T = S.")
flags.DEFINE_list("causal", ["true", "false"], "Causal settings.")
flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "Forward and/or forward+backward.")
flags.DEFINE_integer("repeats", 7, "Timed runs of each path (alternating).")

B, N, H = 4, 8, 64


def earlier_sizes(T: int, S: int) -> dict:
    """The sizes the earlier rule chose, as keyword arguments of kit.chunked_attention."""
    t8, s8 = -(-T // 8) * 8, -(-S // 8) * 8
    return dict(
        block_q=min(512, t8),
        block_k=min(256, s8),
        backward_block_q=min(256, t8),
        backward_block_k=min(512, s8),
    )


def compiled(attend, mode, q, k, v, *, before=False):
    """The pass compiled, with `padding_is_unseen` off while tracing where `before`."""
    saved = chunked.padding_is_unseen
    if before:
        chunked.padding_is_unseen = lambda *_: False
    try:
        return compiled_pass(attend, mode, q, k, v)
    finally:
        chunked.padding_is_unseen = saved


def main(_):
    peak = matmul_peak(5)
    print(f"{cpu_model()}; B={B} N={N} H={H}, T = S, float32; medians of {FLAGS.repeats}")
    rows = []
    for T in map(int, FLAGS.lengths):
        rngs = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(r, (B, T, N, H)) for r in rngs)
        for causal in (c == "true" for c in FLAGS.causal):
            for mode in FLAGS.modes:
                attend = functools.partial(kit.chunked_attention, is_causal=causal)
                earlier = functools.partial(attend, **earlier_sizes(T, T))
                xla = functools.partial(
                    kit.dot_product_attention, is_causal=causal, implementation="xla"
                )
                runs = {
                    "now": compiled(attend, mode, q, k, v),
                    "before": compiled(earlier, mode, q, k, v, before=True),
                    "xla": compiled(xla, mode, q, k, v),
                }
                diff = largest_difference(runs["now"](q, k, v), runs["before"](q, k, v))
                times = alternating_times(runs, q, k, v, repeats=FLAGS.repeats)
                rows.append((T, causal, mode, times, diff))
    peak = max(peak, matmul_peak(5))
    print(
        "| T | causal | pass | now ms (fastest) | before ms (fastest) | now vs before "
        "| xla ms | now vs xla | now % of peak | max diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T, causal, mode, times, diff in rows:
        med = {name: float(np.median(t)) for name, t in times.items()}
        low = {name: min(t) for name, t in times.items()}
        work = 4 * B * N * T * T * H * (0.5 if causal else 1) * (1 if mode == "fwd" else 3.5)
        print(
            f"| {T} | {causal} | {mode} | {med['now'] * 1e3:.1f} ({low['now'] * 1e3:.1f}) "
            f"| {med['before'] * 1e3:.1f} ({low['before'] * 1e3:.1f}) "
            f"| {med['before'] / med['now']:.2f}x | {med['xla'] * 1e3:.1f} "
            f"| {med['xla'] / med['now']:.2f}x | {work / med['now'] / 1e9 / peak:.0%} "
            f"| {diff:.1e} |"
        )
    print(f"matmul peak {peak:.0f} GFLOP/s (the higher of two measurements)")


if __name__ == "__main__":
    app.run(main)
