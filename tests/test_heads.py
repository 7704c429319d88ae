"""The induction task, its span losses, and experiments/heads.py on trained tiny runs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ROOT, command_env, load_config

from kit import tasks, training
from kit.analysis import interp


def test_induction_rows_repeat_a_random_half():
    task = tasks.make_task("induction", length=8, num_symbols=20)
    data = task.train_batch(0, 3, 64)
    assert data["src"].shape == (64, 0)
    halves = set()
    for tgt, n in zip(data["tgt"], data["tgt_lengths"], strict=True):
        h = n // 2
        assert n == 2 * h and 4 <= h <= 8
        np.testing.assert_array_equal(tgt[:h], tgt[h:n])
        assert (tgt[n:] == tasks.PAD).all()
        halves.add(int(h))
    assert len(halves) > 1  # no fixed offset finds the copy


def test_loss_spans_by_hand():
    first, repeat = tasks.make_task("induction", length=8).loss_spans
    mask = repeat.mask(np.array([8, 12]), 13)
    assert [list(np.flatnonzero(row)) for row in mask] == [[5, 6, 7], [7, 8, 9, 10, 11]]
    assert list(np.flatnonzero(first.mask(np.array([8]), 13)[0])) == [0, 1, 2, 3]


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_span_losses_equal_the_losses_computed_by_hand():
    config = load_config("induction")
    s = training.setup(config, jax.devices()[:1])
    graphdef, params = training.init_model(s.mcfg, jax.random.key(0))
    batches = training.steps.eval_batches(s.task, s.kind, config)
    result = training.steps.evaluate(
        jax.jit(s.trainer.eval_step), params, batches, s.kind, loss_spans=s.task.loss_spans
    )
    logits_of = jax.jit(lambda params, mb: nnx.merge(graphdef, params).teacher_forced(mb)[0])
    firsts, repeats = [], []
    for mb, pad in batches:
        logits = logits_of(params, mb)
        losses = np.asarray(
            optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), jnp.asarray(mb["targets"])
            )
        )
        for row in range(len(losses) - pad):
            h = int(mb["weights"][row].sum() - 1) // 2
            firsts.extend(losses[row, :h])
            repeats.extend(losses[row, h + 1 : 2 * h])
    assert result["eval/loss_first"] == pytest.approx(np.mean(firsts), rel=1e-5)
    assert result["eval/loss_repeat"] == pytest.approx(np.mean(repeats), rel=1e-5)


def run(*args):
    command = [sys.executable, os.path.join(ROOT, "experiments", "heads.py"), *args]
    return subprocess.run(
        command, env=command_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.mark.slow
def test_heads_command_on_a_trained_run(tiny_run, tmp_path):
    workdir = tiny_run("copy")
    out = tmp_path / "heads"
    done = run(f"--workdir={workdir}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "heads.json").read_text())
    config, s, state = training.load_checkpoint(workdir)
    model = nnx.merge(s.trainer.graphdef, state["params"])
    shapes = model.attention_shapes()
    assert report["task"] == "copy" and report["metric"] == "eval/exact_match"
    assert report["higher_is_better"] is True
    assert set(report["sets"]) == {"encoder", "decoder", "cross"}
    for name, (L, N) in shapes.items():
        entry = report["sets"][name]
        assert set(entry["scores"]) == set(interp.SCORES)
        for values in entry["scores"].values():
            assert np.asarray(values, float).shape == (L, N)
        assert np.asarray(entry["ablation"]["per_head"]).shape == (L, N)
        assert len(entry["ablation"]["per_layer"]) == L
        assert (out / f"{name}.png").stat().st_size > 1000
    # The numbers are the held-out metric under those masks, measured here again.
    batches = training.steps.eval_batches(s.task, s.kind, config)
    step = jax.jit(s.trainer.eval_step)

    def metric(mask=None):
        result = training.steps.evaluate(
            step,
            state["params"],
            batches,
            s.kind,
            hooks=None if mask is None else model.head_ablation(mask),
        )
        return result["eval/exact_match"]

    assert report["baseline"] == pytest.approx(metric())
    mask = interp.ablation_mask(shapes, "cross", layer=0, head=1)
    assert report["sets"]["cross"]["ablation"]["per_head"][0][1] == pytest.approx(metric(mask))
    assert report["sets"]["cross"]["ablation"]["all"] == pytest.approx(
        metric(interp.ablation_mask(shapes, "cross"))
    )


@pytest.mark.slow
def test_heads_command_errors_write_nothing(tiny_run, tmp_path):
    missing = run(f"--workdir={tmp_path / 'none'}")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[0].startswith("error: workdir: no config.json")
    assert not (tmp_path / "none").exists()
    workdir = tiny_run("copy")
    out = tmp_path / "heads"
    bad = run(f"--workdir={workdir}", "--metric=eval/nothing", f"--out={out}")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: metric: expected one of")
    assert not out.exists()


@pytest.mark.slow
def test_a_training_run_logs_both_span_losses(tiny_run):
    with open(os.path.join(tiny_run("induction"), "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/loss" in r]
    assert evals and all(
        r["eval/loss_first"] > 0.0 and r["eval/loss_repeat"] > 0.0 for r in evals
    ), evals
