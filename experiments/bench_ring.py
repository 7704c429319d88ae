"""Ring attention against single-device chunked attention: time and per-device memory.

    python experiments/bench_ring.py                       # T = 4096 to 32768, causal fwd+bwd
    python experiments/bench_ring.py --lengths=4096 --causal=false --repeats=5

Runs on --devices simulated CPU devices (XLA_FLAGS is set before jax is
imported). For each T it compiles forward+backward of `kit.ring_attention`
over a ring of all the devices and of `kit.chunked_attention` on one device,
then prints a markdown table: the median seconds of --repeats runs after an
untimed one, and the memory XLA plans per device for the compiled program
(arguments + outputs + scratch), with the ring's ratios to one device. The
simulated devices share this machine's cores, so the ring cannot be faster
here (it does the same work plus the transfers and merges); the point is the
memory per device.
"""

import os
import sys

DEVICES = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import kit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"], "Lengths T = S.")
flags.DEFINE_integer("devices", 8, "Simulated devices on the ring.")
flags.DEFINE_bool("causal", True, "Causal attention.")
flags.DEFINE_integer("batch", 1, "B.")
flags.DEFINE_integer("heads", 8, "N (= K).")
flags.DEFINE_integer("head_dim", 64, "H.")
flags.DEFINE_integer("repeats", 3, "Timed runs per cell (the median is reported).")


def fwd_bwd(attention):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def mib(compiled):
    memory = compiled.memory_analysis()
    total = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    return total / 2**20


def median_seconds(run, args):
    jax.block_until_ready(run(*args))  # untimed
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(_):
    mesh = jax.make_mesh((FLAGS.devices,), ("ring",), (AxisType.Auto,))
    causal = FLAGS.causal
    paths = {
        "chunked, 1 device": lambda q, k, v: kit.chunked_attention(q, k, v, is_causal=causal),
        f"ring, {FLAGS.devices} devices": lambda q, k, v: kit.ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", is_causal=causal
        ),
    }
    print(
        f"{jax.devices()[0].device_kind} x {len(jax.devices())} simulated on {os.cpu_count()} "
        f"cores; B={FLAGS.batch} N={FLAGS.heads} H={FLAGS.head_dim} float32 causal={causal} "
        f"fwd+bwd; median of {FLAGS.repeats} runs\n"
    )
    print("| T | path | median s | vs 1 device | MiB per device | vs 1 device |")
    print("|---|---|---|---|---|---|")
    for T in map(int, FLAGS.lengths):
        shape = (FLAGS.batch, T, FLAGS.heads, FLAGS.head_dim)
        rngs = jax.random.split(jax.random.key(0), 3)
        args = [jax.random.normal(r, shape, jnp.float32) for r in rngs]
        base = None
        for name, attention in paths.items():
            run = fwd_bwd(attention).lower(*args).compile()
            seconds, memory = median_seconds(run, args), mib(run)
            base = base or (seconds, memory)
            print(
                f"| {T} | {name} | {seconds:.2f} | {seconds / base[0]:.2f}x | {memory:.0f} "
                f"| {memory / base[1]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
