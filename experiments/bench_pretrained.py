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
import resource
import subprocess
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
flags.DEFINE_string(
    "torch_python",
    None,
    "An interpreter with torch and transformers (a throwaway virtual environment, never the "
    "kit's): transformers' GPT2LMHeadModel on the same files is timed in the same run.",
)

# transformers' side, run by --torch_python: the same figures on the same folder.
TORCH_SIDE = """
import json, sys, time
import torch, transformers
folder, T, prompt, new, repeats = sys.argv[1], *map(int, sys.argv[2:6])
start = time.perf_counter()
model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
loaded = time.perf_counter() - start
g = torch.Generator().manual_seed(1)
tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
def median(f):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
with torch.no_grad():
    forward = median(lambda: model(tokens))
    ids = tokens[:, :prompt]
    generate = median(lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=0))
print(json.dumps({"load": loaded, "forward": forward, "generate": generate,
                  "versions": [torch.__version__, transformers.__version__],
                  "threads": torch.get_num_threads()}))
"""


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
        measure(folder)


def _rss_gb() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(folder: str) -> None:
    size = sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if "safetensors" in f
    )
    before = _rss_gb()
    start = time.perf_counter()
    model = pretrained.load(folder)
    loaded = time.perf_counter() - start
    load_peak = _rss_gb() - before
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
    # What users call (kit.hf: one jit, the parameters as its arguments), and the kit's
    # decode with the model closed over (its parameters constants of the program).
    gen_seconds = median_seconds(
        lambda t: model.generate(t, max_new_tokens=FLAGS.new_tokens), prompt, repeats=FLAGS.repeats
    )
    closed = jax.jit(
        lambda t: decode.greedy_decoder_only(
            model, t, jnp.ones(t.shape, bool), length=FLAGS.new_tokens
        )
    )
    closed_seconds = median_seconds(closed, prompt, repeats=FLAGS.repeats)
    print(
        f"{params / 1e6:.0f}M parameters, loaded in {loaded:.1f} s, peak memory "
        f"+{load_peak:.2f} GB for {size / 2**30:.2f} GB of safetensors "
        f"({load_peak / (size / 2**30):.1f}x); matmul peak {peak:.0f} GFLOP/s"
    )
    print(
        f"forward B=1 T={T}: {1e3 * seconds:.0f} ms, {flops / seconds / 1e9:.0f} GFLOP/s "
        f"({100 * flops / seconds / 1e9 / peak:.0f}% of peak)"
    )
    print(
        f"greedy generation (model.generate), prompt {FLAGS.prompt}, {FLAGS.new_tokens} new "
        f"tokens: {gen_seconds:.2f} s, {FLAGS.new_tokens / gen_seconds:.1f} tokens/s (the "
        f"prompt's pass included); kit.decode with the model closed over: "
        f"{FLAGS.new_tokens / closed_seconds:.1f} tokens/s"
    )
    if FLAGS.torch_python:
        args = [str(a) for a in (folder, T, FLAGS.prompt, FLAGS.new_tokens, FLAGS.repeats)]
        out = subprocess.run(
            [FLAGS.torch_python, "-c", TORCH_SIDE, *args], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"--torch_python failed:\n{out.stderr[-2000:]}")
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        share = 100 * flops / theirs["forward"] / 1e9 / peak
        torch_version, transformers_version = theirs["versions"]
        print(
            f"transformers {transformers_version} (torch {torch_version}, "
            f"{theirs['threads']} threads), same files: loaded in {theirs['load']:.1f} s; "
            f"forward {1e3 * theirs['forward']:.0f} ms ({share:.0f}% of peak); "
            f"generation {FLAGS.new_tokens / theirs['generate']:.1f} tokens/s"
        )
        print(
            f"kit / transformers: forward time {seconds / theirs['forward']:.2f}x, generation "
            f"speed {theirs['generate'] / gen_seconds:.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
