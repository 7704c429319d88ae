"""Training throughput: the kit's model against the same model built on flax.nnx.MultiHeadAttention.

    python experiments/bench_train.py --config=configs/copy.py

Both models share everything but the attention modules (same embeddings,
blocks, optimizer, batches); the flax variant swaps each kit.nn.MultiHeadAttention
for flax.nnx.MultiHeadAttention with the same heads and width. Prints median
training tokens/s of each over --steps steps after a warm-up, measured in
alternating rounds in one run, and their ratio.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kit import models, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/copy.py", "Experiment config.", lock_config=True)
flags.DEFINE_integer("steps", 50, "Timed steps per round.")
flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (the median is reported).")


class FlaxAttention(nnx.Module):
    """flax.nnx.MultiHeadAttention behind kit.nn.MultiHeadAttention's call signature."""

    def __init__(self, d_model, num_heads, rngs):
        self.inner = nnx.MultiHeadAttention(
            num_heads, d_model, qkv_features=d_model, decode=False, rngs=rngs
        )

    def __call__(
        self,
        x,
        context=None,
        *,
        mask=None,
        is_causal=False,
        key_value_seq_lengths=None,
        dropout_rng=None,
        **unused,
    ):
        source = x if context is None else context
        T, S = x.shape[1], source.shape[1]
        live = jnp.ones((x.shape[0], 1, T, S), bool)
        if mask is not None:
            live = live & mask
        if is_causal:
            live = live & jnp.tril(jnp.ones((T, S), bool))[None, None]
        if key_value_seq_lengths is not None:
            keys = jnp.arange(S)[None, None, None, :] < key_value_seq_lengths[:, None, None, None]
            live = live & keys
        return self.inner(x, source, mask=live, deterministic=True)


def flax_variant(model, mcfg, rng):
    """The same model with every attention module replaced by FlaxAttention."""
    rngs = nnx.Rngs(params=rng)
    stacks = [getattr(model, name) for name in ("encoder", "decoder") if hasattr(model, name)]
    for stack in stacks:
        for block in stack.layers:
            block.self_attention = FlaxAttention(mcfg.d_model, mcfg.num_heads, rngs)
            if block.cross_attention is not None:
                block.cross_attention = FlaxAttention(mcfg.d_model, mcfg.num_heads, rngs)
    return model


def main(_):
    config = FLAGS.config
    task, mcfg = training.check_config(config)
    rng = jax.random.key(0, impl="rbg")
    kit_model = models.build(mcfg, rng)
    flax_model = flax_variant(models.build(mcfg, rng), mcfg, rng)
    batches = [
        training.model_batch(
            models.MODELS[mcfg.kind], task.train_batch(0, s, config.train.batch_size)
        )
        for s in range(FLAGS.steps)
    ]
    tokens = sum(int(b["weights"].sum()) + int(b["src_lengths"].sum()) for b in batches)
    runners = {}
    for name, model in (("kit", kit_model), ("flax.nnx", flax_model)):
        graphdef, params = nnx.split(model)
        trainer = training.Trainer(graphdef, training.make_optimizer(config.train), 0.0, False)
        step = jax.jit(trainer.train_step)
        state = trainer.init_state(params)
        state, m = step(state, batches[0], rng)  # compile
        jax.block_until_ready(m)
        runners[name] = (step, state)
    rates = {name: [] for name in runners}
    for _ in range(FLAGS.rounds):
        for name, (step, state) in runners.items():
            start = time.perf_counter()
            for b in batches:
                state, m = step(state, b, rng)
            jax.block_until_ready(m)
            rates[name].append(tokens / (time.perf_counter() - start))
            runners[name] = (step, state)
    kit_rate, flax_rate = np.median(rates["kit"]), np.median(rates["flax.nnx"])
    print(
        f"{task.name} {mcfg.kind} d_model={mcfg.d_model} heads={mcfg.num_heads} "
        f"batch={config.train.batch_size}: median training tokens/s over {FLAGS.rounds} rounds"
    )
    print(f"kit       {kit_rate:10.0f}")
    print(f"flax.nnx  {flax_rate:10.0f}")
    print(f"kit / flax.nnx = {kit_rate / flax_rate:.2f}x")


if __name__ == "__main__":
    app.run(main)
