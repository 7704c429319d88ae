"""kit.train: smoke runs per task and model, exact resume, config errors, one compile."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from kit import checkpoint, metrics, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax's Adam bias correction (decay ** int count) is not strict-promotion clean;
    # kit's own model code is checked under strict promotion in test_decode.py.
    with jax.numpy_dtype_promotion("standard"):
        yield


def tiny_config(task="copy", kind="encoder_decoder", **train_overrides):
    config = train.default_config()
    config.task.name = task
    config.task.length = 5
    config.task.num_symbols = 6
    config.task.eval_size = 12
    config.model.kind = kind
    config.model.d_model = 16
    config.model.num_heads = 2
    config.model.num_layers = 1
    config.model.num_decoder_layers = 1
    config.model.d_ff = 32
    config.model.max_len = 48
    config.model.dropout_rate = 0.1
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.eval_batch_size = 8
    config.train.update(train_overrides)
    config.mesh.update({"data": 1, "model": 1})
    config.lock()
    return config


def run(config, workdir, **kwargs):
    """train_and_evaluate on one device (tests/test_sharding.py covers meshes)."""
    return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], **kwargs)


@pytest.mark.parametrize(
    "task, kind",
    [
        ("copy", "encoder_decoder"),
        ("sort", "decoder_only"),
        ("reverse", "encoder_only"),
        ("dates", "encoder_decoder"),
        ("dates", "decoder_only"),
    ],
)
def test_smoke_train_and_evaluate(tmp_path, task, kind):
    result = run(tiny_config(task, kind), str(tmp_path), progress=False)
    assert result["step"] == 4
    for name in ("eval/loss", "eval/token_accuracy", "eval/exact_match"):
        assert np.isfinite(result[name])
    assert 0.0 <= result["eval/token_accuracy"] <= 1.0
    lines = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "accuracy"} <= set(lines[0])
    assert [line["step"] for line in lines if "eval/exact_match" in line] == [2, 4]
    assert (tmp_path / "config.json").exists()
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


# Crash and resume, bit for bit: tests/test_reliability.py (SIGKILL at 4 points).


# Every config field's invalid value: tests/test_reliability.py (the config sweep).


def test_encoder_only_refuses_a_task_of_other_length(tmp_path):
    with pytest.raises(ValueError, match=r"config.model.kind: 'encoder_only' predicts one output"):
        run(tiny_config("dates", "encoder_only"), str(tmp_path / "r"))


def test_incompatible_checkpoint_stops_and_overwrites_nothing(tmp_path):
    run(tiny_config(steps=2), str(tmp_path), progress=False)
    before = {p: (tmp_path / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
    config = tiny_config(steps=2).unlock()
    config.model.d_model = 32
    with pytest.raises(ValueError, match=r"workdir: .* incompatible config \(model.d_model"):
        run(config, str(tmp_path), progress=False)
    assert before == {p: (tmp_path / p).read_bytes() for p in before}


def test_train_step_compiles_once():
    config = tiny_config()
    task, mcfg = train.check_config(config)
    graphdef, params = train.init_model(mcfg, jax.random.key(0, impl="rbg"))
    trainer = train.Trainer(graphdef, train.make_optimizer(config.train), 0.1, True)
    step = jax.jit(chex.assert_max_traces(trainer.train_step, n=1))
    state = trainer.init_state(params)
    for i in range(3):
        mb = train.model_batch(mcfg.kind, tasks.train_batch(task, 0, i, 8))
        state, _ = step(state, mb, jax.random.key(1, impl="rbg"))
    assert int(state["step"]) == 3


def test_command_line_rejects_a_mistyped_key(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'copy.py')}",
            f"--workdir={tmp_path / 'run'}",
            "--config.train.stepz=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()
