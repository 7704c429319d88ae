"""A pretrained GPT-2 in the kit's model: load time, a long forward pass and greedy
generation with the KV cache, beside the same run's matmul peak.

    python experiments/bench_pretrained.py                            # GPT-2 small's shapes
    python experiments/bench_pretrained.py --checkpoint=path/to/gpt2  # a real checkpoint

Without --checkpoint it writes a GPT-2 small-shaped checkpoint (124M parameters, random
weights, Hugging Face layout) to a temporary folder: nothing is downloaded, and the speed
does not depend on the weights' values. Prints the median of --repeats runs; the forward's
FLOPs are 2 x parameters x tokens plus causal attention's 2 T^2 D per layer, its share of
the matmul peak measured in the same run (the fastest of 10 runs of a 2048^3 matmul).
"""

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchtools import matmul_peak, median_seconds
from flax import nnx

from kit import decode, pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A GPT-2 folder (config.json, safetensors).")
flags.DEFINE_integer("length", 1024, "Tokens of the forward pass (B=1).")
flags.DEFINE_integer("prompt", 32, "Prompt tokens of the generation.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated greedily.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (the median is printed).")


def write_random_gpt2(folder: str, V=50257, P=1024, D=768, L=12, N=12) -> None:
    """GPT2LMHeadModel's tensors with random values, as safetensors, and its config."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(np.float32)

    w = {"wte.weight": normal(V, D), "wpe.weight": normal(P, D)}
    for i in range(L):
        h = f"h.{i}."
        for name, shape in {
            "ln_1.weight": (D,), "ln_1.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
            "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
            "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
            "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,),
            "mlp.c_proj.weight": (4 * D, D), "mlp.c_proj.bias": (D,),
        }.items():  # fmt: skip
            w[h + name] = normal(*shape)
    w.update({"ln_f.weight": np.ones(D, np.float32), "ln_f.bias": np.zeros(D, np.float32)})
    save_file(
        {"transformer." + k: v for k, v in w.items()}, os.path.join(folder, "model.safetensors")
    )
    config = {"model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_embd": D}
    config.update(n_layer=L, n_head=N, layer_norm_epsilon=1e-5, activation_function="gelu_new")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = FLAGS.checkpoint
        if folder is None:
            folder = tmp
            write_random_gpt2(folder)
        start = time.perf_counter()
        model = pretrained.load(folder)
        loaded = time.perf_counter() - start
    cfg = model.cfg
    if FLAGS.length > cfg.max_len or FLAGS.prompt + FLAGS.new_tokens > cfg.max_len:
        raise app.UsageError(f"--length, --prompt + --new_tokens: at most {cfg.max_len}")
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    peak = matmul_peak()
    T = FLAGS.length
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    forward = jax.jit(lambda t: model(t, jnp.ones(t.shape, bool))[0])
    seconds = median_seconds(forward, tokens, repeats=FLAGS.repeats)
    flops = 2 * params * T + 2 * cfg.num_layers * T * T * cfg.d_model
    prompt = tokens[:, : FLAGS.prompt]
    generate = jax.jit(
        lambda t: decode.greedy_decoder_only(
            model, t, jnp.ones(t.shape, bool), length=FLAGS.new_tokens
        )
    )
    gen_seconds = median_seconds(generate, prompt, repeats=FLAGS.repeats)
    print(
        f"{params / 1e6:.0f}M parameters, loaded in {loaded:.1f} s; matmul peak {peak:.0f} GFLOP/s"
    )
    print(
        f"forward B=1 T={T}: {1e3 * seconds:.0f} ms, {flops / seconds / 1e9:.0f} GFLOP/s "
        f"({100 * flops / seconds / 1e9 / peak:.0f}% of peak)"
    )
    print(
        f"greedy generation, prompt {FLAGS.prompt}, {FLAGS.new_tokens} new tokens: "
        f"{gen_seconds:.2f} s, {FLAGS.new_tokens / gen_seconds:.1f} tokens/s "
        "(the prompt's pass included)"
    )


if __name__ == "__main__":
    app.run(main)
