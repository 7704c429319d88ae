"""Context parallelism on simulated devices: memory per device, strategies' time, balance.

    python experiments/bench_context.py
    python experiments/bench_context.py --lengths=4096,16384 --time_length=4096

Runs on --devices simulated CPU devices (XLA_FLAGS is set before jax is imported)
and prints four markdown tables:

1. the attention's forward+backward (B=1, N=K=8, H=64, causal, float32): the
   memory XLA plans per device (arguments + outputs + scratch) for one device's
   chunked kernel and for `kit.attention.context.split_attention` with the
   sequence split over all devices (ring, ring with its heads in 4 groups,
   all-gather; rows in the zig-zag order), with the ratio to one device;
2. a decoder-only model's whole training step (the config below at row length
   T, batch 1): memory per device on one device and with mesh.seq = devices
   (ring, ring with 4 head groups, all-gather), and
   the largest T of --lengths under a --budget_mib per device, both ways;
3. the time of the attention's forward+backward at --time_length, ring against
   all-gather (median of --repeats after an untimed run);
4. the causal balance at --balance_length: live (query block, key block) pairs
   per device (`live_blocks_per_device`, blocks of 128), max over mean, with and
   without the zig-zag order.

The simulated devices share this machine's cores: their times say nothing about a
real interconnect, only how the two strategies' work compares here.
"""

import os
import sys

DEVICES = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from benchtools import cpu_model, median_seconds  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import kit  # noqa: E402
from kit import training  # noqa: E402
from kit.attention import context  # noqa: E402
from kit.training.config import default_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 8, "Simulated devices, all on the seq axis.")
flags.DEFINE_list("lengths", ["4096", "16384", "32768"], "Lengths T for the memory tables.")
flags.DEFINE_integer("budget_mib", 256, "Per-device memory budget for table 2, MiB.")
flags.DEFINE_integer("time_length", 8192, "T for table 3.")
flags.DEFINE_integer("balance_length", 16384, "T for table 4.")
flags.DEFINE_integer("repeats", 3, "Timed runs per cell (the median is reported).")

B, N, H = 1, 8, 64


def mib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20


def attention_grad(mesh, T, strategy, head_groups=1):
    """The jitted forward+backward of one attention call (loss: sum of the output),
    and its abstract arguments: on one device (strategy None) or split."""
    if strategy is None:
        shape = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(kit.chunked_attention(q, k, v, is_causal=True))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (shape,) * 3
    split = context.SequenceSplit(mesh, strategy, head_groups=head_groups)
    places = jnp.asarray(split.order(T, causal=True))[None]
    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    shape = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32, sharding=sharding)

    def loss(q, k, v):
        side = {"index": places, "positions": places}
        out = context.split_attention(split, q, k, v, q_side=side, k_side=side, causal=True)
        return jnp.sum(out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (shape,) * 3


STRATEGIES = {
    "one device (chunked)": (None, 1),
    "ring": ("ring", 1),
    "ring, heads in 4 groups": ("ring", 4),
    "all-gather": ("all_gather", 1),
}


def attention_memory(mesh, lengths):
    print(f"\n1. Attention forward+backward, B={B} N=K={N} H={H} causal float32: MiB per device\n")
    print("| T | " + " | ".join(STRATEGIES) + " |")
    print("|---|" + "---|" * len(STRATEGIES))
    for T in lengths:
        cells, base = [], None
        for strategy, groups in STRATEGIES.values():
            fn, args = attention_grad(mesh, T, strategy, groups)
            memory = mib(fn.lower(*args).compile())
            base = base or memory
            cells.append(
                f"{memory:.0f}" if strategy is None else f"{memory:.0f} ({memory / base:.2f}x)"
            )
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)


def model_config(T, seq, strategy, head_groups=1):
    """A decoder-only model on copy whose row [src, SEP, tgt] has T slots (2L + 1,
    padded to T by the split)."""
    config = default_config()
    config.task.name = "copy"
    config.task.length = (T - 2) // 2
    config.model.update(
        kind="decoder_only", d_model=256, num_heads=8, num_layers=2, d_ff=512, max_len=T,
        context_strategy=strategy, context_head_groups=head_groups,
    )  # fmt: skip
    config.train.batch_size = 1
    config.mesh.update(data=1, seq=seq, model=1)
    return config


def step_memory(config) -> float:
    s = training.setup(config)
    abstract = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state,
        s.state_shardings,
    )
    mb = training.steps.train_model_batch(s.task, s.kind, config.seed, 0, 1)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding) for k, v in mb.items()
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=s.replicated)
    step = jax.jit(s.trainer.train_step, out_shardings=(s.state_shardings, s.replicated))
    return mib(step.lower(abstract, batch, key).compile())


def training_memory(lengths, devices):
    print(
        "\n2. A decoder-only model's training step (d_model 256, 8 heads, 2 layers, batch 1): "
        f"MiB per device; budget {FLAGS.budget_mib} MiB\n"
    )
    ways = {
        "one device": (1, "all_gather", 1),
        f"seq={devices}, ring": (devices, "ring", 1),
        f"seq={devices}, ring, heads in 4 groups": (devices, "ring", 4),
        f"seq={devices}, all_gather": (devices, "all_gather", 1),
    }
    print("| T | " + " | ".join(ways) + " |")
    print("|---|" + "---|" * len(ways))
    fits = dict.fromkeys(ways, 0)
    for T in lengths:
        cells, base = [], None
        for name, (seq, strategy, groups) in ways.items():
            memory = step_memory(model_config(T, seq, strategy, groups))
            base = base or memory
            cells.append(f"{memory:.0f}" if seq == 1 else f"{memory:.0f} ({memory / base:.2f}x)")
            if memory <= FLAGS.budget_mib:
                fits[name] = max(fits[name], T)
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)
    print(
        f"\nLargest T of {[int(t) for t in lengths]} under {FLAGS.budget_mib} MiB per device: "
        + ", ".join(f"{name} {T or 'none'}" for name, T in fits.items())
    )


def strategy_time(mesh, T):
    print(f"\n3. Attention forward+backward at T={T} on the {mesh.shape['seq']} devices: seconds\n")
    print("| strategy | median s | vs all-gather |")
    print("|---|---|---|")
    rows = {}
    for name in ("all-gather", "ring", "ring, heads in 4 groups"):
        strategy, groups = STRATEGIES[name]
        fn, shapes = attention_grad(mesh, T, strategy, groups)
        keys = jax.random.split(jax.random.key(0), 3)
        args = [
            jax.device_put(jax.random.normal(k, s.shape, s.dtype), s.sharding)
            for k, s in zip(keys, shapes, strict=True)
        ]
        rows[name] = median_seconds(fn.lower(*args).compile(), *args, repeats=FLAGS.repeats)
        print(f"| {name} | {rows[name]:.2f} | {rows[name] / rows['all-gather']:.2f}x |", flush=True)


def balance(T, devices):
    print(f"\n4. Causal work per device at T={T}, {devices} devices, blocks of 128\n")
    print("| order | live blocks per device (min..max) | max / mean |")
    print("|---|---|---|")
    for name, order in (
        ("contiguous", np.arange(T)),
        ("zig-zag", context.zigzag_order(T, devices)),
    ):
        live = context.live_blocks_per_device(order, devices, 128)
        print(f"| {name} | {live.min()}..{live.max()} | {live.max() / live.mean():.3f} |")


def main(_):
    devices = FLAGS.devices
    mesh = jax.make_mesh((1, devices), ("data", "seq"), (AxisType.Auto,) * 2)
    lengths = [int(t) for t in FLAGS.lengths]
    print(
        f"{cpu_model()}: {len(jax.devices())} simulated devices on {os.cpu_count()} cores; "
        "the devices share the cores, so times here say nothing about a real interconnect"
    )
    attention_memory(mesh, lengths)
    training_memory(lengths, devices)
    strategy_time(mesh, FLAGS.time_length)
    balance(FLAGS.balance_length, devices)


if __name__ == "__main__":
    app.run(main)
