"""SCAN's splits under named model variants, several seeds each: tables and a plot.

    # choose on validation (drawn from the training split; never the test split)
    python experiments/scan_study.py --split=length --validation --seeds=1 \
        --variants=sinusoidal,random,rope,t5,t5_shared --name=scan_length_validation
    # then the chosen variant on the test split, 3 seeds
    python experiments/scan_study.py --split=length --variants=t5 --name=scan_length_test
    # the positional study of docs/scan.md (600 steps, unpacked)
    python experiments/scan_study.py --split=length --steps=600 --nopack \
        --variants=sinusoidal,learned,rope,alibi,none --name=scan_length_positions

Each (variant, seed) trains configs/scan_simple.py's model on `--split` with the
variant's overrides (`VARIANTS`) into <out>/<split>[-validation]/<variant>-<seed>; a
finished run is read back, not retrained. Writes docs/<name>.md (mean and min-max
exact match per variant, its overrides, and where evaluation logs them: exact match
decoded to the true length, on the "around ... thrice" and recombination-only
commands, per target length, and the mean wall time of a run) and docs/<name>.png
(exact match against target length) where the split has a length cutoff.
"""

import json
import os
import time

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from kit import metrics, scan, training

# name -> config overrides (dotted paths): what the literature points to for SCAN.
VARIANTS = {
    "sinusoidal": {},
    "learned": {"model.positions": "learned"},
    "none": {"model.positions": "none"},
    "alibi": {"model.positions": "alibi"},
    "rope": {"model.positions": "rope"},
    # Ruoss et al. (2023): positions drawn from a range wider than any test length.
    "random": {"model.random_positions": 256},
    "random_learned": {"model.positions": "learned", "model.random_positions": 256},
    "random_shared": {"model.random_positions": 256, "model.share_layers": True},
    # T5 relative bias in self-attention; cross-attention has no positions at all.
    "t5": {"model.positions": "t5"},
    # Csordás et al. (2021): relative positions in a Universal Transformer.
    "t5_shared": {"model.positions": "t5", "model.share_layers": True},
    "t5_shared_3": {
        "model.positions": "t5",
        "model.share_layers": True,
        "model.num_layers": 3,
        "model.num_decoder_layers": 3,
    },
}

FLAGS = flags.FLAGS
flags.DEFINE_string("split", "length", "SCAN split (task.split): simple, length, length_<N>, ...")
flags.DEFINE_list("variants", ["sinusoidal", "t5"], f"Variants to train, of {list(VARIANTS)}.")
flags.DEFINE_integer("seeds", 3, "Seeds per variant (0, 1, ...).")
flags.DEFINE_integer("steps", 3000, "Training steps per run.")
flags.DEFINE_bool("pack", True, "Packed training rows (config.task.pack).")
flags.DEFINE_bool("validation", False, "Evaluate on the validation part (task.validation).")
flags.DEFINE_string("out", "runs/scan_study", "Where the runs' workdirs go.")
flags.DEFINE_string("docs", "docs", "Where the table and the plot go.")
flags.DEFINE_string("name", "scan_study", "The table's and the plot's file name.")

EXTRA = {  # optional columns: metric -> header
    "eval/exact_match_oracle_length": "at the true length",
    "eval/exact_match_around_thrice": "around ... thrice",
    "eval/exact_match_recombination": "recombination only",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(variant: str, seed: int):
    config = training.from_file(os.path.join(ROOT, "configs", "scan_simple.py"))
    config.task.update(split=FLAGS.split, validation=FLAGS.validation, pack=FLAGS.pack)
    config.seed = seed
    steps = FLAGS.steps
    config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps)
    for path, value in VARIANTS[variant].items():
        section, field = path.split(".")
        config[section][field] = value
    return config


def run(variant: str, seed: int) -> dict:
    """The final evaluation of one run, with its wall time ("seconds")."""
    part = FLAGS.split + ("-validation" if FLAGS.validation else "")
    workdir = os.path.join(FLAGS.out, part, f"{variant}-{seed}")
    timing = os.path.join(workdir, "seconds.json")
    if not os.path.exists(timing):
        began = time.perf_counter()
        training.train_and_evaluate(
            config_for(variant, seed), workdir, console=training.Console("quiet")
        )
        with open(timing, "w") as f:
            json.dump(time.perf_counter() - began, f)
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    result = [line for line in lines if "eval/exact_match" in line][-1]
    with open(timing) as f:
        result["seconds"] = json.load(f)
    print(f"{variant} seed {seed}: exact match {result['eval/exact_match']:.4f}", flush=True)
    return result


def table(results: dict[str, list[dict]], lengths: list[int]) -> str:
    extra = [m for m in EXTRA if all(m in e for r in results.values() for e in r)]
    rows = [
        "| variant | overrides | exact match, mean (min-max) | token accuracy, mean | "
        + "".join(f"{EXTRA[m]}, mean | " for m in extra)
        + "".join(f"len {n} | " for n in lengths)
        + "s per run |",
        "|---|---|---|---|" + "---|" * (len(extra) + len(lengths) + 1),
    ]
    for variant, evals in results.items():
        exact = [e["eval/exact_match"] for e in evals]
        overrides = ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) or "-"
        cells = f"{100 * np.mean(exact):.2f}% ({100 * min(exact):.2f}-{100 * max(exact):.2f}) | "
        cells += f"{100 * np.mean([e['eval/token_accuracy'] for e in evals]):.1f}% | "
        cells += "".join(f"{100 * np.mean([e[m] for e in evals]):.1f}% | " for m in extra)
        by_length = [
            np.mean([e["eval/exact_match_by_length"][str(n)] for e in evals]) for n in lengths
        ]
        cells += "".join(f"{100 * v:.0f}% | " for v in by_length)
        rows.append(
            f"| {variant} | {overrides} | {cells}{np.mean([e['seconds'] for e in evals]):.0f} |"
        )
    return "\n".join(rows) + "\n"


def plot(results: dict[str, list[dict]], lengths: list[int], path: str) -> None:
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for variant, evals in results.items():
        by_length = [
            np.mean([e["eval/exact_match_by_length"][str(n)] for e in evals]) for n in lengths
        ]
        ax.plot(lengths, by_length, marker="o", label=variant)
    ax.set_xlabel("target length (actions)")
    ax.set_ylabel(f"exact match, mean of {FLAGS.seeds} seeds")
    part = "validation" if FLAGS.validation else "test"
    ax.set_title(f"SCAN {FLAGS.split} ({part}), {FLAGS.steps} steps per run")
    ax.legend()
    figure.savefig(path, dpi=110)


def main(_):
    training.report.quiet_library_logs(FLAGS.verbosity)
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    scan.length_cutoff(FLAGS.split)  # raises ValueError naming the split
    results = {v: [run(v, seed) for seed in range(FLAGS.seeds)] for v in FLAGS.variants}
    lengths = sorted(
        {
            int(n)
            for r in results.values()
            for e in r
            for n in e.get("eval/exact_match_by_length", {})
        }
    )
    os.makedirs(FLAGS.docs, exist_ok=True)
    text = table(results, lengths)
    with open(os.path.join(FLAGS.docs, f"{FLAGS.name}.md"), "w") as f:
        f.write(text)
    if lengths:
        plot(results, lengths, os.path.join(FLAGS.docs, f"{FLAGS.name}.png"))
    print(text)


if __name__ == "__main__":
    app.run(main)
