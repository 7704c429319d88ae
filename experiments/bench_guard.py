"""The one-minute speed guard: ratios that do not depend on the CPU's speed, against a
committed baseline for this CPU.

    python experiments/bench_guard.py            # compare with the baseline; exit 1 on a fall
    python experiments/bench_guard.py --update   # measure and write this CPU's baseline

One process measures, side by side (B=1, T=2048, N=8, H=64, float32, causal):

- the matmul peak (the fastest of --peak_tries=5 runs of a 2048^3 matmul, measured 8 times);
- the chunked path's forward and forward+backward as a share of that peak (FLOPs:
  4 B N T^2 H forward, 3.5x for forward+backward, causal counting half);
- the chunked path's speed-up over jax.nn.dot_product_attention(implementation="xla"),
  forward and forward+backward;
- flex_attention's ALiBi (a score function on a causal block mask) and 8 causal
  documents (a block mask from segment ids): their speed-up over jax.nn's plain causal,
  forward+backward. (They were plain causal's time on the chunked path over theirs until
  the chunked passes were compiled on a CPU: flex programs keep the jax.numpy kernel, so
  each gain of the compiled kernel read as a fall of flex. jax.nn is a reference that no
  change to the kit moves.)
- a decode step (one query per example against a cache, B=8, S=4096, K=N=8): the
  compiled kernel `implementation=None` runs (kit.attention.cpu_kernels) against the
  jax.numpy products it replaced (few_queries.products), its speed-up. Where the kernel
  was not built, None runs the products and this figure falls to about 1.

Each path runs in blocks of consecutive runs (a block lasts --block_seconds, 2 runs at
least), in --rounds rounds of alternating order, the matmul peak measured again after each
round. A figure is computed from each path's fastest run and the highest peak, which a
noisy machine disturbs less than medians (printed too: noise only ever adds time). So no
untimed run starts a block: the first run after another path may pay for re-faulting the
memory that path released (bench_attention.py measured it), and the fastest is a later
one. --update stores the median figures of
--update_runs measurements. Every figure is "higher is better".

The baseline file (bench_guard_baseline.json beside this script) holds one entry per CPU
model (its name and widest vector extension, "AMD EPYC, AVX2": one name is sold with and
without AVX-512, and the ratios differ between them) and matmul peak: an entry applies
when the model matches and the peak measured now is within --peak_band (a factor) of the
entry's; its figures are then compared, and any that fell more than --tolerance below its
baseline is named and the exit status is 1.
When a figure falls, the guard measures again and fails only on figures that fell in both
measurements, each taken at the better of the two: noise only ever adds time, and on a
busy machine one measurement read the forward 17% low on unchanged code (--noconfirm fails
on the first measurement). The second measurement times only the passes (forward,
forward+backward) whose figures fell, with the programs the first compiled, in
--confirm_rounds=2 rounds. A passing run takes one measurement.
With no entry for this CPU the guard says so and exits 0 (run --update to add one).
--update measures and rewrites this CPU's entry, keeping the others.

--drill_slowdown=0.2 is the guard's own fire drill: it adds a host-side wait of 20% of
each run's time to that run, but jax.nn's and the decode products' (the references), as a
kernel 20% slower would; the guard must then fail. It never changes what the kit computes.
"""

import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchtools import cpu_model, matmul_peak

import kit
from kit import mods
from kit.attention import cpu_kernels, few_queries
from kit.attention.inputs import check_inputs

FLAGS = flags.FLAGS
flags.DEFINE_bool("update", False, "Rewrite this CPU's baseline entry with this run.")
flags.DEFINE_string(
    "baseline",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_guard_baseline.json"),
    "The baseline file.",
)
flags.DEFINE_float("tolerance", 0.15, "Fail when a figure falls more than this below baseline.")
flags.DEFINE_float("peak_band", 1.3, "An entry applies within this factor of its peak.")
flags.DEFINE_integer("rounds", 4, "Rounds over the paths, in alternating order.")
flags.DEFINE_float("block_seconds", 0.4, "Time each path's block of runs takes (2 runs at least).")
flags.DEFINE_integer("peak_tries", 5, "Runs of each matmul peak measurement (8 per measurement).")
flags.DEFINE_integer("update_runs", 3, "--update stores the median of this many measurements.")
flags.DEFINE_float(
    "drill_slowdown", 0.0, "Fire drill: slow each run but jax.nn's and the products' by this share."
)
flags.DEFINE_bool("confirm", True, "On a fall, measure again; fail only if both show it.")
flags.DEFINE_integer("confirm_rounds", 2, "Rounds of the measurement that confirms a fall.")

B, T, N, H = 1, 2048, 8, 64
FORWARD_FLOPS = 4 * B * N * T * T * H / 2  # causal: half the scores
DECODE_B, DECODE_S = 8, 4096  # one query per example, K = N heads in the cache


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paths():
    """name -> f(q, k, v), each causal at T."""
    causal = kit.create_block_mask(mods.causal, None, None, T, T)
    segments = jnp.broadcast_to(jnp.arange(T) // (T // 8), (B, T))
    documents = kit.create_block_mask(
        kit.and_masks(mods.causal, mods.documents(segments)), B, None, T, T
    )
    return {
        "chunked": lambda q, k, v: kit.dot_product_attention(
            q, k, v, is_causal=True, implementation="chunked"
        ),
        "jax_nn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"
        ),
        "flex_alibi": lambda q, k, v: kit.flex_attention(
            q, k, v, mods.alibi(N), causal, implementation="chunked"
        ),
        "flex_documents": lambda q, k, v: kit.flex_attention(
            q, k, v, None, documents, implementation="chunked"
        ),
        "decode_kernel": lambda q, k, v: kit.dot_product_attention(q, k, v),
        "decode_products": lambda q, k, v: few_queries.products(check_inputs(q, k, v))[0],
    }


@functools.cache
def inputs(mode: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v, the same for every measurement of a run: `[B, T, N, H]` each, or for
    the decode step q `[8, 1, N, H]` and a cache `[8, 4096, N, H]`."""
    rng = np.random.default_rng(0)
    if mode == "decode":
        shapes = [(DECODE_B, 1, N, H)] + [(DECODE_B, DECODE_S, N, H)] * 2
    else:
        shapes = [(B, T, N, H)] * 3
    return tuple(jax.device_put(rng.standard_normal(shape, np.float32)) for shape in shapes)


def compiled(fn, mode, args):
    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(fn if mode in ("fwd", "decode") else fwd_bwd).lower(*args).compile()


def timed_runs(runs, args, slowdown, rounds):
    """Seconds of every timed run of each compiled function: `rounds` rounds, in
    alternating order, each path a block of runs (--block_seconds, at least 2; the
    first of a block may pay for memory another path released, the figures take each
    path's fastest); the matmul peak measured again after each round (the fastest of
    --peak_tries runs)."""
    times = {name: [] for name in runs}
    peaks = []
    for r in range(rounds):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            block_start, count = time.perf_counter(), 0
            while count < 2 or time.perf_counter() - block_start < FLAGS.block_seconds:
                start = time.perf_counter()
                jax.block_until_ready(runs[name](*args))
                if name not in REFERENCES and slowdown:
                    time.sleep(slowdown * (time.perf_counter() - start))
                times[name].append(time.perf_counter() - start)
                count += 1
        peaks.append(matmul_peak(FLAGS.peak_tries))
    return times, peaks


MODES = {
    "fwd": ("chunked", "jax_nn"),
    "fwd+bwd": ("chunked", "jax_nn", "flex_alibi", "flex_documents"),
    "decode": ("decode_kernel", "decode_products"),
}
# The paths the figures are measured against: the fire drill never slows them.
REFERENCES = ("jax_nn", "decode_products")


def figure_mode(name: str) -> str:
    """The pass a figure is measured in: its paths' times and that pass's peaks."""
    if name.startswith("decode"):
        return "decode"
    return "fwd" if name.startswith("chunked fwd ") else "fwd+bwd"


def measure(
    slowdown: float = 0.0,
    modes=tuple(MODES),
    programs: dict | None = None,
    rounds: int | None = None,
) -> dict:
    """The guard's figures of the passes in `modes` (from each path's fastest run and
    the highest peak measured in those passes) and the medians beside them, over
    `rounds` rounds (default --rounds).

    `programs` keeps the compiled programs between calls (a confirming measurement
    times the same programs, compiled once)."""
    programs = {} if programs is None else programs
    times, peaks = {}, []
    missing = [
        (name, mode) for mode in modes for name in MODES[mode] if (name, mode) not in programs
    ]
    if missing:
        fns = paths()
        programs.update(
            {(name, mode): compiled(fns[name], mode, inputs(mode)) for name, mode in missing}
        )
    for mode in modes:
        runs = {name: programs[name, mode] for name in MODES[mode]}
        mode_times, mode_peaks = timed_runs(runs, inputs(mode), slowdown, rounds or FLAGS.rounds)
        times.update({f"{name} {mode}": t for name, t in mode_times.items()})
        peaks += mode_peaks
    peak = max(peaks)
    best = {k: min(t) for k, t in times.items()}
    flops = {"fwd": FORWARD_FLOPS, "fwd+bwd": 3.5 * FORWARD_FLOPS}
    figures = {}
    for mode in [m for m in modes if m != "decode"]:
        chunked = best[f"chunked {mode}"]
        figures[f"chunked {mode} % of peak"] = 100 * flops[mode] / chunked / 1e9 / peak
        figures[f"chunked {mode} speed-up over jax.nn"] = best[f"jax_nn {mode}"] / chunked
    if "fwd+bwd" in modes:
        for name in ("flex_alibi", "flex_documents"):
            figures[f"{name} fwd+bwd speed-up over jax.nn"] = (
                best["jax_nn fwd+bwd"] / best[f"{name} fwd+bwd"]
            )
    if "decode" in modes:
        figures["decode kernel speed-up over the products"] = (
            best["decode_products decode"] / best["decode_kernel decode"]
        )
    return {
        "peak_gflops": peak,
        "peaks": peaks,
        "figures": figures,
        "runs": {k: len(t) for k, t in times.items()},
        "best_ms": {k: 1e3 * v for k, v in best.items()},
        "median_ms": {k: 1e3 * float(np.median(t)) for k, t in times.items()},
    }


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise SystemExit(f"--baseline: {path} is not a guard baseline (no 'entries' list)")
    return data["entries"]


def matching(entries: list[dict], model: str, peak: float) -> dict | None:
    """The entry for this CPU model whose peak is nearest this run's, within the band."""
    near = [
        e
        for e in entries
        if e["cpu"] == model and abs(math.log(peak / e["peak_gflops"])) <= math.log(FLAGS.peak_band)
    ]
    return min(near, key=lambda e: abs(math.log(peak / e["peak_gflops"])), default=None)


def print_times(run: dict) -> None:
    print(
        f"B={B} T={T} N={N} H={H} float32 causal; decode B={DECODE_B} T=1 S={DECODE_S}; "
        "ms, fastest (median):"
    )
    print(
        "  "
        + ", ".join(
            f"{k} {v:.0f} ({run['median_ms'][k]:.0f}, {run['runs'][k]} runs)"
            for k, v in run["best_ms"].items()
        )
    )


def compare(figures: dict, base: dict) -> dict[str, str]:
    """Prints each figure against the baseline's; returns those that fell: name -> words."""
    fallen = {}
    for name, value in figures.items():
        if name not in base["figures"]:
            print(f"  {name}: {value:.3f} (not in the baseline)")
            continue
        ratio = value / base["figures"][name]
        bad = ratio < 1 - FLAGS.tolerance
        print(
            f"  {name}: {value:.3f} against {base['figures'][name]:.3f} "
            f"({100 * (ratio - 1):+.0f}%){'  FELL' if bad else ''}"
        )
        if bad:
            fallen[name] = f"{name} fell {100 * (1 - ratio):.0f}%"
    return fallen


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not 0 < FLAGS.tolerance < 1:
        raise app.UsageError(f"--tolerance must be in (0, 1), got {FLAGS.tolerance}")
    if FLAGS.peak_band < 1:
        raise app.UsageError(f"--peak_band is a factor >= 1, got {FLAGS.peak_band}")
    for name in ("rounds", "confirm_rounds", "peak_tries"):
        if FLAGS[name].value < 1:
            raise app.UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.drill_slowdown < 0:
        raise app.UsageError(f"--drill_slowdown must be >= 0, got {FLAGS.drill_slowdown}")
    if FLAGS.update and FLAGS.drill_slowdown:
        raise app.UsageError("--update with --drill_slowdown would store a drill as the baseline")
    entries = load(FLAGS.baseline)  # a broken file fails before a minute is spent
    start = time.perf_counter()
    model = cpu_model()
    programs = {}
    run = measure(FLAGS.drill_slowdown, programs=programs)
    if FLAGS.update:  # a typical run, not a lucky or an unlucky one
        more = [run] + [measure(programs=programs) for _ in range(FLAGS.update_runs - 1)]
        run = dict(run)
        run["figures"] = {
            k: float(np.median([m["figures"][k] for m in more])) for k in run["figures"]
        }
        run["peak_gflops"] = float(np.median([m["peak_gflops"] for m in more]))
    peak = run["peak_gflops"]
    how = (
        f"the median of {FLAGS.update_runs} measurements"
        if FLAGS.update
        else f"the highest of {len(run['peaks'])}, lowest {min(run['peaks']):.0f}"
    )
    print(f"{model}, {os.cpu_count()} CPUs, matmul peak {peak:.0f} GFLOP/s (float32; {how})")
    if FLAGS.update:
        print("the first measurement's times:")
    print_times(run)
    if FLAGS.drill_slowdown:
        print(f"fire drill: each kit run slowed by {100 * FLAGS.drill_slowdown:.0f}%")
    if not cpu_kernels.available():
        print("the compiled decode kernel is not built: None runs the products for a decode step")
    if FLAGS.update:
        entry = {
            "cpu": model,
            "peak_gflops": round(peak, 1),
            "figures": {k: round(v, 4) for k, v in run["figures"].items()},
            "measured": datetime.date.today().isoformat(),
            "commit": commit(),
            "jax": jax.__version__,
        }
        kept = [e for e in entries if e is not matching(entries, model, peak)]
        with open(FLAGS.baseline, "w") as f:
            json.dump({"entries": [*kept, entry]}, f, indent=2)
            f.write("\n")
        for name, value in run["figures"].items():
            print(f"  {name}: {value:.3f}")
        print(
            f"wrote this CPU's baseline to {FLAGS.baseline} ({time.perf_counter() - start:.0f} s)"
        )
        return 0
    base = matching(entries, model, peak)
    if base is None:
        for name, value in run["figures"].items():
            print(f"  {name}: {value:.3f}")
        print(
            f"no baseline for {model!r} near {peak:.0f} GFLOP/s in {FLAGS.baseline}; "
            "nothing compared (run with --update to add one)"
        )
        return 0
    print(f"baseline: {base['measured']} at commit {base['commit']}, peak {base['peak_gflops']}")
    fallen = compare(run["figures"], base)
    if fallen and FLAGS.confirm:
        # Noise only ever adds time, and on a busy machine one measurement can read a
        # figure 15-20% low (this guard failed so once on unchanged code): a fall counts
        # only if a second measurement shows it too, each figure at the better of the two.
        # The second times only the passes whose figures fell, with the same programs,
        # in fewer rounds: taking the better of the two, a shorter second measurement
        # can only rescue fewer false alarms, never pass a real fall more easily.
        modes = tuple(m for m in MODES if any(figure_mode(f) == m for f in fallen))
        print(f"a figure fell: measuring {' and '.join(modes)} again, a fall must show in both")
        again = measure(FLAGS.drill_slowdown, modes, programs, FLAGS.confirm_rounds)
        print_times(again)
        better = {k: max(v, again["figures"].get(k, v)) for k, v in run["figures"].items()}
        fallen = compare(better, base)
    took = time.perf_counter() - start
    if fallen:
        print(f"FAILED ({took:.0f} s): " + "; ".join(fallen.values()), file=sys.stderr)
        return 1
    print(f"ok ({took:.0f} s): no figure fell more than {100 * FLAGS.tolerance:.0f}%")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
