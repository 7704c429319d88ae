"""What hook points cost: the jitted teacher-forced forward with and without hooks.

    python experiments/bench_hooks.py --config=configs/copy.py

Times the forward of the config's model over one training batch (--batch rows),
in alternating rounds in one run: without hooks, with an empty `Hooks()`, with
every head zero-ablated at weight 0 (a write that changes nothing), reading the
residual stream of every layer, and reading every attention's weights (which
runs attention on the materialized path). Prints each one's median and its
ratio to the forward without hooks.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kit import training
from kit.hooks import Hooks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/copy.py", "Experiment config.", lock_config=True)
flags.DEFINE_integer("batch", 256, "Rows per forward.")
flags.DEFINE_integer("calls", 20, "Timed forwards per round.")
flags.DEFINE_integer("rounds", 7, "Alternating timing rounds (the median is reported).")


def main(_):
    config = FLAGS.config
    config.unlock()
    config.train.batch_size = FLAGS.batch
    setup = training.setup(config)
    graphdef, params = training.init_model(setup.mcfg, jax.random.key(0))
    model = nnx.merge(graphdef, params)
    mb = training.steps.train_model_batch(setup.task, setup.kind, 0, 0, FLAGS.batch)
    mb = jax.tree.map(jnp.asarray, mb)
    shapes = model.attention_shapes()
    variants = {
        "no hooks": None,
        "Hooks()": Hooks(),
        "ablation writes (keep all)": model.head_ablation(
            {n: np.ones(s, np.float32) for n, s in shapes.items()}
        ),
        "read residual stream": Hooks(read="*.resid_post"),
        "read attention weights": Hooks(read="*.weights"),
    }

    def forward(p, b, hooks):
        logits, aux = nnx.merge(graphdef, p).teacher_forced(b, hooks=hooks)
        return logits, aux.get("activations")

    run = jax.jit(forward)
    for hooks in variants.values():
        jax.block_until_ready(run(params, mb, hooks))  # compile
    times = {name: [] for name in variants}
    for _ in range(FLAGS.rounds):
        for name, hooks in variants.items():
            start = time.perf_counter()
            for _ in range(FLAGS.calls):
                out = run(params, mb, hooks)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / FLAGS.calls)
    base = np.median(times["no hooks"])
    print(f"{setup.mcfg.kind}, batch {FLAGS.batch}, median of {FLAGS.rounds} rounds:")
    for name, t in times.items():
        print(f"  {name:<28} {1e3 * np.median(t):8.2f} ms   x{np.median(t) / base:.3f}")


if __name__ == "__main__":
    app.run(main)
