"""Mixed precision: one train step's compiled memory in float32 and bfloat16, and training both.

    python experiments/bench_precision.py --config=configs/copy.py \\
        --config.model.d_model=256 --config.model.num_heads=8 --config.model.d_ff=1024 \\
        --config.model.num_layers=4 --config.model.num_decoder_layers=4
    python experiments/bench_precision.py --config=configs/copy.py --train

Prints a table of XLA's memory analysis of the compiled train step (arguments,
outputs, temporaries: the activations and workspace) for config.model.dtype
"float32" and "bfloat16", and the ratio; the activations that autodiff saves for
the backward pass, as the program states them (before XLA's passes); and how
many matrix products compute in bfloat16 before and after XLA's passes (XLA:CPU
rewrites them to float32, so on CPU the compiled temporaries do not shrink).
With --train it also trains the config in both dtypes (in temporary workdirs)
and prints each one's held-out metrics, the largest gap between their logged
training losses, and the wall time.
"""

import re
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kit import training
from kit.metrics import read_metrics
from kit.training.loop import lower_train_step
from kit.training.steps import loss_fn, model_batch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/copy.py", "Experiment config.", lock_config=True)
flags.DEFINE_bool("train", False, "Also train the config in both dtypes and compare.")

DTYPES = ("float32", "bfloat16")


def saved_activations(s, batch) -> float:
    """MiB that reverse mode keeps from the forward pass of the loss (not the parameters)."""
    from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals lists

    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s.abstract_state["params"])

    def objective(params):
        logits, _ = nnx.merge(s.trainer.graphdef, params).teacher_forced(batch)
        return loss_fn(logits, batch["targets"], batch["weights"])[0]

    saved = saved_residuals(objective, params)
    kept = [a for a, why in saved if "from the argument" not in why]
    return sum(a.size * a.dtype.itemsize for a in kept) / (1 << 20)


def bf16_products(text: str, compiled: bool) -> str:
    """How many dots yield bfloat16 out of all, in HLO (`compiled`) or StableHLO text."""
    if compiled:
        kinds = re.findall(r"= (bf16|f32)\[[^\]]*\][^ ]* dot\(", text)
    else:
        kinds = re.findall(r"stablehlo\.dot_general.*-> tensor<[^>]*x(bf16|f32)>", text)
    return f"{kinds.count('bf16')} of {len(kinds)}"


def step_memory(config) -> dict[str, float]:
    """MiB of the compiled train step's arguments, outputs and temporaries, the saved
    activations, and the bfloat16 products before and after XLA's passes."""
    s = training.setup(config)
    batch = model_batch(s.kind, s.task.train_batch(0, 0, config.train.batch_size))
    lowered = lower_train_step(s, batch)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    mib = 1 << 20
    return {
        "arguments": m.argument_size_in_bytes / mib,
        "outputs": m.output_size_in_bytes / mib,
        "temporaries": m.temp_size_in_bytes / mib,
        "saved activations": saved_activations(s, batch),
        "bfloat16 products, program": bf16_products(lowered.as_text(), False),
        "bfloat16 products, compiled": bf16_products(compiled.as_text(), True),
    }


def main(argv):
    del argv
    training.report.quiet_library_logs(FLAGS.verbosity)
    base = FLAGS.config
    configs = {}
    for dtype in DTYPES:
        config = base.copy_and_resolve_references()
        config.model.dtype = dtype
        configs[dtype] = config
    m = base.model
    print(
        f"config: {m.kind}, d={m.d_model}, {m.num_heads} heads, d_ff={m.d_ff}, layers "
        f"{m.num_layers}+{m.num_decoder_layers}, batch {base.train.batch_size}; "
        f"backend {jax.default_backend()}"
    )
    memory = {dtype: step_memory(c) for dtype, c in configs.items()}
    print("\n| MiB | float32 | bfloat16 | bfloat16 / float32 |\n|---|---|---|---|")
    for part in ("arguments", "outputs", "temporaries", "saved activations"):
        a, b = memory["float32"][part], memory["bfloat16"][part]
        print(f"| {part} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    for part in ("bfloat16 products, program", "bfloat16 products, compiled"):
        print(f"| {part} | {memory['float32'][part]} | {memory['bfloat16'][part]} | |")
    if not FLAGS.train:
        return
    print("\n| dtype | held-out | wall s |\n|---|---|---|")
    losses = {}
    for dtype, config in configs.items():
        with tempfile.TemporaryDirectory() as workdir:
            began = time.perf_counter()
            result = training.train_and_evaluate(config, workdir, progress=False)
            wall = time.perf_counter() - began
            lines = read_metrics(f"{workdir}/metrics.jsonl")
        losses[dtype] = {line["step"]: line["loss"] for line in lines if "loss" in line}
        held = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("eval/"))
        print(f"| {dtype} | {held} | {wall:.1f} |")
    steps = sorted(losses["float32"])
    gaps = [abs(losses["float32"][s] - losses["bfloat16"][s]) for s in steps]
    worst = max(range(len(steps)), key=gaps.__getitem__)
    print(
        f"\nlogged training loss, bfloat16 - float32: largest gap {gaps[worst]:.4f} at step "
        f"{steps[worst]} (float32 {losses['float32'][steps[worst]]:.4f}); at the last step "
        f"{gaps[-1]:.4f}"
    )


if __name__ == "__main__":
    app.run(main)
