"""Generate text with a pretrained checkpoint: greedy, or sampled with a temperature.

    python experiments/generate.py --pretrained=path/to/gpt2 --prompt="The attention"
    python experiments/generate.py --pretrained=path/to/t5-small \\
        --prompt="translate English to German: The house is wonderful." --max_new_tokens=20
    python experiments/generate.py --pretrained=path/to/gpt2 --prompt="Once" \\
        --temperature=0.8 --top_k=40 --seed=1

Loads the folder with `kit.pretrained.load` (GPT-2 or T5, with its tokenizer.json),
reads the prompt through the tokenizer and generates --max_new_tokens tokens with the
KV cache in one jit (`model.generate`, greedy unless --temperature > 0), then prints
the prompt's tokens and the text generated: GPT-2 continues the prompt, T5 writes its
decoder's output. A bad flag or prompt ends in one line naming it.
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from kit import hf, pretrained, training

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", None, "A Hugging Face checkpoint folder (GPT-2 or T5).")
flags.DEFINE_string("prompt", None, "The text to continue (GPT-2) or to answer (T5).")
flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; above 0: sample from softmax(logits / t).")
flags.DEFINE_integer("top_k", None, "Sample only among the k most likely tokens.")
flags.DEFINE_integer("seed", 0, "The sampling key's seed.")
flags.mark_flags_as_required(["pretrained", "prompt"])


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    training.report.quiet_library_logs(FLAGS.verbosity)
    try:
        model = pretrained.load(FLAGS.pretrained)
        if not hasattr(model, "generate"):
            raise ValueError(
                f"pretrained: a {model.cfg.kind} model does not generate; use GPT-2 or T5"
            )
        name = os.path.basename(os.path.normpath(FLAGS.pretrained))
        task = hf.TokenizerTask.for_model(model, name)
        ids = task.encode(FLAGS.prompt, "prompt")
        start = time.perf_counter()
        out = model.generate(
            np.asarray([ids]),
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            rng=jax.random.key(FLAGS.seed) if FLAGS.temperature > 0 else None,
        )
        out = np.asarray(out)[0]
        seconds = time.perf_counter() - start
    except ValueError as error:
        sys.exit(f"error: {error}")
    new = out[len(ids) :] if model.cfg.kind == "decoder_only" else out[1:]
    print(f"prompt:    {len(ids)} tokens: {' '.join(task.split(FLAGS.prompt))}")
    print(f"generated: {task.decode(new)}")
    print(f"ids:       {new.tolist()}")
    print(f"{len(new)} tokens in {seconds:.1f} s (compilation included)")


if __name__ == "__main__":
    app.run(main)
