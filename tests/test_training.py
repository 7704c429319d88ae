"""kit.training: smoke runs per task and model, config variants, errors, one compile, report."""

import io
import json
import os
import pathlib
import shutil

import chex
import jax
import numpy as np
import pytest
from helpers import load_config, slow_beyond

from kit import checkpoint, metrics, models, tasks, training

# optax's Adam is not strict-promotion clean: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("standard_promotion")


SMOKE = [
    ("copy", "encoder_decoder"),
    ("sort", "decoder_only"),
    ("reverse", "encoder_only"),
    ("dates", "encoder_decoder"),
    ("dates", "decoder_only"),
]


@pytest.mark.parametrize("name, kind", slow_beyond(SMOKE, [], several=True))
def test_smoke_train_and_evaluate(tiny_run, name, kind):
    workdir = tiny_run(name, **{"model.kind": kind})
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "accuracy", "grad_norm", "skipped"} <= set(lines[0])
    evals = [line for line in lines if "eval/exact_match" in line]
    assert [line["step"] for line in evals] == [2, 4]
    for line in evals:
        assert all(np.isfinite(line[k]) for k in ("eval/loss", "eval/exact_match"))
        assert 0.0 <= line["eval/token_accuracy"] <= 1.0
    saved = json.loads(pathlib.Path(workdir, "config.json").read_text())
    assert saved["model"]["kind"] == kind and saved["task"]["name"] == name
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 4


def test_configs_hold_only_their_differences_and_a_tiny_variant():
    # The tiny variant changes sizes, never what is learned or how it is read.
    for name in ("copy", "reverse", "sort", "dates", "pronoun"):
        full, tiny = load_config(name, None), load_config(name)
        assert (tiny.task.name, tiny.model.kind) == (full.task.name, full.model.kind)
        assert tiny.train.steps == training.config.TINY["train.steps"]
        training.check_config(full)
        training.check_config(tiny)
    with pytest.raises(ValueError, match=r"config variant: expected one of \('tiny',\)"):
        load_config("copy", "huge")


def test_encoder_only_refuses_a_task_of_other_length(tmp_path):
    config = load_config("dates", **{"model.kind": "encoder_only"})
    with pytest.raises(ValueError, match=r"config.model.kind: 'encoder_only' predicts one output"):
        training.train_and_evaluate(config, str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_incompatible_checkpoint_stops_and_overwrites_nothing(tiny_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run("copy"), workdir)
    before = {p.name: p.read_bytes() for p in pathlib.Path(workdir).glob("*.json*")}
    config = load_config("copy", **{"model.d_model": 32})
    with pytest.raises(ValueError, match=r"workdir: .* incompatible config \(model.d_model"):
        training.train_and_evaluate(config, workdir, progress=False)
    assert before == {p: pathlib.Path(workdir, p).read_bytes() for p in before}


def test_workdir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"workdir: .*file exists and is not a folder"):
        training.train_and_evaluate(load_config("copy"), str(path), progress=False)
    with pytest.raises(ValueError, match=r"workdir: .*file is a file, so .* cannot be made"):
        training.train_and_evaluate(load_config("copy"), str(path / "run"), progress=False)
    assert path.read_text() == "x"


@pytest.mark.slow
def test_train_step_compiles_once():
    config = load_config("copy", **{"model.dropout_rate": 0.1})
    task, mcfg = training.check_config(config)
    graphdef, params = training.init_model(mcfg, jax.random.key(0, impl="rbg"))
    trainer = training.Trainer(graphdef, training.make_optimizer(config.train), 0.1, True)
    step = jax.jit(chex.assert_max_traces(trainer.train_step, n=1))
    state = trainer.init_state(params)
    for i in range(3):
        mb = training.model_batch(models.MODELS[mcfg.kind], task.train_batch(0, i, 8))
        state, _ = step(state, mb, jax.random.key(1, impl="rbg"))
    assert int(state["step"]) == 3


@pytest.mark.slow
def test_resumed_run_reports_its_start_and_plain_lines(tiny_run, tmp_path):
    """A resumed run's header says where it resumed; "lines" prints one per log step."""
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run("copy"), workdir)
    config = load_config("copy", **{"train.steps": 6})
    out = io.StringIO()
    result = training.train_and_evaluate(config, workdir, console=training.Console("lines", out))
    text = out.getvalue()
    assert result["step"] == 6
    assert "start:   resumed from step 4" in text
    assert "devices: 1 of 8 cpu devices (the first; the mesh is smaller than the host)" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")] == [
        "5/6",
        "6/6",
    ]
    assert text.count("eval at step 6:  eval/loss") == 1
    steps = [line["step"] for line in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2, 2, 3, 4, 4, 5, 6, 6]  # resumed lines follow the saved ones


def test_console_styles_and_bad_style():
    out = io.StringIO()
    quiet = training.Console("quiet", out)
    quiet.header({"a": "1", "long name": "2"})
    quiet.log_step(1, 2, {"loss": 1.0, "accuracy": 0.5})
    quiet.evaluation(2, {"eval/loss": 0.25})
    assert out.getvalue().splitlines() == [
        "a:         1",
        "long name: 2",
        "eval at step 2:  eval/loss 0.2500",
    ]
    assert training.Console("auto", io.StringIO()).style == "lines"  # not a terminal
    with pytest.raises(ValueError, match=r"style: expected 'auto' or one of"):
        training.Console("loud")


# ---------------------------------------------------------------- mixed precision


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_keeps_float32_state_and_resumes_bit_for_bit(
    tmp_path, monkeypatch
):
    """config.model.dtype="bfloat16": attention reads bfloat16 q/k/v, the parameters and
    optimizer state (so the checkpoints) are float32, and a run stopped at step 3 and
    resumed ends bit for bit where an uninterrupted one does."""
    import signal

    import jax.numpy as jnp

    from kit import nn
    from kit.training import loop

    config = load_config("copy", **{"model.dtype": "bfloat16", "train.steps": 6})
    seen = set()
    real_attend = nn.attend

    def attend(x, **kwargs):  # runs while the steps are traced
        seen.add((x.query.dtype, x.key.dtype, x.value.dtype))
        return real_attend(x, **kwargs)

    monkeypatch.setattr(nn, "attend", attend)
    straight = str(tmp_path / "straight")
    training.train_and_evaluate(config, straight, progress=False)
    assert seen == {(jnp.dtype(jnp.bfloat16),) * 3}

    def stop_at_3(self):  # as Ctrl-C before step 4 would
        return signal.SIGINT if len(training_steps) == 3 else None

    training_steps = []
    real_batch = tasks.Task.train_batch  # the copy task's (a SymbolTask inherits it)

    def train_batch(task, seed, step, batch_size):
        training_steps.append(step)
        return real_batch(task, seed, step, batch_size)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(tasks.Task, "train_batch", train_batch)
    monkeypatch.setattr(loop.StopSignals, "agreed", stop_at_3)
    with pytest.raises(training.Interrupted, match="interrupted at step 3 "):
        training.train_and_evaluate(config, resumed, progress=False)
    monkeypatch.undo()
    training.train_and_evaluate(config, resumed, progress=False)

    _, _, a = training.load_checkpoint(straight)
    _, _, b = training.load_checkpoint(resumed)
    floats = [x.dtype for x in jax.tree.leaves(a) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert set(floats) == {jnp.dtype(jnp.float32)}
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def test_float16_training_is_refused_saying_why(tmp_path):
    config = load_config("copy", **{"model.dtype": "float16"})
    with pytest.raises(ValueError, match=r"^config\.model\.dtype: float16 .* loss scaling"):
        training.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


def _param_count(params):
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_shared_layers_hold_one_block_per_stack_and_train(tiny_run, standard_promotion):
    """model.share_layers: each stack applies one block num_layers times (a Universal
    Transformer): the parameters are a 1+1-layer model's, and a run trains and restores."""
    from flax import nnx

    layers = {"model.num_layers": 3, "model.num_decoder_layers": 2}
    workdir = tiny_run("copy", **layers, **{"model.share_layers": True})
    _, setup, state = training.load_checkpoint(workdir)
    model = nnx.merge(setup.trainer.graphdef, state["params"])
    assert model.encoder.layers[0] is model.encoder.layers[2]
    one = load_config("copy", **{"model.num_layers": 1, "model.num_decoder_layers": 1})
    _, mcfg = training.check_config(one)
    _, params = training.init_model(mcfg, jax.random.key(0, impl="rbg"))
    assert _param_count(state["params"]) == _param_count(params)


def test_a_short_run_learns(tmp_path, standard_promotion):
    """Training lowers the loss: 120 steps of reverse at the tiny model size take the
    training loss below half its first value, and evaluation's exact match above chance
    (0 for 5 symbols of 6 reversed at random: 6**-5)."""
    config = load_config(
        "reverse",
        **{
            "train.steps": 120,
            "train.log_every": 10,
            "train.eval_every": 120,
            "train.checkpoint_every": 120,
            "train.batch_size": 32,
            "train.learning_rate": 1e-2,
            "task.eval_size": 200,
            "train.eval_batch_size": 200,
        },
    )
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir, progress=False)
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses[-1] < 0.5 * losses[0], losses
    exact = [line["eval/exact_match"] for line in lines if "eval/exact_match" in line]
    assert exact[-1] > 0.2


def test_training_steps_take_the_kind_class_and_name_a_kind_name():
    from kit import models

    batch = tasks.make_task("copy").train_batch(0, 0, 2)
    mb = training.model_batch(models.MODELS["encoder_only"], batch)
    assert set(mb) == {"src", "src_lengths", "targets", "weights"}
    with pytest.raises(ValueError, match=r"^kind: expected a model kind's class \(models.MODELS"):
        training.model_batch("encoder_only", batch)
    with pytest.raises(ValueError, match=r"^kind: expected a model kind's class \(one\)"):
        training.model_batch(3, batch)
